"""NVTX ranges for profilers (``nsys profile``): cheap no-ops when no profiler is attached or nvtx is absent."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

try:
    import nvtx as _nvtx
except ImportError:  # the nvtx package is optional
    _nvtx = None

DOMAIN = "bonekern"


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """Mark the enclosed region as ``name`` in the "bonekern" NVTX domain."""
    if _nvtx is None:
        yield
        return
    with _nvtx.annotate(name, domain=DOMAIN):
        yield
