"""Datasets on disk (EADC, Decathlon, BraTS2021, plain pairs) and the MONAI transform pipelines.

Layouts recognised by :func:`detect_layout` (``--format auto``):

``eadc``   the LoRA-PT authors' layout: ``subN/subN_img.nii.gz`` + ``subN/subN_mask.nii.gz`` and
           list files ``train.txt``, ``valid.txt``, ``test.txt`` (one subject per line: a folder
           name like ``sub1`` or a path to the image file, relative to the dataset folder).
``msd``    Medical Segmentation Decathlon: ``dataset.json`` (``training``: list of
           ``{"image", "label"}``, ``labels``: value -> name), ``imagesTr/``, ``labelsTr/``.
``brats``  BraTS2021: ``BraTS2021_xxxxx/BraTS2021_xxxxx_{t1,t1ce,t2,flair,seg}.nii.gz``. One
           channel (``--modality``, default t1) and tumour (labels 1, 2, 4) vs background.
``nifti``  plain pairs: ``images/NAME.nii.gz`` + ``labels/NAME.nii.gz`` (same file names).

Each layout yields ``{"train": [...], "valid": [...], "test": [...]}`` lists of cases
``{"image": str, "label": str | None, "name": str}``. A missing validation split is drawn (seeded)
from the training cases; a missing test split is empty.

Every file is checked before any training (headers: readable, 3-D, image/label shapes and
affines equal), and the voxel data when the pipeline first loads a case (NaN/inf intensities,
label values outside the layout's set, an empty label volume in a training case): each error
is a :class:`DataError` naming the file.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

__all__ = ["DataError", "detect_layout", "load_cases", "check_cases", "LAYOUTS",
           "train_transforms", "eval_transforms", "world_box_to_voxels", "data_error_in",
           "cache_cases", "TrainCrops"]

LAYOUTS = ("eadc", "msd", "brats", "nifti")
NII = (".nii.gz", ".nii")


class DataError(ValueError):
    """Bad input data; the message names the file and the problem."""


def _is_nii(p: Path) -> bool:
    return p.name.endswith(NII)


def _strip(name: str) -> str:
    for e in NII:
        if name.endswith(e):
            return name[: -len(e)]
    return name


def detect_layout(root) -> str:
    """Name of the layout of dataset folder ``root`` (one of :data:`LAYOUTS`)."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: dataset folder does not exist")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (a dataset is a folder in one of the layouts "
                        f"{', '.join(LAYOUTS)})")
    if (root / "dataset.json").is_file() and (root / "imagesTr").is_dir():
        return "msd"
    if any((root / f"{s}.txt").is_file() for s in ("train", "valid", "test")):
        return "eadc"
    if any(p.is_dir() and p.name.startswith("BraTS") and any(p.glob(f"{p.name}_seg.nii*"))
           for p in root.iterdir()):
        return "brats"
    if (root / "images").is_dir() and (root / "labels").is_dir():
        return "nifti"
    raise DataError(
        f"{root}: no known dataset layout. Expected one of: eadc (train.txt/valid.txt/test.txt + "
        f"subN/subN_img.nii.gz, subN/subN_mask.nii.gz), msd (dataset.json + imagesTr/ + "
        f"labelsTr/), brats (BraTS2021_xxxxx/BraTS2021_xxxxx_{{t1,...,seg}}.nii.gz), nifti "
        f"(images/NAME.nii.gz + labels/NAME.nii.gz)")


def _need(path: Path, what: str) -> str:
    if not path.is_file():
        raise DataError(f"{path}: {what} file not found")
    return str(path)


def _eadc(root: Path):
    splits = {}
    for split in ("train", "valid", "test"):
        f = root / f"{split}.txt"
        if not f.is_file():
            continue
        cases = []
        for line in f.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = root / line
            if _is_nii(p):
                img = p
                stem = _strip(p.name)
                stem = stem[:-4] if stem.endswith("_img") else stem
                mask = p.parent / f"{stem}_mask{'.nii.gz' if p.name.endswith('.gz') else '.nii'}"
                name = stem
            else:
                name = p.name
                img = p / f"{name}_img.nii.gz"
                if not img.exists() and (p / f"{name}_img.nii").exists():
                    img = p / f"{name}_img.nii"
                mask = p / f"{name}_mask.nii.gz"
                if not mask.exists() and (p / f"{name}_mask.nii").exists():
                    mask = p / f"{name}_mask.nii"
            cases.append({"image": _need(img, f"image of subject {name!r} listed in {f}"),
                          "label": str(mask) if mask.exists() else None, "name": name})
        splits[split] = cases
    return splits, {0, 1}


