"""``pissa``: PiSSA (Meng et al. 2024) from HuggingFace PEFT (``LoraConfig(init_lora_weights=
"pissa")``): per target layer ``W = P Σ Qᵀ`` (SVD), ``B = P_r Σ_r^½``, ``A = Σ_r^½ Q_rᵀ``
train, the residual ``W - B A`` is frozen in the layer's weight; scaling 1 (``alpha = rank``),
so the output is unchanged at start up to float rounding. Same layers and ranks as
:mod:`tsvd.peft.methods.lora` (:mod:`tsvd.peft.methods.hf`; the fused ``qkv`` takes the top
``r'`` triplets of the fused matrix). Tensors added per target layer ``T``:
``T.lora_A.default.weight (r', in)``, ``T.lora_B.default.weight (out, r')``.

Update scale. ``A`` and ``B`` are made from the pre-trained weights (entries about
``sqrt(σ / n)``), so at one shared rate Adam would change them by a large fraction of their
size per step (as LoRA-PT's U, S, V; see :mod:`tsvd.peft.methods.lorapt`). HF's layers
cannot be reparametrised from outside, so the fix is per-group learning rates: one group per
target group and factor (``adapter:<group>.A``, ``adapter:<group>.B``) at ``FACTOR_RATE ×
adapter_lr × rms(F₀)``, ``rms(F₀)`` over that group's factors when the adapter was installed.
"""
from __future__ import annotations

from . import register
from .base import factor_groups
from .hf import HFLoraMethod, factor_scales


@register
class PiSSA(HFLoraMethod):
    name = "pissa"
    summary = ("PiSSA (HF PEFT): per target layer the top-rank singular values/vectors train as "
               "B A, the residual is frozen.")
    options = {
        "rank": (8, "rank per matrix (fused qkv: see tsvd.peft.methods.hf)"),
        "train_bias": (False, "also train the adapted layers' biases"),
    }
    init_lora_weights = "pissa"

    def install(self):
        super().install()
        self.factors = {
            f"{g}.{k}": [self.names_of(t.name)[k] for t in gp.targets]
            for g, gp in self.plan.group_plans.items() for k in ("A", "B")}
        self.factor_scale = factor_scales(self.model, self.factors)

    def param_groups(self, params, adapter_lr, weight_decay):
        return factor_groups(params, self.factors, self.factor_scale, adapter_lr, weight_decay)

    def frozen_tensors(self):
        """The residual weights ``W - B A`` of each target group: one ``(n, n1, n2)`` tensor
        per target layer."""
        return {g: [self.model.get_submodule(t.name).weight.detach().reshape(t.n, t.n1, t.n2)
                    for t in gp.targets] for g, gp in self.plan.group_plans.items()}
