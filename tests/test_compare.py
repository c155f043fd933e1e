"""The comparison harness (bench/compare.py, code in bench/comparison/): every variant gets the
same data, seed, budget and base weights; mean ± std over seeds against hand-computed values;
the methods from the registry (dora a variant); the per-subject Wilcoxon table against a
by-hand exact p-value and scipy; resumability run by run; and one end-to-end pass through the
real train()/evaluate() on the tiny preset."""
from __future__ import annotations

import copy
import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_comparison():
    """The package bench/comparison/ as ``comparison``, through bench/compare.py's loader
    (bench/ itself stays off sys.path)."""
    spec = importlib.util.spec_from_file_location("bench_compare", ROOT / "bench" / "compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.load()


_load_comparison()
from comparison import cli as CLI, common as CM, plan as PL, report as R, run as RUN  # noqa: E402,I001

VARIANTS = "decoder,full,lora:8,pissa:8,lorapt:4,lorapt:8"
GRID = {"decoder": [1e-3, 3e-3], "full": [1e-4, 3e-4, 1e-3], "lora": [1e-3, 3e-3],
        "pissa": [1e-3, 3e-3], "dora": [1e-3, 3e-3], "lorapt": [1e-3, 3e-3]}


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
        names = (Path(cfg["data"]["path"]) / "test.txt").read_text().split()
        # per-subject Dice: d + (-0.01, 0, +0.01, ...) so that their mean is d for 3 subjects
        cases = [{"case": n, "dice": d + 0.01 * (i - 1)} for i, n in enumerate(names)]
        res = {"dice": {"mean": d, "std": 0.01, "n": 3, "n_nan": 0},
               "hd95_mm": {"mean": 10 * (1 - d), "std": 0.5, "n": 3, "n_nan": 0},
               "cases": cases}
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "metrics.json").write_text(json.dumps(res))
        return res


