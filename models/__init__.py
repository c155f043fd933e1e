"""UNETR construction, presets and checkpoint loading (installed as ``tsvd.models``).

The network is MONAI's :class:`monai.networks.nets.UNETR`; this package only configures it
(:data:`PRESETS`, :func:`build_unetr`) and reads/writes its checkpoints safely
(:func:`load_pretrained`, :func:`save_checkpoint`).
"""
from .checkpoint import (LoadReport, atomic_write, file_sha256, load_pretrained, read_state_dict,
                         remove_stale_temporaries, save_checkpoint)
from .unetr import PRESETS, build_unetr, preset_kwargs

__all__ = ["PRESETS", "build_unetr", "preset_kwargs", "LoadReport", "load_pretrained",
           "read_state_dict", "save_checkpoint", "atomic_write", "remove_stale_temporaries", "file_sha256"]