def _msd(root: Path):
    meta_f = root / "dataset.json"
    try:
        meta = json.loads(meta_f.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{meta_f}: unreadable dataset.json ({e})") from None
    if not isinstance(meta, dict) or "training" not in meta:
        raise DataError(f"{meta_f}: no 'training' list")
    labels = meta.get("labels", {"0": "background", "1": "foreground"})
    try:
        allowed = {int(k) for k in labels} if isinstance(labels, dict) else {0, 1}
    except ValueError:
        raise DataError(f"{meta_f}: 'labels' keys must be integer label values") from None
    train = []
    for item in meta["training"]:
        img = root / item["image"]
        lab = root / item["label"]
        train.append({"image": _need(img, f"image listed in {meta_f}"),
                      "label": _need(lab, f"label listed in {meta_f}"),
                      "name": _strip(img.name)})
    test = []
    for item in meta.get("test", []):
        img = root / (item if isinstance(item, str) else item["image"])
        test.append({"image": _need(img, f"test image listed in {meta_f}"), "label": None,
                     "name": _strip(img.name)})
    return {"train": train, "test": test}, allowed


def _brats(root: Path, modality: str):
    if modality not in ("t1", "t1ce", "t2", "flair"):
        raise DataError(f"modality must be one of t1, t1ce, t2, flair, got {modality!r}")
    cases = []
    for p in sorted(root.iterdir()):
        if not (p.is_dir() and p.name.startswith("BraTS")):
            continue
        img = next(iter(sorted(p.glob(f"{p.name}_{modality}.nii*"))), p / f"{p.name}_{modality}.nii.gz")
        seg = next(iter(sorted(p.glob(f"{p.name}_seg.nii*"))), None)
        if seg is None:
            continue
        cases.append({"image": _need(img, f"{modality} image of {p.name}"), "label": str(seg),
                      "name": p.name})
    return {"train": cases}, {0, 1, 2, 3, 4}


def _nifti(root: Path):
    cases = []
    for img in sorted((root / "images").iterdir()):
        if not _is_nii(img):
            continue
        lab = root / "labels" / img.name
        cases.append({"image": str(img), "label": _need(lab, f"label for {img}"),
                      "name": _strip(img.name)})
    if not cases:
        raise DataError(f"{root / 'images'}: no .nii/.nii.gz images")
    return {"train": cases}, {0, 1}


def load_cases(root, layout: str = "auto", *, modality: str = "t1", valid_fraction: float = 0.2,
               seed: int = 0):
    """Read a dataset folder: (layout, splits dict, allowed label values).

    ``splits``: ``{"train", "valid", "test"}`` -> list of case dicts. No file data is read here
    except small list files; use :func:`check_cases` for the header checks.
    """
    root = Path(root)
    if layout in (None, "auto"):
        layout = detect_layout(root)
    elif layout not in LAYOUTS:
        raise DataError(f"format must be auto or one of {', '.join(LAYOUTS)}, got {layout!r}")
    elif not root.is_dir():
        raise DataError(f"{root}: dataset folder does not exist")
    if layout == "eadc":
        splits, allowed = _eadc(root)
    elif layout == "msd":
        splits, allowed = _msd(root)
    elif layout == "brats":
        splits, allowed = _brats(root, modality)
    else:
        splits, allowed = _nifti(root)
    train = splits.get("train", [])
    if not splits.get("valid") and train:
        if len(train) < 2:
            splits["valid"] = []
        else:
            idx = list(range(len(train)))
            random.Random(seed).shuffle(idx)
            nv = max(1, int(round(valid_fraction * len(train))))
            vset = set(idx[:nv])
            splits["valid"] = [c for i, c in enumerate(train) if i in vset]
            splits["train"] = [c for i, c in enumerate(train) if i not in vset]
    splits.setdefault("test", [])
    splits.setdefault("valid", [])
    splits.setdefault("train", [])
    return layout, splits, allowed


def _header(path: str):
    import nibabel as nib
    try:
        img = nib.load(path)
        shape = img.shape
        aff = img.affine
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as e:  # nibabel raises several types for broken files
        raise DataError(f"{path}: unreadable NIfTI ({type(e).__name__}: {e})") from None
    return shape, aff


def check_cases(cases, *, need_label: bool = True):
    """Header checks, before any work: every file readable, a 3-D volume (or 4-D with one
    channel), label shape and affine equal to the image's. Raises :class:`DataError`."""
    for c in cases:
        ishape, iaff = _header(c["image"])
        if not (len(ishape) == 3 or (len(ishape) == 4 and ishape[3] == 1)):
            raise DataError(f"{c['image']}: expected a 3-D volume, got shape {ishape}")
        if c.get("label") is None:
            if need_label:
                raise DataError(f"{c['image']}: no label file for this case")
            continue
        lshape, laff = _header(c["label"])
        if tuple(lshape[:3]) != tuple(ishape[:3]):
            raise DataError(f"{c['label']}: label shape {tuple(lshape)} differs from image "
                            f"{c['image']} shape {tuple(ishape)}")
        if not np.allclose(laff, iaff, atol=1e-3, rtol=1e-4):
            raise DataError(f"{c['label']}: label affine differs from the affine of image "
                            f"{c['image']}:\n{np.round(laff, 4)}\nvs\n{np.round(iaff, 4)}")


def world_box_to_voxels(affine, centre_mm, size_vox):
    """Voxel start index (3 ints) of a box of ``size_vox`` voxels centred on world point
    ``centre_mm`` in an image with ``affine`` (4×4)."""
    aff = np.asarray(affine, dtype=np.float64)
    c = np.linalg.solve(aff, np.r_[np.asarray(centre_mm, dtype=np.float64), 1.0])[:3]
    return [int(round(ci - s / 2.0)) for ci, s in zip(c, size_vox)]


# ------------------------------------------------------------------------------------------
# MONAI transforms
# ------------------------------------------------------------------------------------------
def _transform_classes():
    from monai.transforms import MapTransform

    class CheckCased(MapTransform):
        """Checks the voxel data of a freshly loaded case (before any resampling)."""

        def __init__(self, allowed, require_foreground):
            super().__init__(keys=["image"], allow_missing_keys=True)
            self.allowed = set(int(a) for a in allowed)
            self.require_foreground = require_foreground

        def __call__(self, d):
            import torch
            img = d["image"]
            if not torch.isfinite(torch.as_tensor(img)).all():
                raise DataError(f"{d['path_image']}: NaN or infinite intensities")
            if "label" in d:
                lab = torch.as_tensor(d["label"])
                vals = set(int(v) for v in torch.unique(lab).tolist())
                if lab.is_floating_point() and not torch.equal(lab, lab.round()):
                    raise DataError(f"{d['path_label']}: non-integer label values")
                bad = vals - self.allowed
                if bad:
                    raise DataError(f"{d['path_label']}: label values {sorted(bad)} outside the "
                                    f"expected set {sorted(self.allowed)}")
                if self.require_foreground and not (vals - {0}):
                    raise DataError(f"{d['path_label']}: empty label volume (no foreground) in a "
                                    f"training case")
            return d

    class Binarized(MapTransform):
        """label -> 1 where the label value is in ``foreground`` (default: any nonzero)."""

        def __init__(self, foreground=None):
            super().__init__(keys=["label"], allow_missing_keys=True)
            self.foreground = foreground

        def __call__(self, d):
            import torch
            if "label" in d:
                lab = d["label"]
                if self.foreground:
                    fg = torch.zeros_like(lab, dtype=torch.bool)
                    for v in self.foreground:
                        fg |= lab == v
                else:
                    fg = lab != 0
                d["label"] = fg.to(torch.float32)   # a MetaTensor keeps lab's affine
            return d

    class CropWorldBoxd(MapTransform):
        """Crop (and zero-pad) a box of ``size`` voxels centred on world point ``centre_mm``."""

        def __init__(self, keys, centre_mm, size):
            super().__init__(keys=keys, allow_missing_keys=True)
            self.centre_mm = centre_mm
            self.size = [int(s) for s in size]

        def __call__(self, d):
            from monai.transforms import SpatialCrop
            aff = d["image"].affine
            start = world_box_to_voxels(aff, self.centre_mm, self.size)
            shape = d["image"].shape[1:]
            lo = [max(0, s) for s in start]
            hi = [min(n, s + z) for s, z, n in zip(start, self.size, shape)]
            if any(h <= l for l, h in zip(lo, hi)):
                raise DataError(f"{d.get('path_image', '?')}: the region of interest centred at "
                                f"{self.centre_mm} mm lies outside the image")
            pad = [(l - s, s + z - h) for s, z, l, h in zip(start, self.size, lo, hi)]
            for k in self.key_iterator(d):
                x = SpatialCrop(roi_start=lo, roi_end=hi)(d[k])
                if any(p != (0, 0) for p in pad):
                    from monai.transforms import BorderPad
                    x = BorderPad(spatial_border=[v for p in pad for v in p])(x)
                d[k] = x
            return d

    class AddPaths(MapTransform):
        def __init__(self):
            super().__init__(keys=["image"])

        def __call__(self, d):
            d = dict(d)
            d["path_image"] = d["image"]
            if d.get("label") is not None:
                d["path_label"] = d["label"]
            else:
                d.pop("label", None)
            return d

    return CheckCased, Binarized, CropWorldBoxd, AddPaths


def _deterministic(cfg, allowed, require_foreground, with_label=True, margin: int = 0):
    from monai.transforms import (EnsureChannelFirstd, LoadImaged, NormalizeIntensityd,
                                  Orientationd, Spacingd, SpatialPadd, EnsureTyped)
    CheckCased, Binarized, CropWorldBoxd, AddPaths = _transform_classes()
    keys = ["image", "label"] if with_label else ["image"]
    sp = cfg["spacing"]
    t = [AddPaths(),
         LoadImaged(keys=keys, image_only=True, allow_missing_keys=True),
         EnsureChannelFirstd(keys=keys, allow_missing_keys=True),
         CheckCased(allowed, require_foreground),
         Orientationd(keys=keys, axcodes="RAS", allow_missing_keys=True, labels=None)]
    if sp:
        t.append(Spacingd(keys=keys, pixdim=[float(sp)] * 3 if np.isscalar(sp) else list(sp),
                          mode=["bilinear", "nearest"][: len(keys)], allow_missing_keys=True))
    t.append(Binarized(cfg.get("foreground")))
    t.append(NormalizeIntensityd(keys=["image"], nonzero=True, channel_wise=True))
    roi = cfg.get("roi")
    if roi:
        t.append(CropWorldBoxd(keys, roi["centre_mm"], [int(z) + margin for z in roi["size"]]))
    t.append(SpatialPadd(keys=keys, spatial_size=cfg["patch"], allow_missing_keys=True))
    t.append(EnsureTyped(keys=keys, dtype=np.float32, allow_missing_keys=True, track_meta=True))
    return t


def train_transforms(cfg, allowed):
    """(deterministic, random) lists of MONAI dict transforms for training.

    Deterministic (cached once per case): load, channel first, data checks, RAS orientation,
    ``spacing`` mm resampling, binarised label, z-score on nonzero (brain) voxels, optional
    world-coordinate region of interest enlarged by ``crop_margin`` voxels per axis, pad to the
    patch size. Random: a ``patch`` crop (inside the enlarged region, which it can leave by up
    to ``crop_margin/2`` voxels on a side; without a region, foreground-centred with
    probability ``pos_fraction``), flips along ``flip_axes``, intensity shift ±0.1 (std
    units), scale ±0.1.
    """
    from monai.transforms import (RandCropByPosNegLabeld, RandFlipd, RandScaleIntensityd,
                                  RandShiftIntensityd, RandSpatialCropd)
    margin = int(cfg.get("crop_margin") or 0) if cfg.get("roi") else 0
    det = _deterministic(cfg, allowed, require_foreground=True, margin=margin)
    rnd = []
    if cfg.get("roi"):
        rnd.append(RandSpatialCropd(keys=["image", "label"], roi_size=cfg["patch"],
                                    random_size=False))
    else:
        pf = float(cfg.get("pos_fraction", 0.5))
        rnd.append(RandCropByPosNegLabeld(keys=["image", "label"], label_key="label",
                                          spatial_size=cfg["patch"], pos=pf, neg=1 - pf,
                                          num_samples=1, image_key="image", image_threshold=0))
    for ax in cfg.get("flip_axes", [0]):
        rnd.append(RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=int(ax)))
    rnd.append(RandShiftIntensityd(keys=["image"], offsets=0.1, prob=0.5))
    rnd.append(RandScaleIntensityd(keys=["image"], factors=0.1, prob=0.5))
    return det, rnd


