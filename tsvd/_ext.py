"""Loader of the compiled extension ``tsvd._C`` (filled in by the extension work)."""
from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401
    _ERR = None
except ImportError as e:  # not built
    _C = None
    _ERR = e


def available(device: torch.device) -> bool:
    return False


def build_info() -> dict:
    return {"built": _C is not None, "error": None if _ERR is None else str(_ERR)}
