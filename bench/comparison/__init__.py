"""The method comparison (issue 6): LoRA-PT against decoder-only, full fine-tuning, LoRA,
PiSSA (and DoRA) on the embedded hippocampus datasets, side by side, with learning rates chosen
on the validation split, mean ± std over seeds and per-subject paired tests.

    python bench/compare.py --out cmp-full             # the full comparison (CPU preset)
    python bench/compare.py --quick --out cmp-quick    # 1 seed, 1 protocol, 4 variants, < 20 min
    python bench/compare.py --out cmp-full             # again: continues where it stopped
    python bench/compare.py --estimate-only            # the plan and its estimated time

What is compared (``--variants``, default
``decoder,full,lora:8,pissa:8,dora:8,lorapt:4,lorapt:8,lorapt:8:nodec,lora:8:nodec,prior``):

The methods are those of the library's registry (``tsvd.peft.METHODS``); a method with a
``rank`` option is given as ``METHOD:RANK`` (rank 8 when left out), e.g. ``dora:8``, and an
adapter method with ``:nodec`` appended trains its adapters alone (``lorapt:8:nodec``);
``prior`` is the template prior:

- ``decoder``: transformer encoder frozen, CNN encoder/decoder and head trained.
- ``full``: every parameter trained.
- ``lora:8``, ``pissa:8``, ``lorapt:4``, ``lorapt:8``: the PEFT methods with that rank, on the
  same layers (attention q/k/v/out, MLP up/down of the 12 blocks), and, as in the paper, the
  CNN decoder and head trained too (``train_decoder=True``). Rank matching: on UNETR a
  LoRA-PT rank r has as many adapter parameters as a LoRA (or PiSSA) rank r to within 0.2 %
  (cpu preset: 332,352 vs 331,776 for r = 8; counted by ``tsvd.peft``'s ``num_trainable()``
  and printed in the table), so ``lora:8``/``pissa:8`` are the parameter-matched partners of
  ``lorapt:8`` and ``lorapt:4`` is LoRA-PT at half that budget.
- ``dora:8``: HF PEFT DoRA (LoRA plus a trainable magnitude per output row) on the same
  layers, with LoRA's grid of learning rates; its step costs about 1.06x LoRA's (measured
  interleaved in one process, cpu preset), so it adds about a sixth to the comparison's time
  (leave it out with ``--variants`` listing the others).
- ``lorapt:8:nodec``, ``lora:8:nodec`` ("LoRA-PT (adapters only)", "LoRA (adapters only)"):
  the same adapters with the CNN encoder/decoder and head frozen (``train_decoder=False``):
  the decoder is 85-90 % of the trainables of a PEFT row with it, so these rows show what the
  adapters do on their own. Each has a learning-rate sweep of its own.
- ``prior`` ("template prior (no training)"): no training; each test subject's prediction is
  the protocol's hippocampus of the undeformed template put on the subject's grid
  (``tsvd.peft.seg.demo.template_prior_scores``, on the same test subjects), no image looked
  at: the baseline any method must clearly beat. One row per (regime, protocol), the same
  numbers in every regime (rank, lr "–", 0 parameters); mean over the test subjects ± their
  std, as it has no seeds; a baseline of the paired tests.

Protocol, identical for every variant (only the method, its rank, whether the decoder trains
and the learning rate differ; ``tests/test_compare.py`` checks this on the configurations
handed to ``train()``):

1. Data: the embedded datasets of ``tsvd.peft.seg.embedded`` (version 2: the ICBM152 2009c
   brain warped into synthetic subjects with atrophy and per-tissue contrast, hippocampus
   labelled by each atlas protocol), built once with dataset seed 0 and cached; train /
   validation / test subjects are disjoint and the same for every run. 20 test subjects per
   protocol (``--n-test``): numbers ``--test-start`` (default 28) to ``--test-start`` + 19 of
   the protocol's test seed range, recorded in ``plan.json``: past the demo's test subjects
   (8-27) and those earlier selections saw (0-7).
   Low-data regime: the first ``round(--low-data-fraction × n_train)`` training subjects
   (``data.max_train`` of the training config), same validation and test subjects.
2. Pre-trained weights: one UNETR pre-trained on the embedded source task (another brain,
   the ICBM152 2009a: grey matter plus the deep grey nuclei) through
   ``tsvd.peft.seg.train.train(task="pretrain")`` with the settings of ``lorapt demo`` (cached in the cache folder, shared with the demo
   when the settings agree), or ``--pretrained CKPT``.
3. Fine-tuning: ``tsvd.peft.seg.train.train(task="finetune")`` with the same epochs, samples per
   epoch, batch size, poly learning-rate schedule, loss, augmentation and seed for every
   variant; the checkpoint evaluated is the best-on-validation epoch.
4. Learning rate, per method (``--sweep method``, default): each variant trains every rate
   of its grid (``--lrs``; three per method by default, see ``plan.LR_GRID`` for why those)
   with seed 0 on the first regime and protocol; the highest validation Dice wins (ties: the
   smaller rate) and is used for that variant everywhere (``lr_choice.json``). When the best
   rate is at an end of its grid, one more rate beyond that end (the grid's ratio) is trained
   and the choice made again, at most twice (``plan.EXTEND_GRID``; not in ``--quick``); a
   chosen rate still at an end is flagged (``at_grid_edge`` in ``lr_choice.json``,
   ``lr_at_grid_edge`` in the summary, † in ``results.md``): the grid did not bracket the
   optimum there. ``--sweep cell`` sweeps every (regime, protocol, variant) instead
   (about twice the time). A final run whose configuration is a sweep run's (seed 0 at the
   chosen rate) *is* that run: it is evaluated on the test split, not trained twice.
   Final runs go seed by seed, so an interrupted comparison has complete one-seed tables.
5. Test: ``tsvd.peft.seg.train.evaluate(split="test")``: Dice and HD95 (mm) per test subject on
   its original grid (an empty prediction's HD95 is the image diagonal); a run's numbers are
   the means over the test subjects, the table gives the mean ± sample standard deviation
   (ddof = 1) of those over the seeds and the count of empty predictions (over subjects and
   seeds).
6. Paired comparison: for each (regime, protocol), every LoRA-PT variant against every other
   variant (the template prior included) on the same test subjects: each subject's Dice
   averaged over a variant's seeds, the differences (LoRA-PT − baseline) paired by subject,
   their median and mean, and the two-sided Wilcoxon signed-rank test
   (``scipy.stats.wilcoxon``, zero differences dropped); "n/a" with fewer than 6 subjects or
   non-zero differences. In ``results.md`` under each regime's table and in ``summary.json``
   (``paired`` of each baseline's cell). ``summary.csv`` (and ``paired_reference`` in
   ``summary.json``) pairs each non-LoRA-PT row with one LoRA-PT row of its (regime,
   protocol): the one of the same rank and decoder setting (the parameter-matched partner),
   else (decoder-only, full, template prior, other ranks) the LoRA-PT row of the highest
   mean validation Dice: columns ``paired_reference``, ``paired_n``,
   ``paired_median_dice_diff`` (reference − row), ``paired_p``, ``paired_note``.

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
    results.md               the Markdown tables and the paired per-subject tests
    dice_vs_params.png       test Dice (mean ± std) against trainable parameters
    training_curves.png      training loss and validation Dice per epoch (mean over seeds)

Code: ``bench/comparison/`` (``plan.py``: settings, variants, grids, jobs, estimate;
``run.py``: the runner, workers, resume; ``report.py``: summary, paired tests, tables, plots;
``common.py``: shared helpers; ``cli.py``: this command line); ``bench/compare.py`` only runs
``cli.main``.

Parallel runs: ``--workers N`` (default 2 on a CPU with 2 or more cores, 1 on CUDA) trains N
runs at once, each in its own ``python compare.py --worker SPEC`` process with CPU cores / N
torch threads; the sweep runs all finish before the learning rates are chosen and the final
runs start. Results and reports are written by the main process only.

Time: before starting, a short calibration (a few training steps of every variant on random
input, and the preprocessing of one subject) gives the estimated total, printed with the plan
(it assumes the workers do not slow each other down, so it is optimistic: 51 min estimated,
1 h 30 min measured for the full comparison of 6 variants on 2 cores, 2026-11-27; the
estimate is also printed times that ratio, ``plan.ESTIMATE_RATIO``); after every run the
remaining time is re-estimated from the runs measured so far. ``--quick`` (variants
``decoder,lora:8,lorapt:8,prior``, 3 trainings of 320 steps at the rates the full
comparison chose on validation, ``plan.QUICK_LR_GRID``) is sized to 20 minutes on 2 cores
(``plan.QUICK``'s comment); it says so when its estimate on the machine at hand is above.
"""
from __future__ import annotations

