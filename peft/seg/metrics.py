"""Segmentation metrics: Dice and the 95th-percentile Hausdorff distance in millimetres.

Both use MONAI's metric objects (``DiceMetric``, ``HausdorffDistanceMetric(percentile=95)``)
on one-hot masks with the background channel excluded, and HD95 gets the voxel spacing so
that it is in mm (the authors' script reported the plain, 100th-percentile distance).
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["dice", "dice_hd95", "voxel_spacing", "summarize"]


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


def dice(pred, target) -> float:
    """Dice ``2|P∩T| / (|P| + |T|)`` of two binary masks of one shape (1.0 when both are
    empty). The one Dice of the project: validation and evaluation use it."""
    p = torch.as_tensor(pred).to(torch.bool)
    t = torch.as_tensor(target).to(torch.bool)
    if p.shape != t.shape:
        raise ValueError(f"pred shape {tuple(p.shape)} != target shape {tuple(t.shape)}")
    s = int(p.sum()) + int(t.sum())
    return 1.0 if s == 0 else 2.0 * int((p & t).sum()) / s


def dice_hd95(pred, target, spacing=(1.0, 1.0, 1.0)) -> tuple[float, float]:
    """(Dice, HD95 in mm) of binary masks ``pred`` and ``target`` (D, H, W), voxel ``spacing``.

    Dice: :func:`dice`. HD95: 95th percentile of the symmetric surface distances (MONAI's
    ``HausdorffDistanceMetric(percentile=95)``). When exactly one of the masks is empty (a
    collapsed prediction) there is no surface to measure: HD95 is then the image diagonal in
    mm, ``sqrt(sum_i (n_i * spacing_i)^2)`` for an image of ``n_i`` voxels along axis i (the
    largest distance possible), so that a collapsed run is not flattered by a missing value
    (:func:`summarize` with ``empty=`` reports how many there were); both empty: 0.
    """
    from monai.metrics import HausdorffDistanceMetric
    p, t = _onehot(pred), _onehot(target)
    if p.shape != t.shape:
        raise ValueError(f"pred shape {tuple(p.shape[2:])} != target shape {tuple(t.shape[2:])}")
    d = dice(p[0, 1], t[0, 1])
    np_, nt = bool(p[0, 1].any()), bool(t[0, 1].any())
    if not np_ and not nt:
        return d, 0.0
    if not np_ or not nt:
        ext = [n * float(sp) for n, sp in zip(p.shape[2:], spacing)]
        return d, float(math.sqrt(sum(e * e for e in ext)))
    hm = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
    hd = float(hm(p, t, spacing=[float(s) for s in spacing]).reshape(-1)[0])
    return d, hd


def summarize(values, empty=None) -> dict:
    """mean, sample std (ddof = 1; NaN for fewer than 2 values), median, n, the number of NaN
    values (left out of the statistics) and, with ``empty`` (one bool per value), the number of
    empty predictions."""
    v = [float(x) for x in values]
    ok = [x for x in v if not math.isnan(x)]
    out = {"mean": float(np.mean(ok)) if ok else float("nan"),
           "std": float(np.std(ok, ddof=1)) if len(ok) > 1 else float("nan"),
           "median": float(np.median(ok)) if ok else float("nan"),
           "n": len(v), "n_nan": len(v) - len(ok)}
    if empty is not None:
        out["n_empty"] = int(sum(bool(e) for e in empty))
    return out
