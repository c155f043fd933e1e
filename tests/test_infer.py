"""Inference pieces against their definitions: test-time flip averaging, keep-largest
components, the precedence of post-processing settings, mapping a prediction back onto an
oblique input grid with MONAI's inverse transforms (with and without a region of interest),
and loading a plain model file (e.g. training's ``model_avg.safetensors``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")
pytest.importorskip("monai")

from test_data import AFFINE, make_case  # noqa: E402
from tsvd.peft.seg import infer as I  # noqa: E402
from tsvd.peft.seg.config import ConfigError, RunConfig  # noqa: E402
from tsvd.peft.seg.runtime import RunError  # noqa: E402

CPU = torch.device("cpu")


class Pointwise(torch.nn.Module):
    """Logits (-z, z) with z = x + ramp along the first spatial axis: not mirror-symmetric,
    so a flip that is not undone exactly would show."""

    def __init__(self, ramp):
        super().__init__()
        self.ramp = ramp

    def forward(self, x):
        z = x + self.ramp.view(1, 1, -1, 1, 1).to(x.dtype)
        return torch.cat([-z, z], 1)


def _sig(z):
    return 1 / (1 + np.exp(-2 * z))        # softmax of (-z, z), class 1


def test_predict_mask_flip_tta_is_the_average_of_mirrored_softmaxes():
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(16, 16, 16))
    ramp = torch.linspace(-1.0, 1.0, 16)
    r = ramp.double().numpy()[:, None, None]
    image = torch.from_numpy(vol[None].astype(np.float32))
    model = Pointwise(ramp).eval()
    kw = dict(patch=[16, 16, 16], overlap=0.25, device=CPU)
    plain = I.predict_mask(model, image, **kw)
    assert plain.dtype == torch.bool and plain.shape == (16, 16, 16)
    np.testing.assert_array_equal(plain.numpy(), vol + r > 0)
    tta = I.predict_mask(model, image, **kw, opts={"tta_flip": [0], "keep_components": 0})
    # the mirrored prediction, mirrored back, sees the ramp reversed
    want = (_sig(vol + r) + _sig(vol - r)) / 2 > 0.5
    assert (want != plain.numpy()).any()        # the test can tell TTA from no TTA
    np.testing.assert_array_equal(tta.numpy(), want)


def test_predict_mask_keeps_the_largest_components():
    vol = -np.ones((20, 20, 20))
    vol[1:6, 1:6, 1:6] = 1          # 125 voxels
    vol[10:14, 10:14, 10:14] = 1    # 64
    vol[16:18, 1:3, 15:17] = 1      # 8
    image = torch.from_numpy(vol[None].astype(np.float32))
    model = Pointwise(torch.zeros(20)).eval()
    kw = dict(patch=[20, 20, 20], overlap=0.0, device=CPU)
    assert int(I.predict_mask(model, image, **kw).sum()) == 125 + 64 + 8
    two = I.predict_mask(model, image, **kw, opts={"tta_flip": [], "keep_components": 2})
    want = vol > 0
    want[16:18, 1:3, 15:17] = False
    np.testing.assert_array_equal(two.numpy(), want)
    one = I.predict_mask(model, image, **kw, opts={"tta_flip": [], "keep_components": 1})
    assert int(one.sum()) == 125 and bool(one[1:6, 1:6, 1:6].all())


def test_infer_options_precedence_and_errors():
    rec = {"tta_flip": [0], "keep_components": 2}
    assert I.infer_options(None, rec) == rec
    cfg = RunConfig.from_dict({"infer": {"keep_components": 0}})
    assert I.infer_options(cfg, rec) == {"tta_flip": [0], "keep_components": 0}
    assert I.infer_options(cfg.to_dict(), rec) == {"tta_flip": [0], "keep_components": 0}
    assert I.infer_options(RunConfig()) == {"tta_flip": [], "keep_components": 0}
    for bad, msg in [({"tta_flip": [3]}, r"tta.flip"), ({"tta_flip": 0}, r"tta.flip"),
                     ({"keep_components": -1}, r"keep.components"),
                     ({"keep_components": 1.5}, r"keep.components")]:
        with pytest.raises(ConfigError, match=msg):            # refused by the config
            I.infer_options({"infer": bad})
        with pytest.raises(RunError, match=msg):               # or as a recorded setting
            I.infer_options(None, bad)


def _oblique(tmp_path, shape=(30, 44, 28)):
    aff = AFFINE.copy()
    aff[:3, :3] = aff[:3, :3] @ np.array([[0.98, -0.17, 0], [0.17, 0.98, 0], [0, 0, 1]]) * 1.2
    img, _ = make_case(7, shape=shape)
    path = tmp_path / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(img, aff), str(path))
    return path, aff


def _field(affine, shape):
    """A smooth function of the world coordinates, sampled on a grid: (X, Y, Z) float64."""
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    w = ijk @ np.asarray(affine, np.float64)[:3, :3].T + np.asarray(affine, np.float64)[:3, 3]
    return np.sin(w[..., 0] / 7.0) + np.cos(w[..., 1] / 5.0) + 0.02 * w[..., 2]


@pytest.mark.parametrize("roi", [None, {"centre_mm": [12.0, -8.0, -4.0], "size": [20, 20, 20]}])
def test_to_input_grid_inverts_the_preprocessing(tmp_path, roi):
    """Values given as a function of world position on the preprocessed (RAS, 1 mm,
    ROI-cropped, padded) grid come back on the oblique input grid as the same function; with
    a region of interest, voxels outside it are 0 (the network never saw them)."""
    path, aff = _oblique(tmp_path)
    data = {"spacing": 1.0, "roi": roi, "patch": [32, 32, 32], "foreground": None}
    comp = I.inference_transforms(data, {0, 1}, with_label=False)
    item = comp({"image": str(path), "label": None})
    x = item["image"]
    f = torch.from_numpy(_field(x.affine.numpy(), x.shape[1:])).float()
    back = I.to_input_grid(torch.stack([f, -f]), item, comp)
    assert back.shape == (2, 30, 44, 28) and type(back) is torch.Tensor
    want = _field(aff, (30, 44, 28))
    got = back[0].double().numpy()
    from scipy import ndimage
    inside = got != 0
    interior = ndimage.binary_erosion(inside, iterations=2)
    assert interior.sum() > 1000
    # bilinear interpolation of a smooth field: small, not exact
    assert np.abs(got - want)[interior].max() < 0.02
    if roi is None:
        assert inside.all()                # the whole input is covered, edges included
    else:
        # the ROI box in input voxels: everything clearly outside it is 0
        ijk = np.stack(np.meshgrid(*[np.arange(s) for s in (30, 44, 28)], indexing="ij"), -1)
        w = ijk @ aff[:3, :3].T + aff[:3, 3]
        ras = np.linalg.inv(x.affine.numpy())         # world -> preprocessed voxels
        v = w @ ras[:3, :3].T + ras[:3, 3]
        box = np.all((v > -1) & (v < 32), axis=-1)
        assert not inside[~box].any() and inside.sum() < 0.6 * inside.size


def test_infer_case_on_an_oblique_input_maps_the_mask_back(tmp_path):
    """End to end through infer_case: a model that thresholds the image itself (z = x) predicts
    the voxels where the normalised input is positive; mapped back onto the oblique input
    grid, the mask must agree with the input's own threshold almost everywhere (resampling
    at the boundary aside)."""
    path, aff = _oblique(tmp_path)
    img = 5.0 + _field(aff, (30, 44, 28))        # smooth, nonzero everywhere
    nib.save(nib.Nifti1Image(img.astype(np.float32), aff), str(path))
    data = {"spacing": 1.2, "roi": None, "patch": [32, 32, 32], "foreground": None}
    comp = I.inference_transforms(data, {0, 1}, with_label=False)
    item = comp({"image": str(path), "label": None})
    info = {"data": {"patch": [32, 32, 32]}, "sw_overlap": 0.25}
    mask, a, hdr = I.infer_case(Pointwise(torch.zeros(32)).eval(), item, info, CPU,
                                transforms=comp)
    assert mask.shape == (30, 44, 28) and mask.dtype == np.uint8
    np.testing.assert_array_equal(a, nib.load(str(path)).affine)
    want = img > img.mean()                 # NormalizeIntensity: positive = above the mean
    assert 0.2 < want.mean() < 0.8
    agree = (mask.astype(bool) == want).mean()
    assert agree > 0.98, agree
    with pytest.raises(ValueError, match="transforms"):
        I.infer_case(Pointwise(torch.zeros(32)).eval(), item, info, CPU)


def test_load_for_inference_of_a_plain_model_file(tmp_path):
    """A weights file without run.json (e.g. a copied ``model_avg.safetensors``): the preset
    comes from the config; the weights are the file's."""
    from tsvd.models import build_unetr, save_checkpoint
    m = build_unetr("tiny")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    f = save_checkpoint(m, tmp_path / "model_avg.safetensors", meta={"preset": "tiny"})
    loaded, info = I.load_for_inference(f, RunConfig.from_dict({"model": {"preset": "tiny"}}))
    assert info["checkpoint"] == str(f) and info["data"]["patch"] == [32, 32, 32]
    m.eval()
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x))
    with pytest.raises(RunError, match="checkpoint not found"):
        I.load_for_inference(tmp_path / "nope.safetensors")
    with pytest.raises(RunError, match="no run.json"):
        I.load_for_inference(tmp_path)


