"""What the comparison runs: its settings (full and ``--quick``), the variants
(``METHOD[:RANK]``, methods from the library's registry :data:`tsvd.peft.METHODS`), the
learning-rate grids, each run's training configuration and folder, the ordered job list
(sweeps, then final runs seed by seed), and the time estimate from a short calibration."""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np

from .common import CompareError, fmt_lr, n_used, read_json

__all__ = ["DEFAULT_VARIANTS", "QUICK_VARIANTS", "QUICK_BUDGET_S", "ESTIMATE_RATIO", "LR_GRID",
           "EXTEND_GRID", "extension_job",
           "QUICK_LR_GRID", "NAMES", "FULL", "QUICK", "NODEC", "PRIOR", "methods", "takes_rank",
           "uses_adapters", "is_prior", "display_name", "variant_label", "parse_variants",
           "parse_lrs", "check_settings", "plan_record", "check_plan_file", "steps_per_run",
           "sweep_key", "jobs", "run_dir", "prior_dir", "run_config", "estimate_run",
           "calibrate"]

#: DoRA is among the defaults: its training step costs about 1.06x LoRA's (cpu preset, batch 1,
#: 1 thread, 6 steps of decoder/lora/dora/lorapt interleaved in one process, 2026-12-04).
#: ``lorapt:8:nodec`` and ``lora:8:nodec`` train the adapters alone (CNN encoder/decoder and
#: head frozen; issue 12: the decoder is 85-90 % of every PEFT run's trainables, so the
#: rows with it mostly measure the decoder); each is one more variant (sizing: see FULL).
#: ``prior``: the template prior, the no-training baseline every method must beat.
DEFAULT_VARIANTS = ("decoder,full,lora:8,pissa:8,dora:8,lorapt:4,lorapt:8,lorapt:8:nodec,"
                    "lora:8:nodec,prior")
#: learning-rate grids (Adam, amsgrad, poly decay) of the sweep, per registered method: three
#: rates, geometric with factor 2.5 around 5e-3 (full fine-tuning, which moves every
#: pre-trained weight, 10x lower). Why there: in the two-rate sweep of 2026-11-27
#: (``bench/results/compare_cpu_2core_2026-11-27/lr_choice.json``) every variant chose the
#: upper rate, 5e-3 over 2e-3 (decoder-only, LoRA, PiSSA by 0.075-0.09 validation Dice, LoRA-PT
#: by 0.005-0.01; full 5e-4 over 2e-4 by 0.13), so the optimum was not bracketed from above;
#: both old rates stay in the grid and 1.25e-2 (1.25e-3) tests the other side. The demo
#: fine-tunes at 5e-3. That sweep predates the per-factor adapter rates of LoRA-PT and PiSSA
#: (``tsvd.peft`` FACTOR_RATE, 2026-12-04) and the current embedded benchmark, so the centre
#: is a guess from old evidence: the report flags a chosen rate at an end of its grid.
#: DoRA is LoRA plus a magnitude per row and gets LoRA's grid; the ``:nodec`` variants use
#: their method's grid (a sweep of their own).
LR_GRID = {"decoder": [2e-3, 5e-3, 1.25e-2], "full": [2e-4, 5e-4, 1.25e-3],
           "lora": [2e-3, 5e-3, 1.25e-2], "pissa": [2e-3, 5e-3, 1.25e-2],
           "dora": [2e-3, 5e-3, 1.25e-2], "lorapt": [2e-3, 5e-3, 1.25e-2]}
#: --quick's rates: one per method, the one the full comparison of 2026-12-04 chose on the
#: validation split (neuromorphometrics, full data, seed 0, 320 steps; its sweep of
#: decoder 2e-3 / 5e-3 / 1.25e-2: val Dice 0.716 / 0.734 / 0.713, LoRA r8 0.717 / 0.7215 /
#: 0.663, PiSSA r8 0.718 / 0.737 / 0.713, DoRA r8 0.715 / 0.726 / 0.675, LoRA-PT r8 0.718 /
#: 0.7306 / 0.7156: every optimum inside its grid, at 5e-3). Full fine-tuning's sweep was
#: still rising at the top of its grid then, so --quick keeps its grid. No test subject was
#: looked at. The report marks a single rate with † ("single rate").
QUICK_LR_GRID = dict(LR_GRID, decoder=[5e-3], lora=[5e-3], pissa=[5e-3], dora=[5e-3],
                     lorapt=[5e-3])
