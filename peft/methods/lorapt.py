"""``lorapt``: LoRA-PT (He et al., arXiv 2407.11292), ours, on :mod:`tsvd`'s t-SVD.

Install: each target group's ``n3`` weight matrices (default: attention q, k, v, out of every
block; MLP up; MLP down) are stacked into ``X (n3, n1, n2)``; the truncated t-SVD
``U (n3, n1, r)``, ``S (n3, r)``, ``V (n3, n2, r)`` (:func:`tsvd.tsvd`, ``transform`` fft or
dct) splits ``X = R + U * fdiag(S) * Vᵀ``; ``R`` is a frozen buffer, ``U``, ``S`` (option
``train_s``) and ``V`` train, and every adapted layer becomes a
:class:`~tsvd.peft.lorapt.TSVDLinear` viewing one rebuilt buffer per group (see
:mod:`tsvd.peft.lorapt`). Tensors added: ``tsvd_lorapt.<group>.{U,S,V}`` (``S`` is saved even
when frozen), buffer ``tsvd_lorapt.<group>.residual`` (not saved: recomputed from the base).

Update scale (issue 12). Adam moves every entry of a parameter by about its learning rate per
step, whatever the entry's size. U and V have orthonormal-like columns (entries about
``1/sqrt(n3 n1)``) and S holds singular values (order 1-100), so at a rate that suits LoRA's
``B`` (zero at start, fixed-scale ``A``) or the CNN decoder, U and V change by tens of percent
of their own size per step and the stacked weights drift by more than their own norm within a
few steps (measured before this fix: ‖ΔW‖/‖W‖ ≈ 1.08 after 6 steps at lr 5e-3; LoRA 0.017).
The fix is a per-factor learning rate: each factor ``F`` (``U``, ``S``, ``V`` of each group)
gets its own optimizer group at ``FACTOR_RATE × adapter_lr × rms(F₀)`` (``F₀``: the factor
when the adapter was installed), so one step changes every factor by about
``FACTOR_RATE × adapter_lr`` *relative to its own size*. Under Adam (invariant to a constant
rescaling of a parameter's gradient), this is exactly training the unit-scale factor
``F / rms(F₀)`` at ``FACTOR_RATE × adapter_lr``; we chose the rate over a reparametrization
because it keeps U, S, V (and the adapter files) in their natural units and the fused
``treconstruct`` kernel unchanged. ``FACTOR_RATE = 3`` is measured, not derived: with it,
6 Adam steps at lr 5e-3 (one rate for everything, cross-entropy on random labels, the
transformer's targets only) move the adapted transformer weights by ‖ΔW‖/‖W‖ =

============================ ======== ======= ======= =======
UNETR preset, rank            lorapt   lora    pissa   dora
============================ ======== ======= ======= =======
``cpu`` (hidden 192), r = 8   0.030    0.056   0.023   0.061
``tiny`` (hidden 48), r = 4   0.043    0.039   0.034   0.048
============================ ======== ======= ======= =======

while one shared rate for the factors gives lorapt 0.83 / 0.48 and pissa 0.12 / 0.087
(cpu / tiny). ``tests/test_peft.py::test_update_scale_is_comparable_across_methods`` checks
the factor of 3 on the tiny preset.
"""
from __future__ import annotations

import torch

import tsvd

from ..lorapt import LoRAPTContainer, TSVDGroup, TSVDLinear
from ..targets import resolve
from . import register
from .base import Method, factor_groups, plain_linear, replace_module, rms

CONTAINER = "tsvd_lorapt"


