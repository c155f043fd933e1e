"""MONAI's UNETR with the presets used by tsvd (the network itself is never re-implemented).

Presets (keyword arguments of :class:`monai.networks.nets.UNETR`):

- ``"paper"``: the configuration of LoRA-PT (He et al., arXiv 2407.11292): 128³ input,
  hidden 768, MLP 3072, 12 heads, feature size 16; 12 transformer blocks (MONAI's UNETR
  always has 12). Stacked LoRA-PT tensors: (48, 768, 768), (12, 3072, 768), (12, 768, 3072).
- ``"cpu"``: small enough to fine-tune in minutes on 2 CPU cores: 64³ input, hidden 192,
  MLP 768, 4 heads, feature size 16, still 12 blocks, so the stacked tensors keep their meaning:
  (48, 192, 192), (12, 768, 192), (12, 192, 768). 64³ / patch 16³ = 64 tokens.
- ``"tiny"``: for tests only: 32³, hidden 48, MLP 96, 4 heads, feature size 8 (8 tokens).

Input ``x`` is ``(B, in_channels, D, H, W)`` with ``(D, H, W) == img_size``; the output is
``(B, out_channels, D, H, W)`` logits.
"""
from __future__ import annotations

import inspect

__all__ = ["PRESETS", "build_unetr", "preset_kwargs"]

_COMMON = dict(in_channels=1, out_channels=2, proj_type="conv", norm_name="instance",
               res_block=True, dropout_rate=0.1)

PRESETS: dict[str, dict] = {
    "paper": dict(_COMMON, img_size=(128, 128, 128), feature_size=16, hidden_size=768,
                  mlp_dim=3072, num_heads=12),
    "cpu": dict(_COMMON, img_size=(64, 64, 64), feature_size=16, hidden_size=192,
                mlp_dim=768, num_heads=4),
    "tiny": dict(_COMMON, img_size=(32, 32, 32), feature_size=8, hidden_size=48,
                 mlp_dim=96, num_heads=4),
}


def preset_kwargs(preset: str = "paper", *, out_channels=None, in_channels=None,
                  **overrides) -> dict:
    """The UNETR keyword arguments of ``preset`` with the given overrides applied."""
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    kw = dict(PRESETS[preset])
    if out_channels is not None:
        kw["out_channels"] = out_channels
    if in_channels is not None:
        kw["in_channels"] = in_channels
    kw.update(overrides)
    for name in ("in_channels", "out_channels"):
        v = kw[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if "img_size" in kw and isinstance(kw["img_size"], list):
        kw["img_size"] = tuple(kw["img_size"])
    return kw


def build_unetr(preset: str = "paper", *, out_channels: int | None = None,
                in_channels: int | None = None, **overrides):
    """Build ``monai.networks.nets.UNETR`` from a preset.

    Args:
        preset: ``"paper"``, ``"cpu"`` or ``"tiny"`` (see :data:`PRESETS`).
        out_channels, in_channels: override the preset's (2 classes, 1 MRI channel).
        overrides: any other UNETR keyword argument (e.g. ``dropout_rate=0.0``).
    Returns:
        the UNETR module, freshly initialised; maps ``(B, in, D, H, W)`` to
        ``(B, out, D, H, W)``.
    """
    from monai.networks.nets import UNETR

    kw = preset_kwargs(preset, out_channels=out_channels, in_channels=in_channels, **overrides)
    params = inspect.signature(UNETR.__init__).parameters
    # MONAI < 1.4 calls the patch-embedding type ``pos_embed`` instead of ``proj_type``
    if "proj_type" in kw and "proj_type" not in params and "pos_embed" in params:
        kw["pos_embed"] = kw.pop("proj_type")
    unknown = sorted(k for k in kw if k not in params)
    if unknown:
        raise ValueError(f"overrides: UNETR (MONAI) has no argument(s) {unknown}")
    return UNETR(**kw)
