"""Tests of the GPU check's tools that run without a GPU: bench/trec_micro.py on the CPU
(JSON, correctness checks, the NaN-poison detection, budget, argument errors) and
bench/gpu_check.sh --dry-run (every step printed with a limit inside the deadline, steps
skipped under a short deadline, the summary of the JSON files)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tsvd  # noqa: F401  (loads tsvd._C: torch.ops.tsvd.*)
from tsvd import _ext

ROOT = Path(__file__).resolve().parents[1]
TREC = ROOT / "bench" / "trec_micro.py"
CHECK = ROOT / "bench" / "gpu_check.sh"
needs_ext = pytest.mark.skipif(not _ext.available("cpu"), reason="tsvd._C is not built")


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")]
                                                         if p]))
    env.pop("OUT", None)
    env.pop("GPU_CHECK_DEADLINE", None)
    env.update(extra)
    return env


def _trec(*args, timeout=60):
    return subprocess.run([sys.executable, str(TREC), *args], capture_output=True, text=True,
                          env=_env(), cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def tm():
    """bench/trec_micro.py imported as a module (bench/ is no package)."""
    spec = importlib.util.spec_from_file_location("trec_micro", TREC)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------------------
# trec_micro.py: a real run on the CPU
# --------------------------------------------------------------------------------------
@needs_ext
def test_trec_micro_cpu_run_writes_checked_json(tmp_path):
    out = tmp_path / "o"
    r = _trec("--device", "cpu", "--shapes", "small", "--reps", "3", "--threads", "1",
              "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    d = json.loads((out / "trec_micro.json").read_text())
    assert [f for f in os.listdir(out)] == ["trec_micro.json"]  # no temporary left behind
    assert Path(d["meta"]["tsvd"]).resolve() == ROOT / "tsvd"  # the worktree's package ran
    assert d["complete"] is True and d["cut_short"] is None and d["shapes_not_run"] == []
    assert d["meta"]["device"] == "cpu" and d["meta"]["reps"] == 3
    assert [r["shape"] for r in d["rows"]] == [[5, 16, 12], [4, 8, 20]]
    for row in d["rows"]:
        assert row["ok"] is True and "error" not in row
        assert set(row["checks"]) == {"fwd", "fwd_nores", "grad_U", "grad_S", "grad_V"}
        for name, c in row["checks"].items():
            # float32 against float64: a few ulps, far inside the tolerance
            assert c["finite"] and c["nonfinite"] == 0 and 0 <= c["err"] < 1e-5, (name, c)
            assert c["poisoned"] is None  # the CPU allocator keeps no freed contents
        assert row["reps_done"] == 3
        for k in ("clone_us", "fwd_us", "fb_us", "ref_fwd_us", "ref_fb_us"):
            assert row[k] > 0 and row["min_us"][k[:-3]] <= row[k]
        # the figures are the stated functions of the medians
        n3, n1, n2 = row["shape"]
        assert row["bytes_moved"] == 2 * 4 * n3 * n1 * n2
        assert row["clone_GBps"] == pytest.approx(row["bytes_moved"] / row["clone_us"] / 1e3)
        assert row["fwd_pct_clone"] == pytest.approx(100 * row["clone_us"] / row["fwd_us"])
        assert row["fb_x_ref"] == pytest.approx(row["ref_fb_us"] / row["fb_us"])
    s = d["summary"]
    assert s["all_ok"] is True and s["max_err"] < 1e-5
    assert s["min_fwd_pct_clone"] == pytest.approx(min(r["fwd_pct_clone"] for r in d["rows"]))


@needs_ext
def test_trec_micro_budget_spent_leaves_json_saying_so(tmp_path):
    """A budget spent before the first shape: nothing measured, exit 0, the JSON says why."""
    r = _trec("--device", "cpu", "--shapes", "small", "--budget-s", "0.001", "--out",
              str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "budget of 0.001 s spent" in r.stdout
    d = json.loads((tmp_path / "trec_micro.json").read_text())
    assert d["rows"] == [] and d["complete"] is False
    assert "budget" in d["cut_short"] and d["shapes_not_run"] == [[5, 16, 12], [4, 8, 20]]


@pytest.mark.parametrize("args, flag", [
    (["--reps", "0"], "--reps"),
    (["--warmup", "-1"], "--warmup"),
    (["--shapes", "5x0x3"], "--shapes"),
    (["--shapes", "huge"], "--shapes"),
    (["--device", "gpu"], "--device"),
    (["--budget-s", "-1"], "--budget-s"),
    (["--budget-s", "nan"], "--budget-s"),
    (["--rank", "0"], "--rank"),
])
def test_trec_micro_bad_flags_exit_2_naming_the_flag(args, flag):
    r = _trec(*args)
    assert r.returncode == 2
    assert f"error: {flag}" in r.stderr, r.stderr


@needs_ext
def test_trec_micro_bad_flags_needing_torch(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    for args, flag in ((["--device", "cpu", "--inner", "3"], "--inner"),
                       (["--device", "cpu", "--out", str(f)], "--out")):
        r = _trec(*args)
        assert r.returncode == 2 and f"error: {flag}" in r.stderr, r.stderr
    if not torch.cuda.is_available():
        r = _trec("--device", "cuda")
        assert r.returncode == 2 and "error: --device cuda" in r.stderr, r.stderr


# --------------------------------------------------------------------------------------
# trec_micro.py: the NaN-poison detection
# --------------------------------------------------------------------------------------
def test_check_result_flags_an_unwritten_output(tm):
    """An output over NaN-poisoned memory that a kernel wrote only partly: every element it
    skipped is counted, and the check fails even though the written part is exact."""
    want = torch.randn(1, 5, 16, 12, dtype=torch.float64)
    out = torch.full(want.shape, math.nan, dtype=torch.float32)  # the poisoned block
    out[..., :-1, :] = want[..., :-1, :]                           # last row never written
    c = tm.check_result(out, want, tol=1e-4)
    assert c["ok"] is False and c["finite"] is False
    assert c["nonfinite"] == 5 * 12 and c["err"] == math.inf
    out[..., -1, :] = want[..., -1, :]                             # now fully written
    c = tm.check_result(out, want, tol=1e-4)
    assert c["ok"] is True and c["nonfinite"] == 0 and c["err"] < 1e-6
    out[0, 0, 0, 0] += 1.0                                         # finite but wrong
    c = tm.check_result(out, want, tol=1e-4)
    assert c["ok"] is False and c["finite"] is True and c["err"] > 1e-4


def test_in_ranges_tells_whether_a_result_lies_in_the_poisoned_block(tm):
    block = torch.full((1000,), math.nan)
    ranges = [(block.data_ptr(), block.numel() * block.element_size())]
    assert tm.in_ranges(block[100:200], ranges)
    assert tm.in_ranges(block, ranges)
    assert not tm.in_ranges(torch.cat([block, block[:1]]), ranges)  # elsewhere
    wide = torch.full((2000,), math.nan)
    assert not tm.in_ranges(wide[500:1500], [(wide.data_ptr() + 4 * 600, 4 * 1000)])  # straddles


def test_poison_returns_the_freed_nan_blocks(tm):
    ranges = tm.poison([10, 1000], torch.float32, torch.device("cpu"))
    assert [n for _, n in ranges] == [40, 4000] and all(a > 0 for a, _ in ranges)


@needs_ext
def test_correctness_catches_a_kernel_that_skips_elements(tm):
    """The whole check path with an op that leaves one row of every slice unwritten (as it
    would look over NaN-poisoned CUDA memory): both forward checks fail on the exact count of
    skipped elements, and the gradients (of the wrong function) fail on their error."""
    def broken(U, S, V, R=None):
        y = torch.ops.tsvd.treconstruct(U, S, V, R)
        out = torch.full(y.shape, math.nan, dtype=y.dtype)
        out[..., :-1, :] = y[..., :-1, :]
        return out

    cpu = torch.device("cpu")
    c = tm.correctness((5, 16, 12), 3, torch.float32, cpu, 1e-4, 0, tm.Budget(1e9), op=broken)
    for k in ("fwd", "fwd_nores"):
        assert not c[k]["ok"] and c[k]["nonfinite"] == 5 * 12
    assert all(not c[k]["ok"] and c[k]["finite"] for k in ("grad_U", "grad_S", "grad_V"))
    good = tm.correctness((5, 16, 12), 3, torch.float32, cpu, 1e-4, 0, tm.Budget(1e9))
    assert all(v["ok"] for v in good.values()) and len(good) == 5


# --------------------------------------------------------------------------------------
# gpu_check.sh --dry-run
# --------------------------------------------------------------------------------------
STEP = re.compile(r"^== \[(\w+)\] \d\d:\d\d:\d\d \(\+\d+ s, limit (\d+) s\): (.*)$", re.M)
STEPS = ["env", "build", "sanity", "tests", "trec_micro", "host_overhead", "kernels"]


def _check(out, *args, **env):
    return subprocess.run(["bash", str(CHECK), *args], capture_output=True, text=True,
                          env=_env(OUT=str(out), **env), cwd=ROOT, timeout=120)


def test_gpu_check_dry_run_prints_every_step_within_the_deadline(tmp_path):
    r = _check(tmp_path, "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    steps = {name: (int(limit), cmd) for name, limit, cmd in STEP.findall(r.stdout)}
    assert [s for s in STEPS if s not in steps] == []
    assert all(0 < limit <= 540 for limit, _ in steps.values()), steps
    assert "bench/trec_micro.py --device cuda --out" in steps["trec_micro"][1]
    budget = int(re.search(r"--budget-s (\d+)", steps["trec_micro"][1]).group(1))
    assert 0 < budget <= min(100, steps["trec_micro"][0] - 30)
    assert f"--out {tmp_path}/host_overhead_cuda.json" in steps["host_overhead"][1]
    assert "--quick" in steps["kernels"][1]
    assert "== [peft] not run: quick mode" in r.stdout and "peft" not in steps
    assert "] skipped:" not in r.stdout
    # the worst case (every step using its whole limit) still ends before deadline - margin
    worst = [(int(a), int(b)) for a, b in
             re.findall(r"worst case: starts at \+(\d+) s, limit (\d+) s", r.stdout)]
    assert worst and all(a + b <= 540 - 15 for a, b in worst), worst
    assert re.search(r"\d+/\d+ tests collected", r.stdout)  # the CUDA tests were collected
    assert "collection failed" not in r.stdout
    assert "== summary" in r.stdout and "gpu_check: status 0" in r.stdout
    assert os.listdir(tmp_path) == ["log"]  # a dry run writes nothing else


def test_gpu_check_short_deadline_skips_steps_and_still_summarizes(tmp_path):
    (tmp_path / "trec_micro.json").write_text(json.dumps({
        "meta": {"device": "cuda", "gpu": "X"}, "summary": {"all_ok": True},
        "rows": [{"shape": [48, 768, 768], "ok": True, "fwd_pct_clone": 71.5,
                  "fb_x_ref": 4.2, "checks": {}}],
        "complete": True, "cut_short": None}))
    (tmp_path / "kernels_cuda.json.tmp").write_text("{")  # a writer killed mid-write
    r = _check(tmp_path, "--dry-run", "--with-peft", GPU_CHECK_DEADLINE="30")
    out = r.stdout
    for name, limit, _ in STEP.findall(out):
        assert int(limit) <= 30, (name, limit)
    skipped = re.findall(r"^== \[(\w+)\] skipped: -?\d+ s left before the deadline", out, re.M)
    assert {"build", "tests", "trec_micro", "kernels", "peft"} <= set(skipped), out
    assert "gating steps skipped: build" in out and r.returncode == 1
    # the summary ran and read the JSON there; the stale temporary is gone
    assert re.search(r"48x768x768: ok=True .* 71\.5 % of clone .* 4\.2x ref", out), out
    assert "removed stale temporary" in out and not (tmp_path / "kernels_cuda.json.tmp").exists()
    assert re.search(r"gpu_check: status 1, total \d+ s \(deadline 30 s\); skipped: .*trec_micro",
                     out)


def test_gpu_check_real_run_clamps_each_step_to_the_deadline(tmp_path):
    """Not a dry run: a stand-in for python whose steps hang (the summary and env.json run for
    real). The step that starts is killed at the time left before the deadline (less the
    margin), the rest are skipped, and the script ends inside the deadline with its summary."""
    stub = tmp_path / "py"
    stub.write_text(f"""#!/usr/bin/env bash
