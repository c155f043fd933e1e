"""torch.distributed: two CPU processes (gloo, launched by torchrun) give the same weights as
one process with the same global batch.

SGD, not Adam: Adam divides every gradient element by its own magnitude, so elements whose
gradient is float rounding noise (different for a batch of 2 and two batches of 1) get
full-size, noise-signed steps; the check would then measure rounding, not the averaging."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("monai")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from test_data import make_dataset  # noqa: E402


def _run(cmd, env):
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r


def test_two_gloo_processes_match_one_process(tmp_path):
    from safetensors.torch import load_file
    data = make_dataset(tmp_path / "d", "eadc", n_train=4, n_valid=1, n_test=0)
    args = ["pretrain", "--data", str(data), "--preset", "tiny", "--spacing", "1",
            "--epochs", "1", "--batch-size", "2", "--samples-per-epoch", "4", "--dropout", "0",
            "--seed", "5", "--device", "cpu", "--quiet", "--optimizer", "sgd", "--lr", "0.01"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    _run([sys.executable, "-m", "tsvd.peft", *args, "--out", str(tmp_path / "one")], env)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "-m", "tsvd.peft", *args, "--out", str(tmp_path / "two")], env)
    one = load_file(str(tmp_path / "one" / "model_last.safetensors"))
    two = load_file(str(tmp_path / "two" / "model_last.safetensors"))
    init = None
    assert one.keys() == two.keys()
    moved = 0
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6, msg=k)
    # and training did something: the weights are not the initial ones
    from tsvd.models import build_unetr
    torch.manual_seed(5)
    init = build_unetr("tiny", dropout_rate=0.0).state_dict()
    moved = sum(not torch.allclose(init[k], one[k]) for k in one if k in init)
    assert moved > len(one) // 2
    import csv
    l1 = [float(r["train_loss"]) for r in csv.DictReader((tmp_path / "one" / "curves.csv").open())]
    l2 = [float(r["train_loss"]) for r in csv.DictReader((tmp_path / "two" / "curves.csv").open())]
    assert l1 == pytest.approx(l2, rel=1e-4)
