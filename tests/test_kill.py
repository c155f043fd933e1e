"""Issue 16: a LoRA-PT training SIGKILLed three times at random moments (after a random
optimizer step, or inside a random file write, between the temporary's write and its rename)
and resumed each time ends bit-identical to an uninterrupted run: same adapter, same averaged
model, same loss and validation curves, and no temporary file left behind.

Each run is a subprocess (tiny UNETR preset, 32^3 tiny generated data, one CPU thread); the
uninterrupted reference runs alongside the killed ones. The kill points come from a fresh
random seed, printed in every failure message so a failing case can be replayed with
``TSVD_KILL_SEED``."""
from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("monai")

from test_data import make_dataset  # noqa: E402
from tsvd.models import build_unetr, save_checkpoint  # noqa: E402
from tsvd.peft.seg.config import RunConfig  # noqa: E402

# The child: trains (resuming when a checkpoint exists); when told, kills itself with SIGKILL
# right after optimizer step k ("step"), or inside the first file write after step k, once
# the temporary is written and before it is renamed ("write").
_CHILD = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    import tsvd.models as M
    import tsvd.models.checkpoint as C
    import tsvd.peft.seg.train as T

    cfg, out = json.loads(sys.argv[1]), Path(sys.argv[2])
    kill_step, phase = int(sys.argv[3]), sys.argv[4]
    steps, armed = [0], [False]

    def after_step(opt, args, kwargs):
        steps[0] += 1
        if steps[0] == kill_step:
            if phase == "step":
                os.kill(os.getpid(), signal.SIGKILL)
            armed[0] = True

    real = C.atomic_write

    def atomic_write(path, write_fn):
        if not armed[0]:
            return real(path, write_fn)

        def write_then_die(tmp):
            write_fn(tmp)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, write_then_die)

    M.atomic_write = C.atomic_write = atomic_write
    if kill_step > 0:
        register_optimizer_step_post_hook(after_step)
    T.train(cfg, out, resume=(out / "checkpoint_last.pt").is_file(), progress=False)
""")


def _start(script, cfg, out, kill_step=0, phase="step"):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    return subprocess.Popen([sys.executable, str(script), json.dumps(cfg), str(out),
                             str(kill_step), phase], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _weights(path):
    from safetensors.torch import load_file
    return load_file(str(path))


def _rows(path):
    return list(csv.DictReader(Path(path).open()))


def test_sigkill_three_times_then_resume_is_bit_identical(tmp_path):
    data = make_dataset(tmp_path / "d", "eadc", n_train=3, n_valid=1, n_test=0)
    torch.manual_seed(0)
    base = save_checkpoint(build_unetr("tiny", out_channels=2), tmp_path / "base.safetensors",
                           meta={"preset": "tiny"})
    epochs, per_epoch = 4, 2
    cfg = RunConfig.from_dict({
        "data": {"path": str(data), "spacing": 1.0},
        "model": {"preset": "tiny", "pretrained": str(base)},
        "adapter": {"method": "lorapt", "rank": 2},
        "train": {"epochs": epochs, "batch_size": 1, "samples_per_epoch": per_epoch,
                  "threads": 1, "seed": 3, "val_every": 2, "average_last": 2}}).to_dict()
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    seed = int(os.environ.get("TSVD_KILL_SEED") or int.from_bytes(os.urandom(4), "little"))
    rng = random.Random(seed)
    ref = _start(script, cfg, tmp_path / "ref")
    out = tmp_path / "killed"
    kills = []
    try:
        for _ in range(3):
            done = 0
            if (out / "checkpoint_last.pt").is_file():
                done = torch.load(out / "checkpoint_last.pt", weights_only=True)["epoch"] + 1
            remaining = (epochs - done) * per_epoch
            k, phase = rng.randint(1, remaining), rng.choice(["step", "write"])
            kills.append((done, k, phase))
            p = _start(script, cfg, out, k, phase)
            log = p.communicate(timeout=600)[0]
            assert p.returncode == -signal.SIGKILL, \
                f"TSVD_KILL_SEED={seed}, kills {kills}:\n{log[-3000:]}"
        p = _start(script, cfg, out)
        log = p.communicate(timeout=600)[0]
        assert p.returncode == 0, f"TSVD_KILL_SEED={seed}, kills {kills}:\n{log[-3000:]}"
        log = ref.communicate(timeout=600)[0]
        assert ref.returncode == 0, log[-3000:]
    finally:
        if ref.poll() is None:
            ref.kill()
    for name in ("adapter_last.safetensors", "model_avg.safetensors"):
        a, b = _weights(tmp_path / "ref" / name), _weights(out / name)
        assert a.keys() == b.keys()
        diff = [k for k in a if not torch.equal(a[k], b[k])]
        assert not diff, f"TSVD_KILL_SEED={seed}, kills {kills}: {name} differs in {diff[:5]}"
    ra, rb = _rows(tmp_path / "ref" / "curves.csv"), _rows(out / "curves.csv")
    for col in ("epoch", "train_loss", "val_dice", "lr"):
        assert [r[col] for r in ra] == [r[col] for r in rb], (col, seed, kills)
    assert json.loads((out / "run.json").read_text())["complete"]
    left = [q.name for q in out.rglob("*") if ".tsvdtmp" in q.name]
    assert not left, (seed, kills, left)
