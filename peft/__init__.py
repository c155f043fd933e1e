"""LoRA-PT and baseline PEFT methods for MONAI's UNETR (installed as ``tsvd.peft``).

    >>> from tsvd.models import build_unetr, load_pretrained
    >>> from tsvd.peft import adapt, load_adapter
    >>> model = build_unetr("cpu"); load_pretrained(model, "pretrained.pt")
    >>> adapter = adapt(model, "lorapt", rank=8)          # model changed in place
    >>> opt = torch.optim.Adam(adapter.trainable_parameters(), lr=1e-3)
    >>> ...                                               # train model(x) as usual
    >>> adapter.save("hippo.lorapt.safetensors", base_checkpoint="pretrained.pt")
    >>> adapter.merge()                                   # plain nn.Linear weights again

See :mod:`tsvd.peft.adapter` for the methods and options, :mod:`tsvd.peft.targets` for how
to name the layer groups of other transformer models.
"""
from .adapter import (FACTOR_RATE, METHODS, Adapter, adapt, get_adapter, load_adapter,
                      read_adapter_meta)
from .lora import LowRankLinear
from .lorapt import LoRAPTContainer, TSVDGroup, TSVDLinear
from .targets import DEFAULT_GROUPS, resolve

__all__ = ["FACTOR_RATE", "METHODS", "Adapter", "adapt", "get_adapter", "load_adapter", "read_adapter_meta",
           "DEFAULT_GROUPS", "resolve", "LowRankLinear", "TSVDGroup", "TSVDLinear",
           "LoRAPTContainer"]