def eval_transforms(cfg, allowed, with_label=True):
    """Deterministic transforms for validation/evaluation/prediction (see train_transforms)."""
    return _deterministic(cfg, allowed, require_foreground=False, with_label=with_label)


# ------------------------------------------------------------------------------------------
# datasets
# ------------------------------------------------------------------------------------------
def data_error_in(exc: BaseException):
    """The :class:`DataError` in ``exc``'s chain of causes (MONAI wraps a transform's error
    in ``RuntimeError("applying transform ...")``), or None."""
    while exc is not None:
        if isinstance(exc, DataError):
            return exc
        exc = exc.__cause__
    return None


def cache_cases(cases, transforms, *, workers: int = 1, copy: bool = True):
    """MONAI :class:`~monai.data.CacheDataset` holding every case after the deterministic
    ``transforms`` (loaded and preprocessed once, ``workers`` threads); a case that cannot be
    loaded is a :class:`DataError` naming its file. ``copy``: each access returns a copy."""
    from monai.data import CacheDataset
    from monai.transforms import Compose, Transform

    from .runtime import apply_transforms

    class Checked(Transform):     # a (deterministic) Transform: CacheDataset caches its output
        def __init__(self, comp):
            self.comp = comp

        def __call__(self, case):
            return apply_transforms(self.comp, case)
    try:
        return CacheDataset([dict(c) for c in cases], Compose([Checked(Compose(transforms))]),
                            cache_rate=1.0, num_workers=max(1, int(workers)), progress=False,
                            copy_cache=copy)
    except Exception as e:
        err = data_error_in(e)
        if err is None:
            raise
        raise DataError(str(err)) from None