def test_an_unreadable_adapter_header_is_an_error_not_a_model_file(tmp_path):
    """An adapter file whose header the library refuses (old format, edited) is reported as
    such, not loaded as if it were a plain model checkpoint."""
    import json as _json

    import pytest as _pytest
    from safetensors.torch import save_file

    from tsvd.peft.seg.infer import load_for_inference
    from tsvd.peft.seg.runtime import RunError
    path = tmp_path / "adapter_last.safetensors"
    save_file({"w": torch.zeros(2)}, str(path),
              metadata={"tsvd_peft": _json.dumps({"format_version": 1, "method": "lorapt",
                                                  "config": {}}), "format": "pt"})
    with _pytest.raises(RunError, match="adapter_last.safetensors: .*format 1"):
        load_for_inference(path)


# ------------------------------------------------------------------------------------------
# the same post-processing through infer_case (a file's case: MetaTensor with its affine)
# ------------------------------------------------------------------------------------------
def _case(tmp_path, vol):
    import nibabel as nib
    from monai.data import MetaTensor
    aff = np.diag([1.5, 1.5, 1.5, 1.0])
    aff[:3, 3] = [-10.0, 4.0, 2.0]
    path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(vol.astype(np.float32), aff), str(path))
    item = {"image": MetaTensor(torch.from_numpy(vol[None].astype(np.float32)),
                                affine=torch.from_numpy(aff)), "path_image": str(path)}
    info = {"data": {"patch": list(vol.shape)}, "sw_overlap": 0.25}
    return item, info


