"""The reference's explicit backward formulas equal autograd through its forward (float64), and the bone
forward equals its merged-weight form. This pins the specification itself."""

from __future__ import annotations

import pytest
import torch

from bonekern import reference
from tests.support import make_problem


@pytest.mark.parametrize(
    "variant, shape",
    [
        ("bone", dict(n=12, k=10, r=3)),
        ("bone", dict(n=5, k=7, r=1)),
        ("mini", dict(n=12, k=9, r=4, mini_r=3)),
        ("bat", dict(n=12, k=8, r=4)),
        ("bat", dict(n=3, k=6, r=1)),
    ],
)
def test_backward_formulas_match_autograd(variant, shape):
    p = make_problem(variant, (6,), dtype=torch.float64, **shape)
    x = p.x.clone().requires_grad_()
    block = p.block.clone().requires_grad_()
    y = reference.linear(x, p.weight, block, p.bias, p.ref_variant)
    dx_auto, dblock_auto = torch.autograd.grad(y, (x, block), p.dy)
    if variant == "bat":
        dx, dblock = reference.bat_backward(p.dy, p.x, p.weight, p.block)
    else:
        s = reference.group_sum(p.x, p.block.shape[0])
        dx, dblock = reference.bone_backward(p.dy, s, p.weight, p.block)
    torch.testing.assert_close(dx, dx_auto, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dblock, dblock_auto, rtol=1e-12, atol=1e-12)


def test_group_sum_pads_with_zeros():
    x = torch.arange(1.0, 8.0).reshape(1, 7)  # [1..7], r = 3 -> groups [1,2,3],[4,5,6],[7,0,0]
    assert reference.group_sum(x, 3).tolist() == [[12.0, 7.0, 9.0]]


def test_bat_weight_is_w_times_i_plus_b_plus_b():
    w = torch.randn(4, 6, dtype=torch.float64)
    b = torch.randn(2, 2, 2, dtype=torch.float64)
    wp = reference.bat_weight(w, b)
    for i in range(2):
        for j in range(3):
            wij = w[2 * i : 2 * i + 2, 2 * j : 2 * j + 2]
            want = wij @ (torch.eye(2, dtype=torch.float64) + b[i]) + b[i]
            torch.testing.assert_close(wp[2 * i : 2 * i + 2, 2 * j : 2 * j + 2], want)
