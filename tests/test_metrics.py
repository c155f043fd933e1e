"""Segmentation metrics against their definitions: Dice on hand-built cubes, HD95 against an
independent scipy computation (surface voxels, Euclidean distance transforms in mm, 95th
percentile of each direction, the larger of the two), the empty-prediction rule, and the
summary statistics against Python's ``statistics``."""
from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

pytest.importorskip("monai")
from scipy import ndimage  # noqa: E402

from tsvd.peft.seg.metrics import dice, dice_hd95, summarize, voxel_spacing  # noqa: E402


def cube(shape, lo, side):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, a + s) for a, s in zip(lo, side))] = True
    return m


def hd95_oracle(p, t, spacing):
    """Symmetric 95th-percentile surface distance (mm): surface = mask minus its erosion by
    the 3-D cross; distances from each surface voxel to the other mask's surface."""
    def surface(m):
        return m & ~ndimage.binary_erosion(m, structure=ndimage.generate_binary_structure(3, 1))
    sp, st = surface(p), surface(t)
    dt_t = ndimage.distance_transform_edt(~st, sampling=spacing)
    dt_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return max(np.percentile(dt_t[sp], 95), np.percentile(dt_p[st], 95))


def test_dice_of_overlapping_cubes_is_the_definition():
    shape = (20, 20, 20)
    a = cube(shape, (2, 2, 2), (8, 8, 8))            # 512 voxels
    b = cube(shape, (6, 2, 2), (8, 8, 8))            # overlap 4*8*8 = 256
    assert dice(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(2 * 256 / 1024)
    c = cube(shape, (12, 12, 12), (3, 4, 5))         # disjoint
    assert dice(a, c) == 0.0
    assert dice(a, a) == 1.0
    assert dice(np.zeros(shape), np.zeros(shape)) == 1.0      # both empty: agreement
    with pytest.raises(ValueError, match="shape"):
        dice(a, a[:-1])


def test_dice_hd95_single_voxels_at_a_known_distance():
    shape = (16, 12, 10)
    p = cube(shape, (3, 4, 5), (1, 1, 1))
    t = cube(shape, (9, 4, 5), (1, 1, 1))
    d, h = dice_hd95(torch.from_numpy(p), torch.from_numpy(t), spacing=(2.0, 1.0, 1.0))
    assert d == 0.0 and h == pytest.approx(6 * 2.0)
    t2 = cube(shape, (3, 7, 9), (1, 1, 1))           # 3 and 4 voxels away, 1.5 mm along y
    _, h2 = dice_hd95(p, t2, spacing=(1.0, 1.5, 1.0))
    assert h2 == pytest.approx(math.hypot(3 * 1.5, 4 * 1.0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_matches_an_independent_scipy_computation(seed):
    rng = np.random.default_rng(seed)
    shape = (24, 20, 18)
    spacing = (1.5, 1.0, 2.5)
    p = ndimage.gaussian_filter(rng.normal(size=shape), 2.0) > 0.05
    t = ndimage.gaussian_filter(rng.normal(size=shape), 2.0) > 0.05
    d, h = dice_hd95(torch.from_numpy(p), torch.from_numpy(t), spacing)
    assert d == pytest.approx(2 * (p & t).sum() / (p.sum() + t.sum()))
    assert h == pytest.approx(hd95_oracle(p, t, spacing), rel=1e-5)


def test_empty_prediction_scores_the_image_diagonal():
    """Issue 12: a collapsed (empty) prediction's HD95 is the image diagonal in mm, not NaN."""
    shape = (20, 16, 12)
    spacing = (1.5, 2.0, 1.0)
    t = cube(shape, (4, 4, 4), (5, 5, 5))
    diag = math.sqrt((20 * 1.5) ** 2 + (16 * 2.0) ** 2 + (12 * 1.0) ** 2)
    d, h = dice_hd95(np.zeros(shape, bool), t, spacing)
    assert d == 0.0 and h == pytest.approx(diag)
    d, h = dice_hd95(t, np.zeros(shape, bool), spacing)             # empty reference
    assert d == 0.0 and h == pytest.approx(diag)
    assert dice_hd95(np.zeros(shape), np.zeros(shape), spacing) == (1.0, 0.0)
    with pytest.raises(ValueError, match="shape"):
        dice_hd95(t, t[:, :, :-1])


def test_summarize_is_sample_statistics_and_counts_empties():
    v = [0.8, 0.5, 0.9, 0.7]
    s = summarize(v, empty=[False, True, False, False])
    assert s["mean"] == pytest.approx(statistics.mean(v))
    assert s["std"] == pytest.approx(statistics.stdev(v))        # ddof = 1
    assert s["median"] == pytest.approx(statistics.median(v))
    assert s["n"] == 4 and s["n_empty"] == 1 and s["n_nan"] == 0
    one = summarize([0.3])
    assert one["mean"] == 0.3 and math.isnan(one["std"]) and one["n"] == 1
    withnan = summarize([0.2, float("nan"), 0.4])
    assert withnan["n"] == 3 and withnan["n_nan"] == 1
    assert withnan["mean"] == pytest.approx(0.3)


def test_voxel_spacing_of_an_oblique_affine():
    rot = np.array([[0.6, -0.8, 0], [0.8, 0.6, 0], [0, 0, 1.0]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([1.2, 0.9, 3.0])
    assert voxel_spacing(aff) == pytest.approx([1.2, 0.9, 3.0])