class TrainCrops:
    """The random training samples of one epoch, a map-style dataset for
    :class:`torch.utils.data.DataLoader`.

    Sample ``k`` of epoch ``e`` is case ``perm_e[k]`` (``perm_e``: the cases repeated to
    ``length`` and permuted by a generator seeded with ``(seed, e)``) passed through the
    random ``transforms`` seeded by ``(seed, e, k)``; so the samples depend neither on the
    number of DataLoader workers nor on the number of processes, and a resumed run draws
    the same ones. Returns ``(image, label)`` float tensors of shape ``(C, *patch)`` and
    ``(1, *patch)``.

    ``cached``: the cases after the deterministic transforms (:func:`cache_cases`).
    Call :meth:`set_epoch` before iterating a DataLoader over it."""

    def __init__(self, cached, transforms, seed: int, length: int):
        from monai.transforms import Compose
        if length < 1:
            raise ValueError(f"length: expected >= 1, got {length}")
        self.cached = cached
        self.transforms = Compose(transforms)
        self.seed = int(seed)
        self.length = int(length)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.perm = np.random.default_rng([self.seed, self.epoch]).permutation(
            np.resize(np.arange(len(self.cached)), self.length))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int):
        from .runtime import plain
        s = (self.seed * 1_000_003 + self.epoch * 10_007 + int(k)) % (2 ** 31)
        self.transforms.set_random_state(seed=s)
        item = self.cached[int(self.perm[k])]
        out = self.transforms({"image": item["image"], "label": item["label"]})
        if isinstance(out, list):
            out = out[0]
        return plain(out["image"]).float(), plain(out["label"]).float()
