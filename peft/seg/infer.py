"""Inference: a trained run loaded for prediction, sliding-window logits, test-time augmentation
and post-processing, :func:`evaluate` (Dice and HD95 per case on the original grids) and
:func:`predict` (NIfTI masks on the input grids).

The network sees each image after MONAI's preprocessing (RAS orientation, resampling to
``data.spacing``, region of interest, padding: :func:`tsvd.peft.seg.data.eval_transforms`).
Its class probabilities ``(2, D, H, W)`` on that grid are mapped back onto the input's own grid
with MONAI's inverse transforms (:class:`monai.transforms.Invertd` over the same ``Compose``,
bilinear), then thresholded (argmax) and post-processed there. Shapes: a preprocessed image is
``(1, D, H, W)``; masks are ``(D, H, W)``.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

import tsvd.peft

from .config import RunConfig
from .data import DataError, check_cases, eval_transforms, load_cases
from .metrics import dice_hd95, summarize, voxel_spacing
from .runtime import (RunError, apply_transforms, build_model, check_out_dir, load_base, plain,
                      select_device, write_bytes, write_json)

__all__ = ["infer_options", "sliding_logits", "probabilities", "keep_largest", "predict_mask",
           "load_for_inference", "inference_transforms", "to_input_grid", "infer_case",
           "save_mask", "evaluate", "predict"]

log = logging.getLogger("tsvd.peft.seg")


def _run_config(cfg) -> RunConfig:
    """A validated :class:`RunConfig` from a RunConfig, a dict in ``config.yaml``'s layout, or
    None (the defaults)."""
    if cfg is None:
        return RunConfig()
    if isinstance(cfg, RunConfig):
        return cfg.validate()
    return RunConfig.from_dict(cfg)


# ------------------------------------------------------------------------------------------
# post-processing settings
# ------------------------------------------------------------------------------------------
def infer_options(cfg=None, recorded: dict | None = None) -> dict:
    """The inference post-processing ``{"tta_flip": [axes], "keep_components": n}``.

    ``tta_flip``: spatial axes whose mirrored prediction is averaged in; ``keep_components``:
    keep the n largest connected foreground components (0 = all). ``cfg`` (a
    :class:`RunConfig`, a dict in ``config.yaml``'s layout, or None) gives ``cfg.infer``;
    its entries that are not None override the ``recorded`` ones (those of the trained run,
    from its ``run.json``). A bad recorded value is a :class:`RunError` naming it (the config's
    own values are checked by :class:`RunConfig`: a ``ConfigError``).
    """
    mine = dataclasses.asdict(_run_config(cfg).infer) if cfg is not None else {}
    out = {"tta_flip": [], "keep_components": 0}
    for src in (recorded or {}), mine:
        for k in out:
            if src.get(k) is not None:
                out[k] = src[k]
    ax = out["tta_flip"]
    if not isinstance(ax, (list, tuple)) or any(
            isinstance(a, bool) or not isinstance(a, int) or a not in (0, 1, 2) for a in ax):
        raise RunError(f"infer.tta_flip: expected a list of spatial axes among 0, 1, 2, "
                       f"got {ax!r}")
    kc = out["keep_components"]
    if isinstance(kc, bool) or not isinstance(kc, int) or kc < 0:
        raise RunError(f"infer.keep_components: expected an integer >= 0 (0 = keep all), "
                       f"got {kc!r}")
    return {"tta_flip": sorted(set(int(a) for a in ax)), "keep_components": int(kc)}


# ------------------------------------------------------------------------------------------
# the network on one preprocessed image
# ------------------------------------------------------------------------------------------
def sliding_logits(model, image, patch, overlap, device, amp=False) -> torch.Tensor:
    """Sliding-window inference (MONAI, Gaussian blending): image ``(1, D, H, W)`` -> logits
    ``(2, D, H, W)`` float32 on the CPU. ``patch``: window size (3 ints); ``overlap`` in
    [0, 1)."""
    from monai.inferers import sliding_window_inference
    x = plain(image)[None].to(device)
    with torch.no_grad(), torch.autocast(device.type,
                                         enabled=bool(amp and device.type == "cuda")):
        y = sliding_window_inference(x, roi_size=list(patch), sw_batch_size=2,
                                     predictor=model, overlap=float(overlap), mode="gaussian")
    return plain(y)[0].float().cpu()


def probabilities(model, image, *, patch, overlap, device, amp=False,
                  tta_flip=()) -> torch.Tensor:
    """Softmax ``(2, D, H, W)`` of a preprocessed image ``(1, D, H, W)``, averaged with the
    softmax of the image mirrored along each spatial axis in ``tta_flip`` (mirrored back)."""
    prob = torch.softmax(sliding_logits(model, image, patch, overlap, device, amp), 0)
    for ax in tta_flip:
        flipped = torch.flip(plain(image), [ax + 1])
        p = torch.softmax(sliding_logits(model, flipped, patch, overlap, device, amp), 0)
        prob += torch.flip(p, [ax + 1])
    return prob / (1 + len(tta_flip))


def keep_largest(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Mask ``(D, H, W)`` with only its ``n`` largest connected components (MONAI's
    ``KeepLargestConnectedComponent``, full connectivity); ``n = 0`` keeps all. Same dtype."""
    from monai.transforms import KeepLargestConnectedComponent
    mask = torch.as_tensor(mask)
    if n <= 0 or not bool(mask.any()):
        return mask
    keep = KeepLargestConnectedComponent(applied_labels=[1], is_onehot=False, num_components=n)
    out = keep(mask[None].to(torch.uint8).clone())
    return plain(out)[0].to(mask.dtype)


def predict_mask(model, image, *, patch, overlap, device, amp=False,
                 opts: dict | None = None) -> torch.Tensor:
    """Boolean mask ``(D, H, W)`` of a preprocessed image ``(1, D, H, W)`` on its own
    (preprocessed) grid: softmax averaged over the ``opts["tta_flip"]`` mirrorings, argmax,
    then the ``opts["keep_components"]`` largest components (:func:`infer_options`). Training's
    validation uses it, so that validation measures the post-processing that test applies."""
    opts = opts or {"tta_flip": [], "keep_components": 0}
    prob = probabilities(model, image, patch=patch, overlap=overlap, device=device, amp=amp,
                         tta_flip=opts["tta_flip"])
    return keep_largest(prob[1] > prob[0], opts["keep_components"]).to(torch.bool)


# ------------------------------------------------------------------------------------------
# back onto the input grid: MONAI's inverse transforms
# ------------------------------------------------------------------------------------------
def _grid_keeper():
    from monai.transforms import InvertibleTransform, MapTransform, SpatialResample
    from monai.utils import TraceKeys

    class KeepGridd(MapTransform, InvertibleTransform):
        """Makes a transform that MONAI cannot invert invertible when all it does to the grid
        is crop / pad (e.g. the world-coordinate region of interest): its trace entries are
        replaced by one entry holding the grid (affine, shape) it started from, and the
        inverse resamples back onto that grid (an integer shift: exact; outside = 0)."""

        def __init__(self, inner):
            super().__init__(keys=["image", "label"], allow_missing_keys=True)
            self.inner = inner

        def __call__(self, data):
            from monai.data import MetaTensor
            before = {k: (len(v.applied_operations), v.affine.clone(), tuple(v.shape[1:]))
                      for k, v in data.items() if k in ("image", "label")
                      and isinstance(v, MetaTensor)}
            d = self.inner(data)
            for k, (n, aff, shape) in before.items():
                x = d.get(k)
                if not isinstance(x, MetaTensor) or len(x.applied_operations) == n:
                    continue
                inner = [op.get(TraceKeys.CLASS_NAME) for op in x.applied_operations[n:]]
                x.applied_operations = x.applied_operations[:n]
                self.push_transform(x, extra_info={"affine": aff, "shape": shape,
                                                   "inner": inner})
            return d

        def inverse(self, data):
            d = dict(data)
            for k in self.key_iterator(d):
                ops = getattr(d[k], "applied_operations", None)
                if not ops or ops[-1].get(TraceKeys.ID) != id(self):
                    continue
                info = self.pop_transform(d[k])[TraceKeys.EXTRA_INFO]
                rs = SpatialResample(mode="bilinear", padding_mode="zeros",
                                     dtype=torch.float32)
                with rs.trace_transform(False):
                    d[k] = rs(d[k], dst_affine=torch.as_tensor(info["affine"],
                                                               dtype=torch.float64),
                              spatial_size=list(info["shape"]))
            return d

    return KeepGridd


def inference_transforms(data: dict, allowed, *, with_label: bool = True):
    """The MONAI ``Compose`` of :func:`tsvd.peft.seg.data.eval_transforms` (``data``: the
    run's data settings with ``patch``) whose inverse maps a prediction back onto the input
    grid: steps MONAI cannot invert are wrapped (crop / pad of the region of interest)."""
    from monai.transforms import Compose, InvertibleTransform
    keep = _grid_keeper()
    ts = [t if isinstance(t, InvertibleTransform) else keep(t)
          for t in eval_transforms(data, allowed, with_label=with_label)]
    return Compose(ts)


def to_input_grid(prob: torch.Tensor, item: dict, transforms) -> torch.Tensor:
    """Probabilities ``(C, D, H, W)`` on ``item``'s preprocessed grid -> ``(C, X, Y, Z)`` on
    the input image's grid (MONAI ``Invertd`` over ``transforms``, the ``Compose`` that made
    ``item``; bilinear). A plain float tensor."""
    from monai.data import MetaTensor
    from monai.transforms import Invertd
    image = item["image"]
    d = {"image": image, "pred": MetaTensor(plain(prob).float(), affine=image.affine)}
    out = Invertd(keys="pred", transform=transforms, orig_keys="image",
                  nearest_interp=False)(d)["pred"]
    left = getattr(out, "applied_operations", [])
    if left:
        raise RuntimeError(f"{item.get('path_image', 'image')}: preprocessing steps that "
                           f"MONAI could not invert remain: {[o.get('class') for o in left]}")
    return plain(out).float()


def infer_case(model, item, info, device, amp=False, opts=None, *, transforms=None):
    """The prediction of one preprocessed case on its input grid.

    ``item``: the output of ``transforms`` (:func:`inference_transforms`) for one case, with
    ``path_image``; ``transforms=None`` only for an item that is on its input grid already
    (no preprocessing recorded). ``info``: the run's ``run.json`` (``data.patch``,
    ``sw_overlap``). The softmax (averaged over ``opts["tta_flip"]`` mirrorings) is mapped back
    with :func:`to_input_grid`, then argmax and the ``opts["keep_components"]`` largest
    components on the input grid.
    Returns (uint8 mask ``(X, Y, Z)`` in the file's voxel order, its affine, its header).
    """
    import nibabel as nib
    opts = opts or {"tta_flip": [], "keep_components": 0}
    image = item["image"]
    prob = probabilities(model, image, patch=info["data"]["patch"],
                         overlap=info.get("sw_overlap", 0.25), device=device, amp=amp,
                         tta_flip=opts["tta_flip"])
    orig = nib.load(item["path_image"])
    if transforms is None:
        if getattr(image, "applied_operations", None):
            raise ValueError("transforms: the item was preprocessed; pass the Compose that "
                             "made it so that its prediction can be mapped back")
        back = prob
    else:
        back = to_input_grid(prob, item, transforms)
    if tuple(back.shape[1:]) != tuple(orig.shape[:3]):
        raise RuntimeError(f"{item['path_image']}: prediction shape {tuple(back.shape[1:])} "
                           f"!= image shape {tuple(orig.shape[:3])}")
    pred = (back[1] > back[0]).to(torch.uint8)
    pred = keep_largest(pred, opts["keep_components"])
    return pred.numpy(), orig.affine, orig.header


def save_mask(mask: np.ndarray, affine, header, path) -> Path:
    """Write a uint8 mask as NIfTI with the input's header (qform/sform codes, pixdim, units
    kept), atomically (:func:`tsvd.models.atomic_write`)."""
    import nibabel as nib
    h = header.copy()
    h.set_data_dtype(np.uint8)
    img = nib.Nifti1Image(np.asarray(mask, dtype=np.uint8), affine, header=h)
    img.header.set_slope_inter(1, 0)
    path = Path(path)
    from . import embedded
    saver = getattr(embedded, "save_nifti_atomic", None)
    if saver is not None:
        saver(img, path)
        return path
    from tsvd.models import atomic_write
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: nib.save(img, str(tmp)))


