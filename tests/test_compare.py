"""The comparison harness (bench/compare.py): every variant gets the same data, seed, budget
and base weights; mean ± std over seeds against hand-computed values; resumability; and one
end-to-end pass through the real train()/evaluate() on the tiny preset."""
from __future__ import annotations

import copy
import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_compare():
    spec = importlib.util.spec_from_file_location("bench_compare", ROOT / "bench" / "compare.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_compare"] = mod
    spec.loader.exec_module(mod)
    return mod


C = _load_compare()

VARIANTS = "decoder,full,lora:8,pissa:8,lorapt:4,lorapt:8"
GRID = {"decoder": [1e-3, 3e-3], "full": [1e-4, 3e-4, 1e-3], "lora": [1e-3, 3e-3],
        "pissa": [1e-3, 3e-3], "lorapt": [1e-3, 3e-3]}


def fake_dataset(root: Path, n_train=8, n_valid=2, n_test=3) -> Path:
    """EADC list files + empty image/mask files (the fake train never reads them)."""
    names = [f"sub{i}" for i in range(n_train + n_valid + n_test)]
    for s in names:
        (root / s).mkdir(parents=True)
        (root / s / f"{s}_img.nii.gz").write_bytes(b"")
        (root / s / f"{s}_mask.nii.gz").write_bytes(b"")
    (root / "train.txt").write_text("\n".join(names[:n_train]) + "\n")
    (root / "valid.txt").write_text("\n".join(names[n_train:n_train + n_valid]) + "\n")
    (root / "test.txt").write_text("\n".join(names[n_train + n_valid:]) + "\n")
    return root


def _score(cfg, salt):
    """A deterministic pseudo-score in (0.5, 0.9) of a run's method, rank, lr, seed, data."""
    key = json.dumps([cfg["adapter"]["method"], cfg["adapter"]["rank"], cfg["train"]["lr"],
                      cfg["train"]["seed"], cfg["data"]["path"], cfg["data"]["max_train"], salt])
    h = sum((i + 1) * ord(c) for i, c in enumerate(key)) % 1000
    return 0.5 + 0.4 * h / 1000


class FakeTrainer:
    """Stands in for tsvd.peft.seg.train.train / evaluate; records every configuration."""

    def __init__(self, fail_after=None):
        self.train_cfgs, self.eval_calls = [], []
        self.fail_after = fail_after

    def train(self, cfg, out, *, task, overwrite, resume, log, progress):
        if self.fail_after is not None and len(self.train_cfgs) >= self.fail_after:
            raise KeyboardInterrupt
        assert task == "finetune"
        self.train_cfgs.append(copy.deepcopy(cfg))
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        n = cfg["train"]["epochs"]
        with open(out / "curves.csv", "w") as f:
            f.write("epoch,train_loss,val_dice,lr,epoch_time_s,time_s\n")
            for e in range(n):
                f.write(f"{e + 1},{1.0 / (e + 1)},{0.5 + 0.01 * e},0.001,3.0,3.5\n")
        art = out / "adapter_best.safetensors"
        art.write_bytes(b"x" * (100 + len(cfg["adapter"]["method"])))
        return {"trainable_parameters": 1000 + (cfg["adapter"]["rank"] or 0),
                "model_parameters": 5000, "best_val_dice": _score(cfg, "val"),
                "final_val_dice": 0.5, "artefact": str(art)}

    def evaluate(self, cfg, checkpoint, out, *, split, overwrite, progress):
        self.eval_calls.append((copy.deepcopy(cfg), str(checkpoint), split))
        d = _score(cfg, "test")
        res = {"dice": {"mean": d, "std": 0.01, "n": 3, "n_nan": 0},
               "hd95_mm": {"mean": 10 * (1 - d), "std": 0.5, "n": 3, "n_nan": 0}}
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "metrics.json").write_text(json.dumps(res))
        return res


def _settings(**kw):
    S = dict(C.FULL, protocols=["neuromorphometrics", "harvard-oxford"], seeds=3, epochs=2,
             samples_per_epoch=4, batch_size=2, n_train=8, n_valid=2, n_test=3,
             regimes={"full-data": 1.0, "low-data": 0.25})
    S.update(kw)
    return S