case "$1 ${{2:-}}" in
  "- "*env.json) echo '{{"gpu": "stub"}}' > "$2" ;;
  "- "*) exec {sys.executable} "$@" ;;
  *) sleep 60 ;;
esac
""")
    stub.chmod(0o755)
    out = tmp_path / "out"
    t = time.monotonic()
    r = _check(out, GPU_CHECK_DEADLINE="14", GPU_CHECK_MARGIN="3", PYTHON=str(stub))
    took = time.monotonic() - t
    steps = {name: int(limit) for name, limit, _ in STEP.findall(r.stdout)}
    assert "sanity" in steps and 9 <= steps["sanity"] <= 11, r.stdout
    assert re.search(r"== \[sanity\] exit 124 after \d+ s \(timed out\)", r.stdout), r.stdout
    skipped = re.findall(r"^== \[(\w+)\] skipped", r.stdout, re.M)
    assert {"build", "tests", "trec_micro", "host_overhead", "kernels"} <= set(skipped)
    assert "env.json: gpu=stub" in r.stdout and r.returncode == 1
    assert took < 14, took


def test_gpu_check_bad_usage_exits_2(tmp_path):
    r = _check(tmp_path, "--bogus")
    assert r.returncode == 2 and "--bogus" in r.stderr
    r = _check(tmp_path, "--dry-run", GPU_CHECK_DEADLINE="9m")
    assert r.returncode == 2 and "GPU_CHECK_DEADLINE" in r.stderr


def test_tsvd_profile_runs_on_cpu_with_op_counts():
    """bench/tsvd_profile.py on the CPU, small shape: every setting prints a row (the real
    slices separate beside auto), and --count-ops prints the merged path with fewer ATen ops
    than the separate one (one block Krylov run instead of two)."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "tsvd_profile.py"), "--device",
                        "cpu", "--shapes", "6x400x300", "--k", "3", "--reps", "1",
                        "--profile-shape", "none", "--count-ops"],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("auto ", "auto, real separate", "auto, 8 host threads", "randomized tol 1e-4",
                 "full"):
        assert re.search(rf"6x400x300 {re.escape(name)}.* ms ", r.stdout), (name, r.stdout)
    m = re.search(r"6x400x300  separate (\d+) ops, it (\d+); merged (\d+) ops, it (\d+)", r.stdout)
    assert m, r.stdout
    assert int(m.group(2)) > 0 and int(m.group(3)) < int(m.group(1))
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "tsvd_profile.py"), "--shapes",
                          "6x90"], capture_output=True, text=True, env=_env(), timeout=60)
    assert bad.returncode == 2 and "--shapes" in bad.stderr
