"""``backend="cupy"``: CUDA C++ kernels through CuPy (work in progress: not built yet)."""

from __future__ import annotations

from ..base import Backend


class CupyBackend(Backend):
    name = "cupy"

    def unavailable_reason(self, device):
        return "the CuPy backend is not built yet in this version of bonekern"
