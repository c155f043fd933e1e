"""The command line of the comparison (``python bench/compare.py``): flags, the plan and its
estimate, then the runs."""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

from . import plan as P
from .common import CompareError, fmt_lr, fmt_time, write_json
from .run import Comparison, cuda_available, prepare_data, pretrain, worker_main

__all__ = ["build_parser", "settings_from_args", "variants_from_args", "main"]


def _grid_text(grid: dict) -> str:
    return "; ".join(f"{m} {','.join(fmt_lr(x) for x in v)}" for m, v in grid.items())


def default_cpu_workers(quick: bool, variants: list[dict], cpus: int | None = None) -> int:
    """Worker processes on a CPU when ``--workers`` is not given: 2 (1 on a 1-core CPU); with
    ``--quick``, one per trained variant (up to 3), since every run is then a final run with
    no later phase to fill a core left idle: its 3 trainings of 320 steps took 20 min 51 s
    on 2 cores as 2 workers (2 rounds, the second on one core; 2026-12-04)."""
    cpus = cpus or os.cpu_count() or 1
    if cpus < 2:
        return 1
    if quick:
        return max(2, min(3, sum(1 for v in variants if not P.is_prior(v))))
    return 2


def build_parser() -> argparse.ArgumentParser:
    doc = sys.modules[__package__].__doc__ or ""
    Q, F = P.QUICK, P.FULL
    ap = argparse.ArgumentParser(prog="compare.py", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="compare-out",
                    help="output folder (default ./compare-out); running again with the same "
                    "folder skips the runs that have a result.json (resume)")
    ap.add_argument("--quick", action="store_true",
                    help=f"one seed, protocol {Q['protocols'][0]}, the full-data regime "
                    f"only, {Q['epochs']} epochs × {Q['samples_per_epoch']} samples, "
                    f"one learning rate per method (chosen on validation by the full "
                    f"comparison) and the variants {P.QUICK_VARIANTS} (what a reviewer runs; "
                    f"sized to < {P.QUICK_BUDGET_S // 60} min on 2 CPU cores, the estimate is "
                    f"printed before the runs start)")
    ap.add_argument("--protocols", help="comma-separated embedded protocols (default "
                    f"{','.join(F['protocols'])}; --quick: {Q['protocols'][0]}; "
                    "available: neuromorphometrics, harvard-oxford, desikan-killiany, aal)")
    ap.add_argument("--variants",
                    help="comma-separated METHOD[:RANK][:nodec], METHOD one of "
                    f"{', '.join(P.methods())}; RANK (default 8) only for methods with a rank; "
                    ":nodec (adapter methods only) trains the adapters alone, CNN "
                    "encoder/decoder and head frozen, e.g. lorapt:8:nodec; prior: the "
                    f"template prior (no training) (default {P.DEFAULT_VARIANTS}; --quick: "
                    f"{P.QUICK_VARIANTS})")
    ap.add_argument("--seeds", type=int, help=f"training seeds 0..N-1 (default {F['seeds']}, "
                    f"--quick {Q['seeds']})")
    ap.add_argument("--epochs", type=int, help=f"epochs per run (default {F['epochs']}, "
                    f"--quick {Q['epochs']})")
    ap.add_argument("--samples-per-epoch", type=int,
                    help=f"random crops per epoch (default {F['samples_per_epoch']}, "
                    f"--quick {Q['samples_per_epoch']})")
    ap.add_argument("--batch-size", type=int, help=f"default {F['batch_size']}")
    ap.add_argument("--lrs", action="append", metavar="METHOD=LR,LR,...",
                    help="learning-rate grid of a method (repeatable); default: "
                    + _grid_text(P.LR_GRID) + " (--quick: " + _grid_text(P.QUICK_LR_GRID) + ")")
    ap.add_argument("--low-data-fraction", type=float,
                    help="fraction of the training subjects of the low-data regime "
                    "(default 0.25; --quick: 0); 0 leaves the low-data regime out")
    ap.add_argument("--regimes", help="comma-separated regimes to run, among full-data and "
                    "low-data (default: both, or full-data alone with --low-data-fraction 0); "
                    "with --lrs METHOD=LR (the rates another plan chose), a second plan adds a "
                    "regime or protocol without repeating that plan's runs")
    ap.add_argument("--sweep", choices=["method", "cell"],
                    help="method (default): each variant's learning rate is chosen once, on "
                    "the first regime and protocol, and used everywhere; cell: a sweep for "
                    "every (regime, protocol, variant), about 2x the time")
    ap.add_argument("--n-train", type=int, help=f"training subjects per protocol (default "
                    f"{F['n_train']})")
    ap.add_argument("--n-valid", type=int, help=f"validation subjects (default {F['n_valid']})")
    ap.add_argument("--n-test", type=int, help=f"test subjects per protocol (default "
                    f"{F['n_test']})")
    ap.add_argument("--test-start", type=int,
                    help=f"first test subject: the test subjects are numbers TEST_START .. "
                    f"TEST_START + n_test - 1 of each protocol's test seed range (default "
                    f"{F['test_start']}; recorded in plan.json)")
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
                    "workers torch threads (default: 2 on a CPU with 2 or more cores, with "
                    "--quick one per trained variant up to 3; 1 on CUDA). On this 2-core machine (2026-11-27, batch 2 steps) 2 workers x 1 "
                    "thread made about 1.3x the training steps per second of 1 x 2 threads; "
                    "the time per step in the table is then that of one worker sharing the "
                    "machine")
    ap.add_argument("--estimate-only", action="store_true",
                    help="build data / pre-train if needed, calibrate, print the plan and the "
                    "estimated time, and stop")
    ap.add_argument("--no-calibrate", action="store_true",
                    help="skip the timing calibration (no estimate before starting)")
    ap.add_argument("--verbose", action="store_true",
                    help="show every run's training log and progress bars")
    return ap


