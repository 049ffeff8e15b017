"""The PyTorch backend: runs everywhere (CPU included), written for speed and memory with plain torch ops.

This module holds only the backend (its strategies and configs); the arithmetic it runs is
:mod:`bonekern.blockmath`. How it beats PEFT's layer with the same math (docs/kernels.md; the numbers are in
docs/measurements.md):

- bone/mini: S is summed from a strided *view* of x (no padded copy), the adapter term is added into the base
  output in place, and in backward ``dY D^T`` is broadcast-added into ``dY W`` in place; mini multiplies by its
  (r, mini_r) block and broadcasts, never forming the repeated (r, N) matrix.
- bat: W' is built with one batched GEMM on a free view of W (``W.view(N/r, K, r)``: rows (p, j), columns s),
  used for one GEMM and dropped; backward rebuilds it. ``G = dY^T x`` is formed a chunk of out-blocks at a time
  and reduced to dB at once, so no N x K gradient temporary exists.

Strategies (the autotuner times them on the CPU):

- bat_forward / bat_backward ``"materialize"``: build the whole W' (transient) and run one GEMM;
  ``"rowchunk"``: build W' ``chunk_blocks`` out-blocks at a time and run one GEMM per chunk, so the transient
  is ``chunk_blocks * r * K`` elements (for GPUs where memory is tight).
- ``chunk_blocks`` also sets how many out-blocks of G the backward forms at once.

The default chunk sizes below are this backend's own training-time choices, not
:func:`bonekern.blockmath.merge_chunk_blocks` (a memory bound for merge/unmerge).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..blockmath import (
    add_grouped_,
    add_repeated_,
    bat_block_grad,
    bat_weight,
    build_bat_weight_,
    fold_repeats,
    group_sum,
    group_sum_dropped,
    spread_dropped,
)
from ..validation import delta_dtype
from .base import Backend, Config, OpProblem

FORWARD_CHUNK_ROWS = 512
"""Rows of W' the default bat forward builds and multiplies at once ("rowchunk"). Measured, not derived: see
:meth:`TorchBackend.default_config`."""


def _default_chunk_blocks(problem: OpProblem) -> int:
    """Out-blocks per chunk of the default bat backward: about 16 MiB of fp32 per chunk of G / W' rows.

    A heuristic (large enough for efficient GEMMs, small enough that a chunk of W' rows stays in cache between its
    use by dx and by dB), separate from the forward's measured :data:`FORWARD_CHUNK_ROWS` and from
    :func:`bonekern.blockmath.merge_chunk_blocks`; the autotuner refines it per shape.
    """
    blocks = problem.n // problem.r
    rows = max(problem.r, (16 << 20) // (4 * max(problem.k, problem.m, 1)))
    return max(1, min(blocks, rows // problem.r))


class TorchBackend(Backend):
    """Plain PyTorch; available on every device torch supports."""

    name = "torch"
    shared_source_modules = ("bonekern.blockmath",)

    def unavailable_reason(self, device: torch.device) -> str | None:
        return None

    def default_config(self, problem: OpProblem) -> Config:
        # Measured on this project's 2-core CPU, fp32, r = 64, candidates interleaved (median of 7): forward with
        # W' built and used 512 rows at a time ("rowchunk", 8 blocks) beat one whole W' by 5-20% (x 2048x4096,
        # W 4096x4096: 397 vs 419 ms; x 512x2048, W 5632x2048: 78 vs 98 ms; equal at 2048x2048): the chunk stays
        # in cache between its build and its GEMM. Backward: rowchunk with ~16 MiB chunks (each chunk of W' rows is
        # reused from cache by dx and by dB). The autotuner refines both per shape.
        if problem.op == "bat_forward":
            blocks = problem.n // problem.r
            return {"strategy": "rowchunk", "chunk_blocks": max(1, min(blocks, FORWARD_CHUNK_ROWS // problem.r))}
        if problem.op == "bat_backward":
            return {"strategy": "rowchunk", "chunk_blocks": _default_chunk_blocks(problem)}
        return {}

    def configs(self, problem: OpProblem) -> list[Config]:
        if not problem.op.startswith("bat"):
            return [{}]
        blocks = problem.n // problem.r
        default = self.default_config(problem)
        chunks = sorted({default["chunk_blocks"], max(1, blocks // 8), max(1, blocks // 2), blocks})
        out = [default]
        for strategy in ("materialize", "rowchunk"):
            for c in chunks:
                cfg = {"strategy": strategy, "chunk_blocks": c}
                if cfg not in out:
                    out.append(cfg)
        return out

    # -- bone / mini --------------------------------------------------------------------------------------

    def bone_forward(self, x, weight, block, bias, config):
        r, cols = block.shape
        dtype = delta_dtype(x.dtype, block.dtype)
        s = group_sum(x, r, dtype)
        y = F.linear(x, weight, bias)
        if y.dtype == dtype and cols == y.shape[1]:
            y.addmm_(s, block.to(dtype))  # bone, full precision: fused into one BLAS call, no (M, N) temporary
        else:
            add_repeated_(y, s @ block.to(dtype))  # (M, C) temporary; adds in the delta dtype, rounds once
        return y, s

    def bone_backward(self, dy, s, weight, block, need_dx, need_dblock, config):
        cols = block.shape[1]
        dtype = s.dtype
        dy_folded = fold_repeats(dy, cols, dtype)  # (M, C); a no-op view for bone at full precision
        dx = dblock = None
        if need_dx:
            dx = torch.mm(dy, weight)
            add_grouped_(dx, dy_folded @ block.to(dtype).t())  # T = dY D^T (M, r), broadcast over the groups
        if need_dblock:
            dblock = torch.mm(s.t(), dy_folded).to(block.dtype)
        return dx, dblock

    # -- the adapter term alone (bone / mini over any base layer) ------------------------------------------

    def adapter_forward(self, x, block, out_features, dropout, config):
        r, cols = block.shape
        dtype = delta_dtype(x.dtype, block.dtype)
        s = group_sum(x, r, dtype) if dropout is None else group_sum_dropped(x, r, dtype, dropout)
        t = s @ block.to(dtype)  # (M, C)
        if cols == out_features and t.dtype == x.dtype:
            return t, s  # bone: the product is the term (no repeats to lay out, no cast)
        m = x.shape[0]
        delta = torch.empty(m, out_features, dtype=x.dtype, device=x.device)
        delta.view(m, out_features // cols, cols).copy_(t[:, None, :])  # D[j, n] = block[j, n % C]; one rounding
        return delta, s

    def adapter_backward(self, dy, s, block, in_features, dropout, need_dx, need_dblock, config):
        cols = block.shape[1]
        dtype = s.dtype
        dy_folded = fold_repeats(dy, cols, dtype)  # (M, C)
        dx = dblock = None
        if need_dx:
            dx = spread_dropped(dy_folded @ block.to(dtype).t(), in_features, dy.dtype, dropout)  # T (M, r) spread
        if need_dblock:
            dblock = torch.mm(s.t(), dy_folded).to(block.dtype)
        return dx, dblock

    # -- bat ----------------------------------------------------------------------------------------------

    def bat_forward(self, x, weight, block, bias, config):
        weight = weight.contiguous()  # no-op for nn.Linear weights; the block views below need it
        r = block.shape[-1]
        blocks = block.shape[0]
        chunk = int(config.get("chunk_blocks", 0)) or blocks
        if config.get("strategy", "materialize") == "materialize":
            w_prime = bat_weight(weight, block, x.dtype, chunk)
            return F.linear(x, w_prime, bias)
        # rowchunk: y[:, rows] = x W'_rows^T, one chunk of W' alive at a time
        m = x.shape[0]
        n = weight.shape[0]
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
        for i0 in range(0, blocks, chunk):
            i1 = min(blocks, i0 + chunk)
            w_rows = build_bat_weight_(
                torch.empty((i1 - i0) * r, weight.shape[1], dtype=x.dtype, device=x.device), weight, block, i0
            )
            y[:, i0 * r : i1 * r] = F.linear(x, w_rows, None if bias is None else bias[i0 * r : i1 * r])
        return y

    def bat_backward(self, dy, x, weight, block, need_dx, need_dblock, config):
        weight = weight.contiguous()
        r = block.shape[-1]
        blocks = block.shape[0]
        chunk = int(config.get("chunk_blocks", 0)) or blocks
        materialize = config.get("strategy", "materialize") == "materialize"
        dtype = delta_dtype(x.dtype, block.dtype)
        dx = dblock = None
        if need_dx and materialize:
            dx = torch.mm(dy, bat_weight(weight, block, dy.dtype, chunk))
        elif need_dx:
            dx = torch.zeros_like(x, memory_format=torch.contiguous_format)
        if need_dblock:
            dblock = torch.empty(block.shape, dtype=dtype, device=block.device)
            x_c = x.to(dtype)
            s_x = group_sum(x_c, r, dtype)
        if not (need_dblock or (need_dx and not materialize)):
            return dx, dblock
        for i0 in range(0, blocks, chunk):
            i1 = min(blocks, i0 + chunk)
            rows = slice(i0 * r, i1 * r)
            if need_dx and not materialize:
                w_rows = build_bat_weight_(
                    torch.empty((i1 - i0) * r, weight.shape[1], dtype=dy.dtype, device=dy.device),
                    weight,
                    block,
                    i0,
                )
                dx.addmm_(dy[:, rows], w_rows)
            if need_dblock:
                dblock[i0:i1] = bat_block_grad(dy[:, rows], x_c, s_x, weight[rows], r, dtype)
        if dblock is not None:
            dblock = dblock.to(block.dtype)
        return dx, dblock
