#!/usr/bin/env python
"""The method comparison (issue 6): LoRA-PT against decoder-only, full fine-tuning, LoRA and
PiSSA on the embedded hippocampus datasets, side by side, with learning rates chosen on the
validation split and mean ± std over seeds.

    python bench/compare.py --out cmp-full             # the full comparison (CPU preset)
    python bench/compare.py --quick --out cmp-quick    # one seed, one protocol, < 20 min
    python bench/compare.py --out cmp-full             # again: continues where it stopped
    python bench/compare.py --estimate-only            # the plan and its estimated time

What is compared (``--variants``, default ``decoder,full,lora:8,pissa:8,lorapt:4,lorapt:8``):

- ``decoder``: transformer encoder frozen, CNN encoder/decoder and head trained.
- ``full``: every parameter trained.
- ``lora:8``, ``pissa:8``, ``lorapt:4``, ``lorapt:8``: the PEFT methods with that rank, on the
  same layers (attention q/k/v/out, MLP up/down of the 12 blocks), and, as in the paper, the
  CNN decoder and head trained too (``train_decoder=True``). Rank matching: on UNETR a
  LoRA-PT rank r has as many adapter parameters as a LoRA (or PiSSA) rank r to within 0.2 %
  (cpu preset: 332,352 vs 331,776 for r = 8; counted by ``tsvd.peft``'s ``num_trainable()``
  and printed in the table), so ``lora:8``/``pissa:8`` are the parameter-matched partners of
  ``lorapt:8`` and ``lorapt:4`` is LoRA-PT at half that budget.

Protocol, identical for every variant (only the method, its rank and the learning rate
differ; ``tests/test_compare.py`` checks this on the configurations handed to ``train()``):

1. Data: the embedded datasets of ``tsvd.peft.seg.embedded`` (MNI152 template warped into
   synthetic subjects, hippocampus labelled by each atlas protocol), built once with dataset
   seed 0 and cached; train / validation / test subjects are disjoint and the same for every
   run. Low-data regime: the first ``round(--low-data-fraction × n_train)`` training subjects
   (``data.max_train`` of the training config), same validation and test subjects.
2. Pre-trained weights: one UNETR pre-trained on the embedded source task (subcortical
   structures other than the hippocampus) through ``tsvd.peft.seg.train.train(task="pretrain")``
   with the settings of ``lorapt demo`` (cached in the cache folder, shared with the demo
   when the settings agree), or ``--pretrained CKPT``.
3. Fine-tuning: ``tsvd.peft.seg.train.train(task="finetune")`` with the same epochs, samples per
   epoch, batch size, poly learning-rate schedule, loss, augmentation and seed for every
   variant; the checkpoint evaluated is the best-on-validation epoch.
4. Learning rate, per method (``--sweep method``, default): each variant trains every rate
   of its grid (``--lrs``) with seed 0 on the first regime and protocol; the highest
   validation Dice wins (ties: the smaller rate) and is used for that variant everywhere
   (``lr_choice.json``). ``--sweep cell`` sweeps every (regime, protocol, variant) instead
   (about twice the time). A final run whose configuration is a sweep run's (seed 0 at the
   chosen rate) *is* that run: it is evaluated on the test split, not trained twice.
   Final runs go seed by seed, so an interrupted comparison has complete one-seed tables.
5. Test: ``tsvd.peft.seg.train.evaluate(split="test")``: Dice and HD95 (mm) per test subject on
   its original grid; a run's numbers are the means over the test subjects, the table gives
   the mean ± sample standard deviation (ddof = 1) of those over the seeds.

Measured per run: trainable parameters (adapter / other / total, from the run's summary and
``tsvd.peft``), size of the saved artefact file (adapter file for PEFT methods, whole model for
``full``), time per training step (sum of the epochs' training time in ``curves.csv`` divided
by the number of optimizer steps: data augmentation, forward, backward, update), peak memory
(CUDA: ``torch.cuda.max_memory_allocated``; CPU: the process's peak resident set ``VmHWM``
during the training call, reset through ``/proc/self/clear_refs`` before it, and that peak
minus the resident set at the start), and wall time.

Outputs in ``--out`` (every file written to a temporary name and renamed into place)::

    plan.json                the settings of the comparison
    runs/REGIME/PROTOCOL/VARIANT/lrLR/seedS/   train/ (the run folder of train()), eval/,
                             result.json (a run with a result.json is skipped when the
                             command is run again: the comparison is resumable)
    runs.csv, runs.json      every run (sweep and final), one row each
    lr_choice.json           the learning-rate sweep: validation Dice per rate and the choice
    summary.csv, summary.json  mean ± std over seeds per (regime, protocol, variant)
    results.md               the Markdown tables
    dice_vs_params.png       test Dice (mean ± std) against trainable parameters
    training_curves.png      training loss and validation Dice per epoch (mean over seeds)

Parallel runs: ``--workers N`` (default 2 on a CPU with 2 or more cores, 1 on CUDA) trains N
runs at once, each in its own ``python compare.py --worker SPEC`` process with CPU cores / N
torch threads; the sweep runs all finish before the learning rates are chosen and the final
runs start. Results and reports are written by the main process only.

Time: before starting, a short calibration (a few training steps of every variant on random
input, and the preprocessing of one subject) gives the estimated total, printed with the plan
(it assumes the workers do not slow each other down, so it is optimistic: 51 min estimated,
1 h 30 min measured for the full comparison on 2 cores); after every run the remaining time
is re-estimated from the runs measured so far.
"""
from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import math
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np

# ------------------------------------------------------------------------------------------
# defaults
# ------------------------------------------------------------------------------------------
DEFAULT_VARIANTS = "decoder,full,lora:8,pissa:8,lorapt:4,lorapt:8"
#: learning-rate grids (Adam, amsgrad, poly decay) of the sweep, per method. Batch 1: the demo
#: fine-tunes LoRA-PT at 5e-3 (3e-3 within 0.003 Dice of it); full fine-tuning moves every
#: pre-trained weight, so its grid is 10x lower.
LR_GRID = {"decoder": [2e-3, 5e-3], "full": [2e-4, 5e-4], "lora": [2e-3, 5e-3],
           "pissa": [2e-3, 5e-3], "lorapt": [2e-3, 5e-3]}
QUICK_LR_GRID = dict(LR_GRID)
METHODS = ("decoder", "full", "lora", "pissa", "lorapt")
NAMES = {"decoder": "decoder-only", "full": "full", "lora": "LoRA", "pissa": "PiSSA",
         "lorapt": "LoRA-PT"}

#: the full comparison (CPU preset). Sizing: 6 variants, 2 protocols, 2 regimes, 3 seeds =
#: 72 final runs + 12 sweep runs (6 of them reused as final runs) = 78 trainings of 64 steps
#: (batch 1, as the demo) + 72 test evaluations. On this 2-core machine (2026-11-27), with
#: 2 worker processes of 1 thread: 1.5-1.9 s per step and worker, 1 h 30 min in all
#: (measured), plus the one-off dataset building and pre-training (cached). Post-processing as the demo:
#: the 2 largest connected components are kept (left and right hippocampus).
FULL = {
    "preset": "cpu", "spacing": 1.5, "flip_axes": [0], "roi": "mni-hippocampus",
    "protocols": ["neuromorphometrics", "harvard-oxford"],
    "n_train": 12, "n_valid": 4, "n_test": 8, "dataset_seed": 0,
    "seeds": 3, "epochs": 4, "samples_per_epoch": 16, "batch_size": 1, "keep_components": 2,
    "regimes": {"full-data": 1.0, "low-data": 0.25}, "sweep": "method",
}
#: --quick: one seed, one protocol, the full-data regime, 3 × 16 samples, two rates per method
QUICK = dict(FULL, protocols=["neuromorphometrics"], seeds=1, epochs=3,
             regimes={"full-data": 1.0})