@pytest.fixture
def setup(tmp_path):
    ds = {p: fake_dataset(tmp_path / p) for p in ("neuromorphometrics", "harvard-oxford")}
    pre = tmp_path / "base.safetensors"
    pre.write_bytes(b"base")
    return ds, pre, tmp_path / "out"


def _comparison(setup, fake, S=None, variants=VARIANTS, grid=GRID, plots=False):
    ds, pre, out = setup
    return C.Comparison(out, S or _settings(), C.parse_variants(variants), grid, datasets=ds,
                        pretrained=pre, device="cpu", train_fn=fake.train,
                        evaluate_fn=fake.evaluate, log=lambda *a: None, plots=plots)


def _strip(cfg, *keys):
    c = copy.deepcopy(cfg)
    for k in keys:
        d = c
        parts = k.split(".")
        for p in parts[:-1]:
            d = d[p]
        d.pop(parts[-1])
    return c


@pytest.mark.parametrize("sweep", ["method", "cell"])
def test_every_variant_gets_same_data_seed_budget_and_base(setup, sweep):
    fake = FakeTrainer()
    cmp = _comparison(setup, fake, S=_settings(sweep=sweep))
    cmp.run()
    cfgs = fake.train_cfgs
    # every (regime, protocol, seed): all variants and learning rates share everything but
    # the method, its rank and the learning rate
    groups = {}
    for c in cfgs:
        key = (c["data"]["path"], c["data"]["max_train"], c["train"]["seed"])
        groups.setdefault(key, []).append(c)
    assert len(groups) == 2 * 2 * 3
    for key, cs in groups.items():
        ref = _strip(cs[0], "adapter.method", "adapter.rank", "train.lr")
        for c in cs[1:]:
            assert _strip(c, "adapter.method", "adapter.rank", "train.lr") == ref
        assert {c["adapter"]["method"] for c in cs} == set(C.METHODS)
    # across seeds only train.seed differs; across regimes only data.max_train; across
    # protocols only data.path
    base = _strip(cfgs[0], "adapter.method", "adapter.rank", "train.lr", "train.seed", "data.max_train",
                  "data.path")
    for c in cfgs:
        assert _strip(c, "adapter.method", "adapter.rank", "train.lr", "train.seed", "data.max_train",
                      "data.path") == base
    assert {c["model"]["pretrained"] for c in cfgs} == {str(setup[1])}
    assert {c["data"]["max_train"] for c in cfgs} == {8, 2}        # 25 % of 8 subjects
    assert {c["train"]["seed"] for c in cfgs} == {0, 1, 2}
    # the sweep is on seed 0 only; final runs use the chosen rate; the sweep run at the
    # chosen rate is not retrained
    variants = C.parse_variants(VARIANTS)
    n_sweep = sum(len(GRID[v["method"]]) for v in variants)
    if sweep == "method":
        assert len(cfgs) == n_sweep + len(variants) * (2 * 2 * 3 - 1)
    else:
        assert len(cfgs) == 2 * 2 * (n_sweep + 2 * len(variants))
    assert len(cmp.lr_choice) == len(variants) * (1 if sweep == "method" else 4)
    final = cmp.final_runs()
    assert len(final) == 2 * 2 * len(variants) * 3
    for r in final:
        v = next(x for x in variants if x["name"] == r["variant"])
        ch = cmp.lr_choice[cmp.sweep_key(r["regime"], r["protocol"], v)]
        assert r["lr"] == ch["lr"]
        assert ch["val_dice"] == max(ch["val_dice_by_lr"].values())
    for c in cfgs:
        if c["train"]["seed"] > 0:
            assert any(r["run_dir"] and r["lr"] == c["train"]["lr"] and r["method"] ==
                       c["adapter"]["method"] for r in final)
    sweeps = [r for r in cmp.runs if r["sweep"]]
    assert len(sweeps) == n_sweep * (1 if sweep == "method" else 4)
    assert {r["seed"] for r in sweeps} == {0}
    # every final run (3 seeds per cell) is evaluated once, on the test split
    assert len(fake.eval_calls) == 2 * 2 * len(variants) * 3
    assert {s for _, _, s in fake.eval_calls} == {"test"}
    assert all(r["test_dice"] is not None for r in final)
    assert all(r["test_dice"] is None for r in cmp.runs if not r["final"])


