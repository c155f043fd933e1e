"""``tsvd.peft.adapt``: the adapter handle, save / load / merge, fingerprints (method-independent).

``adapt(model, method, **options)`` changes ``model`` in place and returns an :class:`Adapter`;
``model(x)`` is used as before. The methods (``lorapt``, ``lora``, ``pissa``, ``dora``, ``full``,
``decoder``) live in :mod:`tsvd.peft.methods`, one file each, with their options
(:func:`tsvd.peft.describe_method`). Options every method takes:

- ``train_decoder`` (default True): also train every parameter outside the transformer encoder
  (UNETR: ``encoder1..4``, ``decoder2..5``, ``out``), as in the paper.
- ``groups``, ``blocks``, ``encoder``: which layers (see :mod:`tsvd.peft.targets`); every
  adapter method acts on the layers LoRA-PT stacks.

Method-specific: ``rank`` (lorapt/lora/pissa/dora, default 8), ``alpha`` (lora/dora, default
rank), ``train_bias`` (lorapt/lora/pissa/dora, default False), ``train_s``, ``transform``,
``svd_method`` (lorapt).

Learning rates: :meth:`Adapter.param_groups` gives the optimizer groups: the trained
non-adapter parameters (``"other"``) at ``lr``, the adapter tensors at rates derived from
``adapter_lr`` (default: ``adapter_lr = lr``) by the method (``lora``/``dora``: ``adapter_lr``
itself; ``lorapt``/``pissa``: ``FACTOR_RATE × adapter_lr × rms`` of each factor at install, see
:mod:`tsvd.peft.methods.lorapt`).

Adapter files (safetensors): only ``adapter.state_dict()`` (adapter tensors plus trained
non-adapter parameters) and, in the header's ``"tsvd_peft"`` entry, a JSON object: method,
options, a small fingerprint of the base weights the adapter was made from (per slice
``aᵀ W_i b`` for fixed random vectors a, b, and ``‖W_i‖_F``), the same for the frozen tensors
the method made from them, the base checkpoint's path and SHA-256 when given, and a SHA-256
over the tensors **and every other header entry**, so an edited header (another transform,
``train_s`` flipped, the fingerprint dropped) is refused as a corrupted file. Loading onto
the wrong base model is an error.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import warnings
from pathlib import Path

import torch
from torch import nn

import tsvd

from .methods import METHODS, get_method
from .methods.base import Method

__all__ = ["METHODS", "Adapter", "adapt", "load_adapter", "read_adapter_meta", "get_adapter",
           "FORMAT_VERSION"]

log = logging.getLogger(__name__)

#: 2: the checksum covers the header's options and fingerprints;
#: 3: it covers every header entry; lora/pissa/dora tensors are HF PEFT's
FORMAT_VERSION = 3
_META_KEY = "tsvd_peft"
_ATTR = "_tsvd_peft_adapter"
_SKETCH_TOL = 1e-4
_SUM_KEY = "sha256"


# --------------------------------------------------------------------------------------
# fingerprints of the frozen base weights
# --------------------------------------------------------------------------------------
def _probe(n, seed, device):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=torch.float64).to(device)


def _sketch_slices(W3: torch.Tensor):
    """``W3 (k, n1, n2)`` -> (``[aᵀ W_i b]``, ``[‖W_i‖_F]``) as float lists."""
    k, n1, n2 = W3.shape
    a = _probe(n1, 1000003 * n1 + n2, W3.device)
    b = _probe(n2, 7919 * n2 + n1 + 1, W3.device)
    Wd = W3.detach().to(torch.float64)
    s = torch.einsum("i,kij,j->k", a, Wd, b)
    f = torch.linalg.matrix_norm(Wd)
    return s.cpu().tolist(), f.cpu().tolist()


def _sketch_tensors(ts) -> dict:
    """A ``(k, n1, n2)`` tensor or a list of them -> ``{"s": [...], "fro": [...]}``."""
    s, f = [], []
    for t in (ts if isinstance(ts, (list, tuple)) else [ts]):
        ss, ff = _sketch_slices(t)
        s += ss
        f += ff
    return {"s": s, "fro": f}


def _sketch_plan(model, plan) -> dict:
    """Fingerprint of the target layers' weights, per group."""
    return {g: _sketch_tensors([model.get_submodule(t.name).weight.detach()
                                .reshape(t.n, t.n1, t.n2) for t in gp.targets])
            for g, gp in plan.group_plans.items()}