def _settings(**kw):
    S = dict(PL.FULL, protocols=["neuromorphometrics", "harvard-oxford"], seeds=3, epochs=2,
             samples_per_epoch=4, batch_size=2, n_train=8, n_valid=2, n_test=3,
             regimes={"full-data": 1.0, "low-data": 0.25},
             no_extend=True)   # the fake scores put many winners at grid ends: counts stay fixed
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
    return RUN.Comparison(out, S or _settings(), PL.parse_variants(variants), grid, datasets=ds,
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
        assert {c["adapter"]["method"] for c in cs} == {"decoder", "full", "lora", "pissa",
                                                         "lorapt"}
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
    variants = PL.parse_variants(VARIANTS)
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
    s = R.aggregate(runs, PL.parse_variants("lorapt:8"))
    assert len(s) == 1
    s = s[0]
    assert s["dice"]["mean"] == pytest.approx(0.8)
    assert s["dice"]["std"] == pytest.approx(0.1)              # sqrt(((.1)²+0+(.1)²)/2)
    assert s["hd95_mm"]["mean"] == pytest.approx(3.0)
    assert s["hd95_mm"]["std"] == pytest.approx(math.sqrt(2.0))  # sqrt((1+1)/1)
    assert s["hd95_mm"]["n_nan"] == 1
    assert s["time_per_step_s"] == pytest.approx(2.0)
    md = R.markdown([s], _settings(), 4)
    assert "0.800 ± 0.100" in md and "3.00 ± 1.41" in md and "1.00 MB" in md
    one = CM.seed_stats([0.75])
    assert one["mean"] == 0.75 and math.isnan(one["std"])
    assert "0.750 (n=1)" in CM.fmt_pm(one)


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
    # each subject's Dice reaches the summary's paired comparison (3 test subjects: n/a)
    final = [r for r in runs if r["final"]]
    assert all(sorted(r["test_case_dice"]) == ["sub10", "sub11", "sub12"] for r in final)
    dec = [s for s in summ if s["variant"] == "decoder"]
    assert all(len(s["paired"]) == 1 and s["paired"][0]["reference"] == "lorapt-r4" and
               s["paired"][0]["n_pairs"] == 3 and s["paired"][0]["p_value"] is None
               for s in dec)
    assert all(s["paired"] == [] for s in summ if s["variant"] == "lorapt-r4")
    assert "Paired per-subject comparison" in md and "n/a: 3 paired subject(s)" in md


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
    variants = PL.parse_variants(VARIANTS)
    total = sum(len(GRID[v["method"]]) for v in variants) + len(variants) * (2 * 2 - 1)
    assert len(first.train_cfgs) + len(second.train_cfgs) == total
    summary = (setup[2] / "summary.json").read_text()
    # a third pass trains and evaluates nothing and gives the same table
    third = FakeTrainer(fail_after=0)
    _comparison(setup, third, S=S).run()
    assert third.eval_calls == []
    assert (setup[2] / "summary.json").read_text() == summary
    # other settings in the same folder: refused
    with pytest.raises(CM.CompareError, match="other settings"):
        _comparison(setup, FakeTrainer(), S=dict(S, epochs=3)).run()


def test_argument_errors():
    with pytest.raises(CM.CompareError, match="unknown method"):
        PL.parse_variants("lorapt:8,adalora:4")
    with pytest.raises(CM.CompareError, match="rank"):
        PL.parse_variants("lorapt:0")
    with pytest.raises(CM.CompareError, match="no rank"):
        PL.parse_variants("full:4")
    with pytest.raises(CM.CompareError, match="twice"):
        PL.parse_variants("lora:8,lora:8")
    with pytest.raises(CM.CompareError, match="--lrs"):
        PL.parse_lrs(["lora=-1"], GRID)
    assert PL.parse_lrs(["lora=3e-3,1e-3"], GRID)["lora"] == [1e-3, 3e-3]
    assert [CM.n_used(12, 0.25), CM.n_used(8, 0.25), CM.n_used(3, 0.1)] == [3, 2, 1]
    p = CLI.build_parser()
    with pytest.raises(CM.CompareError, match="low-data-fraction"):
        CLI.settings_from_args(p.parse_args(["--low-data-fraction", "1.5"]))
    with pytest.raises(CM.CompareError, match="--seeds"):
        CLI.settings_from_args(p.parse_args(["--seeds", "0"]))
    q = CLI.settings_from_args(p.parse_args(["--quick"]))
    assert q["seeds"] == 1 and len(q["protocols"]) == 1


@pytest.mark.parametrize("workers,variants", [(1, "decoder,lorapt:2"), (2, "dora:2,lorapt:2")])
def test_end_to_end_tiny_preset_real_training(tmp_path, workers, variants):
    """The real train()/evaluate() on generated tiny data: the harness's wiring (summary,
    curves, artefact, metrics, per-subject Dice) works, in one process and with 2 worker
    processes (there with HF PEFT's DoRA), and a resumed pass retrains nothing."""
    pytest.importorskip("monai")
    import torch
    from test_data import make_dataset
    from tsvd.models import build_unetr, save_checkpoint
    if "dora" in variants:
        pytest.importorskip("peft")
    data = make_dataset(tmp_path / "d", "eadc", n_train=2, n_valid=1, n_test=1)
    torch.manual_seed(0)
    save_checkpoint(build_unetr("tiny"), str(tmp_path / "base.safetensors"))
    S = dict(PL.FULL, preset="tiny", roi=None, spacing=1.0, protocols=["p"], seeds=1,
             epochs=1, samples_per_epoch=2, batch_size=1, n_train=2, n_valid=1, n_test=1,
             regimes={"full-data": 1.0})
    kw = dict(datasets={"p": data}, pretrained=tmp_path / "base.safetensors", device="cpu",
              log=lambda *a: None)
    vs = PL.parse_variants(variants)
    grid = {v["method"]: [1e-3] for v in vs}
    cmp = RUN.Comparison(tmp_path / "out", S, vs, grid, workers=workers, threads_per_worker=1,
                         **kw)
    cmp.run()
    runs = json.loads((tmp_path / "out" / "runs.json").read_text())
    assert len(runs) == 2 and all(r["workers"] == workers for r in runs)
    assert all(r["threads"] == (1 if workers > 1 else torch.get_num_threads()) for r in runs)
    assert not list((tmp_path / "out").rglob("worker_*.json"))
    assert all(len(r["test_case_dice"]) == 1 for r in runs)
    summ = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [s["variant"] for s in summ] == [v["name"] for v in vs]
    for s in summ:
        assert 0.0 <= s["dice"]["mean"] <= 1.0
        assert s["trainable_parameters"] > 0 and s["artefact_bytes"] > 0
        assert s["time_per_step_s"] > 0 and s["peak_mem_mb"] > 0
        if s["method"] != "decoder":
            assert s["adapter_parameters"] > 0
    calls = []

    def no_train(*a, **k):
        calls.append(1)
        raise AssertionError("retrained a finished run")
    RUN.Comparison(tmp_path / "out", S, vs, grid, train_fn=no_train, evaluate_fn=no_train,
                   **kw).run()
    assert calls == []


# ------------------------------------------------------------------------------------------
# dora, the registry, the paired tests, resuming run by run
# ------------------------------------------------------------------------------------------
def test_methods_come_from_the_registry_and_dora_is_a_variant(setup):
    import tsvd.peft
    assert PL.methods() == tuple(tsvd.peft.METHODS) and "dora" in PL.methods()
    # every registered method has a grid and a name in the tables
    assert set(PL.LR_GRID) == set(PL.methods()) == set(PL.QUICK_LR_GRID)
    assert set(PL.NAMES) == set(PL.methods()) | {"prior"}
    assert PL.LR_GRID["dora"] == PL.LR_GRID["lora"]
    assert PL.display_name("dora") == "DoRA"
    assert "dora-r8" in [v["name"] for v in PL.parse_variants(PL.DEFAULT_VARIANTS)]
    assert CLI.variants_from_args(CLI.build_parser().parse_args([])) == \
        PL.parse_variants(PL.DEFAULT_VARIANTS)
    assert PL.parse_variants("dora:8,dora:4,lorapt") == [
        {"name": "dora-r8", "method": "dora", "rank": 8, "train_decoder": True},
        {"name": "dora-r4", "method": "dora", "rank": 4, "train_decoder": True},
        {"name": "lorapt-r8", "method": "lorapt", "rank": 8, "train_decoder": True}]
    with pytest.raises(CM.CompareError, match="twice"):
        PL.parse_variants("dora,dora:8")
    with pytest.raises(CM.CompareError, match="rank"):
        PL.parse_variants("dora:x")
    assert PL.parse_lrs(["dora=1e-3,4e-3"], PL.LR_GRID)["dora"] == [1e-3, 4e-3]
    args = CLI.build_parser().parse_args(["--variants", "dora:8,lorapt:8", "--lrs", "dora=7e-3"])
    assert [v["name"] for v in PL.parse_variants(args.variants)] == ["dora-r8", "lorapt-r8"]
    # in a comparison: dora trains with its own grid and rank, and has its rows
    fake = FakeTrainer()
    grid = dict(GRID, dora=[2e-3, 4e-3, 6e-3])
    cmp = _comparison(setup, fake, S=_settings(seeds=1, regimes={"full-data": 1.0},
                                               protocols=["neuromorphometrics"]),
                      variants="dora:8,lorapt:8", grid=grid)
    cmp.run()
    dora = [c for c in fake.train_cfgs if c["adapter"]["method"] == "dora"]
    assert sorted(c["train"]["lr"] for c in dora) == [2e-3, 4e-3, 6e-3]
    assert {c["adapter"]["rank"] for c in dora} == {8}
    md = (setup[2] / "results.md").read_text()
    assert "| DoRA | 8 |" in md and "| LoRA-PT r8 | DoRA r8 | 3 |" in md


def _runs_with_cases(variant, method, per_seed: list[dict], regime="full-data", protocol="p"):
    return [{"regime": regime, "protocol": protocol, "variant": variant, "method": method,
             "rank": 8, "lr": 1e-3, "seed": seed, "final": True, "train_subjects": 8,
             "test_dice": sum(cases.values()) / len(cases), "test_hd95_mm": 1.0,
             "val_dice": 0.5, "trainable_parameters": 10, "adapter_parameters": 4,
             "model_parameters": 100, "artefact_bytes": 1, "test_case_dice": cases}
            for seed, cases in enumerate(per_seed)]


def _exact_wilcoxon_p(d):
    """Two-sided exact p of the signed-rank test by enumerating every sign assignment (the
    |differences| distinct and non-zero): 2 P(W+ <= min(W+, W-)) under H0, capped at 1."""
    import itertools
    ranks = {a: i + 1 for i, a in enumerate(sorted(abs(x) for x in d))}
    w_plus = sum(ranks[abs(x)] for x in d if x > 0)
    t = min(w_plus, sum(ranks.values()) - w_plus)
    n = len(d)
    hits = sum(1 for signs in itertools.product((0, 1), repeat=n)
               if sum(r for r, s in zip(range(1, n + 1), signs) if s) <= t)
    return t, min(1.0, 2 * hits / 2 ** n)


def test_paired_wilcoxon_by_hand_and_scipy():
    from scipy.stats import wilcoxon
    subjects = [f"s{i}" for i in range(8)]
    base = [0.60, 0.70, 0.65, 0.72, 0.58, 0.66, 0.69, 0.61]
    diff = [0.05, 0.02, -0.01, 0.06, 0.03, 0.07, 0.08, -0.09]   # LoRA-PT − LoRA per subject
    # LoRA: 3 seeds around base (mean = base); LoRA-PT: 2 seeds around base + diff; subject
    # s7 missing in one LoRA seed (its mean over the 2 others is still base)
    lora = [{s: b + e for s, b in zip(subjects, base)} for e in (-0.02, 0.0, 0.02)]
    del lora[1]["s7"]
    lorapt = [{s: b + d + e for s, b, d in zip(subjects, base, diff)} for e in (-0.03, 0.03)]
    runs = (_runs_with_cases("lorapt-r8", "lorapt", lorapt) +
            _runs_with_cases("lora-r8", "lora", lora) +
            _runs_with_cases("other", "lora", lora, protocol="q"))    # no LoRA-PT in q
    tests = R.paired_tests(runs)
    assert len(tests) == 1
    t = tests[0]
    assert (t["reference"], t["baseline"], t["protocol"]) == ("lorapt-r8", "lora-r8", "p")
    assert t["reference_seeds"] == [0, 1] and t["baseline_seeds"] == [0, 1, 2]
    assert t["n_pairs"] == 8 and t["note"] is None
    assert t["median_diff"] == pytest.approx(0.04)        # (0.03 + 0.05) / 2
    assert t["mean_diff"] == pytest.approx(sum(diff) / 8)
    stat, p = _exact_wilcoxon_p(diff)                    # W- = 1 + 8 = 9, W+ = 27
    assert stat == 9
    assert t["statistic"] == pytest.approx(stat)
    assert t["p_value"] == pytest.approx(p)
    assert t["p_value"] == pytest.approx(wilcoxon(diff).pvalue)
    # the same in the summary (the baseline's cell) and in the table
    summ = R.aggregate(runs, PL.parse_variants("lorapt:8,lora:8") +
                       [{"name": "other", "method": "lora", "rank": 8}])
    cell = next(s for s in summ if s["variant"] == "lora-r8")
    assert cell["paired"] == [t]
    assert next(s for s in summ if s["variant"] == "lorapt-r8")["paired"] == []
    md = R.markdown(summ, _settings(), 4)
    assert f"| p | LoRA-PT r8 | LoRA r8 | 8 | +0.040 | {sum(diff) / 8:+.3f} | " \
           f"{CM.fmt_p(p)} |" in md


def test_paired_test_not_applicable():
    subjects = [f"s{i}" for i in range(5)]
    five = R.paired_test({s: 0.5 + 0.01 * i for i, s in enumerate(subjects)},
                         {s: 0.4 for s in subjects})
    assert five["n_pairs"] == 5 and five["p_value"] is None and "n/a" in five["note"]
    assert five["median_diff"] == pytest.approx(0.12)
    same = {f"s{i}": 0.5 for i in range(10)}
    zero = R.paired_test(same, dict(same))
    assert zero["p_value"] is None and zero["median_diff"] == 0 and "zero" in zero["note"]
    few = R.paired_test(same, dict(same, s0=0.4, s1=0.3))       # 2 non-zero differences
    assert few["p_value"] is None and "non-zero" in few["note"]
    none = R.paired_test({}, {"a": 0.1})                         # e.g. results without cases
    assert none["n_pairs"] == 0 and none["median_diff"] is None and "n/a" in none["note"]
    runs = _runs_with_cases("lorapt-r8", "lorapt", [{"a": 0.5}]) + \
        _runs_with_cases("lora-r8", "lora", [{"a": 0.4}])
    for r in runs:
        r["test_case_dice"] = None
    md = R.markdown(R.aggregate(runs, PL.parse_variants("lorapt:8,lora:8")), _settings(), 4)
    assert "| n/a | n/a | n/a: 0 paired subject(s)" in md


def test_runner_skips_completed_runs(setup):
    S = _settings(seeds=2, protocols=["neuromorphometrics"], regimes={"full-data": 1.0})
    first = FakeTrainer()
    cmp = _comparison(setup, first, S=S, variants="decoder,lorapt:4")
    cmp.run()
    jobs = cmp.plan()
    assert all(cmp.is_done(j) for j in jobs)
    # remove one finished final run (seed 1 of lorapt-r4): only it is trained and tested again
    lost = next(r for r in cmp.final_runs() if r["variant"] == "lorapt-r4" and r["seed"] == 1)
    import shutil
    shutil.rmtree(lost["run_dir"])
    fresh = _comparison(setup, FakeTrainer(), S=S, variants="decoder,lorapt:4")
    assert [j["variant"]["name"] + str(j["seed"]) for j in jobs if not fresh.is_done(j)] == \
        ["lorapt-r41"]
    second = FakeTrainer()
    cmp2 = _comparison(setup, second, S=S, variants="decoder,lorapt:4")
    cmp2.run()
    assert [(c["adapter"]["method"], c["train"]["seed"]) for c in second.train_cfgs] == \
        [("lorapt", 1)]
    assert len(second.eval_calls) == 1 and second.eval_calls[0][0]["train"]["seed"] == 1
    assert len(cmp2.final_runs()) == 4 and all(cmp2.is_done(j) for j in jobs)
    # a run's result.json without the test numbers (interrupted before testing): tested only
    r = next(r for r in cmp2.final_runs() if r["variant"] == "decoder" and r["seed"] == 1)
    res = json.loads((Path(r["run_dir"]) / "result.json").read_text())
    res["test_dice"] = None
    (Path(r["run_dir"]) / "result.json").write_text(json.dumps(res))
    shutil.rmtree(Path(r["run_dir"]) / "eval")
    third = FakeTrainer()
    _comparison(setup, third, S=S, variants="decoder,lorapt:4").run()
    assert third.train_cfgs == [] and len(third.eval_calls) == 1


# ------------------------------------------------------------------------------------------
# adapters without the decoder (METHOD[:RANK]:nodec)
# ------------------------------------------------------------------------------------------
def test_nodec_variants_parse_and_errors():
    assert PL.parse_variants("lorapt:8:nodec, lora:nodec ,decoder") == [
        {"name": "lorapt-r8-nodec", "method": "lorapt", "rank": 8, "train_decoder": False},
        {"name": "lora-r8-nodec", "method": "lora", "rank": 8, "train_decoder": False},
        {"name": "decoder", "method": "decoder", "rank": None, "train_decoder": True}]
    # with and without the decoder are two variants; the same one twice is refused
    assert [v["name"] for v in PL.parse_variants("lorapt:4,lorapt:4:nodec")] == \
        ["lorapt-r4", "lorapt-r4-nodec"]
    with pytest.raises(CM.CompareError, match="--variants: lorapt-r8-nodec given twice"):
        PL.parse_variants("lorapt:nodec,lorapt:8:nodec")
    for bad, msg in [("decoder:nodec", "decoder has no adapters"),
                     ("full:nodec", "full has no adapters"),
                     ("lorapt:nodec:8", r"expected METHOD\[:RANK\]\[:nodec\]"),
                     ("lorapt:8:nodec:nodec", r"expected METHOD\[:RANK\]\[:nodec\]"),
                     ("lorapt:8:4", r"expected METHOD\[:RANK\]\[:nodec\]"),
                     ("lorapt:8:dec", r"'lorapt:8:dec': expected METHOD\[:RANK\]\[:nodec\]"),
                     ("lorapt:dec", "rank of 'lorapt:dec' must be a positive integer"),
                     ("lora:0:nodec", "rank of 'lora:0:nodec'"),
                     ("nodec", "unknown method 'nodec'")]:
        with pytest.raises(CM.CompareError, match="--variants") as e:
            PL.parse_variants(bad)
        assert e.match(msg), (bad, str(e.value))
    # the command line: the error names --variants and exits 2 before any work
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert CLI.main(["--variants", "decoder:nodec", "--estimate-only"]) == 2
    assert "error: --variants: 'decoder:nodec'" in err.getvalue()
    assert ":nodec" in CLI.build_parser().format_help()
    # names in the tables; the defaults have both adapters-only rows
    vs = PL.parse_variants(PL.DEFAULT_VARIANTS)
    assert {"lorapt-r8-nodec", "lora-r8-nodec"} <= {v["name"] for v in vs}
    assert [PL.variant_label(v) for v in PL.parse_variants("lorapt:8:nodec,lora:4,full")] == \
        ["LoRA-PT (adapters only) r8", "LoRA r4", "full"]


def test_nodec_runs_freeze_the_decoder_and_sweep_on_their_own(setup):
    fake = FakeTrainer()
    S = _settings(seeds=2, regimes={"full-data": 1.0}, protocols=["neuromorphometrics"])
    grid = dict(GRID, lorapt=[1e-3, 3e-3, 1e-2])
    cmp = _comparison(setup, fake, S=S, variants="lorapt:8,lorapt:8:nodec", grid=grid)
    cmp.run()
    by = {}
    for c in fake.train_cfgs:
        by.setdefault(c["adapter"]["train_decoder"], []).append(c)
    # 3 sweep rates + 1 more seed each; the only difference is train_decoder (and lr)
    assert {k: len(v) for k, v in by.items()} == {True: 4, False: 4}
    assert sorted(c["train"]["lr"] for c in by[False] if c["train"]["seed"] == 0) == \
        [1e-3, 3e-3, 1e-2]
    strip = ("adapter.train_decoder", "train.lr")
    for a, b in zip(sorted(by[True], key=lambda c: (c["train"]["seed"], c["train"]["lr"])),
                    sorted(by[False], key=lambda c: (c["train"]["seed"], c["train"]["lr"]))):
        if a["train"]["lr"] == b["train"]["lr"]:
            assert _strip(a, *strip) == _strip(b, *strip)
    # each has its own sweep and choice
    assert sorted(cmp.lr_choice) == ["full-data/neuromorphometrics/lorapt-r8",
                                     "full-data/neuromorphometrics/lorapt-r8-nodec"]
    summ = json.loads((setup[2] / "summary.json").read_text())
    assert [(s["variant"], s["train_decoder"]) for s in summ] == [
        ("lorapt-r8", True), ("lorapt-r8-nodec", False)]
    md = (setup[2] / "results.md").read_text()
    assert "| LoRA-PT (adapters only) | 8 |" in md and "| LoRA-PT | 8 |" in md


# ------------------------------------------------------------------------------------------
# test subjects: 20 per protocol, from --test-start on
# ------------------------------------------------------------------------------------------
def test_twenty_test_subjects_from_test_start(tmp_path, monkeypatch):
    p = CLI.build_parser()
    for argv in ([], ["--quick"]):
        S = CLI.settings_from_args(p.parse_args(argv))
        assert (S["n_test"], S["test_start"]) == (20, 28)   # past the demo's 8-27
    S = CLI.settings_from_args(p.parse_args(["--test-start", "40"]))
    assert S["test_start"] == 40
    with pytest.raises(CM.CompareError, match="--test-start"):
        CLI.settings_from_args(p.parse_args(["--test-start", "-1"]))
    # recorded in plan.json: a folder made with another test_start is not continued
    vs = PL.parse_variants("lorapt:8")
    rec = PL.plan_record(S, vs, PL.LR_GRID, None, "cpu")
    CM.write_json(tmp_path / "plan.json", rec)
    assert json.loads((tmp_path / "plan.json").read_text())["settings"]["test_start"] == 40
    assert PL.check_plan_file(tmp_path, rec) is True
    with pytest.raises(CM.CompareError, match="other settings"):
        PL.check_plan_file(tmp_path, PL.plan_record(dict(S, test_start=0), vs, PL.LR_GRID,
                                                    None, "cpu"))
    # and handed to the dataset builder
    from tsvd.peft.seg import embedded as E
    calls = []
    monkeypatch.setattr(E, "build_dataset", lambda name, **kw: calls.append((name, kw)) or
                        tmp_path / name)
    got = RUN.prepare_data(dict(S, protocols=["neuromorphometrics", "harvard-oxford"]),
                           tmp_path, log=lambda *a: None)
    assert got == {p: tmp_path / p for p in ("neuromorphometrics", "harvard-oxford")}
    assert [(n, kw["n_test"], kw["test_start"]) for n, kw in calls] == [
        ("neuromorphometrics", 20, 40), ("harvard-oxford", 20, 40)]


def test_runs_flip_left_right_only(tmp_path):
    for quick in (False, True):
        S = PL.check_settings(quick)
        cfg = PL.run_config(S, tmp_path / "d", tmp_path / "base.safetensors", 12, "full-data",
                            PL.parse_variants("lorapt:8")[0], 1e-3, 0, "cpu")
        assert cfg["data"]["flip_axes"] == [0]
        assert cfg["infer"]["tta_flip"] == []          # test images are not flipped


# ------------------------------------------------------------------------------------------
# learning-rate grids that bracket the optimum, and the flag when they do not
# ------------------------------------------------------------------------------------------
def test_lr_grids_three_geometric_rates_and_plan_counts():
    for m, g in PL.LR_GRID.items():
        assert len(g) == 3 and g == sorted(g), m
        assert g[1] / g[0] == pytest.approx(g[2] / g[1]), m          # geometric
    for m in ("decoder", "lora", "pissa", "dora", "lorapt"):
        assert PL.LR_GRID[m] == PL.LR_GRID["lorapt"]
    assert PL.LR_GRID["full"] == pytest.approx([x / 10 for x in PL.LR_GRID["lorapt"]])
    # the sizing comment's counts: 9 trained variants × 3 rates of sweep, 2 × 2 × 3 final runs
    # each, the 9 seed-0 final runs of the first cell reuse their sweep run; the template
    # prior once per (regime, protocol), first
    S = PL.check_settings()
    vs = PL.parse_variants(PL.DEFAULT_VARIANTS)
    js = PL.jobs(S, vs, PL.LR_GRID)
    sweep = [j for j in js if j["phase"] == "sweep"]
    final = [j for j in js if j["phase"] == "final"]
    assert [j["phase"] for j in js[:4]] == ["prior"] * 4
    assert len(js) == 4 + len(sweep) + len(final)
    assert (len(vs), len(sweep), len(final)) == (10, 27, 108)
    assert sum(j["reuses_sweep"] for j in final) == 9
    assert len(sweep) + len(final) - 9 == 126                  # trainings


def test_grid_edge_by_hand():
    g = [2e-3, 5e-3, 1.25e-2]
    assert [R.grid_edge(x, g) for x in g] == ["lowest", None, "highest"]
    assert R.grid_edge(1e-3, [1e-3]) == "single rate"
    assert R.grid_edge(None, g) is None


class PeakedTrainer(FakeTrainer):
    """Validation Dice peaked at 5e-3 for LoRA-PT, rising with the rate for the decoder."""

    def train(self, cfg, out, **kw):
        summ = super().train(cfg, out, **kw)
        lr = cfg["train"]["lr"]
        summ["best_val_dice"] = (0.8 - abs(math.log(lr / 5e-3)) / 10
                                 if cfg["adapter"]["method"] == "lorapt" else 0.5 + lr)
        return summ


def test_chosen_rate_at_grid_edge_is_flagged(setup):
    S = _settings(seeds=1, regimes={"full-data": 1.0}, protocols=["neuromorphometrics"])
    grid = dict(PL.LR_GRID)
    cmp = _comparison(setup, PeakedTrainer(), S=S, variants="decoder,lorapt:8", grid=grid)
    cmp.run()
    out = setup[2]
    ch = json.loads((out / "lr_choice.json").read_text())
    dec, lpt = (ch[f"full-data/neuromorphometrics/{n}"] for n in ("decoder", "lorapt-r8"))
    assert (dec["lr"], dec["at_grid_edge"], dec["grid"]) == (1.25e-2, "highest", grid["decoder"])
    assert (lpt["lr"], lpt["at_grid_edge"]) == (5e-3, None)
    with open(out / "summary.csv") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert rows["decoder"]["lr_at_grid_edge"] == "highest"
    assert rows["lorapt-r8"]["lr_at_grid_edge"] == ""
    md = (out / "results.md").read_text()
    assert "| decoder-only | – | 0.0125 † |" in md and "| LoRA-PT | 8 | 0.005 |" in md
    assert "† chosen rate at an end of its grid" in md
    assert "decoder-only: 0.0125, highest of 0.002, 0.005, 0.0125" in md


class BeyondGridTrainer(FakeTrainer):
    """Validation Dice peaked at 3e-2 for LoRA-PT (beyond its grid's top, 1.25e-2), rising
    with the rate for the decoder, peaked at 5e-3 (inside the grid) for LoRA."""

    def train(self, cfg, out, **kw):
        summ = super().train(cfg, out, **kw)
        lr, m = cfg["train"]["lr"], cfg["adapter"]["method"]
        peak = {"lorapt": 3e-2, "lora": 5e-3}.get(m)
        summ["best_val_dice"] = 0.5 + lr if peak is None else 0.8 - abs(math.log(lr / peak)) / 10
        self.lrs = getattr(self, "lrs", []) + [(m, lr, cfg["train"]["seed"])]
        return summ


def test_grid_extends_until_the_best_rate_is_bracketed(setup):
    """A sweep whose best rate is at an end of its grid trains one more rate beyond it (the
    grid's ratio, 2.5), at most EXTEND_GRID times; every variant under the same rule; the final
    runs use the choice after the extensions; a rate still at an end keeps its flag."""
    assert PL.EXTEND_GRID == 2
    S = _settings(seeds=2, regimes={"full-data": 1.0}, protocols=["neuromorphometrics"],
                  no_extend=False)
    fake = BeyondGridTrainer()
    cmp = _comparison(setup, fake, S=S, variants="decoder,lora:8,lorapt:8", grid=dict(PL.LR_GRID))
    cmp.run()
    ch = json.loads((setup[2] / "lr_choice.json").read_text())
    dec, lora, lpt = (ch[f"full-data/neuromorphometrics/{n}"]
                      for n in ("decoder", "lora-r8", "lorapt-r8"))
    # LoRA: peak inside the grid, no extension
    assert (lora["lr"], lora["at_grid_edge"], len(lora["grid"])) == (5e-3, None, 3)
    # LoRA-PT: 3.125e-2 wins after one extension, a second (7.812e-2) brackets it
    assert lpt["grid"] == [2e-3, 5e-3, 1.25e-2, 3.125e-2, 7.812e-2]
    assert (lpt["lr"], lpt["at_grid_edge"]) == (3.125e-2, None)
    # decoder: still rising after two extensions, flagged
    assert dec["grid"] == [2e-3, 5e-3, 1.25e-2, 3.125e-2, 7.812e-2]
    assert (dec["lr"], dec["at_grid_edge"]) == (7.812e-2, "highest")
    finals = [(m, lr) for m, lr, seed in fake.lrs if seed == 1]
    assert sorted(finals) == [("decoder", 7.812e-2), ("lora", 5e-3), ("lorapt", 3.125e-2)]
    # 3 + 3 + 3 sweep runs, 2 + 0 + 2 extensions, 3 seed-1 finals (seed 0 reuses the sweep)
    assert len(fake.lrs) == 9 + 4 + 3
    # resumed: nothing is trained again
    fake2 = BeyondGridTrainer()
    _comparison(setup, fake2, S=S, variants="decoder,lora:8,lorapt:8",
                grid=dict(PL.LR_GRID)).run()
    assert getattr(fake2, "lrs", []) == []


def test_resumed_comparison_runs_finals_of_complete_sweeps_first(setup):
    """Interrupted after the decoder's and LoRA's sweeps: on resuming, LoRA's final run (its
    optimum inside the grid, so no extension can move it) trains before LoRA-PT's sweep; the
    decoder's does not (its best rate is at the grid's top: an extension follows). The
    choices and the final runs are those of an uninterrupted run (the test above)."""
    S = _settings(seeds=2, regimes={"full-data": 1.0}, protocols=["neuromorphometrics"],
                  no_extend=False)
    first = BeyondGridTrainer(fail_after=6)
    with pytest.raises(KeyboardInterrupt):
        _comparison(setup, first, S=S, variants="decoder,lora:8,lorapt:8",
                    grid=dict(PL.LR_GRID)).run()
    assert [m for m, _, _ in first.lrs] == ["decoder"] * 3 + ["lora"] * 3
    fake = BeyondGridTrainer()
    _comparison(setup, fake, S=S, variants="decoder,lora:8,lorapt:8", grid=dict(PL.LR_GRID)).run()
    assert fake.lrs[0] == ("lora", 5e-3, 1)                     # LoRA's final, first
    assert [m for m, _, _ in fake.lrs[1:4]] == ["lorapt"] * 3   # then the remaining sweep
    ch = json.loads((setup[2] / "lr_choice.json").read_text())
    assert [ch[f"full-data/neuromorphometrics/{n}"]["lr"]
            for n in ("decoder", "lora-r8", "lorapt-r8")] == [7.812e-2, 5e-3, 3.125e-2]
    finals = sorted((m, lr) for m, lr, seed in first.lrs + fake.lrs if seed == 1)
    assert finals == [("decoder", 7.812e-2), ("lora", 5e-3), ("lorapt", 3.125e-2)]
    assert len(first.lrs + fake.lrs) == 9 + 4 + 3               # nothing trained twice


# ------------------------------------------------------------------------------------------
# the template prior
# ------------------------------------------------------------------------------------------
class FakePrior:
    """Stands in for demo.template_prior_scores: hand-set Dice per subject; sub13 empty."""

    def __init__(self, dice: dict):
        self.dice, self.calls = dice, []

    def __call__(self, cases, protocol, cache):
        self.calls.append(([c["name"] for c in cases], protocol, cache))
        d = [self.dice[c["name"]] for c in cases]
        e = [c["name"] == "sub13" for c in cases]
        h = [100.0 if x else 5.0 for x in e]
        return {"dice": {"mean": float(sum(d) / len(d)), "std": float("nan"), "n": len(d)},
                "hd95_mm": {"mean": float(sum(h) / len(h)), "std": float("nan"), "n": len(h),
                            "n_empty": sum(e)},
                "n": len(d)}


def test_template_prior_row_and_paired_baseline(tmp_path):
    import statistics

    from scipy.stats import wilcoxon
    ds = {"neuromorphometrics": fake_dataset(tmp_path / "nm", n_train=4, n_valid=2, n_test=8)}
    pre = tmp_path / "base.safetensors"
    pre.write_bytes(b"base")
    test_names = [f"sub{i}" for i in range(6, 14)]
    hand = dict(zip(test_names, [0.40, 0.45, 0.52, 0.38, 0.47, 0.50, 0.41, 0.0]))
    prior = FakePrior(hand)
    S = _settings(seeds=1, protocols=["neuromorphometrics"], n_train=4, n_test=8)
    kw = dict(datasets=ds, pretrained=pre, device="cpu", log=lambda *a: None, plots=False,
              cache=tmp_path / "cache")
    vs = PL.parse_variants("lorapt:8,prior")
    assert vs[1] == {"name": "template-prior", "method": "prior", "rank": None,
                     "train_decoder": None}
    fake = FakeTrainer()
    cmp = RUN.Comparison(tmp_path / "out", S, vs, {"lorapt": [1e-3]}, train_fn=fake.train,
                         evaluate_fn=fake.evaluate, prior_fn=prior, **kw)
    cmp.run()
    # one call per test subject (each alone, for the pairs), once for both regimes
    assert prior.calls == [([n], "neuromorphometrics", tmp_path / "cache") for n in test_names]
    assert all(c["adapter"]["method"] == "lorapt" for c in fake.train_cfgs)
    summ = json.loads((tmp_path / "out" / "summary.json").read_text())
    rows = [s for s in summ if s["variant"] == "template-prior"]
    assert [s["regime"] for s in rows] == ["full-data", "low-data"]
    for s in rows:
        assert (s["rank"], s["lr"], s["seeds"], s["trainable_parameters"]) == (None, None, [], 0)
        assert s["dice"]["mean"] == pytest.approx(statistics.mean(hand.values()))
        assert s["dice_std_subjects"] == pytest.approx(statistics.stdev(hand.values()))
        assert s["hd95_mm"]["mean"] == pytest.approx((7 * 5.0 + 100.0) / 8)
        # a baseline of the paired test: LoRA-PT's subjects minus the prior's, scipy's p
        (t,) = s["paired"]
        lpt = next(r for r in cmp.final_runs() if r["variant"] == "lorapt-r8" and
                   r["regime"] == s["regime"])
        diff = [lpt["test_case_dice"][n] - hand[n] for n in test_names]
        assert (t["reference"], t["n_pairs"]) == ("lorapt-r8", 8)
        assert t["median_diff"] == pytest.approx(statistics.median(diff))
        assert t["p_value"] == pytest.approx(wilcoxon(diff).pvalue)
    with open(tmp_path / "out" / "summary.csv") as f:
        csv_rows = [r for r in csv.DictReader(f) if r["variant"] == "template-prior"]
    assert [(r["rank"], r["lr"], r["trainable_parameters"]) for r in csv_rows] == \
        [("", "", "0")] * 2
    md = (tmp_path / "out" / "results.md").read_text()
    m = statistics.mean(hand.values())
    assert f"| neuromorphometrics | template prior (no training) | – | – | {m:.3f} (± " in md
    assert "| LoRA-PT r8 | template prior (no training) | 8 |" in md
    # resumed: the prior is read back, not recomputed
    again = FakePrior(hand)
    RUN.Comparison(tmp_path / "out", S, vs, {"lorapt": [1e-3]}, train_fn=fake.train,
                   evaluate_fn=fake.evaluate, prior_fn=again, **kw).run()
    assert again.calls == []


# ------------------------------------------------------------------------------------------
# summary.csv: paired columns against one LoRA-PT row, empty predictions, sample std
# ------------------------------------------------------------------------------------------
def test_summary_paired_columns_empty_counts_and_sample_std(tmp_path):
    import random
    import statistics

    from scipy.stats import wilcoxon
    subjects = [f"s{i}" for i in range(8)]
    rng = random.Random(3)

    def runs_of(variant, method, rank, td, val, level, seeds=2, empty=(0, 0)):
        out = []
        for seed in range(seeds):
            cases = {s: level + rng.uniform(-0.1, 0.1) for s in subjects}
            out.append({"regime": "full-data", "protocol": "p", "variant": variant,
                        "method": method, "rank": rank, "train_decoder": td, "lr": 1e-3,
                        "seed": seed, "final": True, "train_subjects": 8,
                        "test_dice": statistics.mean(cases.values()), "test_hd95_mm": 2.0,
                        "test_cases": len(cases), "test_empty": empty[seed],
                        "val_dice": val, "trainable_parameters": 10, "adapter_parameters": 4,
                        "model_parameters": 100, "artefact_bytes": 1, "test_case_dice": cases})
        return out
    # LoRA-PT r8 has the best test Dice, LoRA-PT r4 the best validation Dice
    runs = (runs_of("lorapt-r8", "lorapt", 8, True, 0.60, 0.80) +
            runs_of("lorapt-r4", "lorapt", 4, True, 0.70, 0.70) +
            runs_of("lorapt-r8-nodec", "lorapt", 8, False, 0.50, 0.60) +
            runs_of("lora-r8", "lora", 8, True, 0.65, 0.75, empty=(1, 2)) +
            runs_of("lora-r8-nodec", "lora", 8, False, 0.50, 0.55) +
            runs_of("lora-r2", "lora", 2, True, 0.50, 0.50) +
            runs_of("decoder", "decoder", None, True, 0.60, 0.65))
    vs = PL.parse_variants("lorapt:8,lorapt:4,lorapt:8:nodec,lora:8,lora:8:nodec,lora:2,decoder")
    R.write_reports(tmp_path, runs, {}, vs, _settings(), plots=False)
    with open(tmp_path / "summary.csv") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    want_ref = {"lorapt-r8": "", "lorapt-r4": "", "lorapt-r8-nodec": "",
                "lora-r8": "lorapt-r8", "lora-r8-nodec": "lorapt-r8-nodec",
                "lora-r2": "lorapt-r4", "decoder": "lorapt-r4"}
    assert {v: r["paired_reference"] for v, r in rows.items()} == want_ref

    def subject_means(name):
        rs = [r for r in runs if r["variant"] == name]
        return [statistics.mean(r["test_case_dice"][s] for r in rs) for s in subjects]
    for name, ref in want_ref.items():
        r = rows[name]
        seed_dice = [x["test_dice"] for x in runs if x["variant"] == name]
        assert float(r["dice_std"]) == pytest.approx(statistics.stdev(seed_dice))   # ddof 1
        assert float(r["dice_mean"]) == pytest.approx(statistics.mean(seed_dice))
        if not ref:
            assert r["paired_p"] == r["paired_median_dice_diff"] == r["paired_n"] == ""
            continue
        a, b = subject_means(ref), subject_means(name)
        d = [x - y for x, y in zip(a, b)]
        assert int(r["paired_n"]) == 8 and r["paired_note"] == ""
        assert float(r["paired_median_dice_diff"]) == pytest.approx(statistics.median(d))
        assert float(r["paired_p"]) == pytest.approx(wilcoxon(a, b).pvalue)
    assert (rows["lora-r8"]["empty_predictions"], rows["lora-r8"]["predictions"]) == ("3", "16")
    assert rows["decoder"]["empty_predictions"] == "0"
    summ = json.loads((tmp_path / "summary.json").read_text())
    dec = next(s for s in summ if s["variant"] == "decoder")
    assert dec["paired_reference"]["reference"] == "lorapt-r4"
    assert dec["paired_reference"] in dec["paired"]
    md = (tmp_path / "results.md").read_text()
    assert "| 3/16 |" in md and "empty preds" in md


def test_evaluate_empty_predictions_reach_the_run(setup):
    class EmptyEval(FakeTrainer):
        def evaluate(self, cfg, checkpoint, out, **kw):
            res = super().evaluate(cfg, checkpoint, out, **kw)
            res["hd95_mm"]["n_empty"] = 1
            return res
    S = _settings(seeds=1, regimes={"full-data": 1.0}, protocols=["neuromorphometrics"])
    cmp = _comparison(setup, EmptyEval(), S=S, variants="lorapt:8", grid={"lorapt": [1e-3]})
    cmp.run()
    (r,) = cmp.final_runs()
    assert (r["test_empty"], r["test_cases"]) == (1, 3)
    # evaluate()'s per-subject rows when the summary has no count
    res = {}
    RUN.Comparison._add_test(res, {"dice": {"mean": 0.5, "std": 0.1, "n": 3},
                                   "hd95_mm": {"mean": 1.0, "std": 0.1, "n": 3},
                                   "cases": [{"case": c, "dice": 0.5, "empty_prediction": e}
                                             for c, e in (("a", True), ("b", True),
                                                          ("c", False))]})
    assert res["test_empty"] == 2


# ------------------------------------------------------------------------------------------
# --quick: fewer variants, sized to the 20-minute budget
# ------------------------------------------------------------------------------------------
#: the calibration printed by the full comparison of 2026-11-27 (bench/results/
#: compare_cpu_2core_2026-11-27/compare.log): s/step 0.98-1.13, forward 0.34 s, one subject's
#: preprocessing 0.15 s; the slowest step for every variant
CAL_2026_11_27 = {"step_s": {}, "setup_s": {}, "fwd_s": 0.34, "case_s": 0.15}


def test_stability_columns_by_hand():
    """dice_max_dev = max |seed − mean| (None for one seed); val_zero_runs counts runs whose
    best validation Dice is 0 or missing; both in summary.csv and results.md."""
    def run(seed, test, val):
        return {"regime": "full-data", "protocol": "nm", "variant": "lorapt-r8",
                "method": "lorapt", "rank": 8, "train_decoder": True, "lr": 5e-3,
                "seed": seed, "test_dice": test, "test_hd95_mm": 5.0, "val_dice": val,
                "final": True}
    vs = PL.parse_variants("lorapt:8")
    summ = R.aggregate([run(0, 0.70, 0.7), run(1, 0.64, 0.0), run(2, 0.73, None)], vs)
    assert summ[0]["dice_max_dev"] == pytest.approx(0.05)      # mean 0.69: |0.64 − 0.69|
    assert summ[0]["val_zero_runs"] == 2
    assert R.aggregate([run(0, 0.7, 0.7)], vs)[0]["dice_max_dev"] is None
    S = _settings(seeds=3, regimes={"full-data": 1.0}, protocols=["nm"])
    md = R.markdown(summ, S, 4)
    assert "runs whose best validation Dice is 0): nm LoRA-PT r8: 0.050, 2 at 0" in md
    assert "dice_max_dev" in R.SUMMARY_FIELDS and "val_zero_runs" in R.SUMMARY_FIELDS


def test_regimes_option_selects_regimes_and_names_errors():
    p = CLI.build_parser()
    S = CLI.settings_from_args(p.parse_args(["--regimes", "low-data"]))
    assert S["regimes"] == {"low-data": 0.25}
    S = CLI.settings_from_args(p.parse_args([]))
    assert S["regimes"] == {"full-data": 1.0, "low-data": 0.25}
    for bad in (["--regimes", "half"], ["--regimes", "low-data", "--low-data-fraction", "0"],
                ["--regimes", "full-data,full-data"], ["--regimes", ","]):
        with pytest.raises(CM.CompareError, match="--regimes"):
            CLI.settings_from_args(p.parse_args(bad))
    js = PL.jobs(CLI.settings_from_args(p.parse_args(["--regimes", "low-data", "--seeds", "1"])),
                 PL.parse_variants("decoder"), {"decoder": [5e-3]})
    assert {j["regime"] for j in js} == {"low-data"}


def test_quick_plan_fits_twenty_minutes():
    p = CLI.build_parser()
    args = p.parse_args(["--quick"])
    S = CLI.settings_from_args(args)
    vs = CLI.variants_from_args(args)
    assert [v["name"] for v in vs] == ["decoder", "lora-r8", "lorapt-r8", "template-prior"]
    assert CLI.variants_from_args(p.parse_args(["--quick", "--variants", "lora:4"])) == \
        PL.parse_variants("lora:4")
    js = PL.jobs(S, vs, PL.QUICK_LR_GRID)
    phases = [j["phase"] for j in js]
    assert (phases.count("prior"), phases.count("sweep"), phases.count("final")) == (1, 3, 3)
    assert all(j["reuses_sweep"] for j in js if j["phase"] == "final")
    # one rate per trained method, inside the full grid (the full comparison's choice)
    assert {j["lr"] for j in js if j["phase"] == "sweep"} == {5e-3}
    assert all(PL.QUICK_LR_GRID[m][0] in PL.LR_GRID[m] for m in ("decoder", "lora", "lorapt"))
    assert PL.steps_per_run(S) == 320
    cal = dict(CAL_2026_11_27, step_s={v["name"]: 1.13 for v in vs})
    est = sum(PL.estimate_run(S, S["n_train"], j, cal) for j in js) / 2     # 2 workers
    # by hand: 3 trainings of 320 steps + 16 subjects' preprocessing + 20 epochs of 4
    # validation forwards; 3 tests of 20 subjects; the prior's 20 subjects
    train = 320 * 1.13 + 16 * 0.15 + 20 * 4 * 0.34
    by_hand = (3 * train + 3 * 20 * (2 * 0.15 + 0.34) + 20 * 2 * 0.15) / 2
    assert est == pytest.approx(by_hand)
    assert est * PL.ESTIMATE_RATIO < PL.QUICK_BUDGET_S == 20 * 60
    assert "--quick" in p.format_help() and PL.QUICK_VARIANTS in p.format_help()
    # --quick's 3 trainings run at once (no later phase fills an idle core); else 2 workers
    assert CLI.default_cpu_workers(True, vs, cpus=2) == 3
    assert CLI.default_cpu_workers(False, vs, cpus=2) == 2
    assert CLI.default_cpu_workers(True, PL.parse_variants("lora:4,prior"), cpus=2) == 2
    assert CLI.default_cpu_workers(True, vs, cpus=1) == 1


def test_quick_prints_its_estimate_before_running(tmp_path, monkeypatch, capsys):
    ds = fake_dataset(tmp_path / "nm", n_train=12, n_valid=4, n_test=20)
    base = tmp_path / "base.safetensors"
    base.write_bytes(b"base")
    seen = {}

    def fake_cal(S, variants, dataset, device):
        seen["variants"] = [v["name"] for v in variants]
        return dict(CAL_2026_11_27, step_s={v["name"]: 1.13 for v in variants})
    monkeypatch.setattr(CLI, "prepare_data", lambda S, cache: {"neuromorphometrics": ds})
    monkeypatch.setattr(CLI, "pretrain", lambda *a, **k: base)
    monkeypatch.setattr(PL, "calibrate", fake_cal)
    out = tmp_path / "out"
    assert CLI.main(["--quick", "--estimate-only", "--workers", "2", "--out", str(out),
                     "--cache", str(tmp_path / "cache")]) == 0
    text = capsys.readouterr().out
    assert seen["variants"] == ["decoder", "lora-r8", "lorapt-r8", "template-prior"]
    assert "7 runs (3 trainings" in text and "1 template-prior evaluations" in text
    assert "estimated time for the 7 remaining runs: 10m09s" in text    # 609 s by hand
    assert "note: this --quick plan" not in text
    assert not (out / "plan.json").exists()                              # nothing was run


def test_template_prior_through_the_demo_function(tmp_path, monkeypatch):
    """The default prior_fn is tsvd.peft.seg.demo.template_prior_scores, called on each test
    subject; with the atlas step (embedded.template_prior) replaced by a fixed box (the 2nd
    subject: nothing), each subject's Dice is the box's against its label file, by hand."""
    import nibabel as nib
    import numpy as np
    from test_data import make_dataset
    from tsvd.peft.seg import embedded as E
    data = make_dataset(tmp_path / "d", "eadc", n_train=1, n_valid=1, n_test=3)
    calls = []

    def box(protocol, affine, shape, cache_dir=None):
        calls.append((protocol, tuple(shape), cache_dir))
        m = np.zeros(shape, bool)
        if len(calls) != 2:
            m[14:23, 13:24, 15:20] = True
        return m
    monkeypatch.setattr(E, "template_prior", box)
    S = dict(PL.FULL, protocols=["p"], seeds=1, n_test=3, regimes={"full-data": 1.0})
    cmp = RUN.Comparison(tmp_path / "out", S, PL.parse_variants("prior"), {},
                         datasets={"p": data}, pretrained=tmp_path / "none", device="cpu",
                         cache=tmp_path / "cache", log=lambda *a: None, plots=False)
    cmp.run()
    (r,) = cmp.runs
    names = (data / "test.txt").read_text().split()
    assert sorted(r["test_case_dice"]) == sorted(names) and len(calls) == 3
    assert {c[0] for c in calls} == {"p"} and {c[2] for c in calls} == {tmp_path / "cache"}
    for k, n in enumerate(names):
        lab = np.asarray(nib.load(data / n / f"{n}_mask.nii.gz").dataobj) > 0
        m = np.zeros(lab.shape, bool)
        if k != 1:
            m[14:23, 13:24, 15:20] = True
        want = 2 * (m & lab).sum() / (m.sum() + lab.sum())
        assert (want > 0.4) == (k != 1)                  # the box overlaps each label
        assert r["test_case_dice"][n] == pytest.approx(want, abs=1e-6), n
    assert r["test_empty"] == 1 and r["test_cases"] == 3
    assert r["test_dice"] == pytest.approx(np.mean(list(r["test_case_dice"].values())))
