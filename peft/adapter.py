"""``tsvd.peft.adapt``: LoRA-PT and the baselines, the adapter handle, save / load / merge.

Methods (``adapt(model, method, **options)``; the model is changed in place):

========== ==================================================================================
``lorapt`` three stacked tensors (default groups: attention q/k/v/out, MLP up, MLP down), a
           truncated t-SVD of each; U, S, V trained, the residual frozen (see
           :mod:`tsvd.peft.lorapt`).
``lora``   frozen W, trainable ``B A`` per matrix (B = 0 at start), scaling ``alpha / rank``.
``pissa``  per matrix, the top-``rank`` singular values/vectors trained as ``B A``, residual
           frozen.
``full``   every parameter trained (``train_decoder=False``: the transformer encoder only).
``decoder`` transformer encoder frozen, the rest (UNETR's CNN encoder/decoder and head)
           trained: what the published LoRA-PT script really does.
========== ==================================================================================

Options (all JSON-serialisable; ``adapter.config`` holds the resolved values):

- ``train_decoder`` (all methods, default True): also train every parameter outside the
  transformer encoder (UNETR: ``encoder1..4``, ``decoder2..5``, ``out``), as in the paper.
- ``rank`` (lorapt/lora/pissa, default 8): t-SVD truncation / low-rank pair rank.
- ``groups``, ``blocks``, ``encoder``: which layers (see :mod:`tsvd.peft.targets`); LoRA and
  PiSSA act on exactly the matrices LoRA-PT stacks (q, k, v separately).
- ``train_s`` (lorapt, default True): train the singular tubes S (else a frozen buffer).
- ``train_bias`` (lorapt/lora/pissa, default False): also train the adapted layers' biases
  (the paper trains only U, S, V in the transformer; biases stay frozen by default).
- ``transform`` (lorapt, ``"fft"`` or ``"dct"``), ``svd_method`` (lorapt, ``"full"``,
  ``"randomized"`` or ``"auto"``: passed to :func:`tsvd.tsvd`; ``"full"`` is deterministic, so
  an adapter re-applied to the same base reproduces its residual exactly).
- ``alpha`` (lora, default = rank, i.e. scaling 1).

The adapter file stores only ``adapter.state_dict()`` (adapter tensors plus trained
non-adapter parameters) and, in the safetensors header, the options, a SHA-256 of the
tensors, and a small fingerprint of the base weights (per slice, ``aᵀ W_i b`` for fixed random
vectors a, b, and ``‖W_i‖_F``), so that loading onto the wrong base model is an error.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import warnings
from pathlib import Path

import torch
from torch import nn

import tsvd

from .lora import LowRankLinear
from .lorapt import LoRAPTContainer, TSVDGroup, TSVDLinear
from .targets import Plan, in_prefixes, resolve

__all__ = ["METHODS", "Adapter", "adapt", "load_adapter", "read_adapter_meta", "get_adapter"]

METHODS = ("lorapt", "lora", "pissa", "full", "decoder")
FORMAT_VERSION = 2          # 2: the checksum covers the header's options and fingerprints
_META_KEY = "tsvd_peft"
_CONTAINER = "tsvd_lorapt"
_ATTR = "_tsvd_peft_adapter"

_COMMON = {"train_decoder": True, "groups": None, "blocks": None, "encoder": None}
_DEFAULTS = {
    "lorapt": dict(_COMMON, rank=8, train_s=True, train_bias=False, transform="fft",
                   svd_method="full"),
    "lora": dict(_COMMON, rank=8, alpha=None, train_bias=False),
    "pissa": dict(_COMMON, rank=8, train_bias=False),
    "full": dict(_COMMON),
    "decoder": dict(_COMMON),
}
_SKETCH_TOL = 1e-4
#: multiplier of the per-factor rates of lorapt / pissa (see Adapter.param_groups)
FACTOR_RATE = 3.0


# --------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------
def _check_bool(name, v):
    if not isinstance(v, bool):
        raise TypeError(f"{name}: expected True or False, got {v!r}")


def _config(method, options) -> dict:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method: expected one of {list(METHODS)}, got {method!r}")
    allowed = _DEFAULTS[method]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"options: {method!r} has no option(s) {unknown}; its options are "
                        f"{sorted(allowed)}")
    cfg = dict(allowed)
    cfg.update(options)
    for k in ("train_decoder", "train_s", "train_bias"):
        if k in cfg:
            _check_bool(k, cfg[k])
    if "rank" in cfg:
        r = cfg["rank"]
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"rank: expected a positive int, got {r!r}")
    if method == "lora":
        a = cfg["alpha"]
        if a is None:
            cfg["alpha"] = float(cfg["rank"])
        elif isinstance(a, bool) or not isinstance(a, (int, float)) or not a > 0:
            raise ValueError(f"alpha: expected a positive number, got {a!r}")
        cfg["alpha"] = float(cfg["alpha"])
    if method == "lorapt":
        if cfg["transform"] not in ("fft", "dct"):
            raise ValueError(f"transform: expected 'fft' or 'dct', got {cfg['transform']!r}")
        if cfg["svd_method"] not in ("full", "randomized", "auto"):
            raise ValueError("svd_method: expected 'full', 'randomized' or 'auto', got "
                             f"{cfg['svd_method']!r}")
    if method == "decoder" and not cfg["train_decoder"]:
        raise ValueError("train_decoder: method 'decoder' trains only the decoder; "
                         "train_decoder=False would leave nothing to train")
    return cfg


def _plan(model, method, cfg) -> Plan | None:
    if method in ("lorapt", "lora", "pissa"):
        plan = resolve(model, groups=cfg["groups"], blocks=cfg["blocks"], encoder=cfg["encoder"],
                       need_equal_shapes=(method == "lorapt"))
        r = cfg["rank"]
        for gp in plan.group_plans.values():
            for n1, n2 in sorted(gp.slice_shapes):
                if r > min(n1, n2):
                    raise ValueError(f"rank: expected 1 <= rank <= min(n1, n2) = {min(n1, n2)} "
                                     f"for the {n1}x{n2} matrices of group {gp.name!r}, got {r}")
        return plan
    if method == "full" and cfg["train_decoder"] and cfg["encoder"] is None:
        try:
            return resolve(model, groups=cfg["groups"], blocks=cfg["blocks"])
        except ValueError:
            return None            # everything trains: no need to know the encoder
    return resolve(model, groups=cfg["groups"], blocks=cfg["blocks"], encoder=cfg["encoder"])


def _trainable_other(model, method, cfg, plan) -> list:
    """Names of the non-adapter parameters that train (same names before/after adapting)."""
    encoder = plan.encoder if plan is not None else []
    bias_names = set()
    if plan is not None and cfg.get("train_bias") and method in ("lorapt", "lora", "pissa"):
        bias_names = {t.name + ".bias" for t in plan.targets() if t.has_bias}
    target_w = {t.name + ".weight" for t in plan.targets()} if plan is not None else set()
    out = []
    for name, _ in model.named_parameters():
        in_enc = in_prefixes(name, encoder)
        if method == "full":
            ok = in_enc or cfg["train_decoder"]
        elif in_enc:
            ok = name in bias_names
        else:
            ok = cfg["train_decoder"]
        if ok and (method == "full" or name not in target_w):
            out.append(name)
    return out


def _adapter_shapes(method, cfg, plan) -> dict:
    """``{name: shape}`` of the adapter tensors that ``adapt`` creates."""
    out = {}
    r = cfg.get("rank")
    if method == "lorapt":
        for g, gp in plan.group_plans.items():
            (n1, n2), = gp.slice_shapes
            out[f"{_CONTAINER}.{g}.U"] = (gp.n3, n1, r)
            out[f"{_CONTAINER}.{g}.S"] = (gp.n3, r)
            out[f"{_CONTAINER}.{g}.V"] = (gp.n3, n2, r)
    elif method in ("lora", "pissa"):
        for t in plan.targets():
            out[f"{t.name}.lora_A"] = (t.n, r, t.n2)
            out[f"{t.name}.lora_B"] = (t.n, t.n1, r)
    return out


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


def _sketch_plan(model, plan) -> dict:
    out = {}
    for g, gp in plan.group_plans.items():
        s, f = [], []
        for t in gp.targets:
            w = model.get_submodule(t.name).weight
            ss, ff = _sketch_slices(w.detach().reshape(t.n, t.n1, t.n2))
            s += ss
            f += ff
        out[g] = {"s": s, "fro": f}
    return out


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


class Adapter:
    """Handle of an adapted model (returned by :func:`adapt`; see the module docstring)."""

    def __init__(self, model, method, config, plan):
        self.model = model
        self.method = method
        self.config = config
        self.plan = plan
        self.merged = False
        self._hook = None
        self._adapter_names: list = []
        self._other_names: list = []
        self._orig_flags = {n: p.requires_grad for n, p in model.named_parameters()}
        self._model_total = sum(p.numel() for p in model.parameters())
        self.base_sketch = _sketch_plan(model, plan) if method in ("lorapt", "lora", "pissa") \
            else {}
        self.frozen_sketch: dict = {}
        self._factor_scale: dict = {}        # adapter tensor name -> rms at adapt() time

    # -- installation -------------------------------------------------------------------
    def _replace(self, name, new):
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child, new)

    def _install(self):
        model, cfg, plan = self.model, self.config, self.plan
        other = _trainable_other(model, self.method, cfg, plan)
        if self.method == "lorapt":
            container = LoRAPTContainer()
            for g, gp in plan.group_plans.items():
                mods = [model.get_submodule(t.name) for t in gp.targets]
                with torch.no_grad():
                    X = torch.cat([m.weight.detach().reshape(t.n, t.n1, t.n2)
                                   for m, t in zip(mods, gp.targets)], 0)
                    U, S, V = tsvd.tsvd(X, cfg["rank"], transform=cfg["transform"],
                                        method=cfg["svd_method"])
                    R = X.sub_(tsvd.treconstruct(U, S, V, transform=cfg["transform"]))
                group = TSVDGroup(U.contiguous(), S.contiguous(), V.contiguous(), R,
                                  [t.n for t in gp.targets], transform=cfg["transform"],
                                  train_s=cfg["train_s"])
                container[g] = group
                for i, (m, t) in enumerate(zip(mods, gp.targets)):
                    self._replace(t.name, TSVDLinear(group, i, t.n2, t.n * t.n1, m.bias))
                self.frozen_sketch[g] = dict(zip(("s", "fro"), _sketch_slices(R)))
            model.add_module(_CONTAINER, container)
            self._hook = model.register_forward_pre_hook(container.pre_forward)
            self._adapter_names = [f"{_CONTAINER}.{g}.{p}" for g in plan.group_plans
                                   for p in ("U", "S", "V")]
        elif self.method in ("lora", "pissa"):
            for t in plan.targets():
                m = model.get_submodule(t.name)
                if self.method == "lora":
                    new = LowRankLinear.lora(m, t.n, cfg["rank"], cfg["alpha"])
                else:
                    new = LowRankLinear.pissa(m, t.n, cfg["rank"])
                self._replace(t.name, new)
                self._adapter_names += [f"{t.name}.lora_A", f"{t.name}.lora_B"]
            if self.method == "pissa":
                self.frozen_sketch = _sketch_plan(model, plan)
        params = dict(model.named_parameters())
        tensors = self._tensor_map()
        if self.method in ("lorapt", "pissa"):     # factors made from the pre-trained weights
            for n in self._adapter_names:
                t = tensors[n].detach()
                self._factor_scale[n] = float(t.double().pow(2).mean().sqrt()) or 1.0
        for p in model.parameters():
            p.requires_grad_(False)
        for n in self._adapter_names:
            if n in params and not (n.endswith(".S") and not cfg.get("train_s", True)):
                params[n].requires_grad_(True)
        missing = [n for n in self._adapter_names if n not in tensors]
        if missing:                                    # defensive: names are built above
            raise RuntimeError(f"internal: adapter tensors not found: {missing}")
        self._other_names = [n for n in other if n in params]
        for n in self._other_names:
            params[n].requires_grad_(True)
        if not self._adapter_names and not self._other_names:
            raise ValueError("options: nothing would be trained with these options")
        object.__setattr__(model, _ATTR, self)

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
        return {n: params[n] for n in self._adapter_names + self._other_names
                if n in params and params[n].requires_grad}

    def trainable_parameters(self) -> list:
        return list(self.named_trainable_parameters().values())

    def param_groups(self, lr: float, adapter_lr: float | None = None) -> list:
        """Optimizer parameter groups (dicts with ``params``, ``lr``, ``name``): the trained
        non-adapter parameters (``"other"``: UNETR's CNN encoder/decoder and head) at ``lr``,
        the adapter tensors at rates derived from ``adapter_lr`` (default ``lr``).

        Update scale. Adam moves every entry of a parameter by about its learning rate per
        step, whatever the entry's size. The factors of ``lorapt`` (U, S, V) and ``pissa``
        (A, B) are initialised from the pre-trained weights: U and V have entries of about
        1/sqrt(n1), S holds singular values. At one shared rate they would change by tens of
        percent of their own size per step (measured: the stacked weights moved by more than
        their own norm within 6 steps at lr 5e-3), while LoRA's B (zero at start, with A at
        its fixed Kaiming scale) moves W by a small fraction. So each such factor F gets its
        own group at ``FACTOR_RATE × adapter_lr × rms(F₀)`` (F₀: F when :func:`adapt` made
        it): one step changes every factor by about ``3 adapter_lr`` relative to its own size.
        Under Adam this is the same as training unit-scale factors ``F / rms(F₀)``.
        ``FACTOR_RATE = 3`` is measured, not derived: with it, 6 Adam steps at one rate move
        the adapted transformer weights by ‖ΔW‖/‖W‖ = 0.031 (lorapt), 0.052 (lora), 0.023
        (pissa) on the cpu-preset UNETR at rank 8 (without the per-factor rates: lorapt moved
        ~50x more than with them), so one rate means a comparable step for the three
        methods (a test checks a factor of 3 on the tiny preset). ``lora`` uses
        ``adapter_lr`` as given.
        """
        self._check_live()
        for n, v in (("lr", lr), ("adapter_lr", adapter_lr)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not (v > 0 and math.isfinite(v))):
                raise ValueError(f"{n}: expected a positive finite number, got {v!r}")
        alr = float(lr if adapter_lr is None else adapter_lr)
        tp = self.named_trainable_parameters()
        groups = []
        for n in self._adapter_names:
            if n not in tp:
                continue
            scale = FACTOR_RATE * self._factor_scale[n] if n in self._factor_scale else 1.0
            groups.append({"params": [tp[n]], "lr": alr * scale, "name": f"adapter:{n}"})
        other = [tp[n] for n in self._other_names if n in tp]
        if other:
            groups.append({"params": other, "lr": float(lr), "name": "other"})
        return groups

    def merged_copy(self) -> nn.Module:
        """A deep copy of the model with this adapter merged into plain weights (the model
        itself stays adapted): the weights the adapted model uses, e.g. for weight
        averaging (for ``lorapt`` the rebuilt ``R + U * fdiag(S) * Vᵀ``, not the factors)."""
        self._check_live()
        self._invalidate()                         # cached rebuilt weights are graph nodes
        twin = copy.deepcopy(self.model)
        twin_adapter = get_adapter(twin)
        if twin_adapter is None:                   # full / decoder: nothing installed
            return twin
        if twin_adapter._hook is not None:         # the copied handle points at our hooks
            container = getattr(twin, _CONTAINER)
            for k, fn in list(twin._forward_pre_hooks.items()):
                if getattr(fn, "__self__", None) is container:
                    del twin._forward_pre_hooks[k]
            twin_adapter._hook = None
        return twin_adapter.merge()

    def num_trainable(self) -> dict:
        """``{"adapter", "other", "total", "model_total"}`` parameter counts; ``model_total`` is
        the base model's parameter count before adapting (the same for every method)."""
        tp = self.named_trainable_parameters()
        a = sum(p.numel() for n, p in tp.items() if n in set(self._adapter_names))
        o = sum(p.numel() for n, p in tp.items() if n not in set(self._adapter_names))
        return {"adapter": a, "other": o, "total": a + o, "model_total": self._model_total}

    def print_trainable_parameters(self) -> str:
        c = self.num_trainable()
        s = (f"{self.method}: trainable {c['total']:,} = adapter {c['adapter']:,} + other "
             f"{c['other']:,} of {c['model_total']:,} base parameters "
             f"({100.0 * c['total'] / max(c['model_total'], 1):.3f}%)")
        print(s)
        return s

    # -- state ---------------------------------------------------------------------------
    def expected_shapes(self) -> dict:
        tm = self._tensor_map()
        return {n: tuple(tm[n].shape) for n in self._adapter_names + self._other_names}

    def state_dict(self) -> dict:
        """Only what the adapter changed: adapter tensors (LoRA-PT: U, S, V of each group;
        LoRA/PiSSA: ``lora_A``, ``lora_B``) plus the trained non-adapter parameters.
        Tensors are detached (they share storage with the model)."""
        self._check_live()
        tm = self._tensor_map()
        return {n: tm[n].detach() for n in self._adapter_names + self._other_names}

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
        self._invalidate()

    def _invalidate(self):
        if self.method == "lorapt" and hasattr(self.model, _CONTAINER):
            for g in getattr(self.model, _CONTAINER).values():
                g.invalidate()

    def save(self, path, *, base_checkpoint=None) -> Path:
        """Write the adapter as safetensors (atomic: temp file + ``os.replace``).

        The header's metadata ``"tsvd_peft"`` is a JSON object with the method, the options,
        the SHA-256 of the tensors, the base weights' fingerprint, and ``base_checkpoint``
        (path and SHA-256 of that file) when given.
        """
        self._check_live()
        from safetensors.torch import save_file

        from tsvd.models import atomic_write
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}
        meta = {
            "format_version": FORMAT_VERSION, "method": self.method, "config": self.config,
            "base_sketch": self.base_sketch,
            "frozen_sketch": self.frozen_sketch, "num_trainable": self.num_trainable(),
            "model_class": type(self.model).__name__, "tsvd_version": tsvd.__version__,
            "torch_version": torch.__version__,
        }
        if base_checkpoint is not None:
            bp = Path(base_checkpoint)
            if not bp.is_file():
                raise FileNotFoundError(f"base_checkpoint: no such file: {bp}")
            meta["base_checkpoint"] = str(bp.resolve())
            meta["base_sha256"] = _file_sha256(bp)
        meta["tensors_sha256"] = _tensors_sha256(tensors, _signed(meta))
        header = {_META_KEY: json.dumps(meta), "format": "pt"}
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))

    # -- merge ---------------------------------------------------------------------------
    def merge(self) -> nn.Module:
        """Bake the adapter into plain ``nn.Linear`` weights and remove every adapter module,
        parameter, buffer and hook. The parameters' ``requires_grad`` flags are restored to
        what they were before :func:`adapt`. Returns the model (same object)."""
        self._check_live()
        model = self.model
        with torch.no_grad():
            if self.method == "lorapt":
                container = getattr(model, _CONTAINER)
                for g, gp in self.plan.group_plans.items():
                    pieces = container[g].weights()
                    for t, w in zip(gp.targets, pieces):
                        old = model.get_submodule(t.name)
                        self._replace(t.name, _plain_linear(w, old.bias))
                if self._hook is not None:
                    self._hook.remove()
                del model._modules[_CONTAINER]
            elif self.method in ("lora", "pissa"):
                for t in self.plan.targets():
                    old = model.get_submodule(t.name)
                    self._replace(t.name, _plain_linear(old.weight + old.delta(), old.bias))
        for n, p in model.named_parameters():
            p.requires_grad_(self._orig_flags.get(n, True))
        object.__delattr__(model, _ATTR)
        self.merged = True
        return model

    def __repr__(self):
        return f"Adapter(method={self.method!r}, config={self.config}, merged={self.merged})"