def test_aggregate_mean_and_sample_std_by_hand():
    runs = []
    for seed, (d, h) in enumerate([(0.7, 2.0), (0.8, 4.0), (0.9, float("nan"))]):
        runs.append({"regime": "full-data", "protocol": "p", "variant": "lorapt-r8",
                     "method": "lorapt", "rank": 8, "lr": 1e-3, "seed": seed,
                     "train_subjects": 8, "test_dice": d, "test_hd95_mm": h, "val_dice": 0.5,
                     "trainable_parameters": 10, "adapter_parameters": 4,
                     "model_parameters": 100, "artefact_bytes": 2 ** 20,
                     "time_per_step_s": 1.0 + seed, "peak_mem_mb": 1024.0})
    s = C.aggregate(runs, C.parse_variants("lorapt:8"))
    assert len(s) == 1
    s = s[0]
    assert s["dice"]["mean"] == pytest.approx(0.8)
    assert s["dice"]["std"] == pytest.approx(0.1)              # sqrt(((.1)²+0+(.1)²)/2)
    assert s["hd95_mm"]["mean"] == pytest.approx(3.0)
    assert s["hd95_mm"]["std"] == pytest.approx(math.sqrt(2.0))  # sqrt((1+1)/1)
    assert s["hd95_mm"]["n_nan"] == 1
    assert s["time_per_step_s"] == pytest.approx(2.0)
    md = C.markdown([s], _settings(), 4)
    assert "0.800 ± 0.100" in md and "3.00 ± 1.41" in md and "1.00 MB" in md
    one = C.seed_stats([0.75])
    assert one["mean"] == 0.75 and math.isnan(one["std"])
    assert "0.750 (n=1)" in C.fmt_pm(one)


def test_results_files_and_table(setup):
    fake = FakeTrainer()
    cmp = _comparison(setup, fake, S=_settings(seeds=2), variants="decoder,lorapt:4",
                      plots=True)
    cmp.run()
    out = setup[2]
    for f in ("runs.csv", "runs.json", "summary.csv", "summary.json", "results.md",
              "lr_choice.json", "dice_vs_params.png", "training_curves.png"):
        assert (out / f).is_file(), f
    runs = json.loads((out / "runs.json").read_text())
    summ = json.loads((out / "summary.json").read_text())
    assert len(summ) == 2 * 2 * 2
    for s in summ:        # the table's numbers are the mean over the final runs of the cell
        rs = [r for r in runs if (r["regime"], r["protocol"], r["variant"]) ==
              (s["regime"], s["protocol"], s["variant"]) and r["final"]]
        assert len(rs) == 2
        assert s["dice"]["mean"] == pytest.approx(sum(r["test_dice"] for r in rs) / 2)
        assert s["time_per_step_s"] == pytest.approx(3.0 / 2)   # epoch 3 s / 2 steps
    with open(out / "runs.csv") as f:
        assert len(list(csv.DictReader(f))) == len(runs)
    md = (out / "results.md").read_text()
    assert "## full-data" in md and "## low-data" in md and "LoRA-PT" in md


def test_resume_skips_finished_runs_and_refuses_other_settings(setup):
    S = _settings(seeds=2, protocols=["neuromorphometrics"])
    first = FakeTrainer(fail_after=5)
    with pytest.raises(KeyboardInterrupt):
        _comparison(setup, first, S=S).run()
    assert len(first.train_cfgs) == 5
    second = FakeTrainer()
    cmp = _comparison(setup, second, S=S)
    cmp.run()
    done = {json.dumps(c, sort_keys=True) for c in first.train_cfgs}
    again = {json.dumps(c, sort_keys=True) for c in second.train_cfgs}
    assert not (done & again)                      # nothing trained twice
    variants = C.parse_variants(VARIANTS)
    total = sum(len(GRID[v["method"]]) for v in variants) + len(variants) * (2 * 2 - 1)
    assert len(first.train_cfgs) + len(second.train_cfgs) == total
    summary = (setup[2] / "summary.json").read_text()
    # a third pass trains and evaluates nothing and gives the same table
    third = FakeTrainer(fail_after=0)
    _comparison(setup, third, S=S).run()
    assert third.eval_calls == []
    assert (setup[2] / "summary.json").read_text() == summary
    # other settings in the same folder: refused
    with pytest.raises(C.CompareError, match="other settings"):
        _comparison(setup, FakeTrainer(), S=dict(S, epochs=3)).run()


