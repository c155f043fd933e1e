#!/usr/bin/env python
"""The method comparison: ``python bench/compare.py --help``. The code is the package
``bench/comparison/`` (plan, run, report, shared helpers, command line)."""
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from comparison.cli import main
    sys.exit(main())
