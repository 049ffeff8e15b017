"""``backend="reference"``: the einsum references of :mod:`bonekern.reference` behind the backend contract.

(The module is named for what it runs, einsums, so that :mod:`bonekern.reference` -- the specification, part of
the public API -- is the only ``reference`` module.)

Slow and memory-hungry by design (it materialises W' and G); it exists so the specification itself runs
through the same custom ops, autograd and saved-tensor contract as the fast backends.
"""

from __future__ import annotations

from .. import reference
from ..validation import delta_dtype
from .base import Backend


class ReferenceBackend(Backend):
    name = "reference"

    def unavailable_reason(self, device):
        return None

    def bone_forward(self, x, weight, block, bias, config):
        s = reference.group_sum(x.to(delta_dtype(x.dtype, block.dtype)), block.shape[0])
        return reference.linear(x, weight, block, bias, "bone"), s

    def bone_backward(self, dy, s, weight, block, need_dx, need_dblock, config):
        dx, dblock = reference.bone_backward(dy, s, weight, block)
        return (dx if need_dx else None), (dblock if need_dblock else None)

    def bat_forward(self, x, weight, block, bias, config):
        return reference.linear(x, weight, block, bias, "bat")

    def bat_backward(self, dy, x, weight, block, need_dx, need_dblock, config):
        dx, dblock = reference.bat_backward(dy, x, weight, block)
        return (dx if need_dx else None), (dblock if need_dblock else None)

    def adapter_forward(self, x, block, out_features, dropout, config):
        return reference.adapter_forward(x, block, out_features, dropout)

    def adapter_backward(self, dy, s, block, in_features, dropout, need_dx, need_dblock, config):
        dx, dblock = reference.adapter_backward(dy, s, block, in_features, dropout)
        return (dx if need_dx else None), (dblock if need_dblock else None)