class CompareError(ValueError):
    """A bad argument or an inconsistent output folder; the message names it."""


# ------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------
def atomic_write(path, data) -> None:
    """Write ``data`` (bytes or str) to ``path`` through a temporary file + ``os.replace``."""
    from tsvd.peft.seg.runtime import write_bytes
    write_bytes(Path(path), data.encode() if isinstance(data, str) else data)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def write_json(path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=1, default=_json_default))


def write_csv(path, rows: list[dict], fields: list[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    atomic_write(path, buf.getvalue())


def fmt_lr(lr: float) -> str:
    return f"{lr:g}"


def fmt_time(s: float) -> str:
    s = max(0.0, float(s))
    h, rem = divmod(int(round(s)), 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def parse_variants(text: str) -> list[dict]:
    """``"decoder,full,lora:8,lorapt:4"`` -> [{"name", "method", "rank"}, ...]."""
    out, seen = [], set()
    for part in [p.strip() for p in str(text).split(",") if p.strip()]:
        method, _, rank = part.partition(":")
        if method not in METHODS:
            raise CompareError(f"--variants: unknown method {method!r} in {part!r} "
                               f"(expected one of {', '.join(METHODS)}, e.g. lorapt:8)")
        if method in ("decoder", "full"):
            if rank:
                raise CompareError(f"--variants: {method} has no rank ({part!r})")
            r = None
            name = method
        else:
            try:
                r = int(rank) if rank else 8
            except ValueError:
                r = -1
            if r < 1:
                raise CompareError(f"--variants: rank of {part!r} must be a positive integer")
            name = f"{method}-r{r}"
        if name in seen:
            raise CompareError(f"--variants: {name} given twice")
        seen.add(name)
        out.append({"name": name, "method": method, "rank": r})
    if not out:
        raise CompareError("--variants: no variant given")
    return out


def parse_lrs(items, grid: dict) -> dict:
    """``["lora=1e-3,3e-3", ...]`` overrides of the learning-rate grid."""
    grid = copy.deepcopy(grid)
    for it in items or []:
        m, _, vals = it.partition("=")
        if m not in METHODS or not vals:
            raise CompareError(f"--lrs: expected METHOD=LR[,LR...] with METHOD one of "
                               f"{', '.join(METHODS)}, got {it!r}")
        try:
            lrs = [float(v) for v in vals.split(",")]
        except ValueError:
            raise CompareError(f"--lrs: {it!r}: learning rates must be numbers") from None
        if any(not (v > 0) for v in lrs):
            raise CompareError(f"--lrs: {it!r}: learning rates must be positive")
        grid[m] = sorted(set(lrs))
    return grid


def n_used(n_train: int, fraction: float) -> int:
    """Training subjects of a regime: round(fraction × n_train), at least 1."""
    return max(1, min(n_train, int(round(fraction * n_train))))


def seed_stats(values) -> dict:
    """mean and sample std (ddof=1; nan for one value) of the finite values; n; n_nan."""
    v = [float(x) for x in values if x is not None]
    ok = [x for x in v if math.isfinite(x)]
    mean = float(np.mean(ok)) if ok else float("nan")
    std = float(np.std(ok, ddof=1)) if len(ok) > 1 else float("nan")
    return {"mean": mean, "std": std, "n": len(v), "n_nan": len(v) - len(ok)}


def fmt_pm(s: dict, nd: int = 3) -> str:
    if s is None or not math.isfinite(s.get("mean", float("nan"))):
        return "n/a"
    if not math.isfinite(s.get("std", float("nan"))):
        return f"{s['mean']:.{nd}f} (n={s['n'] - s.get('n_nan', 0)})"
    return f"{s['mean']:.{nd}f} ± {s['std']:.{nd}f}"


# ------------------------------------------------------------------------------------------
# peak memory of one training call
# ------------------------------------------------------------------------------------------
def _status_kb(field: str):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory while the ``with`` block runs.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. CPU (Linux):
    the peak resident set ``VmHWM``, reset through ``/proc/self/clear_refs`` on entry; where
    that reset is not allowed, a thread samples ``VmRSS`` every 20 ms instead.
    Attributes after the block: ``peak_mb``, ``start_mb``, ``kind``.
    """

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.peak_mb = self.start_mb = None
        self.kind = None
        self._stop = None

    def __enter__(self):
        import torch
        self._cuda = str(self.device).startswith("cuda") or (
            self.device in (None, "auto") and torch.cuda.is_available())
        if self._cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_mb = torch.cuda.memory_allocated() / 2 ** 20
            self.kind = "cuda_max_memory_allocated"
            return self
        rss = _status_kb("VmRSS")
        self.start_mb = rss / 1024 if rss is not None else None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.kind = "cpu_VmHWM"
        except OSError:
            self.kind = "cpu_VmRSS_sampled"
            self._peak_kb = rss or 0
            self._stop = threading.Event()

            def loop():
                while not self._stop.wait(0.02):
                    v = _status_kb("VmRSS")
                    if v is not None and v > self._peak_kb:
                        self._peak_kb = v
            self._thread = threading.Thread(target=loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch
        if self._cuda:
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2 ** 20
        elif self.kind == "cpu_VmHWM":
            v = _status_kb("VmHWM")
            self.peak_mb = v / 1024 if v is not None else None
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = self._peak_kb / 1024 if self._peak_kb else None
        return False


# ------------------------------------------------------------------------------------------
# the comparison
# ------------------------------------------------------------------------------------------
def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def _train_module():
    from tsvd.peft.seg import train as T
    return T


class Comparison:
    """Plans, runs (resumably) and reports the comparison.

    ``datasets``: protocol -> dataset folder (EADC layout); ``pretrained``: base checkpoint.
    ``train_fn`` / ``evaluate_fn`` default to :func:`tsvd.peft.seg.train.train` and
    :func:`tsvd.peft.seg.infer.evaluate` (the tests replace them).
    """

    def __init__(self, out, settings: dict, variants: list[dict], lr_grid: dict, *,
                 datasets: dict, pretrained, device: str = "auto", train_fn=None,
                 evaluate_fn=None, log=print, verbose: bool = False, plots: bool = True,
                 workers: int = 1, threads_per_worker: int | None = None):
        T = _train_module()
        self.out = Path(out)
        self.S = copy.deepcopy(settings)
        self.variants = variants
        self.lr_grid = lr_grid
        self.datasets = {k: Path(v) for k, v in datasets.items()}
        self.pretrained = Path(pretrained)
        self.device = device or "auto"
        self.train_fn = train_fn or T.train
        from tsvd.peft.seg import infer
        self.evaluate_fn = evaluate_fn or infer.evaluate
        self.log = log
        self.verbose = verbose
        self.plots = plots
        if not isinstance(workers, int) or workers < 1:
            raise CompareError(f"--workers: expected a positive integer, got {workers!r}")
        if workers > 1 and (str(device).startswith("cuda") or (
                device in (None, "auto") and _cuda_available())):
            raise CompareError("--workers > 1 is for CPU runs (one GPU runs one job at a time)")
        self.workers = workers
        self.threads_per_worker = threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
        missing = [p for p in self.S["protocols"] if p not in self.datasets]
        if missing:
            raise CompareError(f"no dataset folder for protocol(s) {missing}")
        for v in variants:
            if not lr_grid.get(v["method"]):
                raise CompareError(f"learning-rate grid of {v['method']} is empty")
        self.n_train = {p: self._count_train(self.datasets[p]) for p in self.S["protocols"]}
        self.records: dict = {}
        self.lr_choice: dict = {}
        self._done_s, self._done_est = 0.0, 0.0

    # -- configuration ---------------------------------------------------------------------
    @staticmethod
    def _count_train(path: Path) -> int:
        from tsvd.peft.seg.data import load_cases
        _, splits, _ = load_cases(path, "eadc")
        n = len(splits["train"])
        if n < 1:
            raise CompareError(f"{path}: no training subjects")
        return n

    def config(self, protocol: str, regime: str, variant: dict, lr: float, seed: int) -> dict:
        """The training configuration (``tsvd.peft.seg.train`` schema) of one run.

        Everything but ``adapter.method``, ``adapter.rank``, ``train.lr`` (and ``train.seed`` across
        seeds) is the same for every variant of a (regime, protocol)."""
        T = _train_module()
        from tsvd.models import preset_kwargs
        from tsvd.peft.seg.embedded import HIPPOCAMPUS_ROI_MM
        S = self.S
        patch = list(preset_kwargs(S["preset"])["img_size"])
        frac = float(S["regimes"][regime])
        n = n_used(self.n_train[protocol], frac)
        cfg = T.merge_config(T.DEFAULTS, {
            "data": {"path": str(self.datasets[protocol]), "format": "eadc",
                     "spacing": S["spacing"], "flip_axes": list(S["flip_axes"]),
                     "roi": ({"centre_mm": list(HIPPOCAMPUS_ROI_MM[0]), "size": patch}
                             if S.get("roi", "mni-hippocampus") == "mni-hippocampus" else None),
                     "max_train": n},
            "model": {"preset": S["preset"], "pretrained": str(self.pretrained)},
            "adapter": {"method": variant["method"], "rank": variant["rank"],
                        "train_decoder": True},
            "train": {"epochs": int(S["epochs"]), "batch_size": int(S["batch_size"]),
                      "samples_per_epoch": int(S["samples_per_epoch"]), "lr": float(lr),
                      "seed": int(seed), "device": self.device, "val_every": 1,
                      "average_last": 0},
            "infer": {"tta_flip": [], "keep_components": int(S.get("keep_components", 0))},
        })
        return cfg

    def steps_per_run(self) -> int:
        return int(math.ceil(self.S["samples_per_epoch"] / self.S["batch_size"])) * \
            int(self.S["epochs"])

    def run_dir(self, protocol, regime, variant, lr, seed) -> Path:
        return (self.out / "runs" / regime / protocol / variant["name"] / f"lr{fmt_lr(lr)}" /
                f"seed{seed}")

    def sweep_key(self, regime, protocol, variant) -> str:
        """Which sweep gives the learning rate of a (regime, protocol, variant): with
        ``sweep="method"`` the variant's sweep on the first regime and protocol, with
        ``sweep="cell"`` a sweep of its own."""
        if self.S.get("sweep", "method") == "method":
            regime, protocol = list(self.S["regimes"])[0], self.S["protocols"][0]
        return "/".join((regime, protocol, variant["name"]))

    def plan(self) -> list[dict]:
        """Every run in order. First the sweeps (seed 0, every rate of the variant's grid),
        then the final runs, seeds outermost (a complete one-seed table comes first): each
        (regime, protocol, variant, seed) at its sweep's chosen rate (``lr=None`` until the
        choice). A final run whose configuration is a sweep run's is that run, not retrained."""
        jobs = []
        regimes, prots = list(self.S["regimes"]), self.S["protocols"]
        cells = [(r, p) for r in regimes for p in prots]
        if self.S.get("sweep", "method") == "method":
            cells_sweep = cells[:1]
        elif self.S.get("sweep") == "cell":
            cells_sweep = cells
        else:
            raise CompareError(f"sweep: expected 'method' or 'cell', got {self.S.get('sweep')!r}")
        for regime, protocol in cells_sweep:
            for v in self.variants:
                for lr in self.lr_grid[v["method"]]:
                    jobs.append({"regime": regime, "protocol": protocol, "variant": v, "lr": lr,
                                 "seed": 0, "phase": "sweep",
                                 "key": self.sweep_key(regime, protocol, v)})
        for seed in range(int(self.S["seeds"])):
            for regime, protocol in cells:
                for v in self.variants:
                    key = self.sweep_key(regime, protocol, v)
                    jobs.append({"regime": regime, "protocol": protocol, "variant": v,
                                 "lr": None, "seed": seed, "phase": "final", "key": key,
                                 "reuses_sweep": seed == 0 and key == "/".join(
                                     (regime, protocol, v["name"]))})
        return jobs

    # -- estimate --------------------------------------------------------------------------
    def estimate_run(self, job, cal) -> float:
        """Seconds for one run from the calibration ``cal`` (see :func:`calibrate`)."""
        if cal is None:
            return float("nan")
        n_tr = n_used(self.n_train[job["protocol"]], self.S["regimes"][job["regime"]])
        nv, nt = self.S["n_valid"], self.S["n_test"]
        test = nt * (2 * cal["case_s"] + cal["fwd_s"])
        if job["phase"] == "final" and job.get("reuses_sweep"):
            return test
        t = self.steps_per_run() * cal["step_s"][job["variant"]["name"]]
        t += (n_tr + nv) * cal["case_s"] + self.S["epochs"] * nv * cal["fwd_s"]
        t += cal["setup_s"].get(job["variant"]["name"], 0.0)
        return t + (test if job["phase"] == "final" else 0.0)

    # -- running ---------------------------------------------------------------------------
    def _run_log(self, rdir: Path):
        rdir.mkdir(parents=True, exist_ok=True)
        f = open(rdir / "log.txt", "a")

        def log(*a):
            msg = " ".join(str(x) for x in a)
            f.write(msg + "\n")
            f.flush()
            if self.verbose:
                self.log("    " + msg)
        return log, f

    def train_run(self, job) -> dict:
        """Train one run (or reuse its ``train.json``); returns the training record."""
        v, lr, seed = job["variant"], job["lr"], job["seed"]
        rdir = self.run_dir(job["protocol"], job["regime"], v, lr, seed)
        cfg = self.config(job["protocol"], job["regime"], v, lr, seed)
        rec_path = rdir / "train.json"
        if rec_path.is_file():
            rec = json.loads(rec_path.read_text())
            if rec.get("config") != json.loads(json.dumps(cfg)):
                raise CompareError(
                    f"{rec_path}: this run was made with other settings (config differs); "
                    f"use another --out, or delete {rdir} to redo it")
            return rec
        tdir = rdir / "train"
        log, fh = self._run_log(rdir)
        try:
            resume = (tdir / "checkpoint_last.pt").is_file()
            t0 = time.time()
            with PeakMemory(self.device) as pm:
                summ = self.train_fn(cfg, tdir, task="finetune", overwrite=True, resume=resume,
                                     log=log, progress=self.verbose)
            wall = time.time() - t0
        finally:
            fh.close()
        curves = read_curves(tdir / "curves.csv")
        steps_per_epoch = int(math.ceil(self.S["samples_per_epoch"] / self.S["batch_size"]))
        tt = [r["epoch_time_s"] for r in curves if math.isfinite(r.get("epoch_time_s", math.nan))]
        art = Path(summ["artefact"]) if summ.get("artefact") else None
        counts = trainable_counts(tdir / "run.json", summ)
        rec = {"config": json.loads(json.dumps(cfg)), "run_dir": str(rdir),
               "trainable_parameters": int(summ["trainable_parameters"]),
               "model_parameters": int(summ["model_parameters"]),
               "adapter_parameters": counts.get("adapter"),
               "artefact": str(art) if art else None,
               "artefact_bytes": art.stat().st_size if art and art.is_file() else None,
               "best_val_dice": summ.get("best_val_dice"),
               "final_val_dice": summ.get("final_val_dice"),
               "time_per_step_s": (sum(tt) / (steps_per_epoch * len(tt))) if tt else None,
               "peak_mem_mb": pm.peak_mb, "mem_start_mb": pm.start_mb, "mem_kind": pm.kind,
               "train_wall_s": round(wall, 2), "resumed": resume,
               "curves": curves}
        write_json(rec_path, rec)
        return rec

    def test_run(self, rec) -> dict:
        """Evaluate the trained run on the test split (or reuse its ``eval/metrics.json``)."""
        rdir = Path(rec["run_dir"])
        mpath = rdir / "eval" / "metrics.json"
        if mpath.is_file():
            return json.loads(mpath.read_text())
        log, fh = self._run_log(rdir)
        try:
            return self.evaluate_fn(rec["config"], rdir / "train", rdir / "eval", split="test",
                                    overwrite=True, progress=self.verbose)
        finally:
            fh.close()

    def _result(self, job, rec, wall) -> dict:
        v = job["variant"]
        return {"regime": job["regime"], "protocol": job["protocol"], "variant": v["name"],
                "method": v["method"], "rank": v["rank"], "lr": job["lr"], "seed": job["seed"],
                "sweep": False, "final": False, "chosen": None,
                "train_subjects": rec["config"]["data"]["max_train"],
                "epochs": self.S["epochs"], "steps": self.steps_per_run(),
                "trainable_parameters": rec["trainable_parameters"],
                "adapter_parameters": rec.get("adapter_parameters"),
                "model_parameters": rec["model_parameters"],
                "artefact_bytes": rec.get("artefact_bytes"),
                "val_dice": rec.get("best_val_dice"),
                "time_per_step_s": rec.get("time_per_step_s"),
                "peak_mem_mb": rec.get("peak_mem_mb"), "mem_start_mb": rec.get("mem_start_mb"),
                "mem_kind": rec.get("mem_kind"), "train_wall_s": rec.get("train_wall_s"),
                "wall_s": round(wall, 2),
                "test_dice": None, "test_dice_std_cases": None, "test_hd95_mm": None,
                "test_hd95_std_cases": None, "test_cases": None, "test_hd95_nan": None,
                "run_dir": rec["run_dir"], "curves": rec.get("curves", [])}

    @staticmethod
    def _add_test(res, ev) -> None:
        res.update({"test_dice": ev["dice"]["mean"], "test_dice_std_cases": ev["dice"]["std"],
                    "test_hd95_mm": ev["hd95_mm"]["mean"],
                    "test_hd95_std_cases": ev["hd95_mm"]["std"], "test_cases": ev["dice"]["n"],
                    "test_hd95_nan": ev["hd95_mm"].get("n_nan", 0)})

    def run(self, cal=None) -> list[dict]:
        """Run (or reuse) every planned run, writing the reports after each one: first every
        sweep run, then the learning-rate choices, then the final runs. With ``workers > 1``
        the runs of each phase go to that many worker processes (``python compare.py
        --worker``, ``threads_per_worker`` torch threads each); every result is recorded and
        reported here, in the main process."""
        jobs = self.plan()
        self._total = len(jobs)
        self._est = {i: self.estimate_run(j, cal) for i, j in enumerate(jobs)}
        self.records: dict = {}            # run folder -> result (one per run)
        self.lr_choice = {}
        self._done_idx: set = set()
        t_start = self._last_plot = time.time()
        sweep = [i for i, j in enumerate(jobs) if j["phase"] == "sweep"]
        final = [i for i, j in enumerate(jobs) if j["phase"] == "final"]
        self._run_phase(jobs, sweep)
        for key in dict.fromkeys(jobs[i]["key"] for i in sweep):
            self._choose(key)
        for i in final:
            jobs[i]["lr"] = self.lr_choice[jobs[i]["key"]]["lr"]
        self._run_phase(jobs, final)
        self.write_reports(plots=True)
        self.log(f"all {self._total} runs done; {fmt_time(time.time() - t_start)} in this "
                 f"session")
        return self.runs

    def _tag(self, i, job) -> str:
        return (f"[{i + 1}/{self._total}] {job['phase']} {job['regime']} {job['protocol']} "
                f"{job['variant']['name']} lr={fmt_lr(job['lr'])} seed={job['seed']}")

    def _run_phase(self, jobs, idx) -> None:
        if self.workers <= 1:
            for i in idx:
                t0 = time.time()
                if self._pending(jobs[i]):
                    self.log(f"{self._tag(i, jobs[i])}: training ({self.steps_per_run()} "
                             f"steps)...")
                res, fresh = self.execute(jobs[i])
                self._record(jobs, i, res, fresh, time.time() - t0)
            return
        from concurrent.futures import ThreadPoolExecutor, as_completed
        todo = []
        for i in idx:          # finished before, or a result already in hand: no worker needed
            if self._pending(jobs[i]) or (jobs[i]["phase"] == "final" and not self._tested(
                    jobs[i])):
                todo.append(i)
            else:
                res, fresh = self.execute(jobs[i])
                self._record(jobs, i, res, fresh, 0.0)
        if not todo:
            return
        self.log(f"{len(todo)} {jobs[todo[0]]['phase']} run(s) on {self.workers} worker "
                 f"processes × {self.threads_per_worker} thread(s)")
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            futs = {pool.submit(self._in_worker, jobs[i]): i for i in todo}
            for f in as_completed(futs):
                i = futs[f]
                res, fresh, wall = f.result()
                self._record(jobs, i, res, fresh, wall)

    def _pending(self, job) -> bool:
        """Whether ``job`` still needs training (no result.json for its run folder)."""
        rdir = self.run_dir(job["protocol"], job["regime"], job["variant"], job["lr"],
                            job["seed"])
        return str(rdir) not in self.records and not (rdir / "result.json").is_file()

    def _tested(self, job) -> bool:
        rdir = self.run_dir(job["protocol"], job["regime"], job["variant"], job["lr"],
                            job["seed"])
        res = self.records.get(str(rdir))
        if res is None and (rdir / "result.json").is_file():
            res = json.loads((rdir / "result.json").read_text())
        return res is not None and res.get("test_dice") is not None

    def _in_worker(self, job):
        """Run ``job`` in a fresh ``python compare.py --worker SPEC`` process; returns
        (result, fresh, wall seconds). The spec and the answer are files in the run folder."""
        import subprocess
        rdir = self.run_dir(job["protocol"], job["regime"], job["variant"], job["lr"],
                            job["seed"])
        rdir.mkdir(parents=True, exist_ok=True)
        spec = {"out": str(self.out), "settings": self.S, "variants": self.variants,
                "lr_grid": self.lr_grid, "datasets": {k: str(v) for k, v in
                                                      self.datasets.items()},
                "pretrained": str(self.pretrained), "device": self.device,
                "threads": self.threads_per_worker, "job": job,
                "answer": str(rdir / "worker_answer.json")}
        write_json(rdir / "worker_spec.json", spec)
        t0 = time.time()
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker",
                               str(rdir / "worker_spec.json")], capture_output=True, text=True)
        wall = time.time() - t0
        ans = rdir / "worker_answer.json"
        if proc.returncode != 0 or not ans.is_file():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-15:]
            raise CompareError(f"worker for {rdir} failed (exit {proc.returncode}):\n    "
                               + "\n    ".join(tail))
        a = json.loads(ans.read_text())
        ans.unlink()
        (rdir / "worker_spec.json").unlink()
        return a["result"], a["fresh"], wall

    def execute(self, job):
        """Train and/or test one run, or reuse what its folder holds; returns (result,
        fresh) where fresh says whether anything was computed now."""
        v = job["variant"]
        rdir = self.run_dir(job["protocol"], job["regime"], v, job["lr"], job["seed"])
        res_path = rdir / "result.json"
        fresh = False
        if str(rdir) in self.records:
            res = self.records[str(rdir)]
        elif res_path.is_file():
            res = json.loads(res_path.read_text())
            want = json.loads(json.dumps(self.config(job["protocol"], job["regime"], v,
                                                     job["lr"], job["seed"])))
            got = json.loads((rdir / "train.json").read_text()).get("config") \
                if (rdir / "train.json").is_file() else None
            if got != want:
                raise CompareError(f"{res_path}: made with other settings (config "
                                   f"differs); use another --out or delete {rdir}")
        else:
            res = self._result(job, self.train_run(job), 0.0)
            fresh = True
        if job["phase"] == "final" and res["test_dice"] is None:
            rec = json.loads((rdir / "train.json").read_text())
            self._add_test(res, self.test_run(rec))
            fresh = True
        if fresh:
            import torch
            res["threads"] = torch.get_num_threads()
        return res, fresh

    def _record(self, jobs, i, res, fresh, wall) -> None:
        """Book one finished job (main process): result.json, progress line, reports."""
        job = jobs[i]
        rdir = self.run_dir(job["protocol"], job["regime"], job["variant"], job["lr"],
                            job["seed"])
        if fresh:
            res["workers"] = self.workers
            res["wall_s"] = round((res.get("wall_s") or 0.0) + wall, 2)
            self._done_s += wall
            self._done_est += self._est[i] if math.isfinite(self._est[i]) else 0.0
        res[job["phase"]] = True
        self._done_idx.add(i)
        self.records[str(rdir)] = res
        write_json(rdir / "result.json", res)
        self._report_progress(self._tag(i, job), res, jobs, i, self._est, fresh)
        # tables after every run; plots at most every 5 minutes (and at the end of run())
        plots = time.time() - self._last_plot > 300
        self.write_reports(plots=plots)
        if plots:
            self._last_plot = time.time()

    @property
    def runs(self) -> list[dict]:
        return list(getattr(self, "records", {}).values())

    def _choose(self, key):
        """The sweep's learning rate for ``key``: best validation Dice, ties to the lower."""
        cands = [r for r in self.runs if r.get("sweep") and
                 "/".join((r["regime"], r["protocol"], r["variant"])) == key]
        vals = {fmt_lr(r["lr"]): r["val_dice"] for r in cands}

        def score(r):
            vd = r["val_dice"]
            return (vd if vd is not None and math.isfinite(vd) else -1.0, -r["lr"])
        best = max(cands, key=score)
        self.lr_choice[key] = {"sweep": key, "lr": best["lr"], "val_dice": best["val_dice"],
                               "val_dice_by_lr": vals}
        for r in cands:
            r["chosen"] = r is best
            write_json(Path(r["run_dir"]) / "result.json", r)
        self.log(f"    learning rate chosen for {key}: {fmt_lr(best['lr'])} (validation Dice "
                 f"by rate: " + ", ".join(f"{k}: {v:.4f}" if v is not None else f"{k}: n/a"
                                          for k, v in vals.items()) + ")")

    def _report_progress(self, tag, res, jobs, i, est, fresh):
        parts = [] if fresh else ["done before"]
        if res.get("val_dice") is not None:
            parts.append(f"val Dice {res['val_dice']:.4f}")
        if res.get("test_dice") is not None:
            parts.append(f"test Dice {res['test_dice']:.4f}, HD95 {res['test_hd95_mm']:.2f} mm")
        if res.get("time_per_step_s"):
            parts.append(f"{res['time_per_step_s']:.2f} s/step")
        if fresh:
            parts.append(f"{res['wall_s']:.0f} s")
        left = [est[k] for k in range(len(jobs)) if k not in self._done_idx]
        if left and all(math.isfinite(x) for x in left):
            scale = self._done_s / self._done_est if self._done_est > 0 else 1.0
            parts.append(f"about {fmt_time(sum(left) * scale / self.workers)} left")
        self.log(f"{tag}: " + ", ".join(parts))

    # -- reports ---------------------------------------------------------------------------
    def final_runs(self) -> list[dict]:
        """Runs that count in the table: the final runs (every seed at the chosen rate)."""
        return [r for r in self.runs if r.get("final")]

    def write_reports(self, plots: bool = True) -> None:
        rows = [{k: v for k, v in r.items() if k != "curves"} for r in self.runs]
        fields = list(rows[0].keys()) if rows else []
        write_csv(self.out / "runs.csv", rows, fields)
        write_json(self.out / "runs.json", self.runs)
        write_json(self.out / "lr_choice.json", self.lr_choice)
        summ = aggregate(self.final_runs(), self.variants)
        write_json(self.out / "summary.json", summ)
        sfields = ["regime", "protocol", "variant", "method", "rank", "lr", "seeds",
                   "dice_mean", "dice_std", "hd95_mean", "hd95_std", "trainable_parameters",
                   "adapter_parameters", "artefact_bytes", "time_per_step_s", "peak_mem_mb"]
        flat = [{**{k: s[k] for k in sfields if k in s},
                 "dice_mean": s["dice"]["mean"], "dice_std": s["dice"]["std"],
                 "hd95_mean": s["hd95_mm"]["mean"], "hd95_std": s["hd95_mm"]["std"]}
                for s in summ]
        write_csv(self.out / "summary.csv", flat, sfields)
        atomic_write(self.out / "results.md", markdown(summ, self.S, self.steps_per_run()))
        if not (plots and self.plots):
            return
        try:
            plot_dice_vs_params(summ, self.out / "dice_vs_params.png")
            plot_curves(self.final_runs(), self.variants, self.out / "training_curves.png")
        except Exception as e:  # a plot must never lose the numbers
            self.log(f"note: plots not written ({type(e).__name__}: {e})")