def _compare_sketch(saved: dict, now: dict, what: str) -> list:
    bad = []
    for g, d in saved.items():
        if g not in now or len(now[g]["s"]) != len(d["s"]):
            bad.append(f"{g}: missing")
            continue
        for i, (a, b, f) in enumerate(zip(d["s"], now[g]["s"], d["fro"])):
            if not math.isfinite(b) or abs(a - b) > _SKETCH_TOL * max(f, 1e-30):
                bad.append(f"{g}[{i}]: {what} fingerprint {b:.6g}, adapter says {a:.6g}")
                break
    return bad


# --------------------------------------------------------------------------------------
# the handle
# --------------------------------------------------------------------------------------
def get_adapter(model: nn.Module):
    """The :class:`Adapter` attached to ``model`` by :func:`adapt`, or None."""
    return getattr(model, _ATTR, None)


def _check_rate(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{name}: expected a positive finite number, got {v!r}")


class Adapter:
    """Handle of an adapted model (returned by :func:`adapt`; see the module docstring).

    Attributes:
        model: the adapted model (changed in place).
        method: the method's name; ``impl`` the installed method object
            (:class:`tsvd.peft.methods.Method`).
        config: the resolved options (JSON-serialisable).
        plan: the target layers (:class:`tsvd.peft.targets.Plan`, or None).
    """

    def __init__(self, model: nn.Module, impl: Method, other_names: list):
        self.model = model
        self.impl = impl
        self.method = impl.name
        self.config = impl.config
        self.plan = impl.plan
        self.merged = False
        self._other_names = list(other_names)

    # -- names -------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list:
        """Names (in the adapted model) of the tensors the method added, trained or not."""
        return list(self.impl.adapter_names)

    @property
    def other_names(self) -> list:
        """Names of the trained non-adapter parameters (decoder, head, adapted layers' biases)."""
        return list(self._other_names)

    def _tensor_map(self) -> dict:
        return {**dict(self.model.named_buffers()), **dict(self.model.named_parameters())}

    def _check_live(self):
        if self.merged:
            raise RuntimeError("adapter: it was merged into the model and no longer exists")

    # -- parameters ----------------------------------------------------------------------
    def named_trainable_parameters(self) -> dict:
        """``{name: nn.Parameter}`` of everything the optimizer should get."""
        self._check_live()
        params = dict(self.model.named_parameters())
        return {n: params[n] for n in self.impl.adapter_names + self._other_names
                if n in params and params[n].requires_grad}

    def trainable_parameters(self) -> list:
        return list(self.named_trainable_parameters().values())

    def param_groups(self, lr: float, adapter_lr: float | None = None,
                     weight_decay: float = 0.0) -> list:
        """Optimizer parameter groups (dicts with ``params``, ``lr``, ``weight_decay``,
        ``name``), covering :meth:`trainable_parameters` once.

        Args:
            lr: rate of the trained non-adapter parameters (group ``"other"``: UNETR's CNN
                encoder/decoder and head; the adapted layers' biases with ``train_bias``).
            adapter_lr: the adapter's rate (default ``lr``); the method derives its groups'
                rates from it: ``lora``/``dora`` one group ``"adapter"`` at ``adapter_lr``;
                ``lorapt`` one group per factor ``adapter:tsvd_lorapt.<group>.<U|S|V>`` and
                ``pissa`` per group and factor ``adapter:<group>.<A|B>``, at ``FACTOR_RATE ×
                adapter_lr × rms`` of the factor when installed (why:
                :mod:`tsvd.peft.methods.lorapt`).
            weight_decay: put in every group.
        """
        self._check_live()
        _check_rate("lr", lr)
        if adapter_lr is not None:
            _check_rate("adapter_lr", adapter_lr)
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or \
                not (weight_decay >= 0 and math.isfinite(weight_decay)):
            raise ValueError(f"weight_decay: expected a finite number >= 0, got {weight_decay!r}")
        alr = float(lr if adapter_lr is None else adapter_lr)
        tp = self.named_trainable_parameters()
        adapter = {n: tp[n] for n in self.impl.adapter_names if n in tp}
        groups = self.impl.param_groups(adapter, alr, float(weight_decay))
        other = [tp[n] for n in self._other_names if n in tp]
        if other:
            groups.append({"params": other, "lr": float(lr), "weight_decay": float(weight_decay),
                           "name": "other"})
        got = sorted(id(p) for g in groups for p in g["params"])
        if got != sorted(id(p) for p in tp.values()):
            raise RuntimeError(f"internal: method {self.method!r} grouped its parameters wrongly")
        return groups

    def num_trainable(self) -> dict:
        """``{"adapter", "other", "total", "model_total"}`` parameter counts; ``model_total`` is
        the base model's parameter count before adapting (the same for every method)."""
        tp = self.named_trainable_parameters()
        names = set(self.impl.adapter_names)
        a = sum(p.numel() for n, p in tp.items() if n in names)
        o = sum(p.numel() for n, p in tp.items() if n not in names)
        return {"adapter": a, "other": o, "total": a + o, "model_total": self._model_total}

    def print_trainable_parameters(self) -> str:
        """Print (as HF PEFT does), log at INFO and return the trainable-parameter line."""
        c = self.num_trainable()
        s = (f"{self.method}: trainable params: {c['total']:,} (adapter {c['adapter']:,} + other "
             f"{c['other']:,}) || all params: {c['model_total']:,} || trainable%: "
             f"{100.0 * c['total'] / max(c['model_total'], 1):.4f}")
        log.info(s)
        print(s)
        return s

    # -- state ---------------------------------------------------------------------------
    def expected_shapes(self) -> dict:
        tm = self._tensor_map()
        return {n: tuple(tm[n].shape) for n in self.impl.adapter_names + self._other_names}

    def state_dict(self) -> dict:
        """Only what the adapter changed: the method's tensors (``lorapt``: U, S, V of each
        group; ``lora``/``pissa``/``dora``: HF's ``lora_A``/``lora_B`` (and DoRA's magnitude) of
        each target layer) plus the trained non-adapter parameters. Tensors are detached (they
        share storage with the model)."""
        self._check_live()
        tm = self._tensor_map()
        return {n: tm[n].detach() for n in self.impl.adapter_names + self._other_names}

    def load_state_dict(self, state_dict: dict):
        """Copy ``state_dict`` (as from :meth:`state_dict`) into the model; every expected
        name must be there with its shape, else ``ValueError`` listing the differences."""
        self._check_live()
        exp = self.expected_shapes()
        _check_tensor_names(exp, {k: tuple(v.shape) for k, v in state_dict.items()}, "state_dict")
        tm = self._tensor_map()
        with torch.no_grad():
            for n in exp:
                tm[n].copy_(state_dict[n])
        self.impl.invalidate()

    def save(self, path, *, base_checkpoint=None) -> Path:
        """Write the adapter as safetensors (atomic: :func:`tsvd.models.atomic_write`).

        The header's metadata ``"tsvd_peft"`` is a JSON object with the method, the options,
        the base weights' fingerprint, ``base_checkpoint`` (path and SHA-256 of that file) when
        given, and a SHA-256 over the tensors and all those entries.
        """
        self._check_live()
        from safetensors.torch import save_file

        from tsvd.models import atomic_write
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}
        meta = {
            "format_version": FORMAT_VERSION, "method": self.method, "config": self.config,
            "base_sketch": self.base_sketch, "frozen_sketch": self.frozen_sketch,
            "num_trainable": self.num_trainable(), "model_class": type(self.model).__name__,
            "tsvd_version": tsvd.__version__, "torch_version": torch.__version__,
        }
        if base_checkpoint is not None:
            bp = Path(base_checkpoint)
            if not bp.is_file():
                raise FileNotFoundError(f"base_checkpoint: no such file: {bp}")
            meta["base_checkpoint"] = str(bp.resolve())
            meta["base_sha256"] = _file_sha256(bp)
        meta[_SUM_KEY] = _checksum(tensors, meta)
        header = {_META_KEY: json.dumps(meta), "format": "pt"}
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))

    # -- merge ---------------------------------------------------------------------------
    def merge(self) -> nn.Module:
        """Bake the adapter into plain ``nn.Linear`` weights and remove every adapter module,
        parameter, buffer and hook. The parameters' ``requires_grad`` flags are restored to
        what they were before :func:`adapt`. Returns the model (same object)."""
        self._check_live()
        with torch.no_grad():
            self.impl.merge()
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._orig_flags.get(n, True))
        object.__delattr__(self.model, _ATTR)
        self.merged = True
        return self.model

    def merged_copy(self) -> nn.Module:
        """A deep copy of the model with this adapter merged into plain weights (the model
        itself stays adapted): the weights the adapted model uses, e.g. for weight averaging
        with ``torch.optim.swa_utils.AveragedModel`` (for ``lorapt`` the rebuilt
        ``R + U * fdiag(S) * Vᵀ``, not the factors; for ``full``/``decoder`` a plain copy)."""
        self._check_live()
        self.impl.invalidate()                     # cached rebuilt weights are graph nodes
        twin = copy.deepcopy(self.model)
        return get_adapter(twin).merge()

    def __repr__(self):
        return f"Adapter(method={self.method!r}, config={self.config}, merged={self.merged})"


