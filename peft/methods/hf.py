"""The HF PEFT side of ``lora``, ``pissa`` and ``dora``: thin wrappers over HuggingFace PEFT's
``LoraConfig`` / ``LoraModel`` applied in place to the layers LoRA-PT stacks.

How it is applied. ``peft.LoraModel(model, LoraConfig(target_modules=[the target layers' full
names], ...), "default")`` replaces each target ``nn.Linear`` by HF's ``lora.Linear`` inside
the caller's model (the model object stays the same and ``model(x)`` works unchanged; the
``LoraModel`` wrapper is kept by the adapter only to merge). Merging is HF's
``merge_and_unload()``, which puts the original ``nn.Linear`` back with the merged weight.
``lora_dropout=0``, ``bias="none"``; HF's ``modules_to_save`` is not used (it refuses UNETR's
decoder blocks): :class:`tsvd.peft.Adapter` sets the non-adapter parameters trainable itself.

Ranks and parameter counts. LoRA-PT and the per-matrix view treat MONAI's fused ``qkv``
(``3h × h``) as three ``h × h`` matrices; HF adapts it as **one** matrix. A rank-``r``
adapter on each of the ``n`` row blocks ``(n1 × n2)`` of a layer has ``n·r·(n1 + n2)``
parameters; HF's single pair on the whole ``(n·n1) × n2`` layer has ``r'·(n·n1 + n2)``. We set,
through ``rank_pattern``,

    r' = round_half_up(n · r · (n1 + n2) / (n · n1 + n2))

(``= r`` for a plain layer; ``1.5 r`` for ``qkv`` with ``n1 = n2 = h``: 12 at r = 8, 6 at
r = 4, 2 at r = 1), which gives exactly the per-matrix count when ``3r/2`` is whole (even
``r``) and the next integer above it otherwise (r = 1: 8h instead of 6h on ``qkv``). LoRA's
scaling ``alpha / r`` is kept the same on every layer through ``alpha_pattern``
(``alpha' = alpha · r' / r``). The adapter counts then equal LoRA-PT's U and V at the same
rank (LoRA-PT adds ``n3·r`` singular values per group; DoRA adds one magnitude per output row).
PiSSA on the fused ``qkv`` takes the top ``r'`` singular triplets of the fused matrix (not the
top ``r`` of q, k, v separately).

HF PEFT is imported lazily (:func:`hf_peft`), so ``tsvd.peft`` with ``lorapt``, ``full`` and
``decoder`` works without it. HF's package is also named ``peft``; when the repository root is
on ``sys.path`` (``python -m pytest`` from the checkout), ``import peft`` would find this
repository's ``peft/`` folder (and ``python bench/peft.py`` would find that script), so
:func:`hf_peft` takes the first *package* named ``peft`` on ``sys.path`` that is not this
repository's folder nor another tsvd checkout's (a git worktree or a second clone on the path).
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import re
import sys
from pathlib import Path

from torch import nn

from .base import Method

__all__ = ["hf_peft", "HFLoraMethod", "fused_rank", "factor_scales"]

_OURS = Path(__file__).resolve().parents[1]          # this repository's peft/ folder
_MIN_VERSION = (0, 13)
_ADAPTER = "default"


def _version_tuple(v: str) -> tuple:
    out = []
    for part in v.split(".")[:2]:
        m = re.match(r"\d+", part)
        out.append(int(m.group()) if m else 0)
    return tuple(out)


def _is_ours(folder: Path) -> bool:
    """``folder`` is this repository's ``peft/`` or that of another checkout of tsvd (a git
    worktree, a second clone on ``sys.path``)."""
    return folder == _OURS or ((folder / "adapter.py").is_file()
                               and (folder / "methods" / "hf.py").is_file())


def hf_peft():
    """HuggingFace's ``peft`` module (imported on first use).

    Raises:
        ImportError: naming the package to install when HF PEFT is missing or too old, or
            when the module already imported as ``peft`` is this repository's folder.
    """
    mod = sys.modules.get("peft")
    if mod is None:
        spec = None
        for p in sys.path:          # the first package named peft that is not our folder
            try:
                s = importlib.machinery.PathFinder.find_spec("peft", [p])
            except (OSError, ImportError):
                continue
            if s is None or s.loader is None or not s.submodule_search_locations or \
                    _is_ours(Path(s.origin or p).resolve().parent):
                continue            # not a package (e.g. bench/peft.py), or a tsvd checkout's
            spec = s
            break
        if spec is None:
            raise ImportError("methods lora, pissa and dora need HuggingFace PEFT: "
                              "pip install 'peft>=0.13' (or tsvd[peft])")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["peft"] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            sys.modules.pop("peft", None)
            raise
    if not hasattr(mod, "LoraConfig") or not hasattr(mod, "LoraModel"):
        raise ImportError(f"the module imported as 'peft' ({getattr(mod, '__file__', mod)}) is "
                          "not HuggingFace PEFT; methods lora, pissa and dora need it "
                          "(pip install 'peft>=0.13')")
    ver = getattr(mod, "__version__", "0")
    if _version_tuple(ver) < _MIN_VERSION:
        raise ImportError(f"methods lora, pissa and dora need HuggingFace PEFT >= "
                          f"{'.'.join(map(str, _MIN_VERSION))}, found {ver}")
    return mod


def fused_rank(r: int, n: int, n1: int, n2: int) -> int:
    """HF rank of a layer made of ``n`` row blocks ``(n1, n2)`` with the parameter count of
    rank ``r`` per block (module docstring)."""
    x = n * r * (n1 + n2) / (n * n1 + n2)
    return max(1, int(x + 0.5))


class HFLoraMethod(Method):
    """Shared by ``lora``, ``pissa``, ``dora``: subclasses set ``init_lora_weights``,
    ``use_dora`` and ``options``."""

    init_lora_weights = True
    use_dora = False
    uses_targets = True

    @classmethod
    def validate(cls, cfg):
        if "alpha" in cfg:
            a = cfg["alpha"]
            if a is None:
                a = float(cfg["rank"])
            elif isinstance(a, bool) or not isinstance(a, (int, float)) or not a > 0 \
                    or a == float("inf"):
                raise ValueError(f"alpha: expected a positive finite number, got {a!r}")
            cfg["alpha"] = float(a)

    @classmethod
    def _alpha(cls, cfg) -> float:
        return cfg.get("alpha", float(cfg["rank"]))

    @classmethod
    def layer_ranks(cls, cfg, plan) -> dict:
        """``{target name: HF rank}``."""
        return {t.name: fused_rank(cfg["rank"], t.n, t.n1, t.n2) for t in plan.targets()}

    @classmethod
    def plan(cls, model, cfg):
        plan = super().plan(model, cfg)
        r = cfg["rank"]
        limit = None
        for t in plan.targets():
            rmax = min(t.n1, t.n2)
            while rmax > 0 and fused_rank(rmax, t.n, t.n1, t.n2) > min(t.n * t.n1, t.n2):
                rmax -= 1
            if limit is None or rmax < limit[0]:
                limit = (rmax, t)
        if limit is not None and r > limit[0]:
            rmax, t = limit
            raise ValueError(
                f"rank: expected 1 <= rank <= {rmax} for this model, got {r} (layer {t.name}: "
                f"{t.n} matrices of {t.n1}x{t.n2}, HF rank {fused_rank(r, t.n, t.n1, t.n2)} of "
                f"its {t.n * t.n1}x{t.n2} weight)")
        return plan

    @classmethod
    def names_of(cls, target: str) -> dict:
        out = {"A": f"{target}.lora_A.{_ADAPTER}.weight", "B": f"{target}.lora_B.{_ADAPTER}.weight"}
        if cls.use_dora:
            out["m"] = f"{target}.lora_magnitude_vector.{_ADAPTER}.weight"
        return out

    @classmethod
    def bias_name(cls, target):
        return target + ".base_layer.bias"

    @classmethod
    def adapter_shapes(cls, model, cfg, plan):
        out = {}
        ranks = cls.layer_ranks(cfg, plan)
        for t in plan.targets():
            nm, rr, n_out = cls.names_of(t.name), ranks[t.name], t.n * t.n1
            out[nm["A"]] = (rr, t.n2)
            out[nm["B"]] = (n_out, rr)
            if "m" in nm:
                out[nm["m"]] = (n_out,)
        return {**out, **cls.trained_biases(cfg, plan)}

    def install(self):
        hf = hf_peft()
        cfg, plan = self.config, self.plan
        ranks = self.layer_ranks(cfg, plan)
        r, alpha = cfg["rank"], self._alpha(cfg)
        fused = {n: rr for n, rr in ranks.items() if rr != r}
        config = hf.LoraConfig(
            r=r, lora_alpha=alpha, target_modules=[t.name for t in plan.targets()],
            rank_pattern={re.escape(n): rr for n, rr in fused.items()},
            alpha_pattern={re.escape(n): alpha * rr / r for n, rr in fused.items()},
            lora_dropout=0.0, bias="none", init_lora_weights=self.init_lora_weights,
            use_dora=self.use_dora)
        self.tuner = hf.LoraModel(self.model, config, _ADAPTER)
        self.adapter_names = [v for t in plan.targets() for v in self.names_of(t.name).values()]
        missing = sorted(set(self.adapter_names) - {n for n, _ in self.model.named_parameters()})
        if missing:
            raise RuntimeError(f"HF PEFT did not create the expected tensors: {missing[:5]}")

    def frozen_tensors(self):
        return {}

    def merge(self):
        self.tuner.merge_and_unload()
        bad = [t.name for t in self.plan.targets()
               if type(self.model.get_submodule(t.name)) is not nn.Linear]
        if bad:
            raise RuntimeError(f"HF PEFT merge_and_unload left adapter layers: {bad[:5]}")
        del self.tuner


def factor_scales(model, names: dict) -> dict:
    """``{label: rms}`` of the parameters ``names[label]`` taken together."""
    params = dict(model.named_parameters())
    out = {}
    for label, ns in names.items():
        num = sum(float(params[n].detach().double().pow(2).sum()) for n in ns)
        cnt = sum(params[n].numel() for n in ns)
        out[label] = (num / cnt) ** 0.5 if num > 0 else 1.0
    return out

