"""Inference: loading a trained run for prediction, sliding-window logits, test-time
augmentation and post-processing, :func:`evaluate` (Dice and HD95 per case on the original
grids) and :func:`predict` (NIfTI masks on the input grids)."""
from __future__ import annotations

import csv
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .data import DataError, check_cases, eval_transforms, load_cases
from .metrics import dice_hd95, summarize, voxel_spacing
import tsvd.peft

from .config import RunConfig
from .runtime import (RunError, apply_transforms, build_model, check_out_dir, load_base, plain,
                      select_device, write_bytes)

__all__ = ["infer_options", "sliding_logits", "probabilities", "keep_largest", "predict_mask",
           "load_for_inference", "infer_case", "evaluate", "predict"]


def _as_dict(cfg) -> dict:
    """A validated config dict (``config.yaml``'s layout) from a RunConfig, a dict or None."""
    if cfg is None:
        return RunConfig().to_dict()
    return (cfg if isinstance(cfg, RunConfig) else RunConfig.from_dict(cfg)).to_dict()


def infer_options(cfg: dict | None, recorded: dict | None = None) -> dict:
    """The inference post-processing: ``tta_flip`` (spatial axes whose mirrored prediction is
    averaged in) and ``keep_components`` (keep the N largest connected foreground components;
    0 = all). ``cfg["infer"]`` entries that are not None override the ``recorded`` ones (those
    of the trained run); the result is validated."""
    out = {"tta_flip": [], "keep_components": 0}
    for src in (recorded or {}), ((cfg or {}).get("infer") or {}):
        for k in out:
            if src.get(k) is not None:
                out[k] = src[k]
    ax = out["tta_flip"]
    if not isinstance(ax, (list, tuple)) or any(
            isinstance(a, bool) or not isinstance(a, int) or a not in (0, 1, 2) for a in ax):
        raise RunError(f"infer.tta_flip: expected a list of spatial axes among 0, 1, 2, got {ax!r}")
    kc = out["keep_components"]
    if isinstance(kc, bool) or not isinstance(kc, int) or kc < 0:
        raise RunError(f"infer.keep_components: expected an integer >= 0 (0 = keep all), "
                       f"got {kc!r}")
    return {"tta_flip": sorted(set(int(a) for a in ax)), "keep_components": int(kc)}


def sliding_logits(model, image, patch, overlap, device, amp=False):
    """Sliding-window inference: image (1, D, H, W) -> logits (2, D, H, W) on CPU."""
    from monai.inferers import sliding_window_inference
    x = plain(image)[None].to(device)
    with torch.no_grad(), torch.autocast(device.type, enabled=bool(amp and device.type == "cuda")):
        y = sliding_window_inference(x, roi_size=patch, sw_batch_size=2, predictor=model,
                                     overlap=overlap, mode="gaussian")
    return plain(y)[0].float().cpu()


def probabilities(model, image, patch, overlap, device, amp=False, tta_flip=()):
    """Softmax ``(2, D, H, W)`` of a preprocessed image ``(1, D, H, W)``, averaged with the
    predictions of the image mirrored along each axis in ``tta_flip`` (flipped back)."""
    prob = torch.softmax(sliding_logits(model, image, patch, overlap, device, amp), 0)
    for ax in tta_flip:
        flipped = torch.flip(plain(image), [ax + 1])
        p = torch.softmax(sliding_logits(model, flipped, patch, overlap, device, amp), 0)
        prob += torch.flip(p, [ax + 1])
    return prob / (1 + len(tta_flip))


def keep_largest(pred: torch.Tensor, n: int) -> torch.Tensor:
    """Binary mask ``(D, H, W)`` with only its ``n`` largest connected components (MONAI's
    ``KeepLargestConnectedComponent``); ``n = 0`` keeps all."""
    from monai.transforms import KeepLargestConnectedComponent
    if n <= 0 or not bool(pred.any()):
        return pred
    keep = KeepLargestConnectedComponent(applied_labels=[1], is_onehot=False, num_components=n)
    return torch.as_tensor(keep(pred[None].to(torch.uint8).clone()))[0].to(pred.dtype)


def predict_mask(model, image, *, patch, overlap, device, amp=False, opts=None) -> torch.Tensor:
    """Boolean mask ``(D, H, W)`` of a preprocessed image ``(1, D, H, W)`` on its own grid,
    with the post-processing ``opts`` (:func:`infer_options`: TTA flips, keep-largest
    components) that evaluation applies, so that validation measures what test measures."""
    opts = opts or {"tta_flip": [], "keep_components": 0}
    prob = probabilities(model, image, patch, overlap, device, amp, opts["tta_flip"])
    return keep_largest(prob[1] > prob[0], opts["keep_components"])


# ------------------------------------------------------------------------------------------
# inference
# ------------------------------------------------------------------------------------------
def _read_json(p: Path):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{p}: unreadable ({e})") from None


