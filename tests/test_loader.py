"""The training data path (``tsvd.peft.seg.data``): MONAI CacheDataset of the preprocessed cases,
``TrainCrops`` through a torch DataLoader, and its split over processes by a
DistributedSampler. Oracle: the definition of sample k of epoch e (case perm_e[k], random
transforms seeded by (seed, e, k)) computed directly from the transforms."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("monai")

from test_data import make_dataset  # noqa: E402
from tsvd.peft.seg.data import (DataError, TrainCrops, cache_cases, load_cases,  # noqa: E402
                                train_transforms)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("ld") / "d", "eadc", n_train=3, n_valid=1,
                        n_test=0)
    _, splits, allowed = load_cases(root)
    dcfg = {"spacing": 1.0, "roi": None, "patch": [16, 16, 16], "flip_axes": [0, 1, 2],
            "pos_fraction": 0.67, "foreground": None}
    det, rnd = train_transforms(dcfg, allowed)
    return splits["train"], det, rnd


def _definition(cases, det, rnd, seed, epoch, k, length):
    """Sample k of epoch ``epoch``, from scratch: preprocess the case, seed, transform."""
    from monai.transforms import Compose
    perm = np.random.default_rng([seed, epoch]).permutation(
        np.resize(np.arange(len(cases)), length))
    item = Compose(det)(dict(cases[int(perm[k])]))
    comp = Compose(rnd)
    comp.set_random_state(seed=(seed * 1_000_003 + epoch * 10_007 + k) % (2 ** 31))
    out = comp({"image": item["image"], "label": item["label"]})
    out = out[0] if isinstance(out, list) else out
    return out["image"].as_tensor().float(), out["label"].as_tensor().float()


def test_samples_follow_the_definition_with_and_without_workers(parts):
    cases, det, rnd = parts
    crops = TrainCrops(cache_cases(cases, det), rnd, seed=7, length=6)
    for epoch in (0, 3):
        crops.set_epoch(epoch)
        want = [_definition(cases, det, rnd, 7, epoch, k, 6) for k in range(6)]
        for workers in (0, 2):
            loader = torch.utils.data.DataLoader(crops, batch_size=2, num_workers=workers)
            got = [(x[j], y[j]) for x, y in loader for j in range(x.shape[0])]
            assert len(got) == 6
            for (gx, gy), (wx, wy) in zip(got, want):
                assert gx.shape == (1, 16, 16, 16) and gy.shape == (1, 16, 16, 16)
                assert torch.equal(gx, wx) and torch.equal(gy, wy), (epoch, workers)
    # epochs differ (other permutation and seeds)
    crops.set_epoch(1)
    assert not torch.equal(crops[0][0], want[0][0])


def test_distributed_sampler_splits_each_global_batch(parts):
    """With W processes and per-process batches of bs/W, the union of the W batches of step
    i is the global batch i (samples i*bs .. i*bs+bs-1), as one process with batch bs."""
    from torch.utils.data import DistributedSampler
    cases, det, rnd = parts
    crops = TrainCrops(cache_cases(cases, det), rnd, seed=1, length=8)
    bs, world = 4, 2
    steps = {}
    for rank in range(world):
        s = DistributedSampler(crops, num_replicas=world, rank=rank, shuffle=False)
        idx = list(s)
        for i in range(len(idx) // (bs // world)):
            steps.setdefault(i, set()).update(idx[i * bs // world:(i + 1) * bs // world])
    assert steps == {i: set(range(i * bs, (i + 1) * bs)) for i in range(8 // bs)}


def test_a_case_that_cannot_be_loaded_is_a_data_error_naming_it(parts, tmp_path):
    cases, det, _ = parts
    bad = dict(cases[0], image=str(tmp_path / "broken.nii.gz"))
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(DataError, match="broken.nii.gz"):
        cache_cases([cases[1], bad], det)
    with pytest.raises(ValueError, match="length"):
        TrainCrops(cache_cases(cases[:1], det), [], seed=0, length=0)


def test_cases_are_preprocessed_once(parts, tmp_path):
    """The cache holds the preprocessed case: reading it needs the file no more."""
    import shutil
    cases, det, rnd = parts
    copy = {k: str(tmp_path / f"{k}.nii.gz") for k in ("image", "label")}
    for k in copy:
        shutil.copy(cases[0][k], copy[k])
    cached = cache_cases([copy], det)
    for k in copy:
        (tmp_path / f"{k}.nii.gz").unlink()
    crops = TrainCrops(cached, rnd, seed=0, length=2)
    assert crops[1][0].shape == (1, 16, 16, 16)


def test_training_with_loader_workers_is_bit_identical(tmp_path):
    """--workers moves crop-making into DataLoader processes and changes nothing else (the
    crops are seeded per sample; dropout on, so the model's RNG stream matters too)."""
    from safetensors.torch import load_file

    from tsvd.peft.seg import train as T
    data = make_dataset(tmp_path / "d", "eadc", n_train=3, n_valid=1, n_test=0)
    got = []
    for w in (0, 2):
        cfg = T.merge_config(T.DEFAULTS, {
            "data": {"path": str(data), "spacing": 1.0},
            "model": {"preset": "tiny", "dropout": 0.2}, "adapter": {"method": "full"},
            "train": {"epochs": 1, "batch_size": 2, "samples_per_epoch": 4, "threads": 1,
                      "seed": 2, "workers": w}})
        T.train(cfg, tmp_path / f"w{w}", progress=False, log=lambda *a: None)
        got.append(load_file(str(tmp_path / f"w{w}" / "model_last.safetensors")))
    assert got[0].keys() == got[1].keys()
    assert all(torch.equal(got[0][k], got[1][k]) for k in got[0])


def test_training_crops_move_inside_the_enlarged_region(tmp_path):
    """With a region of interest, training crops come from the region enlarged by
    ``crop_margin`` voxels, so that they start at different places (issue 12: with box ==
    patch every crop was the whole box); validation sees the region itself. resolve_roi makes
    ``mni-hippocampus`` a one-patch box on both hippocampi."""
    from monai.transforms import Compose

    from tsvd.peft.seg.config import RunConfig
    from tsvd.peft.seg.data import eval_transforms
    from tsvd.peft.seg.demo import resolve_roi
    from tsvd.peft.seg.embedded import HIPPOCAMPUS_ROI_MM
    cfg = RunConfig.from_dict({"data": {"roi": "mni-hippocampus"}, "model": {"preset": "tiny"}})
    out = resolve_roi(cfg)
    assert out.data.roi == {"centre_mm": list(HIPPOCAMPUS_ROI_MM[0]), "size": [32] * 3}
    assert cfg.data.roi == "mni-hippocampus" and out.data.crop_margin == 16
    root = make_dataset(tmp_path / "d", "eadc", n_train=1, n_valid=1, n_test=0)
    _, splits, allowed = load_cases(root)
    case = splits["train"][0]
    import nibabel as nib
    aff = nib.load(case["image"]).affine
    centre = (aff @ np.r_[np.array(nib.load(case["image"]).shape) / 2.0, 1.0])[:3].tolist()
    for margin, want_moves in ((6, True), (0, False)):
        dcfg = {"spacing": None, "roi": {"centre_mm": centre, "size": [8, 8, 8]},
                "patch": [8, 8, 8], "flip_axes": [], "crop_margin": margin, "foreground": None}
        det, rnd = train_transforms(dcfg, allowed)
        box = Compose(det)(dict(case))
        assert tuple(box["image"].shape[1:]) == (8 + margin,) * 3
        assert tuple(Compose(eval_transforms(dcfg, allowed))(dict(case))["image"].shape[1:]) \
            == (8, 8, 8)
        crop = Compose(rnd[:1])
        starts = set()
        for s in range(20):
            crop.set_random_state(seed=s)
            img = crop({"image": box["image"], "label": box["label"]})["image"]
            assert tuple(img.shape[1:]) == (8, 8, 8)
            starts.add(tuple(img.as_tensor().reshape(-1)[:4].tolist()))
        assert (len(starts) > 5) == want_moves, (margin, len(starts))
