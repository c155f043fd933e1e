"""tsvd.models: MONAI UNETR presets and checkpoint loading in the formats of the field."""
from __future__ import annotations

import copy
import os

import pytest
import torch

pytest.importorskip("monai")
pytest.importorskip("safetensors")

from tsvd.models import (PRESETS, build_unetr, load_pretrained, read_state_dict,  # noqa: E402
                         save_checkpoint)
from tsvd.peft import resolve  # noqa: E402


@pytest.fixture(scope="module")
def src():
    """A 'pre-trained' tiny UNETR (random weights, distinct from a fresh build)."""
    torch.manual_seed(123)
    return build_unetr("tiny", dropout_rate=0.0).eval()


def _fresh(**kw):
    torch.manual_seed(7)
    return build_unetr("tiny", dropout_rate=0.0, **kw).eval()


def _same_weights(a, b, skip=()):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if k in sb and not k.startswith(skip))


def test_presets_and_forward():
    from monai.networks.nets import UNETR
    m = build_unetr("tiny")
    assert isinstance(m, UNETR)
    y = m(torch.zeros(2, 1, 32, 32, 32))
    assert y.shape == (2, 2, 32, 32, 32)
    assert build_unetr("tiny", out_channels=4).out.conv.conv.weight.shape[0] == 4
    assert PRESETS["paper"]["img_size"] == (128, 128, 128) and PRESETS["paper"]["hidden_size"] == 768
    with pytest.raises(ValueError, match="preset"):
        build_unetr("huge")
    with pytest.raises(ValueError, match="no argument"):
        build_unetr("tiny", nonsense=1)
    with pytest.raises(ValueError, match="out_channels"):
        build_unetr("tiny", out_channels=0)


def test_cpu_preset_keeps_twelve_blocks_and_tensor_shapes():
    m = build_unetr("cpu")
    plan = resolve(m, need_equal_shapes=True)
    shapes = {g: (gp.n3,) + next(iter(gp.slice_shapes)) for g, gp in plan.group_plans.items()}
    assert shapes == {"attn": (48, 192, 192), "mlp_up": (12, 768, 192),
                      "mlp_down": (12, 192, 768)}


def test_bare_wrapped_and_prefixed_state_dicts(src):
    sd = src.state_dict()
    cases = {
        "bare": sd,
        "state_dict": {"state_dict": sd, "epoch": 3, "best_metric": 0.8},
        "model": {"model": {"module." + k: v for k, v in sd.items()}, "optimizer": {}},
        "compiled": {"_orig_mod." + k: v for k, v in sd.items()},
    }
    for name, obj in cases.items():
        m = _fresh()
        assert not _same_weights(m, src)
        rep = load_pretrained(m, obj)
        assert _same_weights(m, src), name
        assert rep.clean and not rep.missing and not rep.unexpected, (name, str(rep))
    assert load_pretrained(_fresh(), cases["model"]).stripped_prefix == "module."


def test_files_pt_and_safetensors(src, tmp_path):
    save_checkpoint(src, tmp_path / "a.safetensors", meta={"preset": "tiny"})
    save_checkpoint(src, tmp_path / "a.pt", meta={"preset": "tiny"})
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}},
               tmp_path / "dp.pth")
    os.replace(tmp_path / "a.safetensors", tmp_path / "renamed.bin")  # sniffed, not by suffix
    for f in ("renamed.bin", "a.pt", "dp.pth"):
        m = _fresh()
        load_pretrained(m, tmp_path / f)
        assert _same_weights(m, src), f
    sd, fmt = read_state_dict(tmp_path / "a.pt")
    assert fmt == "state_dict" and len(sd) == len(src.state_dict())
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_monai_13_checkpoint_without_norm_cross_attn(src):
    """MONAI <= 1.3 TransformerBlocks have no norm_cross_attn: those keys are missing."""
    sd = {k: v for k, v in src.state_dict().items() if "norm_cross_attn" not in k}
    m = _fresh()
    before = {k: v.clone() for k, v in m.state_dict().items() if "norm_cross_attn" in k}
    assert len(before) == 24                                 # 12 blocks x (weight, bias)
    rep = load_pretrained(m, sd)
    assert sorted(rep.version_keys) == sorted(before) and rep.clean
    now = m.state_dict()
    assert all(torch.equal(now[k], v) for k, v in before.items())   # kept (unused layers)
    assert all(torch.equal(now[k], src.state_dict()[k]) for k in sd)