def load_for_inference(checkpoint, cfg: dict | None = None, log=print):
    """(model in eval mode, run_info) from a run folder, an adapter file or a model file.

    A run folder (or a file next to a ``run.json``) gives the preset and the data processing
    it was trained with; otherwise ``cfg`` (CLI flags) does. An adapter file is applied on its
    base checkpoint (recorded in its metadata) and merged into plain weights.
    """
    ck = Path(checkpoint)
    if not ck.exists():
        raise RunError(f"{ck}: checkpoint not found")
    info = None
    if ck.is_dir():
        if not (ck / "run.json").is_file():
            raise RunError(f"{ck}: not a run folder (no run.json); pass a checkpoint file")
        info = _read_json(ck / "run.json")
        arts = info.get("artefacts", {})
        kind = info.get("default_artefact", "last")
        if kind not in arts:
            raise RunError(f"{ck}: run has no {kind} artefact (unfinished run?)")
        ck = ck / arts[kind]
    elif (ck.parent / "run.json").is_file():
        info = _read_json(ck.parent / "run.json")
    if info is None:
        cfg = _as_dict(cfg)
        info = {"preset": cfg["model"]["preset"], "model": cfg["model"],
                "data": {k: cfg["data"].get(k) for k in ("spacing", "roi", "patch",
                                                         "foreground", "modality")},
                "sw_overlap": cfg["infer"]["sw_overlap"]}
    mcfg = RunConfig.from_dict({"model": {"preset": (info.get("model") or {}).get(
        "preset", info.get("preset"))}})
    model = build_model(mcfg)
    meta = None
    if str(ck).endswith(".safetensors"):
        try:
            meta = tsvd.peft.read_adapter_meta(str(ck))
        except Exception:
            meta = None
    if meta and meta.get("method"):
        base = meta.get("base_checkpoint")
        if not base:
            raise RunError(f"{ck}: adapter file without a base checkpoint pointer")
        bp = Path(base)
        if not bp.is_absolute():
            bp = ck.parent / bp
        if not bp.is_file():
            raise RunError(f"{ck}: its base checkpoint {bp} is missing")
        load_base(model, bp)
        try:
            adapter = tsvd.peft.load_adapter(model, str(ck))
        except (ValueError, RuntimeError, KeyError) as e:
            raise RunError(f"{ck}: adapter does not fit the model: {e}") from None
        adapter.merge()
        info["method"] = meta["method"]
    else:
        load_base(model, ck)
    model.eval()
    info["checkpoint"] = str(ck)
    return model, info


def infer_case(model, item, info, device, amp=False, opts=None):
    """Prediction of one preprocessed case mapped back onto its original grid.

    ``opts`` (see :func:`_infer_options`): the softmax of the image mirrored along each
    ``tta_flip`` axis is averaged with the plain one; after thresholding on the original grid,
    only the ``keep_components`` largest connected foreground components are kept (MONAI's
    ``KeepLargestConnectedComponent``; 0 keeps all).
    Returns (uint8 mask in the original voxel order, original affine, original header).
    """
    import nibabel as nib
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample
    opts = opts or {"tta_flip": [], "keep_components": 0}
    patch = info["data"]["patch"]
    overlap = info.get("sw_overlap", 0.25)
    image = item["image"]
    prob = probabilities(model, image, patch, overlap, device, amp, opts["tta_flip"])
    prob = MetaTensor(prob, affine=image.affine)
    orig = nib.load(item["path_image"])
    shape = orig.shape[:3]
    back = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=torch.float32)(
        prob, dst_affine=torch.as_tensor(orig.affine, dtype=torch.float64), spatial_size=shape)
    pred = (torch.as_tensor(back)[1] > torch.as_tensor(back)[0]).to(torch.uint8)
    pred = keep_largest(pred, opts["keep_components"])
    return pred.numpy(), orig.affine, orig.header


def _prepare_inference(cfg: dict, checkpoint, log):
    """(device, model on it, run info, post-processing options, data settings of the run)
    for :func:`evaluate` and :func:`predict`."""
    infer_options(cfg)                         # the flags' own settings, checked first
    device = select_device(cfg["train"]["device"])
    model, info = load_for_inference(checkpoint, cfg, log)
    opts = infer_options(cfg, info.get("infer"))
    model.to(device)
    dcfg = dict(cfg["data"])
    dcfg.update(info["data"])                  # the run's preprocessing wins
    return device, model, info, opts, dcfg


def _load_label(path, foreground):
    import nibabel as nib
    lab = np.asarray(nib.load(path).dataobj)
    if lab.ndim == 4:
        lab = lab[..., 0]
    if foreground:
        return np.isin(lab, list(foreground))
    return lab != 0