def read_curves(path: Path) -> list[dict]:
    """The rows of a run's ``curves.csv`` as floats ([] when missing)."""
    if not Path(path).is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row = {}
            for k, v in r.items():
                try:
                    row[k] = float(v)
                except (TypeError, ValueError):
                    row[k] = float("nan")
            rows.append(row)
    return rows


def trainable_counts(run_json: Path, summ: dict) -> dict:
    """``{"adapter", "other", "total", ...}`` parameter counts of a finished run: its method
    and options (from its ``run.json``) applied with ``tsvd.peft.adapt`` to a fresh model of
    its preset, once per (preset, method, options); {} when unknown."""
    try:
        info = json.loads(Path(run_json).read_text())
    except (OSError, ValueError):
        return {}
    method, preset = info.get("method"), info.get("preset")
    opts = info.get("peft") or {}
    key = (preset, method, json.dumps(opts, sort_keys=True))
    if key in _COUNT_CACHE:
        return _COUNT_CACHE[key]
    if method == "full":
        c = {"adapter": 0, "total": summ.get("trainable_parameters")}
    else:
        try:
            from tsvd.models import build_unetr
            from tsvd.peft import adapt
            c = adapt(build_unetr(preset), method, **opts).num_trainable()
        except Exception:
            c = {}
    _COUNT_CACHE[key] = c
    return c