def test_newer_checkpoint_into_model_without_norm_cross_attn(src):
    """The reverse: a model built by a MONAI without norm_cross_attn gets a newer checkpoint."""
    m = _fresh()
    for b in m.vit.blocks:
        del b.norm_cross_attn
    rep = load_pretrained(m, src.state_dict())
    assert len(rep.unexpected) == 24 and sorted(rep.unexpected) == sorted(rep.version_keys)
    assert rep.clean and _same_weights(m, src)


def test_different_number_of_classes_reinitialises_head(src):
    m = build_unetr("tiny", out_channels=3, dropout_rate=0.0)
    rep = load_pretrained(m, src.state_dict())
    assert sorted(rep.reinitialised) == ["out.conv.conv.bias", "out.conv.conv.weight"]
    assert "re-initialised" in str(rep) and not rep.clean
    assert _same_weights(m, src, skip=("out.",))
    assert m.out.conv.conv.weight.shape[0] == 3
    y = m(torch.zeros(1, 1, 32, 32, 32))
    assert y.shape == (1, 3, 32, 32, 32)


def test_wrong_checkpoint_is_a_clear_error(src, tmp_path):
    other = build_unetr("tiny", hidden_size=64, mlp_dim=128)
    m = _fresh()
    snap = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError, match=r"vit\.blocks\.0\.mlp\.linear1\.weight: checkpoint "
                                         r"\(128, 64\) vs model \(96, 48\)"):
        load_pretrained(m, other.state_dict())
    with pytest.raises(ValueError, match="none of the checkpoint"):
        load_pretrained(m, {"encoder.weight": torch.zeros(3)})
    sd = dict(src.state_dict())
    del sd["vit.blocks.3.attn.qkv.weight"]
    sd["extra.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"1 missing \(vit\.blocks\.3\.attn\.qkv\.weight\).*"
                                         r"1 unexpected \(extra\.weight\)"):
        load_pretrained(m, sd)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in snap.items())   # untouched
    rep = load_pretrained(m, sd, strict=False)
    assert rep.missing == ["vit.blocks.3.attn.qkv.weight"] and rep.unexpected == ["extra.weight"]
    with pytest.raises(ValueError, match="no tensors"):
        load_pretrained(m, {"epoch": 3})
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a readable"):
        load_pretrained(m, tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError):
        load_pretrained(m, tmp_path / "missing.pt")


_CALLED = []


def _evil():
    _CALLED.append(True)
    return {}


class _Evil:
    def __reduce__(self):
        return (_evil, ())


def test_never_unpickles_arbitrary_objects(src, tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": src.state_dict(), "payload": _Evil()}, path)
    with pytest.raises(ValueError, match="refuses to unpickle"):
        load_pretrained(_fresh(), path)
    assert not _CALLED


def test_save_checkpoint_is_atomic(src, tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(src, path)
    good = path.read_bytes()
    with pytest.raises(TypeError, match="meta"):
        save_checkpoint(src, path, meta={"bad": object()})
    with pytest.raises(TypeError, match="tensor"):
        save_checkpoint({"a": torch.zeros(1), "b": 3}, path)
    assert path.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["ckpt.safetensors"]
    from safetensors import safe_open
    save_checkpoint(src, path, meta={"preset": "tiny", "epoch": 2})
    with safe_open(str(path), "pt") as f:
        assert '"epoch": 2' in f.metadata()["tsvd_meta"]