# ------------------------------------------------------------------------------------------
# loading a trained model
# ------------------------------------------------------------------------------------------
def _read_json(p: Path):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{p}: unreadable ({e})") from None


def _is_adapter_file(path) -> bool:
    """Whether a safetensors file carries a tsvd.peft adapter header (unreadable files are
    left to the loader that reports them)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return "tsvd_peft" in (f.metadata() or {})
    except Exception:
        return False


def load_for_inference(checkpoint, cfg=None):
    """(model in eval mode on the CPU, run info) from a run folder, an adapter file or a model
    file (``model_*.safetensors`` incl. training's weight average ``model_avg.safetensors``,
    or a ``.pt``/``.pth`` checkpoint).

    A run folder (or a file next to a ``run.json``) gives the preset and the data processing
    it was trained with; otherwise ``cfg`` (a :class:`RunConfig`, dict or None) does. A run
    folder loads its ``default_artefact``. An adapter file is applied on its base checkpoint
    (recorded in its header) and merged into plain weights.
    """
    from .runtime import patch_size
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
        c = _run_config(cfg)
        info = {"preset": c.model.preset, "model": dataclasses.asdict(c.model),
                "data": {"spacing": c.data.spacing, "roi": c.data.roi,
                         "patch": patch_size(c), "foreground": c.data.foreground,
                         "modality": c.data.modality},
                "sw_overlap": c.infer.sw_overlap}
    model_cfg = dict(info.get("model") or {})
    model_cfg.setdefault("preset", info.get("preset"))
    mcfg = RunConfig.from_dict({"model": {"preset": model_cfg["preset"],
                                          "dropout": model_cfg.get("dropout")}})
    model = build_model(mcfg)
    meta = None
    if ck.name.endswith(".safetensors"):
        if _is_adapter_file(ck):               # else a model file: no adapter header
            try:
                meta = tsvd.peft.read_adapter_meta(str(ck))
            except ValueError as e:            # an old format, an edited header, ...
                raise RunError(f"{ck}: {e}") from None
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


def _prepare(cfg: RunConfig, checkpoint):
    """(device, model on it, run info, post-processing options, data settings) shared by
    :func:`evaluate` and :func:`predict`."""
    infer_options(cfg)                         # the flags' own settings, checked first
    device = select_device(cfg.train.device)
    model, info = load_for_inference(checkpoint, cfg)
    opts = infer_options(cfg, info.get("infer"))
    model.to(device)
    data = dataclasses.asdict(cfg.data)
    data.update(info["data"])                  # the run's preprocessing wins
    return device, model, info, opts, data


def _load_label(path, foreground) -> np.ndarray:
    import nibabel as nib
    lab = np.asarray(nib.load(path).dataobj)
    if lab.ndim == 4:
        lab = lab[..., 0]
    if foreground:
        return np.isin(lab, list(foreground))
    return lab != 0


# ------------------------------------------------------------------------------------------
# evaluate / predict
# ------------------------------------------------------------------------------------------
def evaluate(cfg, checkpoint, out, *, split: str | None = "test", overwrite: bool = False,
             progress: bool = True) -> dict:
    """Dice and HD95 (mm) per labelled case of ``split`` (train, valid, test; None: test, or
    valid when the dataset has no labelled test cases) on each case's input grid, written
    to ``out/metrics.csv`` and ``out/metrics.json``; returns the JSON's dict (per-case rows,
    :func:`tsvd.peft.seg.metrics.summarize` of each metric, the post-processing used).

    ``cfg``: a :class:`RunConfig` (dict accepted) giving ``data.path`` / ``format`` /
    ``modality`` / ``valid_fraction``, ``train.seed`` (the split), device, and inference
    overrides; the run's own preprocessing (from its ``run.json``) wins.
    """
    from tqdm.auto import tqdm
    cfg = _run_config(cfg)
    out = Path(out)
    if split not in (None, "train", "valid", "test"):
        raise RunError(f"--split: expected train, valid or test, got {split!r}")
    check_out_dir(out, overwrite, False)
    if not cfg.data.path:
        raise RunError("--data (data.path): required, the dataset folder")
    device, model, info, opts, data = _prepare(cfg, checkpoint)
    layout, splits, allowed = load_cases(data["path"], data["format"], modality=data["modality"],
                                         valid_fraction=data["valid_fraction"],
                                         seed=cfg.train.seed)
    if split is None:
        split = "test" if any(c.get("label") for c in splits.get("test", [])) else "valid"
    cases = [c for c in splits.get(split, []) if c.get("label")]
    if not cases:
        raise DataError(f"{data['path']}: no labelled cases in split {split!r} ({layout} layout)")
    check_cases(cases)
    comp = inference_transforms(data, allowed)
    rows = []
    t0 = time.time()
    for c in tqdm(cases, desc=f"evaluate {split}", disable=not progress, file=sys.stderr):
        item = apply_transforms(comp, c)
        pred, aff, _ = infer_case(model, item, info, device, cfg.train.amp, opts,
                                  transforms=comp)
        gt = _load_label(c["label"], data.get("foreground"))
        d, h = dice_hd95(torch.from_numpy(pred), torch.from_numpy(gt), voxel_spacing(aff))
        rows.append({"case": c["name"], "dice": d, "hd95_mm": h,
                     "empty_prediction": not bool(pred.any())})
    empty = [r["empty_prediction"] for r in rows]
    res = {"checkpoint": info["checkpoint"], "method": info.get("method"), "split": split,
           "dataset": str(data["path"]), "layout": layout, "cases": rows,
           "dice": summarize([r["dice"] for r in rows], empty=empty),
           "hd95_mm": summarize([r["hd95_mm"] for r in rows], empty=empty), "infer": opts,
           "time_s": round(time.time() - t0, 1)}
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["case", "dice", "hd95_mm", "empty_prediction"])
    w.writeheader()
    for r in rows:
        w.writerow(r)
    write_bytes(out / "metrics.csv", buf.getvalue().encode())
    write_json(out / "metrics.json", res)
    log.info("%s: Dice %.4f ± %.4f, HD95 %.2f ± %.2f mm over %d cases (%d empty predictions)",
             split, res["dice"]["mean"], res["dice"]["std"], res["hd95_mm"]["mean"],
             res["hd95_mm"]["std"], len(rows), res["hd95_mm"]["n_empty"])
    return res


def predict(cfg, checkpoint, inputs, output, *, overwrite: bool = False,
            progress: bool = True) -> list[str]:
    """Segment NIfTI file(s); each output keeps its input's shape, affine, qform/sform codes
    and pixdim (uint8, 1 = foreground).

    ``inputs``: a file or a folder of .nii/.nii.gz; ``output``: a file (single input) or a
    folder (one ``NAME_pred.nii.gz`` per input). Returns the written paths.
    """
    from tqdm.auto import tqdm
    cfg = _run_config(cfg)
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
    cases = [{"image": str(p), "label": None, "name": p.name} for p in files]
    check_cases(cases, need_label=False)
    device, model, info, opts, data = _prepare(cfg, checkpoint)
    comp = inference_transforms(data, {0, 1}, with_label=False)
    written = []
    for c, o in tqdm(list(zip(cases, outs)), desc="predict", disable=not progress,
                     file=sys.stderr):
        item = apply_transforms(comp, c)
        pred, aff, hdr = infer_case(model, item, info, device, cfg.train.amp, opts,
                                    transforms=comp)
        save_mask(pred, aff, hdr, o)
        written.append(str(o))
    log.info("wrote %d prediction(s)", len(written))
    return written
