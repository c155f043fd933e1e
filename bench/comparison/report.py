"""The comparison's report from its runs: mean ± sample std over seeds per (regime, protocol,
variant), the per-subject paired comparison of LoRA-PT against each baseline (Wilcoxon
signed-rank), the tables (``runs.csv/json``, ``summary.csv/json``, ``lr_choice.json``,
``results.md``) and the plots (``dice_vs_params.png``, ``training_curves.png``)."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from .common import (atomic_write, fmt_lr, fmt_mb, fmt_num, fmt_p, fmt_pm, seed_stats,
                     write_csv, write_json)
from .plan import PRIOR, display_name, steps_per_run, sweep_key, variant_label

__all__ = ["REFERENCE", "MIN_PAIRS", "SUMMARY_FIELDS", "grid_edge", "aggregate",
           "paired_reference", "subject_means", "paired_test", "paired_tests", "markdown",
           "write_reports", "plot_dice_vs_params", "plot_curves"]

#: the method every other one is compared with, subject by subject
REFERENCE = "lorapt"
#: fewer subjects than this (or no non-zero difference): no signed-rank test ("n/a"); with 5
#: pairs the smallest two-sided exact p-value is already 0.0625
MIN_PAIRS = 6

#: summary.csv's columns. ``dice_std``/``hd95_std``: sample std (ddof 1) over the seeds;
#: ``empty_predictions`` of ``predictions`` (test subjects × seeds) were empty (HD95: the
#: image diagonal); ``paired_*``: the row's per-subject test against its LoRA-PT reference
#: (:func:`paired_reference`): ``paired_median_dice_diff`` is the median over the subjects of
#: (reference − this row), ``paired_p`` the two-sided Wilcoxon p (empty when ``paired_note``
#: says why not).
SUMMARY_FIELDS = ["regime", "protocol", "variant", "method", "rank", "train_decoder", "lr",
                  "lr_at_grid_edge", "seeds", "dice_mean", "dice_std", "dice_max_dev",
                  "val_zero_runs", "hd95_mean", "hd95_std",
                  "empty_predictions", "predictions", "paired_reference", "paired_n",
                  "paired_median_dice_diff", "paired_p", "paired_note",
                  "trainable_parameters", "adapter_parameters", "artefact_bytes",
                  "time_per_step_s", "peak_mem_mb"]


def grid_edge(lr, rates) -> str | None:
    """Where the chosen rate ``lr`` sits in the swept ``rates``: None when strictly inside
    (the validation optimum is bracketed), else ``"lowest"``, ``"highest"`` or ``"single
    rate"`` (one rate brackets nothing)."""
    rates = sorted(float(x) for x in rates)
    if lr is None or not rates:
        return None
    if len(rates) == 1:
        return "single rate"
    if float(lr) <= rates[0]:
        return "lowest"
    if float(lr) >= rates[-1]:
        return "highest"
    return None