def adapt(model: nn.Module, method: str, **options) -> Adapter:
    """Adapt ``model`` in place for fine-tuning with ``method`` and return the handle.

    Args:
        model: e.g. a MONAI UNETR with its pre-trained weights loaded.
        method: one of :data:`tsvd.peft.METHODS`.
        options: see the module docstring and :func:`tsvd.peft.describe_method`; unknown
            options are an error.
    Returns:
        an :class:`Adapter`; ``model(x)`` is used as before.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    cls = get_method(method)
    cfg = cls.check_options(options)
    if get_adapter(model) is not None or hasattr(model, "peft_config"):
        raise ValueError("model: it is already adapted; merge() the adapter first or start from "
                         "a fresh model")
    plan = cls.plan(model, cfg)
    if plan is not None:
        cfg["blocks"], cfg["groups"], cfg["encoder"] = plan.blocks, plan.groups, plan.encoder
    orig_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model_total = sum(p.numel() for p in model.parameters())
    base_sketch = _sketch_plan(model, plan) if cls.uses_targets and plan is not None else {}
    other = cls.trainable_other(model, cfg, plan)
    if not other and not cls.adapter_shapes(model, cfg, plan):
        raise ValueError("options: nothing would be trained with these options")
    impl = cls.apply(model, cfg, plan)
    params = dict(model.named_parameters())
    other = [n for n in other if n in params] + \
        [n for n in cls.trained_biases(cfg, plan) if n in params]
    for p in model.parameters():
        p.requires_grad_(False)
    for n in impl.trainable_adapter_names():
        params[n].requires_grad_(True)
    for n in other:
        params[n].requires_grad_(True)
    adapter = Adapter(model, impl, other)
    adapter._orig_flags = orig_flags
    adapter._model_total = model_total
    adapter.base_sketch = base_sketch
    adapter.frozen_sketch = {g: _sketch_tensors(t) for g, t in impl.frozen_tensors().items()}
    object.__setattr__(model, _ATTR, adapter)
    return adapter


# --------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------
def _checksum(tensors: dict, meta: dict) -> str:
    """SHA-256 of every header entry but the checksum itself (canonical JSON) and of the
    tensors (names, dtypes, shapes, bytes), so that editing either is detected."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in meta.items() if k != _SUM_KEY},
                        sort_keys=True).encode())
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _file_sha256(path) -> str:
    from tsvd.models import file_sha256
    return file_sha256(path)


