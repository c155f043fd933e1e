"""Metrics against hand-computed values, resume after an interruption, atomic checkpoints,
weight averaging and seeded reproducibility (tiny UNETR preset, tiny generated data)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("monai")
from scipy.ndimage import binary_erosion  # noqa: E402

from test_data import make_dataset  # noqa: E402
from tsvd.peft.seg import infer as I  # noqa: E402
from tsvd.peft.seg import train as T  # noqa: E402
from tsvd.peft.seg.metrics import dice_hd95, summarize, voxel_spacing  # noqa: E402


# ------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------
def test_dice_of_shifted_cubes():
    a = np.zeros((12, 12, 12), bool)
    b = np.zeros_like(a)
    a[2:6, 2:6, 2:6] = True
    b[3:7, 2:6, 2:6] = True            # overlap 3*4*4 = 48 of 64 + 64 voxels
    d, _ = dice_hd95(torch.from_numpy(a), torch.from_numpy(b))
    assert d == pytest.approx(2 * 48 / 128)


def test_hd95_single_voxels_anisotropic_spacing():
    a = np.zeros((8, 8, 8), bool)
    b = np.zeros_like(a)
    a[2, 2, 2] = True
    b[2, 2, 5] = True                   # 3 voxels apart along an axis of 2 mm voxels
    d, h = dice_hd95(torch.from_numpy(a), torch.from_numpy(b), spacing=(1.0, 1.0, 2.0))
    assert d == 0.0 and h == pytest.approx(6.0)
    _, h2 = dice_hd95(torch.from_numpy(a), torch.from_numpy(a), spacing=(1.0, 1.0, 2.0))
    assert h2 == 0.0


def _hd95_bruteforce(a, b, spacing):
    """Definition: edge voxels = mask minus its erosion; for each edge voxel of one mask the
    Euclidean (mm) distance to the nearest edge voxel of the other; the 95th percentile
    (linear interpolation) of each direction; the larger of the two."""
    ea = np.argwhere(a & ~binary_erosion(a)) * np.asarray(spacing)
    eb = np.argwhere(b & ~binary_erosion(b)) * np.asarray(spacing)
    dist = np.sqrt(((ea[:, None, :] - eb[None, :, :]) ** 2).sum(-1))
    return max(np.percentile(dist.min(1), 95), np.percentile(dist.min(0), 95))


def test_hd95_matches_definition_on_random_blobs():
    from scipy.ndimage import gaussian_filter
    rng = np.random.default_rng(0)
    for trial in range(3):
        f = gaussian_filter(rng.standard_normal((20, 22, 18)), 2.0)
        g = gaussian_filter(rng.standard_normal((20, 22, 18)), 2.0)
        a = np.zeros(f.shape, bool)
        b = np.zeros(f.shape, bool)
        a[2:-2, 2:-2, 2:-2] = f[2:-2, 2:-2, 2:-2] > 0.05
        b[2:-2, 2:-2, 2:-2] = (f + 0.5 * g)[2:-2, 2:-2, 2:-2] > 0.05
        sp = (1.5, 1.0, 2.0)
        d, h = dice_hd95(torch.from_numpy(a), torch.from_numpy(b), sp)
        assert d == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()), rel=1e-6)
        assert h == pytest.approx(_hd95_bruteforce(a, b, sp), rel=1e-5)


def test_empty_masks_and_summary():
    a = np.zeros((6, 6, 6), bool)
    b = np.zeros_like(a)
    b[2:4, 2:4, 2:4] = True
    # an empty prediction: HD95 = the image diagonal in mm (issue 12), not NaN
    d, h = dice_hd95(torch.from_numpy(a), torch.from_numpy(b), (1.5, 1.0, 2.0))
    assert d == 0.0 and h == pytest.approx(np.sqrt(9.0 ** 2 + 6.0 ** 2 + 12.0 ** 2))
    d, h = dice_hd95(torch.from_numpy(a), torch.from_numpy(a))
    assert d == 1.0 and h == 0.0
    s = summarize([0.5, 0.7, 0.9, float("nan")], empty=[False, True, False, False])
    # sample std (ddof = 1) of 0.5, 0.7, 0.9 is 0.2 (population std would be 0.163)
    assert s["mean"] == pytest.approx(0.7) and s["std"] == pytest.approx(0.2)
    assert s["n_nan"] == 1 and s["n_empty"] == 1 and s["median"] == pytest.approx(0.7)
    assert np.isnan(summarize([0.4])["std"])
    aff = np.diag([-1.5, 2.0, 1.0, 1.0])
    assert voxel_spacing(aff) == [1.5, 2.0, 1.0]


# ------------------------------------------------------------------------------------------
# training: resume, atomic checkpoints, averaging
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("tr") / "d", "eadc", n_train=3, n_valid=1,
                        n_test=1)


def _cfg(data, **train):
    t = {"epochs": 2, "batch_size": 1, "samples_per_epoch": 2, "threads": 2, "seed": 3}
    t.update(train)
    return T.merge_config(T.DEFAULTS, {"data": {"path": str(data), "spacing": 1.0},
                                       "model": {"preset": "tiny"}, "adapter": {"method": "full"},
                                       "train": t})


def _weights(path):
    from safetensors.torch import load_file
    return load_file(str(path))


def test_resume_after_interruption_equals_uninterrupted(tiny_data, tmp_path, monkeypatch):
    quiet = dict(progress=False, log=lambda *a: None)
    T.train(_cfg(tiny_data), tmp_path / "a", **quiet)
    ref = _weights(tmp_path / "a" / "model_last.safetensors")
    hist_a = json.loads((tmp_path / "a" / "run.json").read_text())
    # interrupted run: killed (KeyboardInterrupt) during epoch 2's validation
    real = T._val_dice
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(T, "_val_dice", flaky)
    with pytest.raises(KeyboardInterrupt):
        T.train(_cfg(tiny_data), tmp_path / "b", **quiet)
    monkeypatch.setattr(T, "_val_dice", real)
    st = torch.load(tmp_path / "b" / "checkpoint_last.pt", weights_only=True)
    assert st["epoch"] == 0                              # epoch 1 saved, epoch 2 lost
    with pytest.raises(T.RunError, match="exists and is not empty"):
        T.train(_cfg(tiny_data), tmp_path / "b", **quiet)
    T.train(_cfg(tiny_data), tmp_path / "b", resume=True, **quiet)
    got = _weights(tmp_path / "b" / "model_last.safetensors")
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)
    import csv
    ca = list(csv.DictReader((tmp_path / "a" / "curves.csv").open()))
    cb = list(csv.DictReader((tmp_path / "b" / "curves.csv").open()))
    assert [r["train_loss"] for r in ca] == [r["train_loss"] for r in cb]
    assert hist_a["complete"]
    # another seed gives other weights
    T.train(_cfg(tiny_data, seed=4, epochs=1, samples_per_epoch=1), tmp_path / "c", **quiet)
    other = _weights(tmp_path / "c" / "model_last.safetensors")
    assert any(not torch.equal(other[k], ref[k]) for k in ref)
    # resuming with another preset or learning rate is refused, naming the difference
    for key, value, shown in (("model", ("preset", "cpu"), "model.preset"),
                              ("train", ("lr", 0.5), "train.lr")):
        bad = _cfg(tiny_data)
        bad[key][value[0]] = value[1]
        with pytest.raises(T.RunError, match=rf"other settings.*{shown}: "):
            T.train(bad, tmp_path / "b", resume=True, **quiet)


def test_resume_extends_epochs_and_records_it(tiny_data, tmp_path):
    """Issue 16: --resume --epochs N+1 trains the added epoch at a non-zero rate (the poly
    schedule is re-planned to the new end) and records the change as a resume event."""
    import csv
    quiet = dict(progress=False, log=lambda *a: None)
    T.train(_cfg(tiny_data, epochs=1, samples_per_epoch=1), tmp_path / "r", **quiet)
    before = _weights(tmp_path / "r" / "model_last.safetensors")
    T.train(_cfg(tiny_data, epochs=2, samples_per_epoch=1), tmp_path / "r", resume=True,
            **quiet)
    rows = list(csv.DictReader((tmp_path / "r" / "curves.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    after = _weights(tmp_path / "r" / "model_last.safetensors")
    assert any(not torch.equal(after[k], before[k]) for k in before)   # epoch 2 trained
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["resumes"] == [{"at_epoch": 1, "changed": {"epochs": [1, 2]}}]


def test_resume_from_a_truncated_checkpoint_is_a_clear_error(tiny_data, tmp_path):
    quiet = dict(progress=False, log=lambda *a: None)
    T.train(_cfg(tiny_data, epochs=1, samples_per_epoch=1), tmp_path / "t", **quiet)
    ck = tmp_path / "t" / "checkpoint_last.pt"
    ck.write_bytes(ck.read_bytes()[:1000])
    with pytest.raises(T.RunError, match=r"checkpoint_last.pt: cannot be read \(truncated"):
        T.train(_cfg(tiny_data, epochs=1, samples_per_epoch=1), tmp_path / "t", resume=True,
                **quiet)


def test_folder_of_a_run_killed_before_its_first_checkpoint_restarts(tiny_data, tmp_path):
    """A folder holding only config.yaml and a stale temporary (a run killed before its first
    checkpoint) is restarted without --overwrite; the temporary is cleaned."""
    quiet = dict(progress=False, log=lambda *a: None)
    out = tmp_path / "k"
    out.mkdir()
    (out / "config.yaml").write_text("{}\n")
    (out / ".curves.csv.abc.tsvdtmp.csv").write_text("partial")
    T.train(_cfg(tiny_data, epochs=1, samples_per_epoch=1), out, **quiet)
    assert (out / "model_last.safetensors").is_file()
    assert not [p for p in out.iterdir() if ".tsvdtmp" in p.name]


def test_checkpoint_write_killed_keeps_previous(tiny_data, tmp_path, monkeypatch):
    """A kill between writing the temporary file and the rename, or in the middle of the
    write, leaves the previous checkpoint intact and loadable."""
    ck = tmp_path / "r" / "checkpoint_last.pt"
    T._save_torch({"epoch": 0, "x": torch.ones(1000)}, ck)
    before = ck.read_bytes()
    for target in ("replace", "fsync"):
        def boom(*a, **k):
            raise KeyboardInterrupt
        monkeypatch.setattr(os, target, boom)
        with pytest.raises(KeyboardInterrupt):
            T._save_torch({"epoch": 99, "x": torch.zeros(1000)}, ck)
        monkeypatch.undo()
        assert ck.read_bytes() == before
        assert torch.load(ck, weights_only=True)["epoch"] == 0
        assert not [p for p in ck.parent.iterdir() if ".tsvdtmp" in p.name]


def test_average_last_epochs(tiny_data, tmp_path, monkeypatch):
    quiet = dict(progress=False, log=lambda *a: None)
    snaps = []
    real = T._save_torch

    def spy(obj, path):
        if Path(path).name == "checkpoint_last.pt":
            snaps.append({k: v.clone() for k, v in obj["trainable"].items()})
        return real(obj, path)

    monkeypatch.setattr(T, "_save_torch", spy)
    T.train(_cfg(tiny_data, epochs=2, average_last=2, samples_per_epoch=1), tmp_path / "v",
            **quiet)
    info = json.loads((tmp_path / "v" / "run.json").read_text())
    assert info["default_artefact"] == "avg" and info["averaged_epochs"] == 2
    avg = _weights(tmp_path / "v" / "model_avg.safetensors")
    k = "out.conv.conv.weight"
    assert k in avg
    assert not torch.equal(snaps[0][k], snaps[1][k])
    torch.testing.assert_close(avg[k], (snaps[0][k] + snaps[1][k]) / 2)


@pytest.mark.parametrize("method", ["lora", "lorapt"])
def test_finetune_trains_the_adapter_tensors(tiny_data, tmp_path, method):
    """Every adapter tensor reaches the optimizer: after two Adam steps of train(), the
    merged model differs from the base in every adapted transformer linear layer (LoRA's
    B starts at zero and LoRA-PT's U, S, V at the base's principal part, so an adapter left
    out of the optimizer would leave its layers bit-identical after merging)."""
    from tsvd.models import build_unetr, load_pretrained
    from tsvd.peft import load_adapter
    quiet = dict(progress=False, log=lambda *a: None)
    base_dir = tmp_path / "base"
    T.train(_cfg(tiny_data, epochs=1, samples_per_epoch=1), base_dir, **quiet)
    cfg = _cfg(tiny_data, epochs=1, samples_per_epoch=2, lr=1e-2)
    cfg["adapter"]["method"] = method
    cfg["model"]["pretrained"] = str(base_dir / "model_last.safetensors")
    T.train(cfg, tmp_path / "ft", task="finetune", **quiet)
    base = _weights(base_dir / "model_last.safetensors")
    model = build_unetr("tiny", out_channels=2)
    load_pretrained(model, base_dir / "model_last.safetensors")
    load_adapter(model, tmp_path / "ft" / "adapter_last.safetensors").merge()
    merged = model.state_dict()
    layers = [k for k in base if ".blocks." in k and k.endswith("weight") and base[k].dim() == 2]
    assert len(layers) >= 12 * 3, layers
    # more than the float32 rounding of merging an untrained LoRA-PT (W = R + U S Vᵀ)
    same = [k for k in layers
            if (merged[k] - base[k]).abs().max() <= 1e-4 * base[k].abs().max()]
    assert not same, f"{method}: adapted layers left unchanged by training: {same}"


def test_foreground_dice_loss_option(tiny_data, tmp_path):
    """train.loss "dicece-fg" (Dice term without the background class) trains; an unknown
    loss name is refused with the config key in the message."""
    import csv
    quiet = dict(progress=False, log=lambda *a: None)
    T.train(_cfg(tiny_data, epochs=1, samples_per_epoch=1, loss="dicece-fg"), tmp_path / "a",
            **quiet)
    rows = list(csv.DictReader((tmp_path / "a" / "curves.csv").open()))
    assert len(rows) == 1 and np.isfinite(float(rows[0]["train_loss"]))
    with pytest.raises(ValueError, match=r"--loss \(train\.loss\): expected one of dice, dicece"):
        T.train(_cfg(tiny_data, epochs=1, samples_per_epoch=1, loss="focal"), tmp_path / "b",
                **quiet)
    assert not (tmp_path / "b").exists()                 # refused before any work


def test_finetune_records_and_evaluate_applies_postprocessing(tiny_data, tmp_path):
    """A run trained with infer settings records them; evaluate uses them unless overridden;
    a bad setting is refused before any work."""
    quiet = dict(progress=False, log=lambda *a: None)
    cfg = _cfg(tiny_data, epochs=1, samples_per_epoch=1)
    cfg["infer"] = {"tta_flip": [0], "keep_components": 2}
    T.train(cfg, tmp_path / "run", **quiet)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["infer"] == {"tta_flip": [0], "keep_components": 2}
    ev = I.evaluate(_cfg(tiny_data), tmp_path / "run", tmp_path / "ev", progress=False)
    assert ev["infer"] == {"tta_flip": [0], "keep_components": 2}
    over = _cfg(tiny_data)
    over["infer"] = {"tta_flip": [], "keep_components": None}
    ev2 = I.evaluate(over, tmp_path / "run", tmp_path / "ev2", progress=False)
    assert ev2["infer"] == {"tta_flip": [], "keep_components": 2}
    bad = _cfg(tiny_data)
    bad["infer"] = {"tta_flip": None, "keep_components": -2}
    with pytest.raises(ValueError, match=r"infer\.keep_components"):
        I.evaluate(bad, tmp_path / "run", tmp_path / "ev3", progress=False)
    assert not (tmp_path / "ev3").exists()
