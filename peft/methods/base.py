"""The interface every fine-tuning method implements (see :mod:`tsvd.peft.methods`).

A method class has two sides:

- **class side** (no model change): ``options`` (its own options with default and help; the
  common ones are :data:`COMMON_OPTIONS`), :meth:`Method.check_options` (defaults + validation),
  :meth:`Method.plan` (which layers, :mod:`tsvd.peft.targets`), :meth:`Method.adapter_shapes`
  (names and shapes of the tensors it will add: lets :func:`tsvd.peft.load_adapter` check a
  file before touching the model), :meth:`Method.trainable_other` (the non-adapter parameters
  that train), :meth:`Method.describe`.
- **instance side** (one installed adapter): :meth:`Method.apply` installs it in place and
  returns the instance, which knows its ``adapter_names`` (state to save), which of them
  train, its optimizer groups (:meth:`Method.param_groups`), its frozen tensors (fingerprinted
  in the file) and how to :meth:`Method.merge` itself into plain ``nn.Linear`` weights.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..targets import Plan, in_prefixes, resolve

__all__ = ["Method", "COMMON_OPTIONS", "FACTOR_RATE", "rms", "check_bool", "check_rank",
           "replace_module", "plain_linear"]

#: multiplier of the per-factor learning rates of ``lorapt`` and ``pissa``
#: (see :meth:`Method.param_groups` and :mod:`tsvd.peft.methods.lorapt`)
FACTOR_RATE = 3.0

#: options every method takes: ``{name: (default, help)}``
COMMON_OPTIONS = {
    "train_decoder": (True, "also train every parameter outside the transformer encoder "
                            "(UNETR: encoder1..4, decoder2..5, out), as the paper does"),
    "groups": (None, "which layers: default group names or {name: [[path, n], ...]} "
                     "(tsvd.peft.targets)"),
    "blocks": (None, "path of the nn.ModuleList of transformer blocks (auto-detected)"),
    "encoder": (None, "name prefix(es) of the transformer encoder (default: the blocks' parent)"),
}


def check_bool(name, v):
    if not isinstance(v, bool):
        raise TypeError(f"{name}: expected True or False, got {v!r}")


def check_rank(r):
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"rank: expected a positive int, got {r!r}")


def rms(t: torch.Tensor) -> float:
    """Root mean square of ``t``'s entries (float64), 1.0 for an all-zero tensor."""
    return float(t.detach().double().pow(2).mean().sqrt()) or 1.0


def replace_module(model: nn.Module, name: str, new: nn.Module):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def plain_linear(weight: torch.Tensor, bias) -> nn.Linear:
    """An ``nn.Linear`` holding a copy of ``weight (out, in)`` and the given ``bias``."""
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=False, device=weight.device, dtype=weight.dtype)
    lin.weight = nn.Parameter(weight.detach().clone())
    if bias is not None:
        lin.bias = bias
    return lin


