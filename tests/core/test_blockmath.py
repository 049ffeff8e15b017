"""bonekern.blockmath: the shared block arithmetic against the float64 reference, chunking that cannot change a
result, and the one chunk rule of merge/unmerge/delta_weight."""

from __future__ import annotations

import pytest
import torch

from bonekern import blockmath, reference
from tests.support import assert_close_to_reference, make_problem


@pytest.mark.parametrize(("r", "blocks"), [(1, 4096), (3, 1365), (64, 64), (4096, 1), (5000, 1)])
def test_merge_chunk_blocks_is_about_4096_rows_and_at_least_one_block(r, blocks):
    assert blockmath.merge_chunk_blocks(r) == blocks


@pytest.mark.parametrize("k", [16, 18, 3])
def test_group_sum_and_its_transpose_add_grouped(k):
    x = torch.randn(5, 2 * k, dtype=torch.float64)[:, ::2]  # strided view, K % r != 0 for k = 18 and 3
    s = blockmath.group_sum(x, 4, torch.float64)
    assert_close_to_reference(s, reference.group_sum(x, 4), torch.float64, "group_sum")
    t = torch.randn(5, 4, dtype=torch.float64)
    out = blockmath.add_grouped_(torch.zeros(5, k, dtype=torch.float64), t)
    # <add_grouped(t), x> == <t, group_sum(x)>: add_grouped_ is group_sum's transpose
    torch.testing.assert_close((out * x).sum(), (t * s).sum(), rtol=1e-12, atol=1e-12)


def test_fold_repeats_is_the_transpose_of_add_repeated():
    dy = torch.randn(3, 12, dtype=torch.float64)
    t = torch.randn(3, 4, dtype=torch.float64)
    out = blockmath.add_repeated_(torch.zeros(3, 12, dtype=torch.float64), t)
    assert torch.equal(out, t.repeat(1, 3))
    folded = blockmath.fold_repeats(dy, 4, torch.float64)
    torch.testing.assert_close((out * dy).sum(), (t * folded).sum(), rtol=1e-12, atol=1e-12)
    assert torch.equal(blockmath.fold_repeats(dy, 12, torch.float32), dy.float())  # bone: only a cast


@pytest.mark.parametrize("chunk_blocks", [0, 1, 2, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_bat_weight_in_chunks_is_exact_and_matches_reference(dtype, chunk_blocks):
    p = make_problem("bat", (2,), 40, 16, 8, dtype=dtype)
    whole = blockmath.bat_weight(p.weight, p.block, dtype)
    got = blockmath.bat_weight(p.weight, p.block, dtype, chunk_blocks)
    assert torch.equal(got, whole), "chunk boundaries changed W'"
    assert_close_to_reference(got, reference.bat_weight(p.weight.double(), p.block.double()), dtype, "W'")


def test_bat_block_grad_and_weight_grad_match_reference():
    p = make_problem("bat", (7,), 24, 16, 8, dtype=torch.float64, block_dtype=torch.float64)
    x, w, b, dy = p.x, p.weight.requires_grad_(), p.block.requires_grad_(), p.dy
    y = reference.linear(x, w, b, None, "bat")
    dw_ref, db_ref = torch.autograd.grad(y, (w, b), dy)
    s = blockmath.group_sum(x, 8, torch.float64)
    rows = (slice(0, 8), slice(8, 16), slice(16, 24))
    runs = [blockmath.bat_block_grad(dy[:, i], x, s, w[i].detach(), 8, torch.float64) for i in rows]
    db = torch.cat(runs)  # one out-block per run: the backward's chunking, at its finest
    assert_close_to_reference(db, db_ref, torch.float64, "dB per out-block")
    dw = blockmath.bat_weight_grad(dy, x, b.detach(), torch.float64)
    assert_close_to_reference(dw, dw_ref, torch.float64, "dW")


@pytest.mark.parametrize("chunk_blocks", [1, 2, 3, 100])
def test_bat_unmerge_in_chunks_inverts_bat_weight(chunk_blocks):
    p = make_problem("bat", (1,), 24, 16, 8, dtype=torch.float64, block_dtype=torch.float64)
    merged = blockmath.bat_weight(p.weight, p.block, torch.float64)
    got = blockmath.bat_unmerge(merged, p.block, torch.float64, chunk_blocks)
    assert torch.equal(got, blockmath.bat_unmerge(merged, p.block, torch.float64, 1)), "chunking changed W"
    torch.testing.assert_close(got, p.weight, rtol=1e-10, atol=1e-10)
    want = reference.unmerge(merged, p.block, "bat")
    assert_close_to_reference(got, want, torch.float64, "unmerge vs reference")
