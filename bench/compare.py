#!/usr/bin/env python
"""The method comparison: ``python bench/compare.py --help``. The code is the package
``bench/comparison/`` (plan, run, report, shared helpers, command line); this script loads it
and runs its command line."""
import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load():
    """The package ``bench/comparison/`` imported as ``comparison``, without ``bench/`` on
    ``sys.path``: there ``bench/peft.py`` and ``bench/kernels.py`` would shadow HuggingFace's
    ``peft`` and the ``kernels`` package that ``transformers`` imports (HF PEFT methods then
    fail to load)."""
    if "comparison" in sys.modules:
        return sys.modules["comparison"]
    pkg = HERE / "comparison"
    spec = importlib.util.spec_from_file_location("comparison", pkg / "__init__.py",
                                                  submodule_search_locations=[str(pkg)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["comparison"] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules["comparison"]
        raise
    return mod


if __name__ == "__main__":
    # python puts the script's folder first on sys.path: take it off (see load)
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    sys.exit(load().cli.main())
