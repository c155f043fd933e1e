"""LoRA-PT and baseline PEFT methods for MONAI's UNETR (installed as ``tsvd.peft``).

    >>> from tsvd.models import build_unetr, load_pretrained
    >>> from tsvd.peft import adapt, load_adapter
    >>> model = build_unetr("cpu"); load_pretrained(model, "pretrained.pt")
    >>> adapter = adapt(model, "lorapt", rank=8)          # model changed in place
    >>> opt = torch.optim.Adam(adapter.param_groups(lr=1e-3), amsgrad=True)
    >>> ...                                               # train model(x) as usual
    >>> adapter.save("hippo.lorapt.safetensors", base_checkpoint="pretrained.pt")
    >>> averaged_input = adapter.merged_copy()            # plain weights, model stays adapted
    >>> adapter.merge()                                   # plain nn.Linear weights again

Methods (``METHODS``; one class each in :mod:`tsvd.peft.methods`, help text from
:func:`describe_method`): ``lorapt`` (ours), ``lora``, ``pissa``, ``dora`` (thin wrappers over
HuggingFace PEFT, imported only when used), ``full``, ``decoder``. See
:mod:`tsvd.peft.adapter` for the handle and the files, :mod:`tsvd.peft.targets` for how to name
the layer groups of other transformer models.
"""
from .adapter import (FORMAT_VERSION, Adapter, adapt, get_adapter, load_adapter,
                      read_adapter_meta)
from .lorapt import LoRAPTContainer, TSVDGroup, TSVDLinear
from .methods import METHODS, Method, describe_method, get_method, register
from .methods.base import FACTOR_RATE
from .targets import DEFAULT_GROUPS, resolve

__all__ = ["FACTOR_RATE", "FORMAT_VERSION", "METHODS", "Adapter", "adapt", "get_adapter",
           "load_adapter", "read_adapter_meta", "Method", "describe_method", "get_method",
           "register", "DEFAULT_GROUPS", "resolve", "TSVDGroup", "TSVDLinear", "LoRAPTContainer"]
