"""Packaging: the folders ``peft/`` and ``models/`` are importable as ``tsvd.peft`` and
``tsvd.models`` (from the repo root and from elsewhere, editable and regular install),
never as top-level ``peft`` / ``models``; ``tsvd.__version__`` matches the installed
metadata; the reference implementation is importable on its own.

The subprocesses run with ``cwd`` outside the repo so that the current directory cannot
make the imports work by accident.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


import tsvd

REPO = Path(__file__).resolve().parents[1]
PKG = Path(tsvd.__file__).resolve().parent
EDITABLE = PKG == REPO / "tsvd"

PROBE = r"""
import importlib.util, json, sys
import tsvd, tsvd.peft, tsvd.models
from tsvd.reference import treconstruct
def origin(name):
    spec = importlib.util.find_spec(name)
    return None if spec is None else (spec.origin or str(list(spec.submodule_search_locations or [])))
print(json.dumps({
    "tsvd": tsvd.__file__, "peft": tsvd.peft.__file__, "models": tsvd.models.__file__,
    "peft_name": tsvd.peft.__name__, "models_name": tsvd.models.__name__,
    "version": tsvd.__version__, "treconstruct": treconstruct.__module__,
    "top_peft": origin("peft"), "top_models": origin("models"),
    "loaded_top": [m for m in ("peft", "models") if m in sys.modules
                   and sys.modules[m] in (tsvd.peft, tsvd.models)],
}))
"""


def _probe(cwd, env_extra=None) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _inside(path, folder) -> bool:
    return path is not None and Path(folder).resolve() in Path(path).resolve().parents


def _check_layout(info: dict, pkg_dir: Path, src_root: Path | None):
    """tsvd.peft / tsvd.models come from the repo's peft/ and models/ folders (editable)
    or from pkg_dir/peft, pkg_dir/models (regular install)."""
    assert Path(info["tsvd"]).resolve() == pkg_dir / "__init__.py"
    assert info["peft_name"] == "tsvd.peft" and info["models_name"] == "tsvd.models"
    root = src_root if src_root is not None else pkg_dir
    assert Path(info["peft"]).resolve() == root / "peft" / "__init__.py"
    assert Path(info["models"]).resolve() == root / "models" / "__init__.py"
    assert info["treconstruct"] == "tsvd.reference"
    assert info["version"] == tsvd.__version__
    # `peft` / `models` are not top-level names of ours (import peft may be HuggingFace's)
    for key in ("top_peft", "top_models"):
        assert not _inside(info[key], REPO), f"{key} resolves into the repo: {info[key]}"
        assert not _inside(info[key], pkg_dir), f"{key} resolves into tsvd: {info[key]}"
    assert info["loaded_top"] == []


def test_subpackages_import_from_another_directory(tmp_path):
    info = _probe(tmp_path)
    _check_layout(info, PKG, REPO if EDITABLE else None)


def test_subpackages_import_from_repo_root():
    info = _probe(REPO)
    assert Path(info["tsvd"]).resolve() == REPO / "tsvd" / "__init__.py"
    assert Path(info["peft"]).resolve() == REPO / "peft" / "__init__.py"
    assert Path(info["models"]).resolve() == REPO / "models" / "__init__.py"


def test_in_process_names():
    import tsvd.models
    import tsvd.peft
    assert tsvd.peft.__name__ == "tsvd.peft" and tsvd.models.__name__ == "tsvd.models"
    assert sys.modules.get("peft") is not tsvd.peft
    assert sys.modules.get("models") is not tsvd.models
    if EDITABLE:
        assert Path(tsvd.peft.__file__).resolve().parent == REPO / "peft"
        assert Path(tsvd.models.__file__).resolve().parent == REPO / "models"


def test_version():
    assert isinstance(tsvd.__version__, str)
    from packaging.version import Version
    Version(tsvd.__version__)                              # PEP 440
    assert importlib.metadata.version("tsvd") == tsvd.__version__
    setup_py = (REPO / "setup.py").read_text()
    assert f'version="{tsvd.__version__}"' in setup_py


def test_reference_module_is_importable():
    import tsvd.reference as ref
    from tsvd.reference import treconstruct
    assert tsvd.reference is ref and treconstruct is ref.treconstruct
    for name in ref.__all__:
        assert callable(getattr(ref, name)), name


def test_regular_install(tmp_path):
    """A regular (non-editable) pure-Python install of the sources maps peft/ and models/
    into tsvd/ and installs no top-level peft/models (the extension is skipped here:
    TSVD_NO_EXT=1; building it is tested by the extension's own tests and .ci/run)."""
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc", "*.egg-info")
    for name in ("tsvd", "peft", "models"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy2(REPO / name, src / name)
    site = tmp_path / "site"
    env = dict(os.environ, TSVD_NO_EXT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(site), str(src)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    top = sorted(p.name for p in site.iterdir() if not p.name.endswith(".dist-info")
                 and p.name not in ("bin", "__pycache__"))
    assert top == ["tsvd"], top
    info = _probe(tmp_path, {"PYTHONPATH": str(site)})
    _check_layout(info, (site / "tsvd").resolve(), None)