#: bracketing: when a sweep's best validation Dice is at an end of its grid, one more rate
#: beyond that end (the grid's own ratio, 2.5) is trained and the choice made again, at most
#: this many times per sweep (the full comparison; --quick extends none: its budget is fixed).
#: Every variant gets the same rule, so the tuning effort stays equal; a rate still at an end
#: after the extensions keeps its flag. Why: on the version-2 data at 320 steps, full
#: fine-tuning's validation Dice rose over its whole grid (0.539 / 0.587 / 0.694 at
#: 2e-4 / 5e-4 / 1.25e-3; 2026-12-04).
EXTEND_GRID = 2
#: names in the tables
NAMES = {"decoder": "decoder-only", "full": "full", "lora": "LoRA", "pissa": "PiSSA",
         "dora": "DoRA", "lorapt": "LoRA-PT", "prior": "template prior (no training)"}
#: the template prior (``--variants prior``): no training; each test subject's prediction is
#: the protocol's hippocampus of the undeformed template on the subject's grid
#: (``tsvd.peft.seg.demo.template_prior_scores``), no image looked at; one row per (regime,
#: protocol), the same numbers in every regime
PRIOR = {"name": "template-prior", "method": "prior", "rank": None, "train_decoder": None}

#: the full comparison (CPU preset). Sizing: 9 trained variants, 2 protocols, 2 regimes, 3
#: seeds = 108 final runs + 27 sweep runs (3 rates each; 9 of them reused as final runs) =
#: 126 trainings of 64 steps (batch 1, as the demo) + 108 test evaluations of 20 subjects.
#: Measured on this 2-core machine (2026-11-27), with 2 worker processes of 1 thread:
#: 1.5-1.9 s per step and worker, 1 h 30 min in all for 6 variants without DoRA (78
#: trainings and 72 evaluations of 8 subjects: about 69 s per training, evaluation
#: included). Estimated from those figures, not measured: 126 × 69 s ≈ 2 h 25 min, plus the
#: 12 more test subjects per evaluation (about 1.1 s each: that run's calibration, 2 × 0.15 s
#: preprocessing + 0.34 s forward, times its measured/estimated ratio 1.75) ≈ 12 min with 2
#: workers: about 2 h 40 min, within the issue's 6 h; the step time of the adapters-only
#: variants was not measured (counted as a full step), the template prior (4 evaluations, no
#: training) is left out. Plus the one-off dataset building and pre-training (cached).
#: Post-processing as the demo: the 2 largest connected components are kept (left and right
#: hippocampus).
#: Test subjects: 20 per protocol (issue 12: >= 20), subjects ``test_start`` ..
#: ``test_start + 19`` of the protocol's test seed range (``embedded.build_dataset``); from
#: number 28 on by default, so that they are neither the demo's test subjects (8-27) nor
#: any that an earlier selection saw (0-7).
#: Augmentation: random left-right flips (axis 0 of the RAS images), as the demo and the
#: library's default ``data.flip_axes``: they swap the hemispheres, which leaves the label a
#: hippocampus (both sides are labelled); flips along the other axes make brains no subject
#: has, and stopped fine-tuning from finding the hippocampus within the demo's budget (see
#: the comment on ``flip_axes`` in ``tsvd.peft.seg.demo.DEMO``).
FULL = {
    "preset": "cpu", "spacing": 1.5, "flip_axes": [0], "roi": "mni-hippocampus",
    "protocols": ["neuromorphometrics", "harvard-oxford"],
    "n_train": 12, "n_valid": 4, "n_test": 20, "test_start": 28, "dataset_seed": 0,
    "seeds": 3, "epochs": 4, "samples_per_epoch": 16, "batch_size": 1, "keep_components": 2,
    "regimes": {"full-data": 1.0, "low-data": 0.25}, "sweep": "method",
}
#: --quick: one seed, one protocol, the full-data regime, the full comparison's training budget
#: (20 epochs × 16 samples = 320 steps, as the demo), one validated rate per method
#: (:data:`QUICK_LR_GRID`), 20 test subjects, and three trained variants
#: (:data:`QUICK_VARIANTS`): 3 trainings, each its own final run (tested once), and the
#: template prior. With the same settings and seed as the full comparison's seed-0 sweep
#: runs, its validation figures repeat those runs'. Estimated from the calibration of
#: 2026-11-27 (``estimate_run``'s model): about 10 min with 2 workers, times
#: :data:`ESTIMATE_RATIO` about 18 min; measured: see the README (data and pre-training
#: cached; a cold cache adds the pre-training, about 5 min).
QUICK = dict(FULL, protocols=["neuromorphometrics"], seeds=1, epochs=20,
             regimes={"full-data": 1.0}, no_extend=True)