class Method:
    """Base class of the registered methods. Subclasses set ``name``, ``summary``,
    ``options`` and override what differs; the defaults suit a method that adds nothing."""

    #: registry key (``adapt(model, name)``)
    name: str = ""
    #: one line for help texts
    summary: str = ""
    #: the method's own options ``{name: (default, help)}`` (besides :data:`COMMON_OPTIONS`)
    options: dict = {}
    #: acts on the target layers (their base weights are fingerprinted in the adapter file)
    uses_targets: bool = False

    # ------------------------------------------------------------------ class side
    @classmethod
    def all_options(cls) -> dict:
        return {**COMMON_OPTIONS, **cls.options}

    @classmethod
    def defaults(cls) -> dict:
        return {k: v[0] for k, v in cls.all_options().items()}

    @classmethod
    def check_options(cls, options: dict) -> dict:
        """Defaults filled in and every value checked: unknown option -> ``TypeError``, bad
        value -> ``ValueError``/``TypeError`` naming the option. Returns the resolved config."""
        allowed = cls.defaults()
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise TypeError(f"options: {cls.name!r} has no option(s) {unknown}; its options are "
                            f"{sorted(allowed)}")
        cfg = dict(allowed)
        cfg.update(options)
        for k in ("train_decoder", "train_s", "train_bias"):
            if k in cfg:
                check_bool(k, cfg[k])
        if "rank" in cfg:
            check_rank(cfg["rank"])
        cls.validate(cfg)
        return cfg

    @classmethod
    def validate(cls, cfg: dict) -> None:
        """Method-specific checks of the resolved options (may normalise values in place)."""

    @classmethod
    def plan(cls, model: nn.Module, cfg: dict) -> Plan | None:
        """The target layers and the transformer encoder (:func:`tsvd.peft.targets.resolve`)."""
        return resolve(model, groups=cfg["groups"], blocks=cfg["blocks"], encoder=cfg["encoder"])

    @classmethod
    def adapter_shapes(cls, model: nn.Module, cfg: dict, plan: Plan | None) -> dict:
        """``{name: shape}`` of the tensors :meth:`apply` adds, and of the target layers'
        biases when they train (``train_bias``), under their names in the adapted model."""
        return {}

    @classmethod
    def bias_name(cls, target: str) -> str:
        """Name of a target layer's bias in the adapted model."""
        return target + ".bias"

    @classmethod
    def trained_biases(cls, cfg, plan) -> dict:
        if not cfg.get("train_bias") or plan is None:
            return {}
        return {cls.bias_name(t.name): (t.n * t.n1,) for t in plan.targets() if t.has_bias}

    @classmethod
    def trainable_other(cls, model: nn.Module, cfg: dict, plan: Plan | None) -> list:
        """Names of the base model's non-adapter parameters that train (the same names before
        and after :meth:`apply`): everything outside the transformer encoder when
        ``train_decoder``."""
        if not cfg["train_decoder"]:
            return []
        encoder = plan.encoder if plan is not None else []
        return [n for n, _ in model.named_parameters() if not in_prefixes(n, encoder)]

    @classmethod
    def describe(cls) -> str:
        """``name: summary`` and the options with their defaults."""
        opts = ", ".join(f"{k}={v[0]!r}" for k, v in cls.options.items())
        return f"{cls.name}: {cls.summary}" + (f" Options: {opts}." if opts else "")

    # ------------------------------------------------------------------ instance side
    def __init__(self, model: nn.Module, config: dict, plan: Plan | None):
        self.model = model
        self.config = config
        self.plan = plan
        #: names of the tensors the method added (saved by the adapter, trained or not)
        self.adapter_names: list = []

    @classmethod
    def apply(cls, model: nn.Module, config: dict, plan: Plan | None) -> "Method":
        """Install the method on ``model`` in place (``config`` from :meth:`check_options`,
        ``plan`` from :meth:`plan`) and return the installed instance."""
        inst = cls(model, config, plan)
        inst.install()
        return inst

    def install(self) -> None:
        """Change the model; fill ``adapter_names``."""

    def trainable_adapter_names(self) -> list:
        """The subset of ``adapter_names`` that trains."""
        return list(self.adapter_names)

    def param_groups(self, params: dict, adapter_lr: float, weight_decay: float) -> list:
        """Optimizer groups (dicts with ``params``, ``lr``, ``weight_decay``, ``name``) of the
        trained adapter tensors ``params`` (``{name: Parameter}``). Default: one group
        ``"adapter"`` at ``adapter_lr``."""
        ps = [params[n] for n in self.adapter_names if n in params]
        return [{"params": ps, "lr": adapter_lr, "weight_decay": weight_decay,
                 "name": "adapter"}] if ps else []

    def frozen_tensors(self) -> dict:
        """``{label: (k, n1, n2) tensor or a list of them}``: frozen tensors made from the base weights at install time
        (LoRA-PT's residuals, PiSSA's residual weights), fingerprinted in the adapter file."""
        return {}

    def invalidate(self) -> None:
        """Drop cached tensors computed from the trained ones (after they were changed)."""

    def merge(self) -> None:
        """Bake the adapter into plain ``nn.Linear`` weights; remove every module, parameter,
        buffer and hook the method added."""


def factor_groups(params: dict, factors: dict, scale: dict, adapter_lr: float,
                  weight_decay: float) -> list:
    """Groups of a method with per-factor learning rates: ``factors`` maps a group label to the
    parameter names it holds, ``scale`` the label to the factor's rms at install time; the
    group's rate is ``FACTOR_RATE * adapter_lr * scale``."""
    out = []
    for label, names in factors.items():
        ps = [params[n] for n in names if n in params]
        if ps:
            lr = FACTOR_RATE * adapter_lr * scale[label]
            if not math.isfinite(lr) or lr <= 0:
                raise ValueError(f"adapter_lr: the derived rate of {label} is {lr!r}")
            out.append({"params": ps, "lr": lr, "weight_decay": weight_decay,
                        "name": f"adapter:{label}"})
    return out
