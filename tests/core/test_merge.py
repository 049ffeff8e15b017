"""delta_weight / merge / unmerge against the reference, and their round trips."""

from __future__ import annotations

import pytest
import torch

from bonekern import bone_linear, delta_weight, merge, reference, unmerge
from tests.support import assert_close_to_reference, make_problem

CASES = {
    "bone": dict(n=24, k=22, r=4),  # K % r != 0
    "mini": dict(n=24, k=20, r=5, mini_r=6),
    "bat": dict(n=24, k=16, r=8),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", ["bone", "mini", "bat"])
def test_delta_weight_matches_reference(variant, dtype):
    p = make_problem(variant, (3,), dtype=dtype, **CASES[variant])
    got = delta_weight(p.weight, p.block, variant=variant, mini_r=p.mini_r)
    assert got.dtype == dtype and got.shape == p.weight.shape
    want = reference.delta_weight(p.weight.double(), p.block.double(), p.ref_variant)
    assert_close_to_reference(got, want, dtype, "delta_weight")


@pytest.mark.parametrize("variant", ["bone", "mini", "bat"])
def test_merged_linear_equals_bone_linear(variant):
    p = make_problem(variant, (4, 3), dtype=torch.float64, **CASES[variant])
    merged = merge(p.weight, p.block, variant=variant, mini_r=p.mini_r)
    y_merged = torch.nn.functional.linear(p.x, merged, p.bias)
    y = bone_linear(p.x, p.weight, p.block, p.bias, variant=variant, mini_r=p.mini_r)
    torch.testing.assert_close(y, y_merged, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("variant", ["bone", "mini", "bat"])
def test_unmerge_round_trip(variant, dtype):
    p = make_problem(variant, (3,), dtype=dtype, **CASES[variant])
    merged = merge(p.weight, p.block, variant=variant, mini_r=p.mini_r)
    assert merged.data_ptr() != p.weight.data_ptr(), "merge must return a new tensor"
    restored = unmerge(merged, p.block, variant=variant, mini_r=p.mini_r)
    assert restored.data_ptr() != merged.data_ptr()
    assert_close_to_reference(restored, p.weight.double(), dtype, "unmerge(merge(W))")
    want = reference.unmerge(merged.double(), p.block.double(), p.ref_variant)
    assert_close_to_reference(restored, want, dtype, "unmerge vs reference")


def test_bat_unmerge_singular_block():
    w = torch.randn(8, 8)
    block = torch.zeros(2, 4, 4)
    block[1] = -torch.eye(4)  # I + B_1 = 0
    with pytest.raises(ValueError, match=r"singular for out-block\(s\) \[1\]"):
        unmerge(merge(w, block, variant="bat"), block, variant="bat")


def test_large_bat_merge_is_chunked_and_exact():
    """More out-blocks than one build chunk: chunk boundaries must not change the result."""
    p = make_problem("bat", (2,), 4 * 1100, 8, 4, dtype=torch.float64)
    got = merge(p.weight, p.block, variant="bat")
    want = reference.bat_weight(p.weight, p.block)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(unmerge(got, p.block, variant="bat"), p.weight, rtol=1e-9, atol=1e-9)
