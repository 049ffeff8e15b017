"""``python -m bench``: see :mod:`bench.cli` and ``python -m bench --help``."""

import gc

from autotune.argtypes import run_guarded
from bench.cli import main

if __name__ == "__main__":
    # Objects of the imported modules (torch, and peft/transformers once loaded) live for the whole run: move
    # them out of the collector's view so the collections between cases do not rescan them each time.
    gc.freeze()
    raise SystemExit(run_guarded(main, prog="python -m bench"))
