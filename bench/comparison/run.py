"""Running the comparison: :class:`Comparison` trains and tests every planned run (in this
process or in worker processes), resumably (a run whose folder holds a ``result.json`` is
not run again), chooses the learning rates on validation, and rewrites the report after
every run; the data and the pre-trained base it needs; peak memory of a training call."""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

from . import plan as P
from .common import CompareError, fmt_lr, fmt_time, read_json, write_json
from .report import grid_edge, write_reports

__all__ = ["ENTRY", "Comparison", "PeakMemory", "worker_main", "prepare_data", "pretrain",
           "read_curves", "trainable_counts", "cuda_available"]

#: the script a worker process runs (``python compare.py --worker SPEC``)
ENTRY = Path(__file__).resolve().parents[1] / "compare.py"


def cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


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
# what a run leaves behind
# ------------------------------------------------------------------------------------------
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


_COUNT_CACHE: dict = {}


def trainable_counts(run_json: Path, summ: dict) -> dict:
    """``{"adapter", "other", "total", ...}`` parameter counts of a finished run: its method
    and options (from its ``run.json``) applied with ``tsvd.peft.adapt`` to a fresh model of
    its preset, once per (preset, method, options); {} when unknown."""
    try:
        info = read_json(run_json)
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


# ------------------------------------------------------------------------------------------
# data and the pre-trained base
# ------------------------------------------------------------------------------------------
def prepare_data(S: dict, cache: Path, log=print) -> dict:
    """Build (or reuse) the embedded target datasets; protocol -> folder. The test subjects
    are numbers ``test_start`` .. ``test_start + n_test - 1`` of each protocol's test seed
    range."""
    from tsvd.peft.seg import embedded as E
    bad = [p for p in S["protocols"] if p not in E.PROTOCOLS]
    if bad:
        raise CompareError(f"--protocols: unknown {bad} (expected some of "
                           f"{', '.join(sorted(E.PROTOCOLS))})")
    workers = max(1, min(2, os.cpu_count() or 1))
    return {p: E.build_dataset(p, n_train=S["n_train"], n_valid=S["n_valid"],
                               n_test=S["n_test"], test_start=int(S.get("test_start", 0)),
                               spacing=S["spacing"], seed=S["dataset_seed"], cache_dir=cache,
                               workers=workers, log=log)
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


# ------------------------------------------------------------------------------------------
# the comparison
# ------------------------------------------------------------------------------------------
class Comparison:
    """Runs (resumably) and reports the comparison planned by :mod:`.plan`.

    ``datasets``: protocol -> dataset folder (EADC layout); ``pretrained``: base checkpoint.
    ``train_fn`` / ``evaluate_fn`` / ``prior_fn`` default to :func:`tsvd.peft.seg.train.train`,
    :func:`tsvd.peft.seg.infer.evaluate` and :func:`tsvd.peft.seg.demo.template_prior_scores`
    (the tests replace them); ``cache``: the cache folder handed to ``prior_fn``.
    """

    def __init__(self, out, settings: dict, variants: list[dict], lr_grid: dict, *,
                 datasets: dict, pretrained, device: str = "auto", train_fn=None,
                 evaluate_fn=None, prior_fn=None, cache=None, log=print,
                 verbose: bool = False, plots: bool = True, workers: int = 1,
                 threads_per_worker: int | None = None):
        self.out = Path(out)
        self.S = copy.deepcopy(settings)
        self.variants = variants
        self.lr_grid = lr_grid
        self.datasets = {k: Path(v) for k, v in datasets.items()}
        self.pretrained = Path(pretrained)
        self.device = device or "auto"
        if train_fn is None:
            from tsvd.peft.seg.train import train as train_fn
        if evaluate_fn is None:
            from tsvd.peft.seg.infer import evaluate as evaluate_fn
        self.train_fn, self.evaluate_fn, self.prior_fn = train_fn, evaluate_fn, prior_fn
        self.cache = cache
        self._prior_memo: dict = {}
        self.log = log
        self.verbose = verbose
        self.plots = plots
        if not isinstance(workers, int) or workers < 1:
            raise CompareError(f"--workers: expected a positive integer, got {workers!r}")
        if workers > 1 and (str(device).startswith("cuda") or (
                device in (None, "auto") and cuda_available())):
            raise CompareError("--workers > 1 is for CPU runs (one GPU runs one job at a time)")
        self.workers = workers
        self.threads_per_worker = threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
        missing = [p for p in self.S["protocols"] if p not in self.datasets]
        if missing:
            raise CompareError(f"no dataset folder for protocol(s) {missing}")
        for v in variants:
            if not P.is_prior(v) and not lr_grid.get(v["method"]):
                raise CompareError(f"learning-rate grid of {v['method']} is empty")
        self.n_train = {p: self._count_train(self.datasets[p]) for p in self.S["protocols"]}
        self.records: dict = {}            # run folder -> result (one per run)
        self.lr_choice: dict = {}
        self._done_s, self._done_est = 0.0, 0.0

    # -- the plan, for this comparison's settings and folder -------------------------------
    @staticmethod
    def _count_train(path: Path) -> int:
        from tsvd.peft.seg.data import load_cases
        _, splits, _ = load_cases(path, "eadc")
        n = len(splits["train"])
        if n < 1:
            raise CompareError(f"{path}: no training subjects")
        return n

    def config(self, protocol: str, regime: str, variant: dict, lr: float, seed: int) -> dict:
        """The training configuration of one run (:func:`.plan.run_config`)."""
        return P.run_config(self.S, self.datasets[protocol], self.pretrained,
                            self.n_train[protocol], regime, variant, lr, seed, self.device)

    def steps_per_run(self) -> int:
        return P.steps_per_run(self.S)

    def run_dir(self, protocol, regime, variant, lr, seed) -> Path:
        return P.run_dir(self.out, protocol, regime, variant, lr, seed)

    def sweep_key(self, regime, protocol, variant) -> str:
        return P.sweep_key(self.S, regime, protocol, variant)

    def plan(self) -> list[dict]:
        """Every run in order (:func:`.plan.jobs`)."""
        return P.jobs(self.S, self.variants, self.lr_grid)

    def estimate_run(self, job, cal) -> float:
        """Seconds for one run from the calibration ``cal`` (:func:`.plan.estimate_run`)."""
        return P.estimate_run(self.S, self.n_train[job["protocol"]], job, cal)

    def _job_dir(self, job) -> Path:
        if job["phase"] == "prior":
            return P.prior_dir(self.out, job["protocol"], job["regime"])
        return self.run_dir(job["protocol"], job["regime"], job["variant"], job["lr"],
                            job["seed"])

    def is_done(self, job) -> bool:
        """Whether ``job`` is finished in the output folder: its ``result.json`` exists (for
        a final run: with the test numbers). A final run's learning rate is the sweep's
        choice in ``lr_choice.json``; before that choice it is not done."""
        if job["phase"] == "prior":
            p = self._job_dir(job) / "result.json"
            return p.is_file() and read_json(p).get("test_dice") is not None
        if job["phase"] == "final" and job["lr"] is None:
            p = self.out / "lr_choice.json"
            c = (read_json(p) if p.is_file() else {}).get(job["key"])
            if not c:
                return False
            job = dict(job, lr=c["lr"])
        p = self._job_dir(job) / "result.json"
        if not p.is_file():
            return False
        return job["phase"] == "sweep" or read_json(p).get("test_dice") is not None

    # -- one run ---------------------------------------------------------------------------
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
        rdir = self._job_dir(job)
        cfg = self.config(job["protocol"], job["regime"], v, lr, seed)
        rec_path = rdir / "train.json"
        if rec_path.is_file():
            rec = read_json(rec_path)
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
            return read_json(mpath)
        log, fh = self._run_log(rdir)
        try:
            return self.evaluate_fn(rec["config"], rdir / "train", rdir / "eval", split="test",
                                    overwrite=True, progress=self.verbose)
        finally:
            fh.close()

    def _result(self, job, rec, wall) -> dict:
        v = job["variant"]
        return {"regime": job["regime"], "protocol": job["protocol"], "variant": v["name"],
                "method": v["method"], "rank": v["rank"],
                "train_decoder": bool(v.get("train_decoder", True)), "lr": job["lr"],
                "seed": job["seed"],
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
                "test_empty": None,
                "test_case_dice": None,
                "run_dir": rec["run_dir"], "curves": rec.get("curves", [])}

    @staticmethod
    def _add_test(res, ev) -> None:
        """The test numbers of evaluation ``ev`` (``evaluate``'s dict): means over the
        subjects, the number of empty predictions (``test_empty``: ``n_empty`` of its HD95
        summary, else counted from its per-subject rows, else None) and each subject's Dice
        (``test_case_dice``, for the paired tests)."""
        empty = ev["hd95_mm"].get("n_empty")
        if empty is None and ev.get("cases") and all("empty_prediction" in c
                                                     for c in ev["cases"]):
            empty = sum(bool(c["empty_prediction"]) for c in ev["cases"])
        res.update({"test_dice": ev["dice"]["mean"], "test_dice_std_cases": ev["dice"]["std"],
                    "test_hd95_mm": ev["hd95_mm"]["mean"],
                    "test_hd95_std_cases": ev["hd95_mm"]["std"], "test_cases": ev["dice"]["n"],
                    "test_hd95_nan": ev["hd95_mm"].get("n_nan", 0), "test_empty": empty,
                    "test_case_dice": {c["case"]: c["dice"] for c in ev.get("cases", [])}
                    or None})

    # -- the template prior ------------------------------------------------------------------
    def _prior_scores(self, protocol: str) -> dict:
        """The template prior on ``protocol``'s test subjects: ``prior_fn`` on each subject
        alone (for the paired tests), its Dice, HD95 and empty flag per subject; once per
        protocol and session."""
        if protocol not in self._prior_memo:
            from tsvd.peft.seg.data import load_cases
            if self.prior_fn is None:       # imported only when the prior is among the variants
                from tsvd.peft.seg.demo import template_prior_scores
                self.prior_fn = template_prior_scores
            _, splits, _ = load_cases(self.datasets[protocol], "eadc")
            cases = [c for c in splits["test"] if c.get("label")]
            if not cases:
                raise CompareError(f"{self.datasets[protocol]}: no labelled test subjects for "
                                   f"the template prior")
            rows = []
            for c in cases:
                sc = self.prior_fn([c], protocol, self.cache)
                rows.append({"case": c["name"], "dice": sc["dice"]["mean"],
                             "hd95_mm": sc["hd95_mm"]["mean"],
                             "empty_prediction": bool(sc["hd95_mm"].get("n_empty", 0))})
            self._prior_memo[protocol] = rows
        return self._prior_memo[protocol]

    def _prior_result(self, job) -> dict:
        """The template prior's result (a final run of no training, lr and seed None), with
        the test numbers of :meth:`_add_test` (``summarize`` over the subjects)."""
        from tsvd.peft.seg.metrics import summarize
        t0 = time.time()
        rows = self._prior_scores(job["protocol"])
        empty = [r["empty_prediction"] for r in rows]
        ev = {"dice": summarize([r["dice"] for r in rows], empty=empty),
              "hd95_mm": summarize([r["hd95_mm"] for r in rows], empty=empty), "cases": rows}
        v = job["variant"]
        res = {"regime": job["regime"], "protocol": job["protocol"], "variant": v["name"],
               "method": v["method"], "rank": None, "train_decoder": None, "lr": None,
               "seed": None, "sweep": False, "final": True, "chosen": None,
               "dataset": str(self.datasets[job["protocol"]]), "train_subjects": None,
               "epochs": 0, "steps": 0, "trainable_parameters": 0, "adapter_parameters": 0,
               "model_parameters": None, "artefact_bytes": None, "val_dice": None,
               "time_per_step_s": None, "peak_mem_mb": None, "mem_start_mb": None,
               "mem_kind": None, "train_wall_s": 0.0, "wall_s": 0.0,
               "run_dir": str(self._job_dir(job)), "curves": []}
        self._add_test(res, ev)
        res["wall_s"] = round(time.time() - t0, 2)
        return res

    def execute(self, job):
        """Train and/or test one run, or reuse what its folder holds; returns (result,
        fresh) where fresh says whether anything was computed now."""
        v = job["variant"]
        if job["phase"] == "prior":
            p = self._job_dir(job) / "result.json"
            if str(p.parent) in self.records:
                return self.records[str(p.parent)], False
            if p.is_file():
                res = read_json(p)
                if res.get("dataset") != str(self.datasets[job["protocol"]]):
                    raise CompareError(f"{p}: made on another dataset ({res.get('dataset')}); "
                                       f"use another --out or delete {p.parent}")
                return res, False
            return self._prior_result(job), True
        rdir = self._job_dir(job)
        res_path = rdir / "result.json"
        fresh = False
        if str(rdir) in self.records:
            res = self.records[str(rdir)]
        elif res_path.is_file():
            res = read_json(res_path)
            want = json.loads(json.dumps(self.config(job["protocol"], job["regime"], v,
                                                     job["lr"], job["seed"])))
            got = read_json(rdir / "train.json").get("config") \
                if (rdir / "train.json").is_file() else None
            if got != want:
                raise CompareError(f"{res_path}: made with other settings (config "
                                   f"differs); use another --out or delete {rdir}")
        else:
            res = self._result(job, self.train_run(job), 0.0)
            fresh = True
        if job["phase"] == "final" and res["test_dice"] is None:
            self._add_test(res, self.test_run(read_json(rdir / "train.json")))
            fresh = True
        if fresh:
            import torch
            res["threads"] = torch.get_num_threads()
        return res, fresh

    # -- the whole comparison --------------------------------------------------------------
    def run(self, cal=None) -> list[dict]:
        """Run (or reuse) every planned run, writing the reports after each one: first every
        sweep run, then the learning-rate choices, then the final runs. With ``workers > 1``
        the runs of each phase go to that many worker processes (``python compare.py
        --worker``, ``threads_per_worker`` torch threads each); every result is recorded and
        reported here, in the main process."""
        jobs = self.plan()
        self._total = len(jobs)
        self._est = {i: self.estimate_run(j, cal) for i, j in enumerate(jobs)}
        self.records = {}
        self.lr_choice = {}
        self._done_idx: set = set()
        t_start = self._last_plot = time.time()
        for i, j in enumerate(jobs):          # the template prior: here, no training
            if j["phase"] == "prior":
                t0 = time.time()
                res, fresh = self.execute(j)
                self._record(jobs, i, res, fresh, time.time() - t0)
        sweep = [i for i, j in enumerate(jobs) if j["phase"] == "sweep"]
        final = [i for i, j in enumerate(jobs) if j["phase"] == "final"]
        keys = list(dict.fromkeys(jobs[i]["key"] for i in sweep))
        self._early_finals(jobs, sweep, final, keys)
        self._run_phase(jobs, sweep)
        for key in keys:
            self._choose(key)
        # bracketing (P.EXTEND_GRID): one more rate beyond an end that won, then choose again
        for _ in range(0 if self.S.get("no_extend") else P.EXTEND_GRID):
            extra = [e for e in (P.extension_job([jobs[i] for i in sweep],
                                                    self.lr_choice[key]) for key in keys) if e]
            if not extra:
                break
            idx = list(range(len(jobs), len(jobs) + len(extra)))
            jobs.extend(extra)
            self._total = len(jobs)
            for i in idx:
                self._est[i] = self.estimate_run(jobs[i], cal)
            sweep += idx
            self.log(f"extending {len(extra)} learning-rate grid(s) whose best rate is at an "
                     f"end: " + ", ".join(f"{e['key']} lr={fmt_lr(e['lr'])}" for e in extra))
            self._run_phase(jobs, idx)
            for key in keys:
                self._choose(key)
        for i in final:
            jobs[i]["lr"] = self.lr_choice[jobs[i]["key"]]["lr"]
        self._run_phase(jobs, final)
        self.write_reports(plots=True)
        self.log(f"all {self._total} runs done; {fmt_time(time.time() - t_start)} in this "
                 f"session")
        return self.runs

    def _early_finals(self, jobs, sweep, final, keys) -> None:
        """On a resumed comparison: the final runs of every sweep that is already complete
        and whose choice no extension can change (its rate inside the grid, or extensions
        off) run before the remaining sweep runs. The same runs at the same rates as in the
        usual order, only sooner, so that a comparison finished over several sittings has
        its first complete rows early."""
        done = [i for i in sweep if not self._pending(jobs[i])]
        if not done or len(done) == len(sweep):
            return
        self._run_phase(jobs, done)                   # loads their results
        early = []
        for key in keys:
            if any(self._pending(jobs[i]) for i in sweep if jobs[i]["key"] == key):
                continue
            self._choose(key)
            edge = self.lr_choice[key].get("at_grid_edge")
            if edge in ("lowest", "highest") and not self.S.get("no_extend"):
                continue                              # an extension may still move it
            for i in final:
                if jobs[i]["key"] == key:
                    jobs[i]["lr"] = self.lr_choice[key]["lr"]
                    early.append(i)
        if early:
            self.log(f"final runs of {len(set(jobs[i]['key'] for i in early))} complete "
                     f"sweep(s) first, before the {len(sweep) - len(done)} remaining sweep "
                     f"run(s)")
            self._run_phase(jobs, early)

    def _tag(self, i, job) -> str:
        if job["phase"] == "prior":
            return (f"[{i + 1}/{self._total}] template prior {job['regime']} "
                    f"{job['protocol']}")
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
        rdir = self._job_dir(job)
        return str(rdir) not in self.records and not (rdir / "result.json").is_file()

    def _tested(self, job) -> bool:
        rdir = self._job_dir(job)
        res = self.records.get(str(rdir))
        if res is None and (rdir / "result.json").is_file():
            res = read_json(rdir / "result.json")
        return res is not None and res.get("test_dice") is not None

    def _in_worker(self, job):
        """Run ``job`` in a fresh ``python compare.py --worker SPEC`` process; returns
        (result, fresh, wall seconds). The spec and the answer are files in the run folder."""
        import subprocess
        rdir = self._job_dir(job)
        rdir.mkdir(parents=True, exist_ok=True)
        spec = {"out": str(self.out), "settings": self.S, "variants": self.variants,
                "lr_grid": self.lr_grid, "datasets": {k: str(v) for k, v in
                                                      self.datasets.items()},
                "pretrained": str(self.pretrained), "device": self.device,
                "threads": self.threads_per_worker, "job": job,
                "answer": str(rdir / "worker_answer.json")}
        write_json(rdir / "worker_spec.json", spec)
        t0 = time.time()
        proc = subprocess.run([sys.executable, str(ENTRY), "--worker",
                               str(rdir / "worker_spec.json")], capture_output=True, text=True)
        wall = time.time() - t0
        ans = rdir / "worker_answer.json"
        if proc.returncode != 0 or not ans.is_file():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-15:]
            raise CompareError(f"worker for {rdir} failed (exit {proc.returncode}):\n    "
                               + "\n    ".join(tail))
        a = read_json(ans)
        ans.unlink()
        (rdir / "worker_spec.json").unlink()
        return a["result"], a["fresh"], wall

    def _record(self, jobs, i, res, fresh, wall) -> None:
        """Book one finished job (main process): result.json, progress line, reports."""
        job = jobs[i]
        rdir = self._job_dir(job)
        if fresh:
            res["workers"] = self.workers
            res["wall_s"] = round((res.get("wall_s") or 0.0) + wall, 2)
            self._done_s += wall
            self._done_est += self._est[i] if math.isfinite(self._est[i]) else 0.0
        res[job["phase"]] = True
        self._done_idx.add(i)
        self.records[str(rdir)] = res
        write_json(rdir / "result.json", res)
        self._report_progress(self._tag(i, job), res, jobs, fresh)
        # tables after every run; plots at most every 5 minutes (and at the end of run())
        plots = time.time() - self._last_plot > 300
        self.write_reports(plots=plots)
        if plots:
            self._last_plot = time.time()

    @property
    def runs(self) -> list[dict]:
        return list(self.records.values())

    def _choose(self, key):
        """The sweep's learning rate for ``key``: best validation Dice, ties to the lower."""
        cands = [r for r in self.runs if r.get("sweep") and
                 "/".join((r["regime"], r["protocol"], r["variant"])) == key]
        vals = {fmt_lr(r["lr"]): r["val_dice"] for r in cands}

        def score(r):
            vd = r["val_dice"]
            return (vd if vd is not None and math.isfinite(vd) else -1.0, -r["lr"])
        best = max(cands, key=score)
        rates = sorted(r["lr"] for r in cands)
        edge = grid_edge(best["lr"], rates)
        self.lr_choice[key] = {"sweep": key, "lr": best["lr"], "val_dice": best["val_dice"],
                               "val_dice_by_lr": vals, "grid": rates, "at_grid_edge": edge}
        for r in cands:
            r["chosen"] = r is best
            write_json(Path(r["run_dir"]) / "result.json", r)
        self.log(f"    learning rate chosen for {key}: {fmt_lr(best['lr'])} (validation Dice "
                 f"by rate: " + ", ".join(f"{k}: {v:.4f}" if v is not None else f"{k}: n/a"
                                          for k, v in vals.items()) + ")"
                 + (f"; {edge} of the grid: the optimum is not bracketed" if edge else ""))

    def _report_progress(self, tag, res, jobs, fresh):
        parts = [] if fresh else ["done before"]
        if res.get("val_dice") is not None:
            parts.append(f"val Dice {res['val_dice']:.4f}")
        if res.get("test_dice") is not None:
            parts.append(f"test Dice {res['test_dice']:.4f}, HD95 {res['test_hd95_mm']:.2f} mm")
        if res.get("time_per_step_s"):
            parts.append(f"{res['time_per_step_s']:.2f} s/step")
        if fresh:
            parts.append(f"{res['wall_s']:.0f} s")
        left = [self._est[k] for k in range(len(jobs)) if k not in self._done_idx]
        if left and all(math.isfinite(x) for x in left):
            scale = self._done_s / self._done_est if self._done_est > 0 else 1.0
            parts.append(f"about {fmt_time(sum(left) * scale / self.workers)} left")
        self.log(f"{tag}: " + ", ".join(parts))

    # -- reports ---------------------------------------------------------------------------
    def final_runs(self) -> list[dict]:
        """Runs that count in the table: the final runs (every seed at the chosen rate)."""
        return [r for r in self.runs if r.get("final")]

    def write_reports(self, plots: bool = True) -> list[dict]:
        """The tables (and plots, when ``plots`` and the comparison makes plots) so far."""
        return write_reports(self.out, self.runs, self.lr_choice, self.variants, self.S,
                             plots=plots and self.plots, log=self.log)


def worker_main(spec_path) -> int:
    """``compare.py --worker SPEC``: one job of a parallel comparison (see Comparison.run)."""
    import torch
    spec = read_json(spec_path)
    torch.set_num_threads(int(spec["threads"]))
    cmp = Comparison(spec["out"], spec["settings"], spec["variants"], spec["lr_grid"],
                     datasets=spec["datasets"], pretrained=spec["pretrained"],
                     device=spec["device"], log=lambda *a: None, plots=False)
    res, fresh = cmp.execute(spec["job"])
    write_json(spec["answer"], {"result": res, "fresh": fresh})
    return 0