def aggregate(runs: list[dict], variants: list[dict], lr_choice: dict | None = None,
              S: dict | None = None) -> list[dict]:
    """Mean ± sample std over seeds per (regime, protocol, variant), in variant order; the
    cells of baselines carry ``paired`` (:func:`paired_tests` against each LoRA-PT variant
    of the same regime and protocol). With the sweep's ``lr_choice`` and the settings ``S``,
    each cell has ``lr_grid`` (the rates its sweep tried) and ``lr_at_grid_edge``
    (:func:`grid_edge`: None when its rate is inside the grid). Each cell counts its empty
    test predictions (``empty_predictions`` of ``predictions``, over subjects and seeds;
    None when the runs do not say) and has ``paired_reference``: the one entry of ``paired``
    of :func:`paired_reference` (None for LoRA-PT's own rows)."""
    order = {v["name"]: i for i, v in enumerate(variants)}
    by_name = {v["name"]: v for v in variants}
    cells: dict = {}
    for r in runs:
        if r.get("test_dice") is None:
            continue
        cells.setdefault((r["regime"], r["protocol"], r["variant"]), []).append(r)
    regimes = list(dict.fromkeys(r["regime"] for r in runs))
    protocols = list(dict.fromkeys(r["protocol"] for r in runs))
    tests = paired_tests(runs)
    out = []
    for (reg, prot, name), rs in sorted(cells.items(), key=lambda kv: (
            regimes.index(kv[0][0]), protocols.index(kv[0][1]), order.get(kv[0][2], 99))):
        rs = sorted(rs, key=lambda r: -1 if r["seed"] is None else r["seed"])

        def first(k):
            return rs[0].get(k)
        choice = None
        if lr_choice and S and name in by_name:
            choice = lr_choice.get(sweep_key(S, reg, prot, by_name[name]))
        out.append({
            "regime": reg, "protocol": prot, "variant": name, "method": first("method"),
            "rank": first("rank"), "train_decoder": first("train_decoder"), "lr": first("lr"),
            "lr_grid": choice.get("grid") if choice else None,
            "lr_at_grid_edge": choice.get("at_grid_edge") if choice else None,
            "seeds": [r["seed"] for r in rs if r["seed"] is not None],
            "train_subjects": first("train_subjects"),
            "dice": seed_stats([r["test_dice"] for r in rs]),
            # issue 12's collapse check: how far a seed's test Dice lies from the seeds' mean
            # (None with fewer than 2 seeds), and the runs whose best validation Dice is 0
            "dice_max_dev": _max_dev([r["test_dice"] for r in rs]),
            "val_zero_runs": sum(1 for r in rs if not (r.get("val_dice") or 0) > 0),
            "hd95_mm": seed_stats([r["test_hd95_mm"] for r in rs]),
            # sample std over the test subjects, averaged over the seeds
            "dice_std_subjects": seed_stats([r.get("test_dice_std_cases") for r in rs])["mean"],
            "hd95_std_subjects": seed_stats([r.get("test_hd95_std_cases") for r in rs])["mean"],
            "test_subjects": first("test_cases"),
            "val_dice": seed_stats([r.get("val_dice") for r in rs]),
            "trainable_parameters": first("trainable_parameters"),
            "adapter_parameters": first("adapter_parameters"),
            "model_parameters": first("model_parameters"),
            "artefact_bytes": first("artefact_bytes"),
            "time_per_step_s": seed_stats([r.get("time_per_step_s") for r in rs])["mean"],
            "peak_mem_mb": seed_stats([r.get("peak_mem_mb") for r in rs])["mean"],
            "workers": first("workers"), "threads": first("threads"),
            "empty_predictions": _sum_or_none(r.get("test_empty") for r in rs),
            "predictions": _sum_or_none(r.get("test_cases") for r in rs),
            "paired": [t for t in tests if (t["regime"], t["protocol"], t["baseline"]) ==
                       (reg, prot, name)],
        })
    for s in out:
        ref = paired_reference(s, out)
        s["paired_reference"] = next((t for t in s["paired"] if t["reference"] == ref), None)
    return out


def _max_dev(values):
    xs = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return max(abs(x - m) for x in xs)


def _sum_or_none(values):
    v = [int(x) for x in values if x is not None]
    return sum(v) if v else None


def paired_reference(cell: dict, cells: list[dict], reference: str = REFERENCE):
    """The variant name of the LoRA-PT row a summary ``cell`` is paired with in the summary
    tables (``results.md`` has every pair): in the same (regime, protocol), the LoRA-PT row
    of the same rank and decoder setting (LoRA r8 -> LoRA-PT r8, LoRA (adapters only) r8 ->
    LoRA-PT (adapters only) r8: the parameter-matched partner); a row without one (decoder-
    only, full, the template prior, another rank) is paired with the LoRA-PT row of the
    highest mean validation Dice (chosen on validation, never on test; ties: the first in
    variant order). None for LoRA-PT's own rows and where no LoRA-PT row exists."""
    if cell["method"] == reference:
        return None
    refs = [c for c in cells if c["method"] == reference and
            (c["regime"], c["protocol"]) == (cell["regime"], cell["protocol"])]
    same = [c for c in refs if cell.get("rank") is not None and c["rank"] == cell["rank"]
            and bool(c.get("train_decoder", True)) == bool(cell.get("train_decoder", True))]
    if same:
        return same[0]["variant"]
    if not refs:
        return None

    def val(c):
        m = (c.get("val_dice") or {}).get("mean", float("nan"))
        return m if m is not None and math.isfinite(m) else -1.0
    return max(refs, key=lambda c: (val(c), -refs.index(c)))["variant"]


# ------------------------------------------------------------------------------------------
# paired per-subject comparison
# ------------------------------------------------------------------------------------------
def subject_means(runs: list[dict]) -> dict:
    """``{subject: mean test Dice over the runs (seeds) that have it}`` from the runs'
    ``test_case_dice``; NaN values are left out of a subject's mean."""
    acc: dict = {}
    for r in runs:
        for case, d in (r.get("test_case_dice") or {}).items():
            if d is not None and math.isfinite(float(d)):
                acc.setdefault(case, []).append(float(d))
    return {c: float(np.mean(v)) for c, v in acc.items()}