_COUNT_CACHE: dict = {}


def aggregate(runs: list[dict], variants: list[dict]) -> list[dict]:
    """Mean ± sample std over seeds per (regime, protocol, variant), in variant order."""
    order = {v["name"]: i for i, v in enumerate(variants)}
    cells: dict = {}
    for r in runs:
        if r.get("test_dice") is None:
            continue
        cells.setdefault((r["regime"], r["protocol"], r["variant"]), []).append(r)
    regimes = list(dict.fromkeys(r["regime"] for r in runs))
    protocols = list(dict.fromkeys(r["protocol"] for r in runs))
    out = []
    for (reg, prot, name), rs in sorted(cells.items(), key=lambda kv: (
            regimes.index(kv[0][0]), protocols.index(kv[0][1]), order.get(kv[0][2], 99))):
        rs = sorted(rs, key=lambda r: r["seed"])

        def first(k):
            return rs[0].get(k)
        out.append({
            "regime": reg, "protocol": prot, "variant": name, "method": first("method"),
            "rank": first("rank"), "lr": first("lr"), "seeds": [r["seed"] for r in rs],
            "train_subjects": first("train_subjects"),
            "dice": seed_stats([r["test_dice"] for r in rs]),
            "hd95_mm": seed_stats([r["test_hd95_mm"] for r in rs]),
            "val_dice": seed_stats([r.get("val_dice") for r in rs]),
            "trainable_parameters": first("trainable_parameters"),
            "adapter_parameters": first("adapter_parameters"),
            "model_parameters": first("model_parameters"),
            "artefact_bytes": first("artefact_bytes"),
            "time_per_step_s": seed_stats([r.get("time_per_step_s") for r in rs])["mean"],
            "peak_mem_mb": seed_stats([r.get("peak_mem_mb") for r in rs])["mean"],
            "workers": first("workers"), "threads": first("threads"),
        })
    return out


