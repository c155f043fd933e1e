"""``dora``: DoRA (Liu et al. 2024) from HuggingFace PEFT (``LoraConfig(use_dora=True)``): the
weight is split into a trainable magnitude ``m`` (one per output row, initialised to the row
norms of ``W``) and a direction ``W + (alpha / r) B A`` normalised row-wise, with LoRA's
initialisation (``B = 0``), so the output is unchanged at start. Same layers and ranks as
:mod:`tsvd.peft.methods.lora` (:mod:`tsvd.peft.methods.hf`). Tensors added per target layer
``T``: ``T.lora_A.default.weight (r', in)``, ``T.lora_B.default.weight (out, r')``,
``T.lora_magnitude_vector.default.weight (out,)``.

Learning rate: one group ``"adapter"`` at ``adapter_lr``, as LoRA.
"""
from __future__ import annotations

from . import register
from .hf import HFLoraMethod


@register
class DoRA(HFLoraMethod):
    name = "dora"
    summary = ("DoRA (HF PEFT): LoRA's B A on the direction of W plus a trainable magnitude per "
               "output row.")
    options = {
        "rank": (8, "rank per matrix (fused qkv: see tsvd.peft.methods.hf)"),
        "alpha": (None, "scaling numerator (scaling = alpha / rank; default: rank)"),
        "train_bias": (False, "also train the adapted layers' biases"),
    }
    init_lora_weights = True
    use_dora = True