from .common import (CompareError, atomic_write, fmt_lr, fmt_pm, fmt_time, n_used, read_json,
                     seed_stats, write_csv, write_json)
from .plan import (DEFAULT_VARIANTS, FULL, LR_GRID, NAMES, PRIOR, QUICK, QUICK_LR_GRID,
                   QUICK_VARIANTS, calibrate, display_name, jobs, methods, parse_lrs,
                   parse_variants, takes_rank, variant_label)
from .report import (MIN_PAIRS, REFERENCE, aggregate, grid_edge, markdown, paired_reference,
                     paired_test, paired_tests, subject_means, write_reports)
from .run import Comparison, PeakMemory, prepare_data, pretrain, worker_main
from .cli import build_parser, main, settings_from_args, variants_from_args

__all__ = ["CompareError", "atomic_write", "fmt_lr", "fmt_pm", "fmt_time", "n_used",
           "read_json", "seed_stats", "write_csv", "write_json", "DEFAULT_VARIANTS", "FULL",
           "LR_GRID", "NAMES", "PRIOR", "QUICK", "QUICK_LR_GRID", "QUICK_VARIANTS",
           "calibrate", "display_name", "jobs", "methods", "parse_lrs", "parse_variants",
           "takes_rank", "variant_label", "MIN_PAIRS", "REFERENCE", "aggregate", "grid_edge",
           "markdown", "paired_reference", "paired_test", "paired_tests", "subject_means",
           "write_reports", "Comparison", "PeakMemory", "prepare_data", "pretrain",
           "worker_main", "build_parser", "main", "settings_from_args", "variants_from_args"]
