"""Loading and saving UNETR checkpoints in the formats found in the field, safely.

Loading never unpickles arbitrary Python objects: ``.pt``/``.pth``/``.ckpt`` files are
read with ``torch.load(..., weights_only=True)`` and ``.safetensors`` files with
safetensors (the format is sniffed from the file's first bytes, not its suffix).

Handled:

- a bare state dict, or one wrapped as ``{"state_dict": ...}``, ``{"model": ...}``,
  ``{"model_state_dict": ...}``, ``{"net": ...}`` (nested wrappers too; other entries
  such as ``"epoch"`` or ``"optimizer"`` are ignored);
- prefixes added by wrappers: ``module.`` (DataParallel / DDP), ``_orig_mod.``
  (``torch.compile``), ``model.`` (Lightning), stripped when every key has them and the
  model has no such top-level name;
- MONAI-version key differences: checkpoints written by MONAI <= 1.3 lack the
  ``norm_cross_attn`` LayerNorm that MONAI 1.4 added to every ``TransformerBlock``
  (unused unless the block has cross-attention: it keeps the model's initial values), and
  checkpoints from newer MONAI carry it when loaded into an older MONAI (dropped);
- an output head with a different number of classes (keys under ``head``, default
  ``"out"``, whose shapes differ): re-initialised with the module's ``reset_parameters``
  and reported.

Anything else that does not fit raises ``ValueError`` listing the keys (and shapes).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

__all__ = ["LoadReport", "load_pretrained", "read_state_dict", "save_checkpoint",
           "atomic_write"]

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module",
                 "weights")
_PREFIXES = ("module.", "_orig_mod.", "model.")
# keys that exist in one MONAI version's TransformerBlock and not in another's
_VERSION_KEY = re.compile(r"(^|\.)norm_cross_attn\.(weight|bias)$")


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did.

    Attributes:
        loaded: model keys whose values came from the checkpoint.
        missing: model keys not in the checkpoint (kept at the model's current values).
        unexpected: checkpoint keys the model does not have (ignored).
        reinitialised: head keys whose shapes differed (re-initialised).
        version_keys: the subset of ``missing`` + ``unexpected`` explained by MONAI-version
            differences (harmless: the layers are unused).
        mismatched: ``{key: (checkpoint shape, model shape)}`` outside the head (only when
            ``strict_shapes=False``; those keys keep the model's values).
        source_format: ``"bare"`` or the wrapper key(s) unwrapped, e.g. ``"state_dict"``.
        stripped_prefix: the key prefix removed (``""`` if none).
    """
    loaded: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    reinitialised: list = field(default_factory=list)
    version_keys: list = field(default_factory=list)
    mismatched: dict = field(default_factory=dict)
    source_format: str = "bare"
    stripped_prefix: str = ""

    @property
    def clean(self) -> bool:
        """True when every model key was loaded except harmless MONAI-version keys."""
        real_missing = [k for k in self.missing if k not in self.version_keys]
        real_unexp = [k for k in self.unexpected if k not in self.version_keys]
        return not (real_missing or real_unexp or self.reinitialised or self.mismatched)

    def __str__(self) -> str:
        vk = set(self.version_keys)
        lines = [f"loaded {len(self.loaded)} tensors (format: {self.source_format}"
                 + (f", stripped prefix {self.stripped_prefix!r}" if self.stripped_prefix else "")
                 + ")"]
        nm = [k for k in self.missing if k not in vk]
        nu = [k for k in self.unexpected if k not in vk]
        if vk:
            lines.append(f"{len(vk)} MONAI-version keys (unused layers, harmless): "
                         + _short(sorted(vk)))
        if nm:
            lines.append(f"{len(nm)} missing (kept initial values): " + _short(nm))
        if nu:
            lines.append(f"{len(nu)} unexpected (ignored): " + _short(nu))
        if self.reinitialised:
            lines.append(f"{len(self.reinitialised)} head tensors re-initialised (different "
                         "number of classes): " + _short(self.reinitialised))
        if self.mismatched:
            lines.append(f"{len(self.mismatched)} shape mismatches (kept initial values): "
                         + _short([f"{k} {tuple(a)} vs {tuple(b)}"
                                   for k, (a, b) in self.mismatched.items()]))
        return "\n".join(lines)


def _short(items, n=6) -> str:
    items = list(items)
    s = ", ".join(items[:n])
    return s + (f", ... (+{len(items) - n})" if len(items) > n else "")


# --------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------
def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < n < (1 << 31)