#: --quick's variants: the decoder-only and LoRA baselines, LoRA-PT, the template prior
#: (the adapters-only rows need their own validated rate: the full comparison)
QUICK_VARIANTS = "decoder,lora:8,lorapt:8,prior"
#: what --quick must fit in on 2 CPU cores (issue 12): 20 min
QUICK_BUDGET_S = 20 * 60
#: measured / estimated wall time of the full comparison of 2026-11-27 (1 h 30 min against the
#: calibration's 51 min 25 s: the estimate assumes the 2 workers do not slow each other)
ESTIMATE_RATIO = 90 / 51.4


# ------------------------------------------------------------------------------------------
# methods and variants
# ------------------------------------------------------------------------------------------
def methods() -> tuple:
    """The method names of the library's registry (:data:`tsvd.peft.METHODS`)."""
    from tsvd.peft import METHODS
    return tuple(METHODS)


def takes_rank(method: str) -> bool:
    """Whether the registered ``method`` has a ``rank`` option."""
    from tsvd.peft import get_method
    return "rank" in get_method(method).options


def uses_adapters(method: str) -> bool:
    """Whether the registered ``method`` puts adapters on the transformer's layers (LoRA-PT,
    LoRA, PiSSA, DoRA), so that it can train them alone (``:nodec``)."""
    from tsvd.peft import get_method
    return bool(get_method(method).uses_targets)


def is_prior(variant: dict) -> bool:
    """Whether ``variant`` is the template prior (:data:`PRIOR`): nothing to train."""
    return variant.get("method") == PRIOR["method"]


def display_name(method: str, train_decoder=True) -> str:
    """The method's name in the tables (its registry name when it has no entry in NAMES);
    ``train_decoder=False``: with `` (adapters only)``."""
    name = NAMES.get(method, method)
    return name if train_decoder in (True, None) else f"{name} (adapters only)"


def variant_label(variant: dict) -> str:
    """A variant's name in the tables, e.g. ``LoRA-PT r8``, ``LoRA (adapters only) r8``."""
    return display_name(variant["method"], variant.get("train_decoder", True)) + (
        f" r{variant['rank']}" if variant.get("rank") else "")


#: the suffix of an adapters-only variant (``lorapt:8:nodec``)
NODEC = "nodec"


def parse_variants(text: str) -> list[dict]:
    """``"decoder,full,lora:8,lorapt:8:nodec"`` -> [{"name", "method", "rank",
    "train_decoder"}, ...], in the order given.

    One variant is spelled ``METHOD[:RANK][:nodec]``:

    - ``METHOD``: a method of the registry (:func:`methods`);
    - ``RANK``: a positive integer, only for a method with a ``rank`` option (rank 8 when
      left out); name ``METHOD-rRANK``;
    - ``:nodec`` (adapter methods only: lorapt, lora, pissa, dora): the adapters train alone,
      the CNN encoder/decoder and head stay frozen (``adapter.train_decoder`` False; without
      it True, as in the paper); name ``METHOD-rRANK-nodec``, shown as e.g. ``LoRA-PT
      (adapters only) r8``, with a learning-rate sweep of its own. ``lorapt:nodec`` is
      ``lorapt:8:nodec``.

    ``prior`` is the template prior (:data:`PRIOR`, no training).

    Anything else is a CompareError naming ``--variants``."""
    known = methods()
    out, seen = [], set()
    for part in [p.strip() for p in str(text).split(",") if p.strip()]:
        if part == PRIOR["method"]:
            if PRIOR["name"] in seen:
                raise CompareError(f"--variants: {PRIOR['method']} given twice")
            seen.add(PRIOR["name"])
            out.append(dict(PRIOR))
            continue
        method, *rest = [x.strip() for x in part.split(":")]
        if method not in known:
            raise CompareError(f"--variants: unknown method {method!r} in {part!r} "
                               f"(expected one of {', '.join(known)}, e.g. lorapt:8 or "
                               f"lorapt:8:{NODEC}, or {PRIOR['method']})")
        nodec = bool(rest) and rest[-1] == NODEC
        if nodec:
            rest = rest[:-1]
            if not uses_adapters(method):
                raise CompareError(f"--variants: {part!r}: :{NODEC} (adapters alone) is for "
                                   f"the adapter methods "
                                   f"({', '.join(m for m in known if uses_adapters(m))}); "
                                   f"{method} has no adapters")
        if len(rest) > 1 or NODEC in rest:
            raise CompareError(f"--variants: {part!r}: expected METHOD[:RANK][:{NODEC}], "
                               f"e.g. lorapt:8:{NODEC}")
        rank = rest[0] if rest else ""
        if not takes_rank(method):
            if rank:
                raise CompareError(f"--variants: {method} has no rank ({part!r})")
            r, name = None, method
        else:
            try:
                r = int(rank) if rank else 8
            except ValueError:
                r = -1
            if r < 1:
                raise CompareError(f"--variants: rank of {part!r} must be a positive integer "
                                   f"(METHOD[:RANK][:{NODEC}])")
            name = f"{method}-r{r}" + (f"-{NODEC}" if nodec else "")
        if name in seen:
            raise CompareError(f"--variants: {name} given twice")
        seen.add(name)
        out.append({"name": name, "method": method, "rank": r, "train_decoder": not nodec})
    if not out:
        raise CompareError("--variants: no variant given")
    return out


