"""The fine-tuning methods of :func:`tsvd.peft.adapt`: one class per method, one file each.

``METHODS`` (the registry's names, in registration order) is the one list of methods; the CLI's
choices come from it. A method class (subclass of :class:`~tsvd.peft.methods.base.Method`)
declares its options with their defaults, validates them, says which layers it acts on,
installs itself on a model (:meth:`~tsvd.peft.methods.base.Method.apply`), names the tensors it
adds, groups them for the optimizer with their learning rates, merges itself back into plain
weights, and describes itself in one line. :class:`tsvd.peft.Adapter` does the rest
(parameter bookkeeping, files, fingerprints) without knowing which method it holds.

Adding a method: write one file here with a :class:`Method` subclass decorated by
:func:`register`, and import it at the bottom of this file.

========== ==================================================================================
``lorapt`` LoRA-PT (ours): truncated t-SVD of three stacked weight tensors, U, S, V trained
``lora``   HF PEFT LoRA (``LoraConfig(init_lora_weights=True)``) on the same layers
``pissa``  HF PEFT PiSSA (``init_lora_weights="pissa"``) on the same layers
``dora``   HF PEFT DoRA (``use_dora=True``) on the same layers
``full``   every parameter trains
``decoder`` the transformer frozen, the rest (UNETR's CNN encoder/decoder and head) trains
========== ==================================================================================
"""
from __future__ import annotations

from .base import Method

__all__ = ["METHODS", "Method", "register", "get_method", "describe_method", "registry"]

_REGISTRY: dict[str, type] = {}
#: the method names, in registration order (rebuilt by :func:`register`)
METHODS: tuple = ()


def register(cls: type) -> type:
    """Class decorator: add a :class:`Method` subclass to the registry under ``cls.name``."""
    global METHODS
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"cls: expected a subclass of tsvd.peft.methods.Method, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"cls.name: expected an identifier, got {name!r}")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"cls.name: method {name!r} is already registered "
                         f"({_REGISTRY[name].__module__}.{_REGISTRY[name].__qualname__})")
    _REGISTRY[name] = cls
    METHODS = tuple(_REGISTRY)
    return cls


def registry() -> dict:
    """``{name: method class}`` (a copy)."""
    return dict(_REGISTRY)


def get_method(name: str) -> type:
    """The method class registered as ``name``; ``ValueError`` naming the choices otherwise."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"method: expected one of {list(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name]


def describe_method(name: str) -> str:
    """One paragraph of help on method ``name``: what trains, its options and defaults."""
    return get_method(name).describe()


# registration order = the order of METHODS
from . import lorapt, lora, pissa, dora, full, decoder  # noqa: E402,F401