def _read_file(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"source: no such checkpoint file: {path}")
    if _is_safetensors(path):
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"source: {path} is not a readable safetensors file "
                             f"(truncated or corrupted?): {e}") from e
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():          # not a forbidden object: a broken file
            raise ValueError(f"source: {path} is not a readable PyTorch checkpoint "
                             f"(truncated or corrupted?): {e}") from e
        raise ValueError(
            f"source: {path} contains Python objects other than tensors and plain "
            "containers; tsvd refuses to unpickle arbitrary objects (torch.load with "
            "weights_only=True). Re-save it as a plain state dict (torch.save(model."
            f"state_dict(), path)) or as safetensors. Details: {e}") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"source: {path} is not a readable PyTorch checkpoint "
                         f"(truncated or corrupted?): {e}") from e


def _unwrap(obj, what: str):
    fmt = []
    while True:
        if not isinstance(obj, Mapping):
            raise ValueError(f"{what}: expected a state dict (a mapping of names to tensors), "
                             f"got {type(obj).__name__}")
        inner = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if inner is not None and len(tensors) <= len(obj) // 2:
            fmt.append(inner)
            obj = obj[inner]
            continue
        if not tensors:
            raise ValueError(f"{what}: no tensors found; top-level keys: "
                             + _short([str(k) for k in obj.keys()], 10))
        return {str(k): v for k, v in tensors.items()}, ("/".join(fmt) or "bare")


def read_state_dict(source) -> tuple[dict, str]:
    """Read a checkpoint into a flat ``{name: tensor}`` dict (wrappers removed).

    Args:
        source: a path (``.pt``/``.pth``/``.ckpt``/``.safetensors``) or a mapping.
    Returns:
        ``(state_dict, format)`` where format names the wrapper(s) removed, or ``"bare"``.
    """
    if isinstance(source, (str, os.PathLike)):
        obj = _read_file(Path(source))
        what = f"source ({source})"
    elif isinstance(source, Mapping):
        obj, what = source, "source"
    else:
        raise TypeError(f"source: expected a path or a state dict, got {type(source).__name__}")
    return _unwrap(obj, what)


def _strip_prefixes(sd: dict, model_keys) -> tuple[dict, str]:
    stripped = ""
    changed = True
    while changed and sd:
        changed = False
        for p in _PREFIXES:
            if all(k.startswith(p) for k in sd) and not any(k.startswith(p) for k in model_keys):
                sd = {k[len(p):]: v for k, v in sd.items()}
                stripped += p
                changed = True
    return sd, stripped


def _benign_version_key(model: nn.Module, key: str) -> bool:
    """A ``norm_cross_attn`` key of a block without cross-attention (unused either way)."""
    if not _VERSION_KEY.search(key):
        return False
    owner = key.rsplit(".norm_cross_attn.", 1)[0] if ".norm_cross_attn." in key else ""
    try:
        block = model.get_submodule(owner) if owner else model
    except AttributeError:
        return True          # the model (older MONAI) has no such block attribute at all
    return not getattr(block, "with_cross_attention", False)


