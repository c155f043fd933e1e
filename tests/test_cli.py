"""The ``lorapt`` tool end to end on tiny generated datasets (tiny UNETR preset, 32³)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
pytest.importorskip("monai")

from test_data import AFFINE, make_case, make_dataset  # noqa: E402
from tsvd.peft.seg import cli  # noqa: E402

TINY = ["--preset", "tiny", "--spacing", "1", "--threads", "2", "--quiet"]


def run(*argv):
    return cli.main([str(a) for a in argv])


def _code(fn, *argv):
    """Exit status of ``fn(*argv)``, whether returned or raised (argparse's SystemExit)."""
    try:
        return fn(*argv)
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny EADC dataset, a 1-epoch pre-training and a 1-epoch LoRA-PT fine-tuning."""
    base = tmp_path_factory.mktemp("cli")
    data = make_dataset(base / "eadc", "eadc", n_train=3, n_valid=1, n_test=2)
    pre = base / "pre"
    assert run("pretrain", "--data", data, "--out", pre, "--epochs", 1, *TINY) == 0
    ft = base / "ft"
    assert run("finetune", "--data", data, "--out", ft, "--epochs", 1, "--method", "lorapt",
               "--rank", 2, "--pretrained", pre / "model_last.safetensors", *TINY) == 0
    return {"base": base, "data": data, "pre": pre, "ft": ft}


def test_help_of_every_subcommand(capsys):
    for sub in ("demo", "pretrain", "finetune", "evaluate", "predict"):
        with pytest.raises(SystemExit) as e:
            cli.main([sub, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert f"lorapt {sub}" in out
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--method", "nope"])


def test_python_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "tsvd.peft", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "finetune" in r.stdout


def test_pretrain_and_finetune_outputs(runs):
    pre, ft = runs["pre"], runs["ft"]
    for f in ("model_last.safetensors", "checkpoint_last.pt", "curves.csv", "curves.png",
              "config.yaml", "run.json", "summary.json"):
        assert (pre / f).is_file(), f
    assert any((pre / "tb").iterdir())
    info = json.loads((ft / "run.json").read_text())
    assert info["method"] == "lorapt" and info["complete"]
    assert info["base_checkpoint"] == str((pre / "model_last.safetensors").resolve())
    adapter = ft / info["artefacts"]["last"]
    assert adapter.name == "adapter_last.safetensors"
    # the adapter (+ the trained decoder) is smaller than the model and points at its base
    assert adapter.stat().st_size < 0.8 * (pre / "model_last.safetensors").stat().st_size
    from tsvd.peft import read_adapter_meta
    meta = read_adapter_meta(str(adapter))
    assert meta["method"] == "lorapt"
    assert Path(meta["base_checkpoint"]).resolve() == (pre / "model_last.safetensors").resolve()
    import csv
    rows = list(csv.DictReader((ft / "curves.csv").open()))
    assert len(rows) == 1 and 0.0 <= float(rows[0]["val_dice"]) <= 1.0
    import yaml
    cfg = yaml.safe_load((ft / "config.yaml").read_text())
    assert cfg["adapter"]["method"] == "lorapt" and cfg["adapter"]["rank"] == 2 and cfg["model"]["preset"] == "tiny"


def test_evaluate_writes_per_case_metrics(runs):
    out = runs["base"] / "ev"
    assert run("evaluate", "--data", runs["data"], "--checkpoint", runs["ft"], "--out", out,
               "--quiet") == 0
    res = json.loads((out / "metrics.json").read_text())
    assert res["split"] == "test" and len(res["cases"]) == 2
    d = [c["dice"] for c in res["cases"]]
    assert res["dice"]["mean"] == pytest.approx(np.mean(d))
    assert all(0 <= x <= 1 for x in d)
    assert (out / "metrics.csv").read_text().startswith("case,dice,hd95_mm")
    # existing output folder without --overwrite: refused, files untouched
    before = (out / "metrics.json").read_bytes()
    assert run("evaluate", "--data", runs["data"], "--checkpoint", runs["ft"], "--out", out) == 2
    assert (out / "metrics.json").read_bytes() == before


def test_predict_keeps_affine_shape_orientation(runs, tmp_path, capsys):
    # an oblique, non-RAS input with a different shape than the training data, its own
    # qform / sform codes, pixdim and units
    aff = AFFINE.copy()
    aff[:3, :3] = aff[:3, :3] @ np.array([[0.98, -0.17, 0], [0.17, 0.98, 0], [0, 0, 1]]) * 1.2
    img, _ = make_case(7, shape=(30, 44, 28))
    src = tmp_path / "in.nii.gz"
    nimg = nib.Nifti1Image(img, aff)
    nimg.set_qform(aff, code=1)
    nimg.set_sform(aff, code=4)
    nimg.header.set_xyzt_units("mm", "sec")
    nib.save(nimg, str(src))
    dst = tmp_path / "out" / "pred.nii.gz"
    assert run("predict", "--checkpoint", runs["ft"] / "adapter_last.safetensors",
               "--input", src, "--output", dst, "--quiet") == 0
    p, s = nib.load(str(dst)), nib.load(str(src))
    assert p.shape == (30, 44, 28)
    np.testing.assert_array_equal(p.affine, s.affine)
    for coded in ("get_qform", "get_sform"):
        qa, qc = getattr(p.header, coded)(coded=True)
        qb, qd = getattr(s.header, coded)(coded=True)
        np.testing.assert_array_equal(qa, qb)
        assert qc == qd
    np.testing.assert_array_equal(p.header["pixdim"], s.header["pixdim"])
    assert p.header.get_xyzt_units() == ("mm", "sec")
    assert nib.aff2axcodes(p.affine) == nib.aff2axcodes(aff)
    assert p.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(p.dataobj))) <= {0, 1}
    # folder input -> one file per image; refuses to overwrite
    assert run("predict", "--checkpoint", runs["ft"], "--input", tmp_path, "--output",
               tmp_path / "o2", "--quiet") == 0
    assert (tmp_path / "o2" / "in_pred.nii.gz").is_file()
    capsys.readouterr()
    assert run("predict", "--checkpoint", runs["ft"], "--input", src, "--output", dst) == 2
    assert "pred.nii.gz: output exists" in capsys.readouterr().err


def test_merged_prediction_equals_unmerged_model(runs):
    """predict merges the adapter: same logits as the adapted (unmerged) model."""
    import torch
    from tsvd.models import build_unetr, load_pretrained
    from tsvd.peft import load_adapter
    from tsvd.peft.seg.infer import load_for_inference
    merged, _ = load_for_inference(runs["ft"])
    m = build_unetr("tiny")
    load_pretrained(m, str(runs["pre"] / "model_last.safetensors"))
    load_adapter(m, str(runs["ft"] / "adapter_last.safetensors"))
    m.eval()
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), m(x), rtol=1e-4, atol=1e-4)


def test_finetune_other_layouts_and_yaml_config(tmp_path, runs):
    import yaml
    data = make_dataset(tmp_path / "msd", "msd", n_train=3, n_valid=0, n_test=0)
    cfg = {"data": {"path": str(data), "format": "auto", "spacing": 1.0},
           "model": {"preset": "tiny", "pretrained": str(runs["pre"] / "model_last.safetensors")},
           "adapter": {"method": "decoder"},
           "train": {"epochs": 1, "batch_size": 1, "samples_per_epoch": 1, "threads": 2}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "o"
    assert run("finetune", "--config", tmp_path / "c.yaml", "--out", out, "--quiet",
               "--lr", "0.0005") == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["adapter"]["method"] == "decoder" and saved["train"]["lr"] == 0.0005   # flag wins
    assert saved["data"]["path"] == str(data)
    assert (out / "adapter_last.safetensors").is_file()
    # unknown key in the YAML: clear error
    (tmp_path / "bad.yaml").write_text("train: {epoch: 3}\n")
    assert run("finetune", "--config", tmp_path / "bad.yaml", "--out", tmp_path / "o3") == 2


def test_bad_inputs_have_clear_messages(runs, tmp_path, capsys):
    data = runs["data"]
    # unknown layout
    (tmp_path / "empty").mkdir()
    assert run("finetune", "--data", tmp_path / "empty", "--out", tmp_path / "x",
               "--method", "full", *TINY) == 2
    assert "no known dataset layout" in capsys.readouterr().err
    # existing output folder
    assert run("finetune", "--data", data, "--out", runs["ft"], "--method", "full", *TINY) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    # checkpoint for another model (tiny weights into the cpu preset)
    assert run("finetune", "--data", data, "--out", tmp_path / "y", "--preset", "cpu",
               "--pretrained", runs["pre"] / "model_last.safetensors", "--epochs", 1) == 2
    err = capsys.readouterr().err
    assert "model_last.safetensors: checkpoint does not fit this model" in err
    # NaN intensities in a training case
    bad = make_dataset(tmp_path / "nan", "eadc", n_train=2, n_valid=1, n_test=0)
    img = nib.load(str(bad / "sub1" / "sub1_img.nii.gz"))
    arr = np.asarray(img.dataobj, np.float32)
    arr[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(arr, img.affine), str(bad / "sub1" / "sub1_img.nii.gz"))
    assert run("finetune", "--data", bad, "--out", tmp_path / "z", "--method", "full",
               "--epochs", 1, *TINY) == 2
    assert "sub1_img.nii.gz: NaN or infinite intensities" in capsys.readouterr().err
    assert not (tmp_path / "z" / "checkpoint_last.pt").exists()
    # missing pretrained file
    assert run("finetune", "--data", data, "--out", tmp_path / "w",
               "--pretrained", tmp_path / "nope.pt", *TINY) == 2
    assert "nope.pt: checkpoint file not found" in capsys.readouterr().err


@pytest.mark.parametrize("flags, named", [
    (["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "0"], "--lr"),
    (["--weight-decay", "-1"], "--weight-decay"), (["--overlap", "1.0"], "--overlap"),
    (["--overlap", "-0.5"], "--overlap"), (["--patch", "7"], "--patch"),
    (["--patch", "0"], "--patch"), (["--dropout", "1.5"], "--dropout"),
    (["--val-every", "0"], "--val-every"), (["--alpha", "-1"], "--alpha"),
    (["--rank", "0"], "--rank"), (["--rank", "-1"], "--rank"),
    (["--spacing", "0"], "--spacing"), (["--spacing", "-1"], "--spacing"),
    (["--average-last", "-3"], "--average-last"), (["--max-train", "0"], "--max-train"),
    (["--samples-per-epoch", "0"], "--samples-per-epoch"), (["--threads", "0"], "--threads"),
    (["--roi", "1,2,3"], "--roi"), (["--adapter-lr", "0"], "--adapter-lr"),
    (["--average-last", "-1"], "--average-last"), (["--batch-size", "0"], "--batch-size"),
    (["--epochs", "0"], "--epochs"), (["--valid-fraction", "1"], "--valid-fraction"),
    (["--keep-components", "-1"], "--keep-components"), (["--tta-flip", "3"], "--tta-flip"),
    (["--flip-axes", "5"], "--flip-axes"), (["--seed", "-1"], "--seed"),
    (["--lr", "abc"], "argument --lr"), (["--method", "nope"], "argument --method"),
    (["--preset", "huge"], "argument --preset"), (["--log-level", "loud"], "argument --log-level"),
])
def test_every_bad_value_is_refused_before_any_file(tmp_path, capsys, flags, named):
    """Issue 16: each value outside its declared range is a one-line error naming the flag
    and the accepted range, exit status 2, and the output folder is not created."""
    out = tmp_path / "never"
    code = _code(run, "finetune", "--data", tmp_path, "--out", out, "--pretrained",
                 tmp_path / "x.pt", *flags)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("lorapt finetune: error: " + named) and "\n" not in err, err
    assert "expected" in err or "invalid" in err
    assert not out.exists()


def test_rank_with_a_method_without_rank_is_refused(runs, tmp_path, capsys):
    out = tmp_path / "r"
    assert run("finetune", "--data", runs["data"], "--out", out, "--method", "full",
               "--rank", 4, *TINY) == 2
    err = capsys.readouterr().err
    assert "--method full" in err and "rank" in err
    assert not (out / "config.yaml").exists()


def test_version_flag(capsys):
    import torch

    import tsvd
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert tsvd.__version__ in out and torch.__version__ in out


def test_rank_larger_than_the_matrices_is_refused(runs, tmp_path, capsys):
    out = tmp_path / "big"
    assert run("finetune", "--data", runs["data"], "--out", out, "--method", "lorapt",
               "--rank", 1000, "--pretrained", runs["pre"] / "model_last.safetensors",
               *TINY) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]     # after the run's info messages
    assert err.startswith("lorapt finetune: error: ") and "--rank" in err and "1000" in err, err
    assert not (out / "config.yaml").exists() and not (out / "checkpoint_last.pt").exists()


@pytest.mark.parametrize("argv, named", [
    (["pretrain", "--out", "O"], "--data"), (["finetune", "--data", "D"], "--out"),
    (["evaluate", "--data", "D", "--out", "O"], "--checkpoint"),
    (["evaluate", "--checkpoint", "C", "--out", "O"], "--data"),
    (["evaluate", "--checkpoint", "C", "--data", "D"], "--out"),
    (["predict", "--input", "I", "--output", "P"], "--checkpoint"),
    (["predict", "--checkpoint", "C", "--output", "P"], "--input"),
    (["predict", "--checkpoint", "C", "--input", "I"], "--output"),
])
def test_missing_required_arguments(tmp_path, capsys, argv, named):
    argv = [str(tmp_path / a) if len(a) == 1 else a for a in argv]
    assert run(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lorapt {argv[0]}: error: {named}") and "required" in err, err
    assert list(tmp_path.iterdir()) == []


def test_log_level_controls_messages(runs, tmp_path, capsys):
    img, _ = make_case(3, shape=(20, 22, 18))
    src = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(img, AFFINE), str(src))
    args = ["predict", "--checkpoint", runs["ft"], "--input", src, "--quiet"]
    assert run(*args, "--output", tmp_path / "a.nii.gz") == 0
    assert "wrote 1 prediction(s)" in capsys.readouterr().err      # info (the default)
    assert run(*args, "--output", tmp_path / "b.nii.gz", "--log-level", "warning") == 0
    assert "wrote" not in capsys.readouterr().err
    assert run("--log-level", "error", *args, "--output", tmp_path / "c.nii.gz") == 0
    assert capsys.readouterr().err == ""


def test_demo_flags_are_checked_before_anything_is_built(tmp_path, capsys):
    for argv, named in [(["--finetune-epochs", "0"], "--finetune-epochs"),
                        (["--pretrain-epochs", "-2"], "--pretrain-epochs"),
                        (["--seed", "-1"], "--seed"), (["--threads", "0"], "--threads"),
                        (["--dataset", "nope"], "--dataset"), (["--device", "tpu"], "--device")]:
        code = run("demo", "--out", tmp_path / "d", "--cache", tmp_path / "c", *argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith(f"lorapt demo: error: {named}"), err
    assert list(tmp_path.iterdir()) == []


def test_adapter_library_option_errors_become_flag_errors(tmp_path, monkeypatch, capsys):
    """A ValueError/TypeError raised by tsvd.peft's option checks is a one-line error naming
    the flag (exit 2); the same exception types raised elsewhere are bugs and propagate."""
    from tsvd.peft import get_method
    from tsvd.peft.seg import train as T

    def adapter_check(cfg, out, **kw):
        get_method(cfg.adapter.method).check_options({"rank": cfg.adapter.rank})

    monkeypatch.setattr(T, "train", adapter_check)
    out = tmp_path / "o"
    assert run("finetune", "--data", tmp_path, "--out", out, "--method", "full",
               "--rank", 4) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorapt finetune: error: --rank") and "\n" not in err, err

    def bug(cfg, out, **kw):
        raise ValueError("an internal bug")

    monkeypatch.setattr(T, "train", bug)
    with pytest.raises(ValueError, match="internal bug"):
        run("finetune", "--data", tmp_path, "--out", out, "--method", "full")
    assert not out.exists()