def _plain_linear(weight: torch.Tensor, bias) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=False, device=weight.device, dtype=weight.dtype)
    lin.weight = nn.Parameter(weight.detach().clone())
    if bias is not None:
        lin.bias = bias
    return lin


def adapt(model: nn.Module, method: str, **options) -> Adapter:
    """Adapt ``model`` in place for fine-tuning with ``method`` and return the handle.

    Args:
        model: e.g. a MONAI UNETR with its pre-trained weights loaded.
        method: ``"lorapt"``, ``"lora"``, ``"pissa"``, ``"full"`` or ``"decoder"``.
        options: see the module docstring; unknown options are an error.
    Returns:
        an :class:`Adapter`; ``model(x)`` is used as before.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    cfg = _config(method, options)
    if get_adapter(model) is not None or hasattr(model, _CONTAINER):
        raise ValueError("model: it is already adapted; merge() the adapter first or start from "
                         "a fresh model")
    plan = _plan(model, method, cfg)
    if plan is not None:
        cfg["blocks"], cfg["groups"], cfg["encoder"] = plan.blocks, plan.groups, plan.encoder
    adapter = Adapter(model, method, cfg, plan)
    adapter._install()
    return adapter


# --------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------
#: header entries covered by the checksum (what changes how the adapter is applied or checked)
_SIGNED = ("format_version", "method", "config", "base_sketch", "frozen_sketch",
           "base_checkpoint", "base_sha256")


def _signed(meta: dict) -> dict:
    return {k: meta.get(k) for k in _SIGNED}


def _tensors_sha256(tensors: dict, header: dict | None = None) -> str:
    """SHA-256 of the tensors (names, dtypes, shapes, bytes) and of the signed header
    entries (canonical JSON), so that editing either is detected."""
    h = hashlib.sha256()
    if header is not None:
        h.update(json.dumps(header, sort_keys=True).encode())
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
    """The metadata of an adapter file without loading its tensors.

    Returns:
        a dict with ``method``, ``config`` (the options; also as ``options``), ``format_version``,
        ``base_checkpoint``/``base_sha256`` (if saved), ``num_trainable``, ``tensors``
        (``{name: shape}``) and the fingerprints.
    """
    with _open(path) as f:
        raw = f.metadata() or {}
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if _META_KEY not in raw:
        raise ValueError(f"path: {path} is a safetensors file but not a tsvd.peft adapter "
                         f"(no {_META_KEY!r} metadata)")
    try:
        meta = json.loads(raw[_META_KEY])
        method, config = meta["method"], meta["config"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"path: the adapter metadata of {path} is corrupted: {e}") from e
    if method not in METHODS or not isinstance(config, dict):
        raise ValueError(f"path: the adapter metadata of {path} names an unknown method "
                         f"{method!r}")
    if meta.get("format_version", 0) < FORMAT_VERSION:
        raise ValueError(f"path: {path} is an adapter of format {meta.get('format_version', 0)}, "
                         f"whose header is not covered by its checksum; this tsvd reads format "
                         f"{FORMAT_VERSION}: re-train or re-save it with this version")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"path: adapter format {meta['format_version']} is newer than this "
                         f"tsvd ({FORMAT_VERSION}); upgrade tsvd")
    meta["tensors"] = shapes
    meta["options"] = meta["config"]            # alias (the options adapt() was called with)
    return meta


def load_adapter(model: nn.Module, path, *, check_base: bool = True) -> Adapter:
    """Adapt ``model`` (a base model, pre-trained weights loaded) with the options saved in
    ``path`` and load the adapter's tensors.

    Everything is checked before the model is touched: the file's integrity (SHA-256), that
    its tensors' names and shapes fit this model (mismatches are listed with both shapes),
    and, with ``check_base``, that the model's frozen weights are the ones the adapter was
    made from (fingerprint).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    meta = read_adapter_meta(path)
    if get_adapter(model) is not None or hasattr(model, _CONTAINER):
        raise ValueError("model: it is already adapted; load the adapter into a base model")
    method = meta["method"]
    options = {k: v for k, v in meta["config"].items() if k in _DEFAULTS[method]}
    try:
        cfg = _config(method, options)
        plan = _plan(model, method, cfg)
    except ValueError as e:
        raise ValueError(f"path: the adapter {path} does not fit this model: {e}") from e
    expected = _adapter_shapes(method, cfg, plan)
    params = dict(model.named_parameters())
    for n in _trainable_other(model, method, cfg, plan):
        expected[n] = tuple(params[n].shape)
    _check_tensor_names(expected, meta["tensors"], f"adapter file {path}")
    with _open(path) as f:
        try:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise ValueError(f"path: {path} is truncated or corrupted: {e}") from e
    if _tensors_sha256(tensors, _signed(meta)) != meta.get("tensors_sha256"):
        raise ValueError(f"path: {path} is corrupted or was edited: its tensors or header "
                         "(method, options, base fingerprint) do not match the SHA-256 recorded "
                         "when it was saved")
    if check_base and meta.get("base_sketch") and plan is not None:
        bad = _compare_sketch(meta["base_sketch"], _sketch_plan(model, plan), "base weights'")
        if bad:
            where = f" (made from {meta['base_checkpoint']})" if meta.get("base_checkpoint") \
                else ""
            raise ValueError(
                "model: its weights are not the ones this adapter was trained on" + where
                + "; load the same pre-trained checkpoint first. First differences: "
                + "; ".join(bad[:3]))
    adapter = adapt(model, method, **{k: cfg[k] for k in _DEFAULTS[method]})
    adapter.load_state_dict(tensors)
    if check_base and meta.get("frozen_sketch"):
        bad = _compare_sketch(meta["frozen_sketch"], adapter.frozen_sketch, "residual")
        if bad:
            warnings.warn("load_adapter: the recomputed frozen residual differs from the one "
                          "at training time beyond float rounding (a different SVD backend or "
                          "device?): " + "; ".join(bad[:3]), RuntimeWarning, stacklevel=2)
    return adapter
