"""Parity with PEFT's MiSS layer: same outputs and gradients through bonekern.bone_linear.

A tiny torch model gets ``MissConfig`` with init_weights True ("bone"), "bat" and "mini"; its blocks are set to
random non-zero values; bonekern is then called on the same weight, bias and block. The bf16 case keeps the
adapter in fp32, as PEFT's default ``autocast_adapter_dtype=True`` does.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bonekern import bone_linear
from bonekern.backends import BACKEND_NAMES, unavailable_reason
from tests.support import assert_close_to_reference

peft = pytest.importorskip("peft", reason="needs the peft package (pip install 'bonekern[peft]')")

INIT = {"bone": True, "bat": "bat", "mini": "mini"}


class Tiny(nn.Module):
    def __init__(self, k: int, n: int):
        super().__init__()
        self.proj = nn.Linear(k, n, bias=True)
        self.head = nn.Linear(n, 3, bias=False)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x)))


def peft_model(variant: str, k: int, n: int, r: int, dtype: torch.dtype, mini_r: int = 4):
    torch.manual_seed(0)
    base = Tiny(k, n).to(dtype)
    config = peft.MissConfig(r=r, init_weights=INIT[variant], mini_r=mini_r, target_modules=["proj"])
    model = peft.get_peft_model(base, config)
    layer = model.base_model.model.proj
    block = layer.miss_block["default"]
    with torch.no_grad():
        block.normal_(0, 0.3 if variant != "bat" else 0.1)
    return model, layer, block


SHAPES = {
    "bone": (20, 12, 6),
    "mini": (20, 12, 6),
    "bat": (24, 16, 8),
}  # (K, N, r): bone/mini have K % r != 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", ["bone", "mini", "bat"])
@pytest.mark.parametrize("backend", [b for b in BACKEND_NAMES if b != "reference"])
def test_same_outputs_and_gradients_as_peft(backend, variant, dtype):
    reason = unavailable_reason(backend, "cpu")
    if reason is not None:
        pytest.skip(f"backend {backend!r} unavailable on cpu: {reason}")
    k, n, r = SHAPES[variant]
    _, layer, block = peft_model(variant, k, n, r, dtype)
    assert block.dtype == torch.float32  # PEFT keeps adapters in fp32
    x = torch.randn(2, 5, k).to(dtype)

    # PEFT's own forward/backward
    x_peft = x.clone().requires_grad_()
    y_peft = layer(x_peft)
    dy = torch.randn_like(y_peft)
    y_peft.backward(dy)
    dx_peft, dblock_peft = x_peft.grad, block.grad.clone()
    block.grad = None

    # bonekern on the very same parameters
    base = layer.get_base_layer()
    x_bk = x.clone().requires_grad_()
    mini_r = block.shape[1] if variant == "mini" else None
    y_bk = bone_linear(x_bk, base.weight, block, base.bias, variant=variant, mini_r=mini_r, backend=backend)
    y_bk.backward(dy)
    assert y_bk.dtype == y_peft.dtype == dtype
    assert_close_to_reference(y_bk, y_peft.double(), dtype, "y vs PEFT", backend)
    assert_close_to_reference(x_bk.grad, dx_peft.double(), dtype, "dx vs PEFT", backend)
    assert_close_to_reference(block.grad, dblock_peft.double(), dtype, "dblock vs PEFT", backend)


@pytest.mark.parametrize("variant", ["bone", "mini", "bat"])
def test_merge_matches_peft_merge(variant):
    from bonekern import merge

    k, n, r = SHAPES[variant]
    _, layer, block = peft_model(variant, k, n, r, torch.float32)
    base = layer.get_base_layer()
    w0 = base.weight.detach().clone()
    mini_r = block.shape[1] if variant == "mini" else None
    ours = merge(w0, block.detach(), variant=variant, mini_r=mini_r)
    layer.merge()
    torch.testing.assert_close(ours, base.weight.detach(), rtol=1e-5, atol=1e-5)
