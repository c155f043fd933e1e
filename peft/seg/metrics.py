"""Segmentation metrics: Dice and the 95th-percentile Hausdorff distance in millimetres.

Both use MONAI's metric objects (``DiceMetric``, ``HausdorffDistanceMetric(percentile=95)``)
on one-hot masks with the background channel excluded, and HD95 gets the voxel spacing so
that it is in mm (the authors' script reported the plain, 100th-percentile distance).
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["dice_hd95", "voxel_spacing", "summarize"]


def voxel_spacing(affine) -> list[float]:
    """Voxel sizes (mm) = norms of the affine's first three columns."""
    a = np.asarray(affine, dtype=np.float64)
    return [float(v) for v in np.linalg.norm(a[:3, :3], axis=0)]


def _onehot(mask: torch.Tensor) -> torch.Tensor:
    m = torch.as_tensor(mask).to(torch.bool)
    while m.dim() > 3 and m.shape[0] == 1:
        m = m[0]
    if m.dim() != 3:
        raise ValueError(f"mask must be 3-D (D, H, W), got shape {tuple(mask.shape)}")
    return torch.stack([~m, m]).unsqueeze(0).float()          # (1, 2, D, H, W)


def dice_hd95(pred, target, spacing=(1.0, 1.0, 1.0)) -> tuple[float, float]:
    """(Dice, HD95 in mm) of binary masks ``pred`` and ``target`` (D, H, W), voxel ``spacing``.

    Dice = 2|P∩T| / (|P| + |T|) (1.0 when both are empty); HD95 = 95th percentile of the
    symmetric surface distances (MONAI); ``nan`` when either mask is empty.
    """
    from monai.metrics import DiceMetric, HausdorffDistanceMetric
    p, t = _onehot(pred), _onehot(target)
    if p.shape != t.shape:
        raise ValueError(f"pred shape {tuple(p.shape[2:])} != target shape {tuple(t.shape[2:])}")
    dm = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    dice = float(dm(p, t).reshape(-1)[0])
    if p[0, 1].sum() == 0 or t[0, 1].sum() == 0:
        return dice, float("nan")
    hm = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
    hd = float(hm(p, t, spacing=[float(s) for s in spacing]).reshape(-1)[0])
    return dice, hd


def summarize(values) -> dict:
    """mean, std (population), n and the number of nan values of a list of floats."""
    v = [float(x) for x in values]
    ok = [x for x in v if not math.isnan(x)]
    return {"mean": float(np.mean(ok)) if ok else float("nan"),
            "std": float(np.std(ok)) if ok else float("nan"),
            "n": len(v), "n_nan": len(v) - len(ok)}