def paired_test(ref: dict, base: dict) -> dict:
    """Wilcoxon signed-rank test (two-sided, :func:`scipy.stats.wilcoxon`, zero differences
    dropped) of ``ref`` against ``base`` (``{subject: Dice}``), paired by subject.

    Returns ``n_pairs``, ``median_diff`` / ``mean_diff`` (ref − base over every pair), the
    test's ``statistic`` and ``p_value``, and ``note``: None when the test ran, else why not
    (fewer than :data:`MIN_PAIRS` subjects or non-zero differences); then ``statistic`` and
    ``p_value`` are None."""
    common = sorted(set(ref) & set(base))
    d = np.array([ref[c] - base[c] for c in common], dtype=np.float64)
    res = {"n_pairs": len(common),
           "median_diff": float(np.median(d)) if len(d) else None,
           "mean_diff": float(np.mean(d)) if len(d) else None,
           "statistic": None, "p_value": None, "note": None}
    nonzero = int(np.count_nonzero(d))
    if len(d) < MIN_PAIRS:
        res["note"] = f"n/a: {len(d)} paired subject(s), the test needs {MIN_PAIRS}"
    elif nonzero == 0:
        res["note"] = "n/a: every paired difference is zero"
    elif nonzero < MIN_PAIRS:
        res["note"] = f"n/a: {nonzero} non-zero difference(s), the test needs {MIN_PAIRS}"
    else:
        from scipy.stats import wilcoxon
        w = wilcoxon([ref[c] for c in common], [base[c] for c in common])
        res["statistic"], res["p_value"] = float(w.statistic), float(w.pvalue)
    return res


def paired_tests(runs: list[dict], reference: str = REFERENCE) -> list[dict]:
    """Over the tested ``runs`` (the final runs and the template prior), every (regime,
    protocol): each variant of method ``reference`` against each variant of another method,
    on the test subjects' Dice paired by subject (each subject's Dice averaged over the
    variant's seeds first, :func:`subject_means`); :func:`paired_test`'s numbers with the
    regime, protocol, both variant names and their seeds."""
    cells: dict = {}
    for r in runs:
        if r.get("test_dice") is not None:
            cells.setdefault((r["regime"], r["protocol"]), {}).setdefault(
                r["variant"], []).append(r)
    out = []
    for (reg, prot), by_variant in cells.items():
        refs = [n for n, rs in by_variant.items() if rs[0]["method"] == reference]
        bases = [n for n, rs in by_variant.items() if rs[0]["method"] != reference]
        for rn in refs:
            ref = subject_means(by_variant[rn])
            for bn in bases:
                t = paired_test(ref, subject_means(by_variant[bn]))
                out.append({"regime": reg, "protocol": prot, "reference": rn, "baseline": bn,
                            "reference_seeds": sorted(r["seed"] for r in by_variant[rn]),
                            "baseline_seeds": sorted(r["seed"] for r in by_variant[bn]), **t})
    return out


# ------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------
def _variant_label(name: str, summ: list[dict]) -> str:
    s = next((x for x in summ if x["variant"] == name), None)
    return name if s is None else variant_label(s)


def _prior_row(s: dict) -> str:
    """The template prior's line of a results.md table: no training, so no seeds; its Dice
    and HD95 are the means over the test subjects, ± their sample std over the subjects."""
    def cell(stats, sd, nd):
        m = stats["mean"]
        if not math.isfinite(m):
            return "n/a"
        return f"{m:.{nd}f}" + (f" (± {sd:.{nd}f} over subjects)"
                                if sd is not None and math.isfinite(sd) else "")
    return (f"| {s['protocol']} | {display_name(s['method'])} | – | – | "
            f"{cell(s['dice'], s.get('dice_std_subjects'), 3)} | "
            f"{cell(s['hd95_mm'], s.get('hd95_std_subjects'), 2)} | {_empty_cell(s)} | 0 | – | "
            f"– | – |")


def _empty_cell(s: dict) -> str:
    """``k/n``: empty test predictions of all predictions (subjects × seeds); n/a unknown."""
    if s.get("empty_predictions") is None:
        return "n/a"
    return f"{s['empty_predictions']}/{s['predictions'] if s.get('predictions') else '?'}"


