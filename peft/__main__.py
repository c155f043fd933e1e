"""``python -m tsvd.peft``: the ``lorapt`` command-line tool."""
import sys

from .seg.cli import main

sys.exit(main())
