"""The PyTorch backend: runs everywhere (CPU included), written for speed and memory with plain torch ops.

How it beats PEFT's layer with the same math (DESIGN.md section 2):

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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..validation import delta_dtype
from .base import Backend, Config, OpProblem

# ----------------------------------------------------------------------------------------------------------
# Building blocks, shared with bonekern.functional (merge/unmerge) and the GEMM parts of other backends.
# ----------------------------------------------------------------------------------------------------------


def group_sum(x: torch.Tensor, r: int, dtype: torch.dtype) -> torch.Tensor:
    """S (M, r) in ``dtype``: sum of x's r-wide column groups, the last one zero-padded (PEFT's padding).

    Reads x through views (works for any strides); never forms a padded copy.
    """
    m, k = x.shape
    full = k // r
    if full > 0:
        s = x[:, : full * r].unflatten(1, (full, r)).sum(dim=1, dtype=dtype)
    else:
        s = x.new_zeros(m, r, dtype=dtype)
    rem = k - full * r
    if rem:
        s[:, :rem] += x[:, full * r :]
    return s


def add_grouped_(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """In place: out[:, k] += t[:, k % r] for out (M, K) and t (M, r); the inverse pattern of :func:`group_sum`."""
    k = out.shape[1]
    r = t.shape[1]
    full = k // r
    if full > 0:
        out[:, : full * r].unflatten(1, (full, r)).add_(t[:, None, :])
    rem = k - full * r
    if rem:
        out[:, full * r :] += t[:, :rem]
    return out


def add_repeated_(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """In place: out[:, n] += t[:, n % C] for out (M, N) and t (M, C) with C | N (mini's repeats)."""
    cols = t.shape[1]
    out.unflatten(1, (out.shape[1] // cols, cols)).add_(t[:, None, :])
    return out


def fold_repeats(dy: torch.Tensor, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """(M, N) -> (M, C) in ``dtype``: sums the N // C repeats of mini's block (identity cast for bone)."""
    n = dy.shape[1]
    if cols == n:
        return dy.to(dtype)
    return dy.unflatten(1, (n // cols, cols)).sum(dim=1, dtype=dtype)


def _blocks_view(weight: torch.Tensor, r: int) -> torch.Tensor:
    """W (N, K) -> (N // r, K, r) view: element [i, p * (K // r) + j, s] = W[i*r + p, j*r + s]."""
    n, k = weight.shape
    return weight.view(n // r, k, r)


def build_bat_weight_(
    out: torch.Tensor, weight: torch.Tensor, block: torch.Tensor, first_block: int = 0
) -> torch.Tensor:
    """Write W' rows for out-blocks ``first_block .. first_block + out.shape[0] // r`` into ``out``.

    W'_ij = W_ij (I + B_i) + B_i, computed in the delta dtype and stored in out's dtype.
    out: (c * r, K) contiguous; weight: (N, K) contiguous; block: (N // r, r, r).
    """
    r = block.shape[-1]
    count = out.shape[0] // r
    dtype = delta_dtype(weight.dtype, block.dtype)
    w = _blocks_view(weight, r)[first_block : first_block + count].to(dtype)
    b = block[first_block : first_block + count].to(dtype)
    k = weight.shape[1]
    if out.dtype == dtype:
        built = torch.baddbmm(w, w, b, out=out.view(count, k, r))
    else:
        built = torch.baddbmm(w, w, b)
    built.view(count, r, k // r, r).add_(b[:, :, None, :])
    if out.dtype != dtype:
        out.view(count, k, r).copy_(built)
    return out


def bat_weight(weight: torch.Tensor, block: torch.Tensor, dtype: torch.dtype, chunk_blocks: int = 0) -> torch.Tensor:
    """The whole W' (N, K) in ``dtype``, built ``chunk_blocks`` out-blocks at a time (0: all at once).

    Chunking bounds the float32 temporary when ``dtype`` is half precision.
    """
    weight = weight.contiguous()
    n, k = weight.shape
    r = block.shape[-1]
    blocks = n // r
    step = blocks if chunk_blocks <= 0 else chunk_blocks
    out = torch.empty(n, k, dtype=dtype, device=weight.device)
    for i0 in range(0, blocks, step):
        i1 = min(blocks, i0 + step)
        build_bat_weight_(out[i0 * r : i1 * r], weight, block, i0)
    return out


def bat_block_grad(
    dy_rows: torch.Tensor,
    x_c: torch.Tensor,
    s_x: torch.Tensor,
    weight_rows: torch.Tensor,
    r: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """dB for a run of out-blocks: dB_i = sum_j (W_ij + I)^T G_ij with G = dY_rows^T x (formed here, then dropped).

    The identity part, sum_j G_ij, equals dY_i^T S with S = group_sum(x): a rank-r product instead of a pass
    over G. dy_rows: (M, c*r) columns of dY for those out-blocks; x_c: (M, K) and s_x: (M, r), both in
    ``dtype``; weight_rows: (c*r, K) contiguous. Returns (c, r, r) in ``dtype``.
    """
    count = dy_rows.shape[1] // r
    k = x_c.shape[1]
    dy_t = dy_rows.t().to(dtype)
    g = torch.mm(dy_t, x_c).view(count, k, r)  # rows (p, j), columns q
    w = _blocks_view(weight_rows, r).to(dtype)  # rows (p, j), columns s
    db = torch.bmm(w.transpose(1, 2), g)
    db += torch.mm(dy_t, s_x).view(count, r, r)
    return db


def bat_weight_grad(dy: torch.Tensor, x: torch.Tensor, block: torch.Tensor, weight_dtype: torch.dtype) -> torch.Tensor:
    """dW for bat when the weight is trainable: dW_ij = G_ij (I + B_i)^T with G = dY^T x. Returns (N, K)."""
    dtype = delta_dtype(dy.dtype, block.dtype)
    r = block.shape[-1]
    g = torch.mm(dy.t().to(dtype), x.to(dtype))
    n, k = g.shape
    eye_plus_b = block.to(dtype) + torch.eye(r, dtype=dtype, device=block.device)
    dw = torch.bmm(g.view(n // r, k, r), eye_plus_b.transpose(1, 2))
    return dw.view(n, k).to(weight_dtype)


def _default_chunk_blocks(problem: OpProblem) -> int:
    """About 16 MiB of fp32 per chunk of G / W' rows: large enough for efficient GEMMs, small enough to bound memory."""
    blocks = problem.n // problem.r
    rows = max(problem.r, (16 << 20) // (4 * max(problem.k, problem.m, 1)))
    return max(1, min(blocks, rows // problem.r))


# ----------------------------------------------------------------------------------------------------------
# The backend.
# ----------------------------------------------------------------------------------------------------------


class TorchBackend(Backend):
    """Plain PyTorch; available on every device torch supports."""

    name = "torch"

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
            return {"strategy": "rowchunk", "chunk_blocks": max(1, min(blocks, 512 // problem.r))}
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