def parse_lrs(items, grid: dict) -> dict:
    """``["lora=1e-3,3e-3", ...]`` overrides of the learning-rate grid (a copy)."""
    known = methods()
    grid = copy.deepcopy(grid)
    for it in items or []:
        m, _, vals = it.partition("=")
        if m not in known or not vals:
            raise CompareError(f"--lrs: expected METHOD=LR[,LR...] with METHOD one of "
                               f"{', '.join(known)}, got {it!r}")
        try:
            lrs = [float(v) for v in vals.split(",")]
        except ValueError:
            raise CompareError(f"--lrs: {it!r}: learning rates must be numbers") from None
        if any(not (v > 0) for v in lrs):
            raise CompareError(f"--lrs: {it!r}: learning rates must be positive")
        grid[m] = sorted(set(lrs))
    return grid


# ------------------------------------------------------------------------------------------
# settings
# ------------------------------------------------------------------------------------------
_INT_SETTINGS = ("seeds", "epochs", "samples_per_epoch", "batch_size", "n_train", "n_valid",
                 "n_test")


def check_settings(quick: bool = False, *, protocols=None, low_data_fraction=None,
                   sweep=None, regimes=None, **over) -> dict:
    """The settings (:data:`FULL` or :data:`QUICK`) with the command line's overrides
    (``over``: the integer settings, ``test_start`` and ``preset``; None keeps the default),
    checked. ``low_data_fraction``: the low-data regime's share (default 0.25, quick 0; 0:
    none). ``regimes``: comma-separated names of the regimes to run (default: all of them),
    so that a later plan can add a regime without repeating the runs of another."""
    S = copy.deepcopy(QUICK if quick else FULL)
    if protocols:
        S["protocols"] = [p.strip() for p in protocols.split(",") if p.strip()]
    for k, v in over.items():
        if k not in _INT_SETTINGS + ("test_start", "preset"):
            raise TypeError(f"check_settings: unknown setting {k!r}")
        if v is not None:
            S[k] = v
    for k in _INT_SETTINGS:
        if not isinstance(S[k], int) or isinstance(S[k], bool) or S[k] < 1:
            raise CompareError(f"--{k.replace('_', '-')}: expected a positive integer, "
                               f"got {S[k]!r}")
    t = S.get("test_start", 0)
    if not isinstance(t, int) or isinstance(t, bool) or t < 0:
        raise CompareError(f"--test-start: expected an integer >= 0, got {t!r}")
    if sweep:
        S["sweep"] = sweep
    f = low_data_fraction
    if f is None:
        f = 0.0 if quick else 0.25
    if not (0 <= f < 1):
        raise CompareError(f"--low-data-fraction: expected a number in [0, 1), got {f!r}")
    S["regimes"] = {"full-data": 1.0}
    if f > 0:
        S["regimes"]["low-data"] = float(f)
    if regimes:
        keep = [r.strip() for r in regimes.split(",") if r.strip()]
        bad = [r for r in keep if r not in S["regimes"]]
        if bad or not keep or len(set(keep)) != len(keep):
            raise CompareError(
                f"--regimes: expected distinct names among {', '.join(S['regimes'])} "
                f"(low-data needs --low-data-fraction > 0), got {regimes!r}")
        S["regimes"] = {r: S["regimes"][r] for r in keep}
    return S