def evaluate(cfg: dict, checkpoint, out, *, split: str = "test", overwrite: bool = False,
             log=print, progress=True) -> dict:
    """Dice and HD95 (mm) per case of ``split`` on the original grids; CSV + JSON in ``out``."""
    from tqdm.auto import tqdm
    cfg = _as_dict(cfg)
    out = Path(out)
    check_out_dir(out, overwrite, False)
    device, model, info, opts, dcfg = _prepare_inference(cfg, checkpoint, log)
    layout, splits, allowed = load_cases(dcfg["path"], dcfg["format"], modality=dcfg["modality"],
                                         valid_fraction=dcfg["valid_fraction"],
                                         seed=cfg["train"]["seed"])
    if split not in splits:
        raise RunError(f"split: expected train, valid or test, got {split!r}")
    cases = [c for c in splits[split] if c.get("label")]
    if not cases:
        raise DataError(f"{dcfg['path']}: no labelled cases in split {split!r} ({layout} layout)")
    check_cases(cases)
    from monai.transforms import Compose
    comp = Compose(eval_transforms(dcfg, allowed))
    rows = []
    t0 = time.time()
    for c in tqdm(cases, desc=f"evaluate {split}", disable=not progress, file=sys.stderr):
        item = apply_transforms(comp, c)
        pred, aff, _ = infer_case(model, item, info, device, cfg["train"].get("amp"), opts)
        gt = _load_label(c["label"], dcfg.get("foreground"))
        d, h = dice_hd95(torch.from_numpy(pred), torch.from_numpy(gt), voxel_spacing(aff))
        rows.append({"case": c["name"], "dice": d, "hd95_mm": h,
                     "empty_prediction": not bool(pred.any())})
    res = {"checkpoint": info["checkpoint"], "method": info.get("method"), "split": split,
           "dataset": str(dcfg["path"]), "layout": layout, "cases": rows,
           "dice": summarize([r["dice"] for r in rows]),
           "hd95_mm": summarize([r["hd95_mm"] for r in rows],
                                empty=[r["empty_prediction"] for r in rows]), "infer": opts,
           "time_s": round(time.time() - t0, 1)}
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["case", "dice", "hd95_mm", "empty_prediction"])
    w.writeheader()
    for r in rows:
        w.writerow(r)
    write_bytes(out / "metrics.csv", buf.getvalue().encode())
    write_bytes(out / "metrics.json", json.dumps(res, indent=1).encode())
    log(f"{split}: Dice {res['dice']['mean']:.4f} ± {res['dice']['std']:.4f}, HD95 "
        f"{res['hd95_mm']['mean']:.2f} ± {res['hd95_mm']['std']:.2f} mm over {len(rows)} cases")
    return res


def predict(cfg: dict, checkpoint, inputs, output, *, overwrite: bool = False, log=print,
            progress=True) -> list[str]:
    """Segment NIfTI file(s); each output keeps its input's affine, shape and orientation.

    ``inputs``: a file or a folder of .nii/.nii.gz; ``output``: a file (single input) or a
    folder (one ``NAME_pred.nii.gz`` per input).
    """
    import nibabel as nib
    from monai.transforms import Compose
    from tqdm.auto import tqdm
    inputs, output = Path(inputs), Path(output)
    if not inputs.exists():
        raise DataError(f"{inputs}: input not found")
    if inputs.is_dir():
        files = sorted(p for p in inputs.iterdir() if p.name.endswith((".nii", ".nii.gz")))
        if not files:
            raise DataError(f"{inputs}: no .nii/.nii.gz files")
        if output.exists() and not output.is_dir():
            raise RunError(f"{output}: exists and is not a folder")
        outs = [output / (p.name.split(".nii")[0] + "_pred.nii.gz") for p in files]
    else:
        files = [inputs]
        outs = [output / (inputs.name.split(".nii")[0] + "_pred.nii.gz")] if output.is_dir() \
            else [output]
    if not overwrite:
        for o in outs:
            if o.exists():
                raise RunError(f"{o}: output exists (use --overwrite to replace it)")
    cfg = _as_dict(cfg)
    cases = [{"image": str(p), "label": None, "name": p.name} for p in files]
    check_cases(cases, need_label=False)
    device, model, info, opts, dcfg = _prepare_inference(cfg, checkpoint, log)
    comp = Compose(eval_transforms(dcfg, {0, 1}, with_label=False))
    written = []
    for c, o in tqdm(list(zip(cases, outs)), desc="predict", disable=not progress, file=sys.stderr):
        item = apply_transforms(comp, c)
        pred, aff, hdr = infer_case(model, item, info, device, cfg["train"].get("amp"), opts)
        h = hdr.copy()
        h.set_data_dtype(np.uint8)
        img = nib.Nifti1Image(pred, aff, header=h)
        img.header.set_slope_inter(1, 0)
        from .embedded import _atomic_save_nifti
        _atomic_save_nifti(img, o)
        written.append(str(o))
    log(f"wrote {len(written)} prediction(s)")
    return written
