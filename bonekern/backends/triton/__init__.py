"""``backend="triton"``: fused Triton kernels (work in progress: not built yet)."""

from __future__ import annotations

from ..base import Backend


class TritonBackend(Backend):
    name = "triton"

    def unavailable_reason(self, device):
        return "the Triton backend is not built yet in this version of bonekern"