def plan_record(S: dict, variants: list[dict], grid: dict, pretrained, device) -> dict:
    """What ``plan.json`` holds: a folder continues a comparison only with the same record."""
    return {"settings": S, "variants": variants, "lr_grid": grid,
            "pretrained": None if pretrained is None else str(pretrained), "device": device}


def check_plan_file(out: Path, record: dict) -> bool:
    """Whether ``out/plan.json`` exists (a comparison to continue); CompareError when it
    holds another plan than ``record``."""
    path = Path(out) / "plan.json"
    if not path.is_file():
        return False
    old = read_json(path)
    if {k: old.get(k) for k in record} != json.loads(json.dumps(record)):
        raise CompareError(f"{path}: {out} holds a comparison with other settings; "
                           f"use another --out (or the same options as before)")
    return True


# ------------------------------------------------------------------------------------------
# runs
# ------------------------------------------------------------------------------------------
def steps_per_run(S: dict) -> int:
    """Optimizer steps of one training: ceil(samples per epoch / batch) × epochs."""
    return int(math.ceil(S["samples_per_epoch"] / S["batch_size"])) * int(S["epochs"])


def sweep_key(S: dict, regime: str, protocol: str, variant: dict) -> str:
    """Which sweep gives the learning rate of a (regime, protocol, variant): with
    ``sweep="method"`` the variant's sweep on the first regime and protocol, with
    ``sweep="cell"`` a sweep of its own."""
    if S.get("sweep", "method") == "method":
        regime, protocol = list(S["regimes"])[0], S["protocols"][0]
    return "/".join((regime, protocol, variant["name"]))


def jobs(S: dict, variants: list[dict], lr_grid: dict) -> list[dict]:
    """Every run in order. First the template prior (phase ``"prior"``, one per (regime,
    protocol), when it is among the variants), then the sweeps (seed 0, every rate of the
    variant's grid), then the final runs, seeds outermost (a complete one-seed table comes
    first): each (regime, protocol, variant, seed) at its sweep's chosen rate (``lr=None``
    until the choice). A final run whose configuration is a sweep run's is that run
    (``reuses_sweep``), not retrained."""
    out = []
    cells = [(r, p) for r in S["regimes"] for p in S["protocols"]]
    mode = S.get("sweep", "method")
    if mode not in ("method", "cell"):
        raise CompareError(f"sweep: expected 'method' or 'cell', got {mode!r}")
    prior = [v for v in variants if is_prior(v)]
    variants = [v for v in variants if not is_prior(v)]
    for regime, protocol in cells:
        for v in prior:
            out.append({"regime": regime, "protocol": protocol, "variant": v, "lr": None,
                        "seed": None, "phase": "prior", "key": None})
    for regime, protocol in (cells[:1] if mode == "method" else cells):
        for v in variants:
            for lr in lr_grid[v["method"]]:
                out.append({"regime": regime, "protocol": protocol, "variant": v, "lr": lr,
                            "seed": 0, "phase": "sweep",
                            "key": sweep_key(S, regime, protocol, v)})
    for seed in range(int(S["seeds"])):
        for regime, protocol in cells:
            for v in variants:
                key = sweep_key(S, regime, protocol, v)
                out.append({"regime": regime, "protocol": protocol, "variant": v, "lr": None,
                            "seed": seed, "phase": "final", "key": key,
                            "reuses_sweep": seed == 0 and key == "/".join(
                                (regime, protocol, v["name"]))})
    return out


