"""What the training loop and inference share: errors, device choice, the model of a config,
loading a base checkpoint, running MONAI transforms on one case, output folders.

Every function takes a :class:`~tsvd.peft.seg.config.RunConfig` (or parts of it) and uses
public names only.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import RunConfig
from .data import DataError, data_error_in

__all__ = ["RunError", "select_device", "patch_size", "build_model", "load_base", "plain",
           "apply_transforms", "check_out_dir", "write_bytes", "write_json"]


class RunError(ValueError):
    """A bad argument or an unusable file; the message names it."""


def select_device(spec: str | None) -> torch.device:
    """``"auto"`` (CUDA device ``LOCAL_RANK`` if any, else the CPU), ``"cpu"``, ``"cuda"``,
    ``"cuda:N"``; a CUDA device on a machine without one is a :class:`RunError`."""
    if spec in (None, "auto"):
        if torch.cuda.is_available():
            lr = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device(f"cuda:{lr % torch.cuda.device_count()}")
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise RunError(f"--device (train.device): expected auto, cpu, cuda or cuda:N, got "
                       f"{spec!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device (train.device): {spec!r} asked for, but CUDA is not available "
                       f"on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise RunError(f"--device (train.device): expected auto, cpu, cuda or cuda:N, got "
                       f"{spec!r}")
    return dev


def patch_size(cfg: RunConfig) -> list[int]:
    """The crop / sliding-window size: ``data.patch`` or the preset's input size."""
    if cfg.data.patch:
        return [int(cfg.data.patch)] * 3
    from tsvd.models import preset_kwargs
    return list(preset_kwargs(cfg.model.preset)["img_size"])


def build_model(cfg: RunConfig, out_channels: int = 2) -> torch.nn.Module:
    """MONAI UNETR of ``cfg.model`` (preset, dropout override)."""
    from tsvd.models import build_unetr
    over = {}
    if cfg.model.dropout is not None:
        over["dropout_rate"] = float(cfg.model.dropout)
    return build_unetr(cfg.model.preset, out_channels=out_channels, **over)


def load_base(model, path, log=None):
    """Load a pre-trained checkpoint into ``model``; errors are :class:`RunError` naming the
    file. Returns the load report."""
    from tsvd.models import load_pretrained
    try:
        rep = load_pretrained(model, str(path))
    except FileNotFoundError:
        raise RunError(f"{path}: checkpoint file not found") from None
    except (ValueError, RuntimeError, KeyError) as e:
        raise RunError(f"{path}: checkpoint does not fit this model: {e}") from None
    if log is not None:
        log(f"loaded {path}: {rep}")
    return rep


def plain(x) -> torch.Tensor:
    """A plain ``torch.Tensor`` view (MONAI's MetaTensor slows every op down)."""
    x = torch.as_tensor(x)
    return x.as_subclass(torch.Tensor) if type(x) is not torch.Tensor else x


def apply_transforms(comp, case: dict):
    """Run a MONAI ``Compose`` on one case; a :class:`DataError` anywhere in MONAI's wrapping
    is re-raised as is, anything else becomes a DataError naming the image file."""
    try:
        return comp(dict(case))
    except Exception as e:  # MONAI wraps errors in RuntimeError("applying transform ...")
        err = data_error_in(e)
        if err is not None:
            raise DataError(str(err)) from None
        raise DataError(f"{case['image']}: could not be loaded and preprocessed "
                        f"({type(e).__name__}: {e})") from e


def check_out_dir(out: Path, overwrite: bool, resume: bool = False) -> None:
    """An output folder may be new, empty, or replaced (``overwrite``) / continued
    (``resume``); anything else is a :class:`RunError` before any work starts."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"{out}: output path exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (overwrite or resume):
        raise RunError(f"{out}: output folder exists and is not empty (use --overwrite to "
                       f"replace its files, or --resume to continue the run in it)")


def write_bytes(path, data: bytes) -> Path:
    """Atomically write ``data`` to ``path`` (creating its folder) through
    :func:`tsvd.models.atomic_write`."""
    from tsvd.models import atomic_write
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_json(path, obj) -> Path:
    """Atomically write ``obj`` as indented JSON (NaN written as NaN, as Python's json)."""
    return write_bytes(path, json.dumps(obj, indent=1).encode())