def _mb(b):
    return "n/a" if b is None else f"{b / 2 ** 20:.2f} MB"


def _num(n):
    return "n/a" if n is None else f"{int(n):,}"


def markdown(summ: list[dict], S: dict, steps: int) -> str:
    lines = [f"# Method comparison (UNETR {S['preset']} preset, embedded hippocampus data)", "",
             f"{S['epochs']} epochs × {S['samples_per_epoch']} samples, batch "
             f"{S['batch_size']} ({steps} steps) per run; seeds: {S['seeds']}; Dice and HD95 "
             f"on {S['n_test']} test subjects per protocol, mean ± std over seeds "
             f"(std: sample, ddof=1). Learning rate: best validation Dice of the sweep "
             f"(seed 0)."]
    par = sorted({(s.get("workers"), s.get("threads")) for s in summ
                  if s.get("workers") is not None})
    if par:
        lines[-1] += " s/step: training time per optimizer step of one run (augmentation, " \
            "forward, backward, update), with " + " / ".join(
                f"{w} run(s) at once × {t} thread(s)" for w, t in par) + \
            "; peak mem: that process's peak resident set."
    lines.append("")
    for regime in dict.fromkeys(s["regime"] for s in summ):
        rs = [s for s in summ if s["regime"] == regime]
        frac = S["regimes"].get(regime)
        lines += [f"## {regime} ({rs[0]['train_subjects']} training subjects"
                  + (f", {100 * frac:.0f} %" if frac is not None else "") + ")", "",
                  "| protocol | method | rank | lr | Dice | HD95 (mm) | trainable params "
                  "(adapter) | artefact | s/step | peak mem |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for s in rs:
            pct = 100.0 * s["trainable_parameters"] / s["model_parameters"] \
                if s.get("model_parameters") else float("nan")
            tps = s.get("time_per_step_s")
            pm = s.get("peak_mem_mb")
            lines.append(
                f"| {s['protocol']} | {NAMES.get(s['method'], s['method'])} | "
                f"{s['rank'] if s['rank'] else '–'} | {fmt_lr(s['lr'])} | {fmt_pm(s['dice'])} | "
                f"{fmt_pm(s['hd95_mm'], 2)} | {_num(s['trainable_parameters'])} "
                f"({pct:.1f} %; {_num(s.get('adapter_parameters'))}) | "
                f"{_mb(s.get('artefact_bytes'))} | "
                f"{'n/a' if tps is None or not math.isfinite(tps) else f'{tps:.2f}'} | "
                f"{'n/a' if pm is None or not math.isfinite(pm) else f'{pm / 1024:.2f} GB'} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save_fig(fig, path):
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def plot_dice_vs_params(summ: list[dict], path) -> None:
    """Test Dice (mean ± std over seeds) against trainable parameters, one panel per
    (regime, protocol), one marker per method."""
    if not summ:
        return
    plt = _plt()
    regimes = list(dict.fromkeys(s["regime"] for s in summ))
    prots = list(dict.fromkeys(s["protocol"] for s in summ))
    fig, axes = plt.subplots(len(regimes), len(prots), figsize=(5 * len(prots),
                             3.8 * len(regimes)), squeeze=False)
    marks = {"decoder": "s", "full": "D", "lora": "^", "pissa": "v", "lorapt": "o"}
    for i, reg in enumerate(regimes):
        for j, prot in enumerate(prots):
            ax = axes[i][j]
            for k, s in enumerate(x for x in summ if x["regime"] == reg and x["protocol"] == prot):
                std = s["dice"]["std"] if math.isfinite(s["dice"]["std"]) else 0.0
                ax.errorbar([s["trainable_parameters"]], [s["dice"]["mean"]], yerr=[std],
                            fmt=marks.get(s["method"], "o"), color=f"C{k}", capsize=3,
                            label=s["variant"])
            ax.set_xscale("log")
            ax.set_xlabel("trainable parameters")
            ax.set_ylabel("test Dice")
            ax.set_title(f"{reg}, {prot}")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.tight_layout()
    _save_fig(fig, path)


def plot_curves(runs: list[dict], variants: list[dict], path) -> None:
    """Training loss and validation Dice per epoch, mean over seeds, per variant; columns:
    protocols, rows: (regime, loss) and (regime, val Dice)."""
    runs = [r for r in runs if r.get("curves")]
    if not runs:
        return
    plt = _plt()
    regimes = list(dict.fromkeys(r["regime"] for r in runs))
    prots = list(dict.fromkeys(r["protocol"] for r in runs))
    fig, axes = plt.subplots(2 * len(regimes), len(prots), figsize=(5 * len(prots),
                             3.0 * 2 * len(regimes)), squeeze=False)
    for i, reg in enumerate(regimes):
        for j, prot in enumerate(prots):
            for k, v in enumerate(variants):
                rs = [r for r in runs if (r["regime"], r["protocol"], r["variant"]) ==
                      (reg, prot, v["name"])]
                if not rs:
                    continue
                n = min(len(r["curves"]) for r in rs)
                ep = [rs[0]["curves"][e]["epoch"] for e in range(n)]
                for row, key in ((2 * i, "train_loss"), (2 * i + 1, "val_dice")):
                    y = np.nanmean([[r["curves"][e].get(key, np.nan) for e in range(n)]
                                    for r in rs], axis=0)
                    axes[row][j].plot(ep, y, "o-", ms=3, color=f"C{k}", label=v["name"])
            for row, lab in ((2 * i, "training loss"), (2 * i + 1, "validation Dice")):
                ax = axes[row][j]
                ax.set_title(f"{reg}, {prot}")
                ax.set_xlabel("epoch")
                ax.set_ylabel(lab)
                ax.grid(alpha=0.3)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=7)
    fig.tight_layout()
    _save_fig(fig, path)


# ------------------------------------------------------------------------------------------
# data, pre-training, calibration
# ------------------------------------------------------------------------------------------
def prepare_data(S: dict, cache: Path, log=print) -> dict:
    """Build (or reuse) the embedded target datasets; protocol -> folder."""
    from tsvd.peft.seg import embedded as E
    bad = [p for p in S["protocols"] if p not in E.PROTOCOLS]
    if bad:
        raise CompareError(f"--protocols: unknown {bad} (expected some of "
                           f"{', '.join(sorted(E.PROTOCOLS))})")
    workers = max(1, min(2, os.cpu_count() or 1))
    return {p: E.build_dataset(p, n_train=S["n_train"], n_valid=S["n_valid"],
                               n_test=S["n_test"], spacing=S["spacing"],
                               seed=S["dataset_seed"], cache_dir=cache, workers=workers, log=log)
            for p in S["protocols"]}


def pretrain(S: dict, cache: Path, device="auto", log=print, progress=False) -> Path:
    """The pre-trained base: ``lorapt demo``'s source-task pre-training (its settings from
    ``tsvd.peft.seg.demo.DEMO``), run through ``train(task="pretrain")``, cached by its settings
    (the same cache entry as the demo's when the settings agree). Returns the weights file."""
    from tsvd.peft.seg import demo
    from tsvd.peft.seg import embedded as E
    D = demo.DEMO
    src = E.build_dataset("source", n_train=D["source_train"], n_valid=D["source_valid"],
                          n_test=0, spacing=D["spacing"], seed=0, cache_dir=cache,
                          workers=max(1, min(2, os.cpu_count() or 1)), log=log)
    t0 = time.time()
    base = demo.cached_pretrain(dict(D, preset=S["preset"]), src, cache, seed=0, device=device,
                                progress=progress)
    log(f"pre-trained weights ready in {fmt_time(time.time() - t0)}")
    return base


def calibrate(S: dict, variants: list[dict], dataset: Path, device="auto", steps=2,
              log=print) -> dict:
    """Seconds per training step of each variant (random input, ``steps`` timed steps after
    one warm-up), per no-grad forward, per subject preprocessing, and adapter set-up."""
    import torch
    from monai.losses import DiceCELoss
    from monai.transforms import Compose
    from tsvd.models import build_unetr, preset_kwargs
    from tsvd.peft import adapt
    from tsvd.peft.seg.data import eval_transforms, load_cases
    from tsvd.peft.seg.embedded import HIPPOCAMPUS_ROI_MM
    dev = torch.device("cuda" if (device in (None, "auto") and torch.cuda.is_available())
                       else ("cpu" if device in (None, "auto") else device))
    size = list(preset_kwargs(S["preset"])["img_size"])
    bs = int(S["batch_size"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(bs, 1, *size, generator=g).to(dev)
    y = (torch.rand(bs, 1, *size, generator=g) > 0.9).float().to(dev)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    out = {"step_s": {}, "setup_s": {}, "fwd_s": None, "case_s": None, "device": str(dev)}

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()
    for v in variants:
        torch.manual_seed(0)
        model = build_unetr(S["preset"])
        t0 = time.time()
        if v["method"] == "full":
            params = list(model.parameters())
        else:
            kw = {"rank": v["rank"]} if v["rank"] else {}
            params = adapt(model, v["method"], **kw).trainable_parameters()
        out["setup_s"][v["name"]] = time.time() - t0
        model.to(dev).train()
        opt = torch.optim.Adam(params, lr=1e-3, amsgrad=True)
        ts = []
        for k in range(steps + 1):
            sync()
            t0 = time.time()
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync()
            if k:
                ts.append(time.time() - t0)
        out["step_s"][v["name"]] = float(np.median(ts))
        if out["fwd_s"] is None:
            model.eval()
            with torch.no_grad():
                sync()
                t0 = time.time()
                model(x[:1])
                sync()
                out["fwd_s"] = time.time() - t0
        del model, opt, params
    _, splits, allowed = load_cases(dataset, "eadc")
    dcfg = {"spacing": S["spacing"], "patch": size, "foreground": None,
            "roi": ({"centre_mm": list(HIPPOCAMPUS_ROI_MM[0]), "size": size}
                    if S.get("roi", "mni-hippocampus") == "mni-hippocampus" else None)}
    comp = Compose(eval_transforms(dcfg, allowed))
    c = splits["test"][0] if splits["test"] else splits["train"][0]
    t0 = time.time()
    comp(dict(c))
    out["case_s"] = time.time() - t0
    log("calibration: s/step " + ", ".join(f"{k} {v:.2f}" for k, v in out["step_s"].items())
        + f"; forward {out['fwd_s']:.2f} s; one subject's preprocessing {out['case_s']:.2f} s")
    return out


# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="compare.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0] + "\n\n" + "\n\n".join(__doc__.split("\n\n")[1:]),
    )
    ap.add_argument("--out", default="compare-out",
                    help="output folder (default ./compare-out); running again with the same "
                    "folder skips the runs that have a result.json (resume)")
    ap.add_argument("--quick", action="store_true",
                    help=f"one seed, protocol {QUICK['protocols'][0]}, the full-data regime "
                    f"only, {QUICK['epochs']} epochs × {QUICK['samples_per_epoch']} samples, two "
                    f"learning rates per method "
                    f"(what CI or a reviewer runs; < 20 min on 2 CPU cores)")
    ap.add_argument("--protocols", help="comma-separated embedded protocols (default "
                    f"{','.join(FULL['protocols'])}; --quick: {QUICK['protocols'][0]}; "
                    "available: neuromorphometrics, harvard-oxford, desikan-killiany, aal)")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help="comma-separated METHOD[:RANK] (default %(default)s)")
    ap.add_argument("--seeds", type=int, help=f"training seeds 0..N-1 (default {FULL['seeds']}, "
                    f"--quick 1)")
    ap.add_argument("--epochs", type=int, help=f"epochs per run (default {FULL['epochs']}, "
                    f"--quick {QUICK['epochs']})")
    ap.add_argument("--samples-per-epoch", type=int,
                    help=f"random crops per epoch (default {FULL['samples_per_epoch']}, "
                    f"--quick {QUICK['samples_per_epoch']})")
    ap.add_argument("--batch-size", type=int, help=f"default {FULL['batch_size']}")
    ap.add_argument("--lrs", action="append", metavar="METHOD=LR,LR,...",
                    help="learning-rate grid of a method (repeatable); default: "
                    + "; ".join(f"{m} {','.join(fmt_lr(x) for x in v)}" for m, v in LR_GRID.items())
                    + " (--quick: " + "; ".join(f"{m} {','.join(fmt_lr(x) for x in v)}"
                                                for m, v in QUICK_LR_GRID.items()) + ")")
    ap.add_argument("--low-data-fraction", type=float,
                    help="fraction of the training subjects of the low-data regime "
                    "(default 0.25; --quick: 0); 0 leaves the low-data regime out")
    ap.add_argument("--sweep", choices=["method", "cell"],
                    help="method (default): each variant's learning rate is chosen once, on "
                    "the first regime and protocol, and used everywhere; cell: a sweep for "
                    "every (regime, protocol, variant), about 2x the time")
    ap.add_argument("--n-train", type=int, help=f"training subjects per protocol (default "
                    f"{FULL['n_train']})")
    ap.add_argument("--n-valid", type=int, help=f"validation subjects (default {FULL['n_valid']})")
    ap.add_argument("--n-test", type=int, help=f"test subjects (default {FULL['n_test']})")
    ap.add_argument("--preset", choices=["cpu", "paper", "tiny"],
                    help="UNETR preset (default cpu)")
    ap.add_argument("--pretrained", help="base checkpoint to fine-tune (default: pre-train once "
                    "on the embedded source task like `lorapt demo`, cached)")
    ap.add_argument("--cache", help="cache folder for datasets and pre-trained weights "
                    "(default $TSVD_CACHE or ~/.cache/tsvd)")
    ap.add_argument("--device", default="auto", help="auto (default), cpu, cuda")
    ap.add_argument("--threads", type=int, help="torch CPU threads (per worker with --workers)")
    ap.add_argument("--workers", type=int,
                    help="runs trained at once, each in its own process with CPU threads / "
                    "workers torch threads (default: 2 on a CPU with 2 or more cores, 1 on "
                    "CUDA). On this 2-core machine (2026-11-27, batch 2 steps) 2 workers x 1 "
                    "thread made about 1.3x the training steps per second of 1 x 2 threads; the time per step in the "
                    "table is then that of one worker sharing the machine")
    ap.add_argument("--estimate-only", action="store_true",
                    help="build data / pre-train if needed, calibrate, print the plan and the "
                    "estimated time, and stop")
    ap.add_argument("--no-calibrate", action="store_true",
                    help="skip the timing calibration (no estimate before starting)")
    ap.add_argument("--verbose", action="store_true",
                    help="show every run's training log and progress bars")
    return ap


def settings_from_args(args) -> dict:
    S = copy.deepcopy(QUICK if args.quick else FULL)
    if args.protocols:
        S["protocols"] = [p.strip() for p in args.protocols.split(",") if p.strip()]
    for k in ("seeds", "epochs", "samples_per_epoch", "batch_size", "n_train", "n_valid",
              "n_test", "preset"):
        v = getattr(args, k, None)
        if v is not None:
            S[k] = v
    for k in ("seeds", "epochs", "samples_per_epoch", "batch_size", "n_train", "n_valid",
              "n_test"):
        if not isinstance(S[k], int) or S[k] < 1:
            raise CompareError(f"--{k.replace('_', '-')}: expected a positive integer, "
                               f"got {S[k]!r}")
    if args.sweep:
        S["sweep"] = args.sweep
    f = args.low_data_fraction
    if f is None:
        f = 0.0 if args.quick else 0.25
    if not (0 <= f < 1):
        raise CompareError(f"--low-data-fraction: expected a number in [0, 1), got {f!r}")
    S["regimes"] = {"full-data": 1.0}
    if f > 0:
        S["regimes"]["low-data"] = float(f)
    return S


def worker_main(spec_path) -> int:
    """``compare.py --worker SPEC``: one job of a parallel comparison (see Comparison.run)."""
    import torch
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(int(spec["threads"]))
    cmp = Comparison(spec["out"], spec["settings"], spec["variants"], spec["lr_grid"],
                     datasets=spec["datasets"], pretrained=spec["pretrained"],
                     device=spec["device"], log=lambda *a: None, plots=False)
    res, fresh = cmp.execute(spec["job"])
    write_json(spec["answer"], {"result": res, "fresh": fresh})
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 2 and argv[0] == "--worker":
        return worker_main(argv[1])
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except CompareError as e:
        print(f"compare.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("compare.py: interrupted; finished runs are kept, run the same command again "
              "to continue", file=sys.stderr)
        return 130


def _main(args) -> int:
    t_all = time.time()
    S = settings_from_args(args)
    if args.workers is None:
        cuda = str(args.device).startswith("cuda") or (args.device in (None, "auto")
                                                       and _cuda_available())
        args.workers = 1 if cuda else max(1, min(2, os.cpu_count() or 1))
    if args.workers < 1:
        raise CompareError(f"--workers: expected a positive integer, got {args.workers}")
    if args.threads is not None and args.threads < 1:
        raise CompareError(f"--threads: expected a positive integer, got {args.threads}")
    variants = parse_variants(args.variants)
    grid = parse_lrs(args.lrs, QUICK_LR_GRID if args.quick else LR_GRID)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CompareError(f"--out {out}: exists and is not a folder")
    import torch
    if args.threads:
        torch.set_num_threads(int(args.threads))
    from tsvd.peft.seg import embedded as E
    cache = Path(args.cache) if args.cache else E.default_cache_dir()
    plan_path = out / "plan.json"
    plan_obj = {"settings": S, "variants": variants, "lr_grid": grid,
                "pretrained": args.pretrained, "device": args.device}
    if plan_path.is_file():
        old = json.loads(plan_path.read_text())
        if {k: old.get(k) for k in plan_obj} != json.loads(json.dumps(plan_obj)):
            raise CompareError(f"{plan_path}: {out} holds a comparison with other settings; "
                               f"use another --out (or the same options as before)")
        print(f"continuing the comparison in {out}")
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), CUDA "
          f"{'yes' if torch.cuda.is_available() else 'no'}; {time.strftime('%Y-%m-%d %H:%M %Z')}")
    t0 = time.time()
    datasets = prepare_data(S, cache)
    pre = Path(args.pretrained) if args.pretrained else pretrain(S, cache, args.device,
                                                                 progress=args.verbose)
    if not pre.is_file():
        raise CompareError(f"--pretrained {pre}: file not found")
    print(f"data and pre-trained weights ready in {fmt_time(time.time() - t0)}; base {pre}")
    cmp = Comparison(out, S, variants, grid, datasets=datasets, pretrained=pre,
                     device=args.device, verbose=args.verbose, workers=args.workers,
                     threads_per_worker=args.threads)
    jobs = cmp.plan()
    todo = [j for j in jobs if not _has_result(cmp, j)]
    steps = cmp.steps_per_run()
    n_reused = sum(1 for j in jobs if j.get("reuses_sweep"))
    print(f"plan: {len(S['regimes'])} regime(s) {list(S['regimes'])} × {len(S['protocols'])} "
          f"protocol(s) {S['protocols']} × {len(variants)} variants "
          f"[{', '.join(v['name'] for v in variants)}]; seeds {S['seeds']}; learning rates "
          + "; ".join(f"{m} {','.join(fmt_lr(x) for x in grid[m])}"
                      for m in dict.fromkeys(v['method'] for v in variants))
          + f"\n      {len(jobs)} runs ({len(jobs) - n_reused} trainings of {S['epochs']} "
          f"epochs × {S['samples_per_epoch']} samples, batch {S['batch_size']}, {steps} steps; "
          f"{n_reused} final runs are sweep runs evaluated on the test split); "
          f"{len(jobs) - len(todo)} done before, {len(todo)} to run")
    cal = None
    if todo and not args.no_calibrate:
        cal = calibrate(S, variants, datasets[S["protocols"][0]], args.device)
        est = sum(cmp.estimate_run(j, cal) for j in todo) / args.workers
        print(f"estimated time for the {len(todo)} remaining runs: {fmt_time(est)} "
              f"(from the calibration; other load on the machine makes it longer)")
    if args.estimate_only:
        return 0
    write_json(plan_path, plan_obj)
    cmp.run(cal)
    print(f"\nresults in {out}: results.md, summary.csv/json, runs.csv/json, lr_choice.json, "
          f"dice_vs_params.png, training_curves.png")
    print((out / "results.md").read_text())
    print(f"total wall time {fmt_time(time.time() - t_all)}")
    return 0


def _has_result(cmp: Comparison, job) -> bool:
    """Whether ``job`` is finished in the output folder (for the estimate before starting)."""
    lr = job["lr"]
    if job["phase"] == "final":      # its learning rate: the sweep's choice, if made before
        p = cmp.out / "lr_choice.json"
        c = (json.loads(p.read_text()) if p.is_file() else {}).get(job["key"])
        if not c:
            return False
        lr = c["lr"]
    p = cmp.run_dir(job["protocol"], job["regime"], job["variant"], lr, job["seed"]) / \
        "result.json"
    if not p.is_file():
        return False
    return job["phase"] == "sweep" or json.loads(p.read_text()).get("test_dice") is not None


if __name__ == "__main__":
    sys.exit(main())