def settings_from_args(args) -> dict:
    """The comparison's settings from parsed arguments (:func:`.plan.check_settings`)."""
    return P.check_settings(
        args.quick, protocols=args.protocols, low_data_fraction=args.low_data_fraction,
        sweep=args.sweep, regimes=args.regimes, seeds=args.seeds, epochs=args.epochs,
        samples_per_epoch=args.samples_per_epoch, batch_size=args.batch_size,
        n_train=args.n_train, n_valid=args.n_valid, n_test=args.n_test,
        test_start=args.test_start, preset=args.preset)


def variants_from_args(args) -> list[dict]:
    """The variants of ``--variants`` (default :data:`.plan.DEFAULT_VARIANTS`, with
    ``--quick`` :data:`.plan.QUICK_VARIANTS`), parsed."""
    text = args.variants
    if text is None:
        text = P.QUICK_VARIANTS if args.quick else P.DEFAULT_VARIANTS
    return P.parse_variants(text)


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
    if args.workers is not None and args.workers < 1:
        raise CompareError(f"--workers: expected a positive integer, got {args.workers}")
    if args.threads is not None and args.threads < 1:
        raise CompareError(f"--threads: expected a positive integer, got {args.threads}")
    variants = variants_from_args(args)
    if args.workers is None:
        cuda = str(args.device).startswith("cuda") or (args.device in (None, "auto")
                                                       and cuda_available())
        args.workers = 1 if cuda else default_cpu_workers(args.quick, variants)
    grid = P.parse_lrs(args.lrs, P.QUICK_LR_GRID if args.quick else P.LR_GRID)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CompareError(f"--out {out}: exists and is not a folder")
    import torch
    if args.threads:
        torch.set_num_threads(int(args.threads))
    from tsvd.peft.seg import embedded as E
    cache = Path(args.cache) if args.cache else E.default_cache_dir()
    record = P.plan_record(S, variants, grid, args.pretrained, args.device)
    if P.check_plan_file(out, record):
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
                     device=args.device, cache=cache, verbose=args.verbose,
                     workers=args.workers, threads_per_worker=args.threads)
    jobs = cmp.plan()
    todo = [j for j in jobs if not cmp.is_done(j)]
    n_reused = sum(1 for j in jobs if j.get("reuses_sweep"))
    n_prior = sum(1 for j in jobs if j["phase"] == "prior")
    print(f"plan: {len(S['regimes'])} regime(s) {list(S['regimes'])} × {len(S['protocols'])} "
          f"protocol(s) {S['protocols']} × {len(variants)} variants "
          f"[{', '.join(v['name'] for v in variants)}]; seeds {S['seeds']}; learning rates "
          + _grid_text({m: grid[m] for m in dict.fromkeys(v['method'] for v in variants
                                                         if not P.is_prior(v))})
          + f"\n      {len(jobs)} runs ({len(jobs) - n_reused - n_prior} trainings of "
          f"{S['epochs']} epochs × {S['samples_per_epoch']} samples, batch "
          f"{S['batch_size']}, {cmp.steps_per_run()} steps; {n_reused} final runs are sweep "
          f"runs evaluated on the test split; {n_prior} template-prior evaluations); "
          f"{len(jobs) - len(todo)} done before, {len(todo)} to run")
    cal = None
    if todo and not args.no_calibrate:
        cal = P.calibrate(S, variants, datasets[S["protocols"][0]], args.device)
        # workers beyond the cores share them: the runs finish no sooner than cores allow
        est = sum(cmp.estimate_run(j, cal) for j in todo) / max(
            1, min(args.workers, os.cpu_count() or 1))
        print(f"estimated time for the {len(todo)} remaining runs: {fmt_time(est)} "
              f"(from the calibration, assuming the workers do not slow each other; the "
              f"full comparison of 2026-11-27 took {P.ESTIMATE_RATIO:.2f}x its estimate: "
              f"{fmt_time(est * P.ESTIMATE_RATIO)}; other load on the machine makes it longer)")
        if args.quick and est * P.ESTIMATE_RATIO > P.QUICK_BUDGET_S:
            print(f"note: this --quick plan is estimated above "
                  f"{fmt_time(P.QUICK_BUDGET_S)} on this machine (options or load)")
    if args.estimate_only:
        return 0
    write_json(out / "plan.json", record)
    cmp.run(cal)
    print(f"\nresults in {out}: results.md, summary.csv/json, runs.csv/json, lr_choice.json, "
          f"dice_vs_params.png, training_curves.png")
    print((out / "results.md").read_text())
    print(f"total wall time {fmt_time(time.time() - t_all)}")
    return 0