@register
class LoRAPT(Method):
    name = "lorapt"
    summary = ("LoRA-PT: truncated t-SVD of the stacked transformer weights (attention q/k/v/out, "
               "MLP up, MLP down); the principal U, S, V train, the residual is frozen.")
    options = {
        "rank": (8, "t-SVD truncation rank (per Fourier-domain slice)"),
        "train_s": (True, "train the singular tubes S (else a frozen buffer)"),
        "train_bias": (False, "also train the adapted layers' biases"),
        "transform": ("fft", "transform along the tubes: 'fft' or 'dct'"),
        "svd_method": ("full", "t-SVD algorithm: 'full' (deterministic), 'randomized' or 'auto'"),
    }
    uses_targets = True

    @classmethod
    def validate(cls, cfg):
        if cfg["transform"] not in ("fft", "dct"):
            raise ValueError(f"transform: expected 'fft' or 'dct', got {cfg['transform']!r}")
        if cfg["svd_method"] not in ("full", "randomized", "auto"):
            raise ValueError("svd_method: expected 'full', 'randomized' or 'auto', got "
                             f"{cfg['svd_method']!r}")

    @classmethod
    def plan(cls, model, cfg):
        plan = resolve(model, groups=cfg["groups"], blocks=cfg["blocks"], encoder=cfg["encoder"],
                       need_equal_shapes=True)
        r = cfg["rank"]
        for gp in plan.group_plans.values():
            (n1, n2), = gp.slice_shapes
            if r > min(n1, n2):
                raise ValueError(f"rank: expected 1 <= rank <= min(n1, n2) = {min(n1, n2)} for "
                                 f"the {n1}x{n2} matrices of group {gp.name!r}, got {r}")
        return plan

    @classmethod
    def adapter_shapes(cls, model, cfg, plan):
        out, r = {}, cfg["rank"]
        for g, gp in plan.group_plans.items():
            (n1, n2), = gp.slice_shapes
            out[f"{CONTAINER}.{g}.U"] = (gp.n3, n1, r)
            out[f"{CONTAINER}.{g}.S"] = (gp.n3, r)
            out[f"{CONTAINER}.{g}.V"] = (gp.n3, n2, r)
        return {**out, **cls.trained_biases(cfg, plan)}

    def install(self):
        model, cfg, plan = self.model, self.config, self.plan
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
                replace_module(model, t.name, TSVDLinear(group, i, t.n2, t.n * t.n1, m.bias))
        model.add_module(CONTAINER, container)
        model.register_forward_pre_hook(container.pre_forward)
        self.adapter_names = [f"{CONTAINER}.{g}.{p}" for g in plan.group_plans for p in "USV"]
        #: rms of every factor at install time (its per-factor learning rate's scale)
        self.factor_scale = {f"{CONTAINER}.{g}.{p}": rms(getattr(container[g], p))
                             for g in plan.group_plans for p in "USV"}

    def trainable_adapter_names(self):
        return [n for n in self.adapter_names
                if not (n.endswith(".S") and not self.config["train_s"])]

    def param_groups(self, params, adapter_lr, weight_decay):
        """One group per factor (``adapter:tsvd_lorapt.<group>.<U|S|V>``) at
        ``FACTOR_RATE × adapter_lr × rms(F₀)`` (module docstring)."""
        return factor_groups(params, {n: [n] for n in self.adapter_names}, self.factor_scale,
                             adapter_lr, weight_decay)

    def frozen_tensors(self):
        c = getattr(self.model, CONTAINER)
        return {g: c[g].residual for g in self.plan.group_plans}

    def invalidate(self):
        for g in getattr(self.model, CONTAINER).values():
            g.invalidate()

    def merge(self):
        model = self.model
        container = getattr(model, CONTAINER)
        with torch.no_grad():
            for g, gp in self.plan.group_plans.items():
                for t, w in zip(gp.targets, container[g].weights()):
                    replace_module(model, t.name, plain_linear(w, model.get_submodule(t.name).bias))
        # remove the hook by identity (a deep-copied model's hook is bound to its own container)
        for k, fn in list(model._forward_pre_hooks.items()):
            if getattr(fn, "__self__", None) is container:
                del model._forward_pre_hooks[k]
        del model._modules[CONTAINER]