def _check_tensor_names(expected: dict, got: dict, what: str):
    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    wrong = [f"{k}: {what} {tuple(got[k])} vs model {tuple(expected[k])}"
             for k in expected if k in got and tuple(got[k]) != tuple(expected[k])]
    if missing or extra or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} shape mismatch(es):\n  " + "\n  ".join(wrong[:20]))
        if missing:
            parts.append(f"{len(missing)} missing: {missing[:10]}")
        if extra:
            parts.append(f"{len(extra)} unexpected: {extra[:10]}")
        raise ValueError(f"{what}: does not fit this model (an adapter of another model?): "
                         + "; ".join(parts))


def _open(path):
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no such adapter file: {path}")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:
        raise ValueError(f"path: {path} is not a readable safetensors file (truncated or "
                         f"corrupted?): {e}") from e


def read_adapter_meta(path) -> dict:
    """The metadata of an adapter file without loading its tensors (not yet checked against
    its checksum: :func:`load_adapter` does that).

    Returns:
        a dict with ``method``, ``config`` (the options; also as ``options``), ``format_version``,
        ``base_checkpoint``/``base_sha256`` (if saved), ``num_trainable``, ``tensors``
        (``{name: shape}``), the fingerprints and ``sha256``.
    """
    with _open(path) as f:
        raw = f.metadata() or {}
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if _META_KEY not in raw:
        raise ValueError(f"path: {path} is a safetensors file but not a tsvd.peft adapter "
                         f"(no {_META_KEY!r} metadata)")
    try:
        meta = json.loads(raw[_META_KEY])
        method, config, version = meta["method"], meta["config"], meta.get("format_version", 0)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"path: the adapter metadata of {path} is corrupted: {e}") from e
    if not isinstance(version, int) or version < FORMAT_VERSION:
        raise ValueError(f"path: {path} is an adapter of format {version!r}, written by an older "
                         f"tsvd (its header is not fully covered by its checksum, and lora/pissa "
                         f"tensors were not HF PEFT's); this tsvd reads format {FORMAT_VERSION}: "
                         "re-train it, or re-save it with the tsvd version that wrote it after "
                         "merging")
    if version > FORMAT_VERSION:
        raise ValueError(f"path: adapter format {version} is newer than this tsvd "
                         f"({FORMAT_VERSION}); upgrade tsvd")
    if method not in METHODS or not isinstance(config, dict):
        raise ValueError(f"path: the adapter metadata of {path} names an unknown method "
                         f"{method!r} (this tsvd has {list(METHODS)})")
    meta["tensors"] = shapes
    meta["options"] = meta["config"]            # alias (the options adapt() was called with)
    return meta