def test_infer_case_flip_tta_matches_definition(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(16, 16, 16))
    ramp = torch.linspace(-1.0, 1.0, 16)
    item, info = _case(tmp_path, vol)
    model = Pointwise(ramp).eval()
    r = ramp.double().numpy()[:, None, None]
    plain, _, _ = I.infer_case(model, item, info, torch.device("cpu"))
    np.testing.assert_array_equal(plain, (vol + r > 0).astype(np.uint8))
    tta, _, _ = I.infer_case(model, item, info, torch.device("cpu"),
                              opts={"tta_flip": [0], "keep_components": 0})

    def sig(z):
        return 1 / (1 + np.exp(-2 * z))        # softmax of (-z, z), class 1
    # the mirrored prediction, mirrored back, sees the ramp reversed
    want = (sig(vol + r) + sig(vol - r)) / 2 > 0.5
    assert (want != (plain > 0)).any()         # the test can tell TTA from no TTA
    np.testing.assert_array_equal(tta, want.astype(np.uint8))


def test_infer_case_keeps_the_largest_components(tmp_path):
    vol = -np.ones((20, 20, 20))
    vol[1:6, 1:6, 1:6] = 1          # 125 voxels
    vol[10:14, 10:14, 10:14] = 1    # 64
    vol[16:18, 1:3, 15:17] = 1      # 8
    item, info = _case(tmp_path, vol)
    model = Pointwise(torch.zeros(20)).eval()
    cpu = torch.device("cpu")
    every, _, _ = I.infer_case(model, item, info, cpu)
    assert every.sum() == 125 + 64 + 8
    two, _, _ = I.infer_case(model, item, info, cpu, opts={"tta_flip": [], "keep_components": 2})
    want = (vol > 0)
    want[16:18, 1:3, 15:17] = False
    np.testing.assert_array_equal(two, want.astype(np.uint8))
    one, _, _ = I.infer_case(model, item, info, cpu, opts={"tta_flip": [], "keep_components": 1})
    assert one.sum() == 125 and one[1:6, 1:6, 1:6].all()
