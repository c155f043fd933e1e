"""``lora``: LoRA (Hu et al. 2021) from HuggingFace PEFT (``LoraConfig(init_lora_weights=True)``:
``A`` Kaiming-uniform, ``B = 0``, so the output is unchanged at start; ``y = x Wᵀ + b +
(alpha / r) x Aᵀ Bᵀ``) on the layers LoRA-PT stacks. Ranks of fused layers (``qkv``) and the
parameter counts: :mod:`tsvd.peft.methods.hf`. Tensors added per target layer ``T``:
``T.lora_A.default.weight (r', in)``, ``T.lora_B.default.weight (out, r')``.

Learning rate: one group ``"adapter"`` at ``adapter_lr`` (``B`` starts at zero and ``A`` has a
fixed scale, so Adam's per-entry step already is a small relative change of ``W``).
"""
from __future__ import annotations

from . import register
from .hf import HFLoraMethod


@register
class LoRA(HFLoraMethod):
    name = "lora"
    summary = ("LoRA (HF PEFT): frozen W, trainable B A per target layer (B = 0 at start), "
               "scaling alpha / rank.")
    options = {
        "rank": (8, "rank per matrix (fused qkv: see tsvd.peft.methods.hf)"),
        "alpha": (None, "scaling numerator (scaling = alpha / rank; default: rank)"),
        "train_bias": (False, "also train the adapted layers' biases"),
    }
    init_lora_weights = True
