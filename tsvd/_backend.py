"""Which implementation runs: the compiled extension ``tsvd._C`` or the PyTorch reference.

``tsvd.backend(op, tensor)`` answers for one call before it is made;
``tsvd.last_backend(op)`` tells which one the last call of ``op`` used;
``with tsvd.use_backend("reference"):`` forces one (``"auto"``, ``"compiled"``,
``"reference"``).
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch

_state = threading.local()
_last: dict[str, str] = {}
_VALID = ("auto", "compiled", "reference")

#: ops that have compiled kernels (the rest are always the reference)
COMPILED_OPS = ("treconstruct", "tprod", "tsvd")


def _ext():
    try:
        from . import _ext as ext  # noqa: WPS433
    except ImportError:  # pragma: no cover - only when the package itself is broken
        return None
    return ext


def compiled_available(device="cpu") -> bool:
    """True when ``tsvd._C`` was built and has kernels for ``device`` (``"cpu"``/``"cuda"``)."""
    ext = _ext()
    return bool(ext is not None and ext.available(torch.device(device)))


def build_info() -> dict:
    """What the extension was built with (empty when it is not built)."""
    ext = _ext()
    return ext.build_info() if ext is not None else {}


def get_backend() -> str:
    return getattr(_state, "mode", None) or os.environ.get("TSVD_BACKEND", "auto")


@contextlib.contextmanager
def use_backend(mode: str):
    """Force ``"compiled"`` or ``"reference"`` (or ``"auto"``) inside a ``with`` block."""
    if mode not in _VALID:
        raise ValueError(f"mode: expected one of {_VALID}, got {mode!r}")
    old = getattr(_state, "mode", None)
    _state.mode = mode
    try:
        yield
    finally:
        _state.mode = old


def choose(op: str, device: torch.device, *, eligible: bool = True) -> str:
    """Decide the backend of one call. ``eligible`` is False for inputs the kernels do not
    cover (e.g. a non-FFT transform): then the reference runs, even in "compiled" mode."""
    mode = get_backend()
    if mode not in _VALID:
        raise ValueError(f"TSVD_BACKEND: expected one of {_VALID}, got {mode!r}")
    has = op in COMPILED_OPS and eligible and compiled_available(device)
    if mode == "compiled" and op in COMPILED_OPS and eligible and not has:
        raise RuntimeError(
            f"tsvd: backend 'compiled' was requested for {op} on {device}, but tsvd._C has no "
            f"kernels for that device (build_info: {build_info()})")
    return "compiled" if (has and mode != "reference") else "reference"


def record(op: str, which: str) -> str:
    _last[op] = which
    return which


def last_backend(op: str) -> str | None:
    """Backend used by the most recent call of ``op`` in this process (None if never called)."""
    return _last.get(op)


def backend(op: str, tensor: torch.Tensor | None = None) -> str:
    """Backend that a call of ``op`` on ``tensor``'s device would use now."""
    dev = tensor.device if tensor is not None else torch.device("cpu")
    return choose(op, dev)
