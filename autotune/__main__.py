"""``python -m autotune``: see :mod:`autotune.cli`."""

import sys

from .argtypes import run_guarded
from .cli import main

if __name__ == "__main__":
    sys.exit(run_guarded(main, prog="python -m autotune"))