def extension_job(sweep_jobs: list[dict], choice: dict) -> dict | None:
    """The sweep job that brackets ``choice`` (an lr_choice entry) when its rate is at an end
    of its grid: the same job at the next rate beyond that end, the grid's smallest ratio
    apart (4 significant digits); None when the rate is inside the grid."""
    edge = choice.get("at_grid_edge")
    rates = sorted(float(x) for x in choice.get("grid") or [])
    if edge not in ("lowest", "highest") or len(rates) < 2:
        return None
    ratio = min(b / a for a, b in zip(rates, rates[1:]))
    new = rates[-1] * ratio if edge == "highest" else rates[0] / ratio
    proto = next(j for j in sweep_jobs if j["key"] == choice["sweep"])
    return dict(proto, lr=float(f"{new:.4g}"), extension=True)


def run_dir(out, protocol: str, regime: str, variant: dict, lr: float, seed: int) -> Path:
    """``out/runs/REGIME/PROTOCOL/VARIANT/lrLR/seedS``."""
    return (Path(out) / "runs" / regime / protocol / variant["name"] / f"lr{fmt_lr(lr)}" /
            f"seed{seed}")


def prior_dir(out, protocol: str, regime: str) -> Path:
    """``out/runs/REGIME/PROTOCOL/template-prior``: the template prior's result."""
    return Path(out) / "runs" / regime / protocol / PRIOR["name"]


def run_config(S: dict, dataset, pretrained, n_train: int, regime: str, variant: dict,
               lr: float, seed: int, device: str = "auto") -> dict:
    """The training configuration (``tsvd.peft.seg.train`` schema) of one run on ``dataset``
    (``n_train`` training subjects in all).

    Everything but ``adapter.method``, ``adapter.rank``, ``adapter.train_decoder`` (False
    for a ``:nodec`` variant), ``train.lr`` (and ``train.seed`` across seeds) is the same for
    every variant of a (regime, protocol)."""
    from tsvd.models import preset_kwargs
    from tsvd.peft.seg import train as T
    from tsvd.peft.seg.embedded import HIPPOCAMPUS_ROI_MM
    patch = list(preset_kwargs(S["preset"])["img_size"])
    n = n_used(n_train, float(S["regimes"][regime]))
    return T.merge_config(T.DEFAULTS, {
        "data": {"path": str(dataset), "format": "eadc",
                 "spacing": S["spacing"], "flip_axes": list(S["flip_axes"]),
                 "roi": ({"centre_mm": list(HIPPOCAMPUS_ROI_MM[0]), "size": patch}
                         if S.get("roi", "mni-hippocampus") == "mni-hippocampus" else None),
                 "max_train": n},
        "model": {"preset": S["preset"], "pretrained": str(pretrained)},
        "adapter": {"method": variant["method"], "rank": variant["rank"],
                    "train_decoder": bool(variant.get("train_decoder", True))},
        "train": {"epochs": int(S["epochs"]), "batch_size": int(S["batch_size"]),
                  "samples_per_epoch": int(S["samples_per_epoch"]), "lr": float(lr),
                  "seed": int(seed), "device": device, "val_every": 1, "average_last": 0},
        "infer": {"tta_flip": [], "keep_components": int(S.get("keep_components", 0))},
    })


# ------------------------------------------------------------------------------------------
# time
# ------------------------------------------------------------------------------------------
def estimate_run(S: dict, n_train: int, job: dict, cal) -> float:
    """Seconds for one run (``n_train``: training subjects of its protocol) from the
    calibration ``cal`` (:func:`calibrate`); NaN without one."""
    if cal is None:
        return float("nan")
    n_tr = n_used(n_train, S["regimes"][job["regime"]])
    nv, nt = S["n_valid"], S["n_test"]
    if job["phase"] == "prior":        # a guess, not calibrated: load a label, resample one
        return nt * 2 * cal["case_s"]
    test = nt * (2 * cal["case_s"] + cal["fwd_s"])
    if job["phase"] == "final" and job.get("reuses_sweep"):
        return test
    t = steps_per_run(S) * cal["step_s"][job["variant"]["name"]]
    t += (n_tr + nv) * cal["case_s"] + S["epochs"] * nv * cal["fwd_s"]
    t += cal["setup_s"].get(job["variant"]["name"], 0.0)
    return t + (test if job["phase"] == "final" else 0.0)


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
    for v in [v for v in variants if not is_prior(v)]:
        torch.manual_seed(0)
        model = build_unetr(S["preset"])
        t0 = time.time()
        if v["method"] == "full":
            params = list(model.parameters())
        else:
            kw = {"rank": v["rank"]} if v["rank"] else {}
            if not v.get("train_decoder", True):
                kw["train_decoder"] = False
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
