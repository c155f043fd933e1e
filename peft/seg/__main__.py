"""``python -m tsvd.peft.seg`` is ``lorapt``."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