def load_pretrained(model: nn.Module, source, *, strict_shapes: bool = True,
                    strict: bool = True, head: str = "out") -> LoadReport:
    """Load pre-trained weights into ``model`` (in place), tolerant of the usual differences.

    Args:
        model: the network, e.g. from :func:`tsvd.models.build_unetr`.
        source: a checkpoint path or a state dict (see the module docstring for formats).
        strict_shapes: raise ``ValueError`` on a shape mismatch outside the head
            (else those tensors keep the model's values and are reported).
        strict: raise ``ValueError`` on missing or unexpected keys that are not explained
            by MONAI-version differences (else they are reported).
        head: name prefix of the output head; its tensors may differ in shape (another
            number of classes) and are then re-initialised.
    Returns:
        a :class:`LoadReport`; ``str(report)`` is a summary.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    sd, fmt = read_state_dict(source)
    model_sd = model.state_dict()
    sd, prefix = _strip_prefixes(sd, model_sd.keys())
    rep = LoadReport(source_format=fmt, stripped_prefix=prefix)

    head_p = head.rstrip(".") + "." if head else None
    mismatched, load = {}, {}
    for k, v in sd.items():
        if k not in model_sd:
            rep.unexpected.append(k)
            if _benign_version_key(model, k):
                rep.version_keys.append(k)
            continue
        if tuple(v.shape) != tuple(model_sd[k].shape):
            if head_p and k.startswith(head_p):
                rep.reinitialised.append(k)
            else:
                mismatched[k] = (tuple(v.shape), tuple(model_sd[k].shape))
            continue
        load[k] = v
    for k in model_sd:
        if k not in sd:
            rep.missing.append(k)
            if _benign_version_key(model, k):
                rep.version_keys.append(k)

    if not load:
        raise ValueError(
            f"source: none of the checkpoint's {len(sd)} tensors fits the model "
            f"(checkpoint keys: {_short(sorted(sd), 4)}; model keys: "
            f"{_short(list(model_sd), 4)}); is this a checkpoint of this network?")
    if mismatched and strict_shapes:
        lines = [f"  {k}: checkpoint {a} vs model {b}" for k, (a, b) in mismatched.items()]
        more = f"\n  ... (+{len(lines) - 20})" if len(lines) > 20 else ""
        raise ValueError(f"source: {len(mismatched)} tensors have the wrong shape for this "
                         "model (a checkpoint of another configuration?):\n"
                         + "\n".join(lines[:20]) + more)
    vk = set(rep.version_keys)
    real_missing = [k for k in rep.missing if k not in vk and k not in mismatched
                    and k not in rep.reinitialised]
    real_unexp = [k for k in rep.unexpected if k not in vk]
    if strict and (real_missing or real_unexp):
        raise ValueError(
            "source: the checkpoint's keys do not match the model's: "
            + (f"{len(real_missing)} missing ({_short(real_missing, 10)})" if real_missing else "")
            + ("; " if real_missing and real_unexp else "")
            + (f"{len(real_unexp)} unexpected ({_short(real_unexp, 10)})" if real_unexp else "")
            + ". Pass strict=False to load the rest anyway.")
    rep.mismatched = mismatched
    rep.missing = [k for k in rep.missing if k not in rep.reinitialised and k not in mismatched]

    with torch.no_grad():
        model.load_state_dict(load, strict=False)
        done = set()
        for k in rep.reinitialised:
            owner = k.rsplit(".", 1)[0]
            if owner in done:
                continue
            done.add(owner)
            mod = model.get_submodule(owner)
            if hasattr(mod, "reset_parameters"):
                mod.reset_parameters()
    rep.loaded = sorted(load)
    return rep


# --------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------
_TMP_TAG = ".tsvdtmp"


def file_sha256(path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB chunks."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def remove_stale_temporaries(folder) -> list:
    """Delete the temporary files that :func:`atomic_write` left in ``folder`` (not
    recursive) when its process was killed mid-write; returns their paths. Only names of the
    form ``.NAME.XXXX.tsvdtmp...`` are touched."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        if p.name.startswith(".") and _TMP_TAG in p.name and p.is_file():
            p.unlink(missing_ok=True)
            out.append(p)
    return out


def atomic_write(path, write_fn) -> Path:
    """Write ``path`` atomically: ``write_fn(tmp_path)`` writes a temporary file in the same
    folder, which then replaces ``path`` with ``os.replace``; on failure the temporary file
    is removed and an existing ``path`` is left untouched."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"path: folder {parent} does not exist")
    # the temporary name keeps the target's suffixes (writers such as nibabel pick the format
    # from them) and is recognised by remove_stale_temporaries()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_TAG + "".join(path.suffixes),
                               dir=parent)
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _plain_state(sd: Mapping) -> dict:
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"model_or_state_dict: entry {k!r} is a {type(v).__name__}, "
                            "expected a tensor")
        out[str(k)] = v.detach().cpu().contiguous().clone()
    return out


def save_checkpoint(model_or_state_dict, path, *, meta: dict | None = None) -> Path:
    """Save a state dict atomically (temp file + ``os.replace``).

    Args:
        model_or_state_dict: an ``nn.Module`` (its ``state_dict()``) or a mapping of tensors.
        path: ``*.safetensors`` (meta stored as JSON in the header under ``"tsvd_meta"``)
            or anything else for ``torch.save({"state_dict": ..., "meta": ...})`` (loadable
            with ``weights_only=True``).
        meta: a JSON-serialisable dict (e.g. the preset and training options).
    Returns:
        the path written.
    """
    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) \
        else model_or_state_dict
    if not isinstance(sd, Mapping):
        raise TypeError("model_or_state_dict: expected an nn.Module or a mapping of tensors, got "
                        f"{type(model_or_state_dict).__name__}")
    sd = _plain_state(sd)
    try:
        meta_json = json.dumps(meta if meta is not None else {})
    except TypeError as e:
        raise TypeError(f"meta: expected a JSON-serialisable dict: {e}") from e
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        return atomic_write(path, lambda tmp: save_file(sd, tmp, metadata={
            "format": "pt", "tsvd_meta": meta_json}))
    payload = {"state_dict": sd, "meta": json.loads(meta_json)}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))