def markdown(summ: list[dict], S: dict, steps: int) -> str:
    """``results.md``: per regime, the table of every (protocol, variant), then the paired
    per-subject comparison of LoRA-PT against each baseline."""
    lines = [f"# Method comparison (UNETR {S['preset']} preset, embedded hippocampus data)", "",
             f"{S['epochs']} epochs × {S['samples_per_epoch']} samples, batch "
             f"{S['batch_size']} ({steps} steps) per run; seeds: {S['seeds']}; Dice and HD95 "
             f"on {S['n_test']} test subjects per protocol (numbers "
             f"{S.get('test_start', 0)}-{S.get('test_start', 0) + S['n_test'] - 1} of its test "
             f"seed range), mean ± std over seeds "
             f"(std: sample, ddof=1). Learning rate: best validation Dice of the sweep "
             f"(seed 0). Empty preds: empty test predictions of all (subjects × seeds); "
             f"an empty prediction's HD95 is the image diagonal."]
    if any(s["method"] == PRIOR["method"] for s in summ):
        lines[-1] += (" Template prior: no training; each test subject's prediction is the "
                      "protocol's hippocampus of the undeformed template on the subject's "
                      "grid (no image looked at); mean over the test subjects ± their sample "
                      "std, the same in every regime.")
    par = sorted({(s.get("workers"), s.get("threads")) for s in summ
                  if s.get("workers") is not None and s["method"] != PRIOR["method"]})
    if par:
        lines[-1] += " s/step: training time per optimizer step of one run (augmentation, " \
            "forward, backward, update), with " + " / ".join(
                f"{w} run(s) at once × {t} thread(s)" for w, t in par) + \
            "; peak mem: that process's peak resident set."
    lines.append("")
    for regime in dict.fromkeys(s["regime"] for s in summ):
        rs = [s for s in summ if s["regime"] == regime]
        frac = S["regimes"].get(regime)
        n_tr = next((s["train_subjects"] for s in rs if s.get("train_subjects") is not None),
                    "?")
        lines += [f"## {regime} ({n_tr} training subjects"
                  + (f", {100 * frac:.0f} %" if frac is not None else "") + ")", "",
                  "| protocol | method | rank | lr | Dice | HD95 (mm) | empty preds | "
                  "trainable params (adapter) | artefact | s/step | peak mem |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in rs:
            if s["method"] == PRIOR["method"]:
                lines.append(_prior_row(s))
                continue
            pct = 100.0 * s["trainable_parameters"] / s["model_parameters"] \
                if s.get("model_parameters") else float("nan")
            tps = s.get("time_per_step_s")
            pm = s.get("peak_mem_mb")
            lines.append(
                f"| {s['protocol']} | {display_name(s['method'], s.get('train_decoder'))} | "
                f"{s['rank'] if s['rank'] else '–'} | {fmt_lr(s['lr'])}"
                f"{' †' if s.get('lr_at_grid_edge') else ''} | {fmt_pm(s['dice'])} | "
                f"{fmt_pm(s['hd95_mm'], 2)} | {_empty_cell(s)} | "
                f"{fmt_num(s['trainable_parameters'])} "
                f"({pct:.1f} %; {fmt_num(s.get('adapter_parameters'))}) | "
                f"{fmt_mb(s.get('artefact_bytes'))} | "
                f"{'n/a' if tps is None or not math.isfinite(tps) else f'{tps:.2f}'} | "
                f"{'n/a' if pm is None or not math.isfinite(pm) else f'{pm / 1024:.2f} GB'} |")
        edge = [s for s in rs if s.get("lr_at_grid_edge")]
        if edge:
            lines += ["", "† chosen rate at an end of its grid (the validation optimum was "
                      "not bracketed; a rate outside the grid may do better): " + "; ".join(
                          f"{s['protocol']} {variant_label(s)}: {fmt_lr(s['lr'])}, "
                          f"{s['lr_at_grid_edge']} of "
                          f"{', '.join(fmt_lr(x) for x in s.get('lr_grid') or [])}"
                          for s in edge)]
        stab = [s for s in rs if s["method"] != PRIOR["method"] and (
            s.get("dice_max_dev") is not None or s.get("val_zero_runs"))]
        if stab:
            lines += ["", "Stability over seeds (largest distance of one seed's test Dice from "
                      "the seeds' mean; runs whose best validation Dice is 0): " + "; ".join(
                          f"{s['protocol']} {variant_label(s)}: "
                          + ("n/a" if s.get("dice_max_dev") is None
                             else f"{s['dice_max_dev']:.3f}")
                          + f", {s.get('val_zero_runs', 0)} at 0" for s in stab)]
        lines.append("")
        tests = [t for s in rs for t in s.get("paired", [])]
        if tests:
            lines += [f"Paired per-subject comparison ({display_name(REFERENCE)} − baseline, "
                      f"test Dice; each subject's Dice averaged over the seeds first; "
                      f"Wilcoxon signed-rank, two-sided, zero differences dropped; n/a with "
                      f"fewer than {MIN_PAIRS} subjects or non-zero differences):", "",
                      "| protocol | LoRA-PT | baseline | subjects | median Δ Dice | "
                      "mean Δ Dice | p |", "|---|---|---|---|---|---|---|"]
            for t in tests:
                lines.append(
                    f"| {t['protocol']} | {_variant_label(t['reference'], rs)} | "
                    f"{_variant_label(t['baseline'], rs)} | {t['n_pairs']} | "
                    + " | ".join("n/a" if x is None else f"{x:+.3f}"
                                 for x in (t["median_diff"], t["mean_diff"]))
                    + f" | {fmt_p(t['p_value']) if t['note'] is None else t['note']} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def write_reports(out, runs: list[dict], lr_choice: dict, variants: list[dict], S: dict, *,
                  plots: bool = True, log=print) -> list[dict]:
    """Write every table (and, with ``plots``, the figures) of the comparison in ``out``
    from ``runs`` (sweep and final, one dict each); returns the summary."""
    out = Path(out)
    rows = [{k: v for k, v in r.items() if k not in ("curves", "test_case_dice")}
            for r in runs]
    fields = list(dict.fromkeys(k for r in rows for k in r))
    write_csv(out / "runs.csv", rows, fields)
    write_json(out / "runs.json", runs)
    write_json(out / "lr_choice.json", lr_choice)
    final = [r for r in runs if r.get("final")]
    summ = aggregate(final, variants, lr_choice, S)
    write_json(out / "summary.json", summ)
    flat = []
    for s in summ:
        t = s.get("paired_reference") or {}
        flat.append({**{k: s[k] for k in SUMMARY_FIELDS if k in s},
                     "dice_mean": s["dice"]["mean"], "dice_std": s["dice"]["std"],
                     "hd95_mean": s["hd95_mm"]["mean"], "hd95_std": s["hd95_mm"]["std"],
                     "paired_reference": t.get("reference"), "paired_n": t.get("n_pairs"),
                     "paired_median_dice_diff": t.get("median_diff"),
                     "paired_p": t.get("p_value"), "paired_note": t.get("note")})
    write_csv(out / "summary.csv", flat, SUMMARY_FIELDS)
    atomic_write(out / "results.md", markdown(summ, S, steps_per_run(S)))
    if plots:
        try:
            plot_dice_vs_params(summ, out / "dice_vs_params.png")
            plot_curves(final, variants, out / "training_curves.png")
        except Exception as e:  # a plot must never lose the numbers
            log(f"note: plots not written ({type(e).__name__}: {e})")
    return summ


# ------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------
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


_MARKERS = {"decoder": "s", "full": "D", "lora": "^", "pissa": "v", "dora": "P", "lorapt": "o"}


def plot_dice_vs_params(summ: list[dict], path) -> None:
    """Test Dice (mean ± std over seeds) against trainable parameters, one panel per
    (regime, protocol), one marker per method; the template prior (0 parameters) as a dashed
    line."""
    if not summ:
        return
    plt = _plt()
    regimes = list(dict.fromkeys(s["regime"] for s in summ))
    prots = list(dict.fromkeys(s["protocol"] for s in summ))
    fig, axes = plt.subplots(len(regimes), len(prots), figsize=(5 * len(prots),
                             3.8 * len(regimes)), squeeze=False)
    for i, reg in enumerate(regimes):
        for j, prot in enumerate(prots):
            ax = axes[i][j]
            for k, s in enumerate(x for x in summ if x["regime"] == reg and x["protocol"] == prot):
                if s["method"] == PRIOR["method"]:      # 0 parameters: a line, not a point
                    ax.axhline(s["dice"]["mean"], color="grey", ls="--", lw=1,
                               label=display_name(s["method"]))
                    continue
                std = s["dice"]["std"] if math.isfinite(s["dice"]["std"]) else 0.0
                ax.errorbar([s["trainable_parameters"]], [s["dice"]["mean"]], yerr=[std],
                            fmt=_MARKERS.get(s["method"], "o"), color=f"C{k}", capsize=3,
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