def test_argument_errors():
    with pytest.raises(C.CompareError, match="unknown method"):
        C.parse_variants("lorapt:8,dora:4")
    with pytest.raises(C.CompareError, match="rank"):
        C.parse_variants("lorapt:0")
    with pytest.raises(C.CompareError, match="no rank"):
        C.parse_variants("full:4")
    with pytest.raises(C.CompareError, match="twice"):
        C.parse_variants("lora:8,lora:8")
    with pytest.raises(C.CompareError, match="--lrs"):
        C.parse_lrs(["lora=-1"], GRID)
    assert C.parse_lrs(["lora=3e-3,1e-3"], GRID)["lora"] == [1e-3, 3e-3]
    assert [C.n_used(12, 0.25), C.n_used(8, 0.25), C.n_used(3, 0.1)] == [3, 2, 1]
    p = C.build_parser()
    with pytest.raises(C.CompareError, match="low-data-fraction"):
        C.settings_from_args(p.parse_args(["--low-data-fraction", "1.5"]))
    with pytest.raises(C.CompareError, match="--seeds"):
        C.settings_from_args(p.parse_args(["--seeds", "0"]))
    q = C.settings_from_args(p.parse_args(["--quick"]))
    assert q["seeds"] == 1 and len(q["protocols"]) == 1


@pytest.mark.parametrize("workers", [1, 2])
def test_end_to_end_tiny_preset_real_training(tmp_path, workers):
    """The real train()/evaluate() on generated tiny data: the harness's wiring (summary,
    curves, artefact, metrics) works, in one process and with 2 worker processes, and a
    resumed pass retrains nothing."""
    pytest.importorskip("monai")
    import torch
    from test_data import make_dataset
    from tsvd.models import build_unetr, save_checkpoint
    data = make_dataset(tmp_path / "d", "eadc", n_train=2, n_valid=1, n_test=1)
    torch.manual_seed(0)
    save_checkpoint(build_unetr("tiny"), str(tmp_path / "base.safetensors"))
    S = dict(C.FULL, preset="tiny", roi=None, spacing=1.0, protocols=["p"], seeds=1,
             epochs=1, samples_per_epoch=2, batch_size=1, n_train=2, n_valid=1, n_test=1,
             regimes={"full-data": 1.0})
    kw = dict(datasets={"p": data}, pretrained=tmp_path / "base.safetensors", device="cpu",
              log=lambda *a: None)
    cmp = C.Comparison(tmp_path / "out", S, C.parse_variants("decoder,lorapt:2"),
                       {"decoder": [1e-3], "lorapt": [1e-3, 3e-3]}, workers=workers,
                       threads_per_worker=1, **kw)
    cmp.run()
    runs = json.loads((tmp_path / "out" / "runs.json").read_text())
    assert len(runs) == 3 and all(r["workers"] == workers for r in runs)
    assert all(r["threads"] == (1 if workers > 1 else torch.get_num_threads()) for r in runs)
    assert not list((tmp_path / "out").rglob("worker_*.json"))
    summ = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [s["variant"] for s in summ] == ["decoder", "lorapt-r2"]
    for s in summ:
        assert 0.0 <= s["dice"]["mean"] <= 1.0
        assert s["trainable_parameters"] > 0 and s["artefact_bytes"] > 0
        assert s["time_per_step_s"] > 0 and s["peak_mem_mb"] > 0
    lp = next(s for s in summ if s["variant"] == "lorapt-r2")
    assert lp["adapter_parameters"] > 0
    calls = []

    def no_train(*a, **k):
        calls.append(1)
        raise AssertionError("retrained a finished run")
    C.Comparison(tmp_path / "out", S, C.parse_variants("decoder,lorapt:2"),
                 {"decoder": [1e-3], "lorapt": [1e-3, 3e-3]}, train_fn=no_train,
                 evaluate_fn=no_train, **kw).run()
    assert calls == []