def load_adapter(model: nn.Module, path, *, check_base: bool = True) -> Adapter:
    """Adapt ``model`` (a base model, pre-trained weights loaded) with the options saved in
    ``path`` and load the adapter's tensors.

    Everything is checked before the model is touched: the file's integrity (SHA-256 over the
    tensors and the header), that its tensors' names and shapes fit this model (mismatches are
    listed with both shapes), and, with ``check_base``, that the model's frozen weights are the
    ones the adapter was made from (fingerprint).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    meta = read_adapter_meta(path)
    if get_adapter(model) is not None or hasattr(model, "peft_config"):
        raise ValueError("model: it is already adapted; load the adapter into a base model")
    with _open(path) as f:
        try:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise ValueError(f"path: {path} is truncated or corrupted: {e}") from e
        header = json.loads(f.metadata()[_META_KEY])          # as saved, before read_adapter_meta
    if _checksum(tensors, header) != meta.get(_SUM_KEY):
        raise ValueError(f"path: {path} is corrupted or was edited: its tensors or header "
                         "(method, options, base fingerprint, ...) do not match the SHA-256 "
                         "recorded when it was saved")
    cls = get_method(meta["method"])
    try:
        cfg = cls.check_options(dict(meta["config"]))
        plan = cls.plan(model, cfg)
    except (ValueError, TypeError) as e:
        raise ValueError(f"path: the adapter {path} does not fit this model: {e}") from e
    expected = dict(cls.adapter_shapes(model, cfg, plan))
    params = dict(model.named_parameters())
    for n in cls.trainable_other(model, cfg, plan):
        expected[n] = tuple(params[n].shape)
    _check_tensor_names(expected, meta["tensors"], f"adapter file {path}")
    if check_base and meta.get("base_sketch") and plan is not None:
        bad = _compare_sketch(meta["base_sketch"], _sketch_plan(model, plan), "base weights'")
        if bad:
            where = f" (made from {meta['base_checkpoint']})" if meta.get("base_checkpoint") \
                else ""
            raise ValueError(
                "model: its weights are not the ones this adapter was trained on" + where
                + "; load the same pre-trained checkpoint first. First differences: "
                + "; ".join(bad[:3]))
    adapter = adapt(model, cls.name, **cfg)
    adapter.load_state_dict(tensors)
    if check_base and meta.get("frozen_sketch"):
        bad = _compare_sketch(meta["frozen_sketch"], adapter.frozen_sketch, "residual")
        if bad:
            warnings.warn("load_adapter: the recomputed frozen residual differs from the one "
                          "at training time beyond float rounding (a different SVD backend or "
                          "device?): " + "; ".join(bad[:3]), RuntimeWarning, stacklevel=2)
    return adapter
