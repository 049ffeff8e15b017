"""Triton kernels for the bat variant, forward and backward, and the host functions that launch them.

Math (DESIGN.md section 1): B is (N/r, r, r); ``W'_ij = W_ij (I + B_i) + B_i`` for out-block i, in-block j;
``y = x W'^T + b``; ``dx = dY W'``; with ``G = dY^T x`` cut into r x r blocks, ``dB_i = sum_j (W_ij + I)^T G_ij``.
Only x is kept for backward; W' never outlives one call.

Kernels (one launch each; all accumulate in fp32, in fp64 when x or the block is fp64):

- ``_bat_gemm_kernel``: ``C = A @ op(W')``, ``op`` a transpose for the forward (``y = x W'^T + b``, bias in the
  epilogue) and the identity for ``dx = dY W'``. With ``FUSED`` it forms each W' tile from W and B right before
  the tile's ``tl.dot`` (strategy "fused"); without, it is a plain tiled GEMM on a W' that
  :func:`materialize_weight` wrote (strategy "materialize" with ``gemm="triton"``).
- ``_bat_build_kernel``: writes W' (N, K) in x's dtype, one tile per program (strategy "materialize"). The GEMM
  after it is cuBLAS (``F.linear`` / ``torch.mm``) by default: NVIDIA's per-shape tuned kernels are the bar a
  plain Triton GEMM can at best meet; the Triton GEMM is a config option for the autotuner.
- ``_bat_dblock_kernel``: dB. A program owns out-blocks (or one out-block's column chunk) and a split of the
  in-blocks; per K tile it accumulates ``G_tile = dY_tile^T x_tile`` over all of M in registers and contracts it
  in the epilogue: ``dB_i += (W_ij + I)^T G_ij``. G (N x K) is never written to memory.

When to use which: "fused" re-forms W' once per m-tile (``r / block_m`` extra tensor-core MACs per tile) and
never writes it; "materialize" forms it once (memory bound: a read of W and a write of W') and re-reads it in
the GEMM. Fused wins for few tokens, materialize for many; configs.py picks by M (a model until tuned).

Tilings. A tile spans ``block_n`` rows and ``block_k`` columns of W in lanes; an r-block takes R lanes, R = r
rounded up to a power of two (lanes >= r are masked off: r = 3 wastes (1/4)^2 of a tile, powers of two nothing).

- sub-block (R >= min(block_n, block_k), i.e. r >= 32 for the shipped tiles): the tile lies inside one out-block
  and one in-block (lanes clamped to R). ``W'[p, q] = W[p, q] + sum_s W[p, s] B_i[s, q] + B_i[p, q]`` is a 2-D
  ``tl.dot`` of the tile's rows (all R columns s of its in-block, in chunks of block_k) with ``B_i[:, q]``.
- arranged (smaller r): ``block_n // R`` out-blocks x ``block_k // R`` in-blocks per tile, loaded in the
  block-row arrangement (a, R*b, R), element [ia, p*b + jb, s] = W[(i0+ia) r + p, (j0+jb) r + s], where
  ``W'_ij = W_ij (I + B_i) + B_i`` is one batched product plus B broadcast over jb, and which reshapes for free
  to the (block_n, block_k) tile: a 3-D ``tl.dot`` for R >= 16, a broadcast multiply-sum below (``tl.dot``
  needs an inner size of 16), elementwise ``W + W*B + B`` for r = 1.

Formation precision (config ``form_precision``; W' is always formed in fp32, fp64 for fp64 inputs, and rounded
once to x's dtype for the GEMM). Forming an element costs r MACs, so the fused kernel adds ``r / block_m`` of
the GEMM's MACs (r = 64, block_m = 128: +50%). As fp32 FMA ("ieee") those run on CUDA cores, ~15x slower than
half-precision tensor cores (H100: 67 vs 989 dense TFLOP/s): the formation alone would take ~7x the GEMM;
"tf32x3" (three TF32 products, close to fp32) ~3x; "tf32" ~1x; operands in x's half dtype ~0.5x (peak-rate
estimates, not measurements). Default "matched": the product ``W_ij B_i`` takes the operand precision the main
GEMM uses anyway. For fp16/bf16 x, W is already in x's dtype (exact) and only B is rounded to it, so the delta
carries about one rounding of ``|W| |B|``, at or below the rounding of W' to x's dtype that the GEMM needs in any
case; ``W_ij`` and ``+ B_i`` are added in fp32, exactly. For fp32 x it is "tf32" when torch allows TF32 matmuls,
else "tf32x3" (close to fp32 at a fifth of the FMA cost). "tf32x3" and "ieee" can be asked for explicitly. The
materialize strategy forms W' once (``r / M`` of the GEMM, memory bound), so its default is "tf32x3".

The GEMMs' fp32 ``tl.dot`` (fp32 x) follows ``torch.backends.cuda.matmul.allow_tf32`` ("ieee" when False). dB's
epilogue costs ``r / M`` of the G product; its precision is the config's ``dblock.precision`` ("matched": TF32
for fp16/bf16 inputs, whose W is exact in TF32 while G is rounded to 2^-11; for fp32 "tf32" or "tf32x3" as above).

Determinism: dB with ``dblock.reduce="partials"`` (default) writes one fp32 (split, N/r, r, r) partial per K split
and sums them in a fixed order: bitwise reproducible. ``"atomic"`` adds into one buffer with ``tl.atomic_add``
(no split-sized buffer; the order varies run to run). Everything else is deterministic.

Offsets are int32 unless some tensor's largest element offset ``sum((size - 1) * stride)`` passes 2^31 - 1; then
the kernel is specialised (``INT64``): its strides become int64, so every ``index * stride`` is computed in int64
(indices stay int32: each is below M, N or K).

Strides: x, dY, W and B may have any strides (the kernels take them as arguments and never copy). The cuBLAS
GEMM of the materialize strategy is ``torch.mm`` / ``F.linear``, which copies an operand whose strides BLAS cannot
express (neither stride 1, e.g. ``x[:, ::2]``); the fused strategy and the Triton GEMM read it as it is.

Under the Triton interpreter (CPU tensors) bf16 ``tl.dot`` multiplies raw bits, so every dot operand in bf16 is
cast to fp32 when ``INTERPRET`` is set.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields

import torch
import triton
import triton.language as tl

from ...profiling import nvtx_range
from ...validation import delta_dtype
from ..base import Config, OpProblem
from . import configs
from .common import TRITON_TYPE_NAMES, AotCase, fp32_dot_precision, interpreting, needs_int64

# ----------------------------------------------------------------------------------------------------------
# Device helpers (@triton.jit), shared by the kernels below.
#
# A tile spans BN rows of W (n) and BK columns (k), in lanes; an r-block takes R lanes (R: r rounded up to a
# power of two, lanes >= r masked off). Two tilings, chosen on the host by :func:`_tiling`:
#
# - "sub-block" (SUB, R >= min(block_n, block_k)): the tile lies inside one out-block i and one in-block j
#   (BN, BK <= R). W'[p, q] = W[p, q] + sum_s W[p, s] B_i[s, q] + B_i[p, q]: a 2-D ``tl.dot`` of the tile's rows
#   (all R columns s of in-block j, in chunks of BK) with B_i[:, q-chunk].
# - "arranged" (several whole blocks per tile, small r): A = BN // R out-blocks x BB = BK // R in-blocks, viewed in
#   the block-row arrangement (A, R*BB, R) whose element [ia, p*BB + jb, s] is W[(i0 + ia)*r + p, (j0 + jb)*r + s].
#   There W'_ij = W_ij (I + B_i) + B_i is one batched product W3 @ B3 plus B broadcast over jb, and the result
#   reshapes for free to the (BN, BK) tile. The product is a 3-D ``tl.dot`` for R >= 16 and a broadcast
#   multiply-sum below (``tl.dot`` needs an inner size of 16); for r = 1 that is an elementwise W*B + B.
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _dot_operand(t, INTERPRET: tl.constexpr):
    """``t`` ready for ``tl.dot``: bf16 becomes fp32 under the interpreter (whose bf16 dot is wrong)."""
    if INTERPRET and t.dtype == tl.bfloat16:
        t = t.to(tl.float32)
    return t


@triton.jit
def _wide(stride, INT64: tl.constexpr):
    """``stride`` as int64 when INT64 (then every ``index * stride`` offset is computed in int64), else as is.
    Indices themselves stay int32: each is below M, N or K."""
    if INT64:
        stride = tl.cast(stride, tl.int64)
    return stride


@triton.jit
def _num_tiles(blocks, LANES: tl.constexpr, R: tl.constexpr):
    """Tiles of LANES lanes over ``blocks`` r-blocks: whole blocks per tile, or R // LANES tiles per block."""
    if LANES >= R:
        return tl.cdiv(blocks, LANES // R)
    return blocks * (R // LANES)


@triton.jit
def _coords(tile, LANES: tl.constexpr, R: tl.constexpr, r: tl.constexpr, blocks):
    """Element indices (LANES,) of tile ``tile`` along one dimension of W, and their in-range mask."""
    lane = tl.arange(0, LANES)
    if LANES >= R:
        blk = tile * (LANES // R) + lane // R
        within = lane % R
    else:
        blk = tile // (R // LANES)
        within = (tile % (R // LANES)) * LANES + lane
    return blk * r + within, (blk < blocks) & (within < r)


@triton.jit
def _sub_coords(tile, LANES: tl.constexpr, R: tl.constexpr):
    """Sub-block tiling: the block index (scalar) and the lanes within it (LANES,) of tile ``tile``."""
    return tile // (R // LANES), (tile % (R // LANES)) * LANES + tl.arange(0, LANES)


@triton.jit
def _load_b2(BLK, i, s, q, NB, stride_bi, stride_bs, stride_bq, r: tl.constexpr, FD: tl.constexpr):
    """B[i, s, q] as a (len(s), len(q)) tile in FD, zero outside the block (s, q >= r) or past the last block."""
    mask = (s[:, None] < r) & (q[None, :] < r) & (i < NB)
    ptrs = BLK + i * stride_bi + s[:, None] * stride_bs + q[None, :] * stride_bq
    return tl.load(ptrs, mask=mask, other=0.0).to(FD)


@triton.jit
def _load_sub_b(BLK, i, p, q, NB, stride_bi, stride_bs, stride_bq, BN: tl.constexpr, BK: tl.constexpr,
                R: tl.constexpr, r: tl.constexpr, FD: tl.constexpr):  # fmt: skip
    """B for a sub-block tile: (b_sq, b_pq) = (B_i[:, q] (R, BK), B_i[p, q] (BN, BK)), one load when they are the
    same tile (BN == R). b_sq is only needed when BK == R (else :func:`_form_sub` loads B in chunks)."""
    b_pq = _load_b2(BLK, i, p, q, NB, stride_bi, stride_bs, stride_bq, r, FD)
    if BK == R and BN != R:
        b_sq = _load_b2(BLK, i, tl.arange(0, R), q, NB, stride_bi, stride_bs, stride_bq, r, FD)
    else:
        b_sq = b_pq
    return b_sq, b_pq


@triton.jit
def _product(a, b, FD: tl.constexpr, OPS_INPUT: tl.constexpr, PREC: tl.constexpr, INTERPRET: tl.constexpr):
    """``a @ b`` (2-D or batched 3-D) in FD. a: W values in W's dtype; b: B values in FD. OPS_INPUT: operands in
    W's (half) dtype, B rounded to it; else FD operands at ``input_precision=PREC``."""
    if OPS_INPUT:
        a_op = _dot_operand(a, INTERPRET)
        b_op = _dot_operand(b.to(a.dtype), INTERPRET)
    else:
        a_op = a.to(FD)
        b_op = b
    return tl.dot(a_op, b_op, input_precision=PREC, out_dtype=FD)


@triton.jit
def _form_sub(w, W, BLK, rows, row_ok, i, j, q, b_sq, b_pq, NB, stride_wn, stride_wk, stride_bi, stride_bs,
              stride_bq, BN: tl.constexpr, BK: tl.constexpr, R: tl.constexpr, r: tl.constexpr, FD: tl.constexpr,
              OPS_INPUT: tl.constexpr, PREC: tl.constexpr, INTERPRET: tl.constexpr):  # fmt: skip
    """Sub-block W' tile (BN, BK) in FD: ``W[p, q] + sum_s W[p, s] B_i[s, q] + B_i[p, q]``.

    w: the W tile (rows, in-block j's lanes q); b_pq = B_i[p, q]; b_sq = B_i[:, q] (R, BK), used when BK == R
    (the W tile then holds every s of its rows). When BK < R the s sum runs over R / BK chunks of W's rows.
    """
    if BK == R:
        delta = _product(w, b_sq, FD, OPS_INPUT, PREC, INTERPRET)
    else:
        delta = tl.zeros((BN, BK), dtype=FD)
        for s0 in range(0, R, BK):
            s = s0 + tl.arange(0, BK)
            w_s = tl.load(W + rows[:, None] * stride_wn + (j * r + s)[None, :] * stride_wk,
                          mask=row_ok[:, None] & (s < r)[None, :], other=0.0)  # fmt: skip
            b_s = _load_b2(BLK, i, s, q, NB, stride_bi, stride_bs, stride_bq, r, FD)
            delta += _product(w_s, b_s, FD, OPS_INPUT, PREC, INTERPRET)
    return w.to(FD) + delta + b_pq


@triton.jit
def _arranged_coords(i0, j0, NB, KB, A: tl.constexpr, BB: tl.constexpr, R: tl.constexpr, r: tl.constexpr):
    """Row index (A, R*BB, 1), column index (1, R*BB, R), mask (A, R*BB, R) and the row-in-block p (1, R*BB, 1)
    of W in the block-row arrangement of out-blocks ``i0 ..`` x in-blocks ``j0 ..``."""
    ia = tl.arange(0, A)[:, None, None]
    t = tl.arange(0, R * BB)[None, :, None]
    s = tl.arange(0, R)[None, None, :]
    p = t // BB
    bi = i0 + ia
    bj = j0 + t % BB
    ok = (bi < NB) & (bj < KB) & (p < r) & (s < r)
    return bi * r + p, bj * r + s, ok, p


@triton.jit
def _load_b_arranged(BLK, i0, NB, stride_bi, stride_bs, stride_bq, A: tl.constexpr, BB: tl.constexpr,
                     R: tl.constexpr, r: tl.constexpr, FD: tl.constexpr):  # fmt: skip
    """B for out-blocks ``i0 .. i0 + A`` in FD, twice: (A, R, R) as the right operand of W3 @ B3, and broadcast
    to the arrangement (A, R*BB, R), element [ia, p*BB + jb, q] = B[i0 + ia, p, q]."""
    ia = tl.arange(0, A)[:, None, None]
    u = tl.arange(0, R)[None, :, None]
    q = tl.arange(0, R)[None, None, :]
    p = tl.arange(0, R * BB)[None, :, None] // BB
    bi = i0 + ia
    b3 = tl.load(BLK + bi * stride_bi + u * stride_bs + q * stride_bq, mask=(bi < NB) & (u < r) & (q < r), other=0.0)
    b_x = tl.load(BLK + bi * stride_bi + p * stride_bs + q * stride_bq, mask=(bi < NB) & (p < r) & (q < r), other=0.0)
    return b3.to(FD), b_x.to(FD)


@triton.jit
def _form_arranged(w3, b3, b_x, A: tl.constexpr, BB: tl.constexpr, R: tl.constexpr, FD: tl.constexpr,
                   OPS_INPUT: tl.constexpr, PREC: tl.constexpr, INTERPRET: tl.constexpr):  # fmt: skip
    """Arranged W' tile, returned as (A*R, BB*R) in FD: W3 + W3 @ B3 + B broadcast over in-blocks."""
    if R < 16:
        delta = tl.sum(w3.to(FD)[:, :, :, None] * b3[:, None, :, :], axis=2)
    else:
        delta = _product(w3, b3, FD, OPS_INPUT, PREC, INTERPRET)
    return tl.reshape(w3.to(FD) + delta + b_x, (A * R, BB * R))


# ----------------------------------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _bat_gemm_kernel(
    A_PTR, W, BLK, BIAS, C,
    M, NB, KB,
    stride_am, stride_ak, stride_wn, stride_wk, stride_bi, stride_bs, stride_bq, stride_cm, stride_cn,
    FORWARD: tl.constexpr, FUSED: tl.constexpr, HAS_BIAS: tl.constexpr, SUB: tl.constexpr,
    r: tl.constexpr, R: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr, GROUP_M: tl.constexpr,
    FD: tl.constexpr, OPS_INPUT: tl.constexpr, FORM_PREC: tl.constexpr, MAIN_PREC: tl.constexpr,
    INT64: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """C (M, cols) = A_PTR (M, depth) @ op(W'), W' (N, K) given as W and B (FUSED), or as W' itself in W.

    FORWARD: ``y = x W'^T (+ bias)``: output columns are W's rows (n-tiles of BN lanes), the depth is K (steps of
    BK lanes). Else ``dx = dY W'``: output columns are W's columns (k-tiles of BK lanes), the depth is N (steps of
    BN lanes). NB / KB: r-blocks in N / K. A plain GEMM is FUSED=False with r = R = 1.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    if FORWARD:
        num_cols = _num_tiles(NB, BN, R)
        steps = _num_tiles(KB, BK, R)
    else:
        num_cols = _num_tiles(KB, BK, R)
        steps = _num_tiles(NB, BN, R)
    width = GROUP_M * num_cols
    first_m = (pid // width) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_c = (pid % width) // group_size

    stride_am = _wide(stride_am, INT64)
    stride_ak = _wide(stride_ak, INT64)
    stride_wn = _wide(stride_wn, INT64)
    stride_wk = _wide(stride_wk, INT64)
    stride_bi = _wide(stride_bi, INT64)
    stride_cm = _wide(stride_cm, INT64)
    stride_cn = _wide(stride_cn, INT64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_ok = offs_m < M
    if FORWARD:
        out_idx, out_ok = _coords(pid_c, BN, R, r, NB)
        acc = tl.zeros((BM, BN), dtype=FD)
    else:
        out_idx, out_ok = _coords(pid_c, BK, R, r, KB)
        acc = tl.zeros((BM, BK), dtype=FD)
    # Forward: B depends on the n-tile only (and, for sub-blocks, on q, fixed when BK == R): load it once.
    PRELOAD: tl.constexpr = FUSED and FORWARD and (not SUB or BK == R)
    if PRELOAD:
        if SUB:
            i, p = _sub_coords(pid_c, BN, R)
            q = tl.arange(0, BK)
            b_sq, b_pq = _load_sub_b(BLK, i, p, q, NB, stride_bi, stride_bs, stride_bq, BN, BK, R, r, FD)
        else:
            b3, b_x = _load_b_arranged(BLK, pid_c * (BN // R), NB, stride_bi, stride_bs, stride_bq, BN // R, BK // R,
                                       R, r, FD)  # fmt: skip

    for step in range(0, steps):
        if FORWARD:
            n_tile = pid_c
            k_tile = step
            depth_idx, depth_ok = _coords(step, BK, R, r, KB)
        else:
            n_tile = step
            k_tile = pid_c
            depth_idx, depth_ok = _coords(step, BN, R, r, NB)
        a_tile = tl.load(A_PTR + offs_m[:, None] * stride_am + depth_idx[None, :] * stride_ak,
                         mask=m_ok[:, None] & depth_ok[None, :], other=0.0)  # fmt: skip
        if FUSED and not SUB:
            A: tl.constexpr = BN // R
            BB: tl.constexpr = BK // R
            w_rows, w_cols, w_ok, _ = _arranged_coords(n_tile * A, k_tile * BB, NB, KB, A, BB, R, r)
            w3 = tl.load(W + w_rows * stride_wn + w_cols * stride_wk, mask=w_ok, other=0.0)
            if not PRELOAD:
                b3, b_x = _load_b_arranged(BLK, n_tile * A, NB, stride_bi, stride_bs, stride_bq, A, BB, R, r, FD)
            w = _form_arranged(w3, b3, b_x, A, BB, R, FD, OPS_INPUT, FORM_PREC, INTERPRET)
        else:
            rows, row_ok = _coords(n_tile, BN, R, r, NB)
            cols, col_ok = _coords(k_tile, BK, R, r, KB)
            w = tl.load(W + rows[:, None] * stride_wn + cols[None, :] * stride_wk,
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # fmt: skip
            if FUSED:
                j, q = _sub_coords(k_tile, BK, R)
                if not PRELOAD:
                    i, p = _sub_coords(n_tile, BN, R)
                    b_sq, b_pq = _load_sub_b(BLK, i, p, q, NB, stride_bi, stride_bs, stride_bq, BN, BK, R, r, FD)
                w = _form_sub(w, W, BLK, rows, row_ok, i, j, q, b_sq, b_pq, NB, stride_wn, stride_wk, stride_bi,
                              stride_bs, stride_bq, BN, BK, R, r, FD, OPS_INPUT, FORM_PREC, INTERPRET)  # fmt: skip
        if FUSED:
            w = w.to(A_PTR.dtype.element_ty)  # W' rounded once to the GEMM's operand dtype
        if FD.is_fp64():
            a_op = a_tile.to(tl.float64)
            w = w.to(tl.float64)
        else:
            a_op = _dot_operand(a_tile, INTERPRET)
            w = _dot_operand(w, INTERPRET)
        if FORWARD:
            acc = tl.dot(a_op, tl.trans(w), acc, input_precision=MAIN_PREC, out_dtype=FD)
        else:
            acc = tl.dot(a_op, w, acc, input_precision=MAIN_PREC, out_dtype=FD)

    if FORWARD and HAS_BIAS:
        acc += tl.load(BIAS + out_idx, mask=out_ok, other=0.0).to(FD)[None, :]
    c_ptrs = C + offs_m[:, None] * stride_cm + out_idx[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=m_ok[:, None] & out_ok[None, :])


@triton.jit
def _bat_build_kernel(
    W, BLK, OUT,
    NB, KB,
    stride_wn, stride_wk, stride_bi, stride_bs, stride_bq, stride_on, stride_ok,
    SUB: tl.constexpr, r: tl.constexpr, R: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    FD: tl.constexpr, OPS_INPUT: tl.constexpr, FORM_PREC: tl.constexpr, INT64: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """OUT (N, K) = W' in OUT's dtype; program (n-tile, k-tile) writes one (BN, BK) tile."""
    stride_wn = _wide(stride_wn, INT64)
    stride_wk = _wide(stride_wk, INT64)
    stride_bi = _wide(stride_bi, INT64)
    stride_on = _wide(stride_on, INT64)
    stride_ok = _wide(stride_ok, INT64)
    n_tile = tl.program_id(0)
    k_tile = tl.program_id(1)
    rows, row_ok = _coords(n_tile, BN, R, r, NB)
    cols, col_ok = _coords(k_tile, BK, R, r, KB)
    if SUB:
        w = tl.load(W + rows[:, None] * stride_wn + cols[None, :] * stride_wk,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # fmt: skip
        i, p = _sub_coords(n_tile, BN, R)
        j, q = _sub_coords(k_tile, BK, R)
        b_sq, b_pq = _load_sub_b(BLK, i, p, q, NB, stride_bi, stride_bs, stride_bq, BN, BK, R, r, FD)
        w_prime = _form_sub(w, W, BLK, rows, row_ok, i, j, q, b_sq, b_pq, NB, stride_wn, stride_wk, stride_bi,
                            stride_bs, stride_bq, BN, BK, R, r, FD, OPS_INPUT, FORM_PREC, INTERPRET)  # fmt: skip
    else:
        A: tl.constexpr = BN // R
        BB: tl.constexpr = BK // R
        w_rows, w_cols, w_ok, _ = _arranged_coords(n_tile * A, k_tile * BB, NB, KB, A, BB, R, r)
        w3 = tl.load(W + w_rows * stride_wn + w_cols * stride_wk, mask=w_ok, other=0.0)
        b3, b_x = _load_b_arranged(BLK, n_tile * A, NB, stride_bi, stride_bs, stride_bq, A, BB, R, r, FD)
        w_prime = _form_arranged(w3, b3, b_x, A, BB, R, FD, OPS_INPUT, FORM_PREC, INTERPRET)
    tl.store(OUT + rows[:, None] * stride_on + cols[None, :] * stride_ok, w_prime.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])  # fmt: skip


@triton.jit
def _g_tile(DY, X, rows, row_ok, cols, col_ok, M, stride_dm, stride_dn, stride_xm, stride_xk, BN: tl.constexpr,
            BK: tl.constexpr, BM: tl.constexpr, FD: tl.constexpr, MAIN_PREC: tl.constexpr,
            INTERPRET: tl.constexpr):  # fmt: skip
    """G[rows, cols] = sum over all M of dY[:, rows]^T x[:, cols], (BN, BK) in FD, accumulated in registers."""
    g = tl.zeros((BN, BK), dtype=FD)
    for m0 in range(0, M, BM):
        offs_m = m0 + tl.arange(0, BM)
        m_ok = offs_m < M
        dy = tl.load(DY + offs_m[:, None] * stride_dm + rows[None, :] * stride_dn,
                     mask=m_ok[:, None] & row_ok[None, :], other=0.0)  # fmt: skip
        x = tl.load(X + offs_m[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=m_ok[:, None] & col_ok[None, :], other=0.0)  # fmt: skip
        if FD.is_fp64():
            dy = dy.to(tl.float64)
            x = x.to(tl.float64)
        else:
            dy = _dot_operand(dy, INTERPRET)
            x = _dot_operand(x, INTERPRET)
        g = tl.dot(tl.trans(dy), x, g, input_precision=MAIN_PREC, out_dtype=FD)
    return g


@triton.jit
def _bat_dblock_kernel(
    DY, X, W, OUT,
    M, NB, KB, per_split,
    stride_dm, stride_dn, stride_xm, stride_xk, stride_wn, stride_wk,
    stride_os, stride_oi, stride_op, stride_oq,
    SUB: tl.constexpr, r: tl.constexpr, R: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr,
    FD: tl.constexpr, MAIN_PREC: tl.constexpr, EPI_PREC: tl.constexpr, ATOMIC: tl.constexpr,
    INT64: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """dB_i = sum_j (W_ij + I)^T G_ij with G = dY^T x formed tile by tile in registers, never stored.

    Program (t, s): split s covers ``per_split`` in-blocks (SUB) or K tiles (arranged) of the in-blocks.
    - SUB: t = (out-block i, q-chunk of BK lanes); dB_i[:, q] (R, BK) += (W[p-chunk, j] + I)^T @ G[p-chunk, q]
      for every p-chunk (BN lanes) of block i and every in-block j of the split.
    - arranged: t = A = BN // R out-blocks; per K tile of BB = BK // R in-blocks, G (BN, BK) is reshaped to the
      block-row arrangement and ``dB (A, R, R) += (W3 + I)^T @ G3``.
    OUT is (splits, N/r, r, r): the program writes OUT[s], or with ATOMIC adds into OUT[0].
    """
    stride_dm = _wide(stride_dm, INT64)
    stride_dn = _wide(stride_dn, INT64)
    stride_xm = _wide(stride_xm, INT64)
    stride_xk = _wide(stride_xk, INT64)
    stride_wn = _wide(stride_wn, INT64)
    stride_wk = _wide(stride_wk, INT64)
    stride_os = _wide(stride_os, INT64)
    stride_oi = _wide(stride_oi, INT64)
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    if SUB:
        i, q = _sub_coords(pid, BK, R)
        s_all = tl.arange(0, R)
        db = tl.zeros((R, BK), dtype=FD)
        first = pid_s * per_split
        last = tl.minimum(first + per_split, KB)
        for j in range(first, last):
            cols = j * r + q
            col_ok = q < r
            for p0 in range(0, R, BN):
                p = p0 + tl.arange(0, BN)
                rows = i * r + p
                row_ok = (p < r) & (i < NB)
                g = _g_tile(DY, X, rows, row_ok, cols, col_ok, M, stride_dm, stride_dn, stride_xm, stride_xk, BN, BK,
                            BM, FD, MAIN_PREC, INTERPRET)  # fmt: skip
                w_ok = row_ok[:, None] & (s_all < r)[None, :]
                w = tl.load(W + rows[:, None] * stride_wn + (j * r + s_all)[None, :] * stride_wk, mask=w_ok,
                            other=0.0).to(FD)  # fmt: skip
                w += tl.where((p[:, None] == s_all[None, :]) & w_ok, 1.0, 0.0).to(FD)
                db = tl.dot(tl.trans(w), g, db, input_precision=EPI_PREC, out_dtype=FD)
        u = s_all[:, None]
        mask = (u < r) & (q[None, :] < r) & (i < NB)
        offs = i * stride_oi + u * stride_op + q[None, :] * stride_oq
    else:
        A: tl.constexpr = BN // R
        BB: tl.constexpr = BK // R
        i0 = pid * A
        rows, row_ok = _coords(pid, BN, R, r, NB)
        first = pid_s * per_split
        last = tl.minimum(first + per_split, tl.cdiv(KB, BB))
        db = tl.zeros((A, R, R), dtype=FD)
        for kt in range(first, last):
            cols, col_ok = _coords(kt, BK, R, r, KB)
            g = _g_tile(DY, X, rows, row_ok, cols, col_ok, M, stride_dm, stride_dn, stride_xm, stride_xk, BN, BK, BM,
                        FD, MAIN_PREC, INTERPRET)  # fmt: skip
            w_rows, w_cols, w_ok, p = _arranged_coords(i0, kt * BB, NB, KB, A, BB, R, r)
            w3 = tl.load(W + w_rows * stride_wn + w_cols * stride_wk, mask=w_ok, other=0.0).to(FD)
            w3 += tl.where((p == tl.arange(0, R)[None, None, :]) & w_ok, 1.0, 0.0).to(FD)
            g3 = tl.reshape(g, (A, R * BB, R))
            if R < 16:
                db += tl.sum(w3[:, :, :, None] * g3[:, :, None, :], axis=1)
            else:
                db = tl.dot(tl.permute(w3, (0, 2, 1)), g3, db, input_precision=EPI_PREC, out_dtype=FD)
        ia = tl.arange(0, A)[:, None, None]
        u = tl.arange(0, R)[None, :, None]
        q = tl.arange(0, R)[None, None, :]
        mask = (i0 + ia < NB) & (u < r) & (q < r)
        offs = (i0 + ia) * stride_oi + u * stride_op + q * stride_oq
    if ATOMIC:
        tl.atomic_add(OUT + offs, db.to(OUT.dtype.element_ty), mask=mask, sem="relaxed")
    else:
        tl.store(OUT + pid_s * stride_os + offs, db.to(OUT.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Configs: parsed from the JSON dicts of configs.py (defaults and candidates live there, not here).
# ----------------------------------------------------------------------------------------------------------

STRATEGIES = ("fused", "materialize")
GEMMS = ("cublas", "triton")
FORM_PRECISIONS = ("matched", "tf32x3", "ieee")
DB_REDUCES = ("partials", "atomic")


@dataclass(frozen=True)
class Tiles:
    """One kernel's launch shape: ``block_n`` / ``block_k`` lanes of W's rows / columns per tile (fitted to r by
    :func:`_tiling`), ``block_m`` rows of x / dY (unused by the W' build kernel), warps, pipeline stages, and the
    program grouping along M (``group_m``, GEMM kernels only)."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    block_m: int = 16
    group_m: int = 8


def _tiles(config: Config, where: str, extra: tuple[str, ...] = ()) -> Tiles:
    """Read and check a Tiles from ``config`` (a dict of tile sizes, warps, stages and the ``extra`` keys)."""
    if not isinstance(config, dict):
        raise ValueError(f"{where} must be a dict; got {config!r}")
    names = {f.name for f in fields(Tiles)}
    unknown = sorted(set(config) - names - set(extra))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known keys are {sorted(names | set(extra))}")
    for key in ("block_n", "block_k", "num_warps", "num_stages"):
        if key not in config:
            raise ValueError(f"{where}: missing {key!r}; got keys {sorted(config)}")
    for key in ("block_m", "block_n", "block_k", "num_warps"):
        value = config.get(key, 16)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1):
            raise ValueError(f"{where}[{key!r}] must be a power of two >= 1; got {value!r}")
    for key in ("num_stages", "group_m"):
        value = config.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}[{key!r}] must be an int >= 1; got {value!r}")
    for key in ("block_m", "block_n", "block_k"):
        if config.get(key, 16) < 16:
            raise ValueError(f"{where}[{key!r}] must be >= 16 (tl.dot's inner size); got {config[key]}")
    return Tiles(**{k: v for k, v in config.items() if k in names})


def _choice(config: Config, key: str, allowed: tuple[str, ...], where: str) -> str:
    value = config.get(key)
    if value not in allowed:
        raise ValueError(f"{where}[{key!r}] must be one of {allowed}; got {value!r}")
    return value


def _complete(config: Config, default: Config, where: str) -> Config:
    """``config`` with missing entries (and missing entries of its nested dicts) taken from ``default``."""
    if not isinstance(config, dict):
        raise TypeError(f"{where} must be a dict; got {type(config).__name__}")
    unknown = sorted(set(config) - set(default))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known keys are {sorted(default)}")
    out = {**default, **config}
    for key, value in default.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            out[key] = {**value, **config[key]}
    return out


# ----------------------------------------------------------------------------------------------------------
# Host helpers: everything a launch needs besides the tensors, shared by the launchers and aot_cases().
# ----------------------------------------------------------------------------------------------------------


def _tiling(r: int, block_n: int, block_k: int) -> tuple[bool, int, int]:
    """(SUB, BN, BK): sub-block tiles (inside one r-block, lanes clamped to R) when R >= min(block_n, block_k),
    else arranged tiles of whole blocks (block_n // R out-blocks x block_k // R in-blocks)."""
    rp = configs.bat_padded_r(r)
    if rp >= min(block_n, block_k):
        return True, min(block_n, rp), min(block_k, rp)
    return False, block_n, block_k


def _count_tiles(blocks: int, lanes: int, rp: int) -> int:
    """Host twin of the kernels' ``_num_tiles``."""
    return triton.cdiv(blocks, lanes // rp) if lanes >= rp else blocks * (rp // lanes)


_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def _form_mode(choice: str, x_dtype: torch.dtype, fd: torch.dtype, main_precision: str) -> tuple[bool, str]:
    """(OPS_INPUT, input_precision) of the W' formation product for a ``form_precision`` choice.

    fp64 delta dtype: fp64 "ieee". "matched": operands in x's dtype for fp16/bf16 x; for fp32 x "tf32" when the
    main GEMM is TF32, else "tf32x3". "tf32x3" / "ieee": fp32 operands at that precision.
    """
    if fd == torch.float64:
        return False, "ieee"
    if choice == "matched":
        if x_dtype in (torch.float16, torch.bfloat16):
            return True, "tf32"  # input_precision is ignored for half operands
        return False, "tf32" if main_precision == "tf32" else "tf32x3"
    return False, choice


def _db_precision(choice: str, x_dtype: torch.dtype, fd: torch.dtype, main_precision: str) -> str:
    """input_precision of dB's epilogue ``(W + I)^T G`` (fp32 operands: G is an fp32 sum). "matched": "tf32" for
    fp16/bf16 inputs (their W is exact in TF32, G is rounded to 2^-11, finer than the inputs), for fp32 inputs
    "tf32" when the main GEMM is TF32, else "tf32x3"."""
    if fd == torch.float64:
        return "ieee"
    if choice == "matched":
        if x_dtype in (torch.float16, torch.bfloat16) or main_precision == "tf32":
            return "tf32"
        return "tf32x3"
    return choice


def _gemm_constexprs(
    *,
    forward: bool,
    fused: bool,
    has_bias: bool,
    r: int,
    tiles: Tiles,
    fd: torch.dtype,
    form: tuple[bool, str],
    main_precision: str,
    int64: bool,
) -> dict:
    """The constexpr arguments of ``_bat_gemm_kernel`` for one launch (a plain GEMM when not ``fused``)."""
    if not fused:
        r = 1
    sub, bn, bk = _tiling(r, tiles.block_n, tiles.block_k)
    return dict(
        FORWARD=forward, FUSED=fused, HAS_BIAS=has_bias, SUB=sub, r=r, R=configs.bat_padded_r(r), BN=bn, BK=bk,
        BM=tiles.block_m, GROUP_M=tiles.group_m, FD=_TL_DTYPES[fd], OPS_INPUT=form[0], FORM_PREC=form[1],
        MAIN_PREC=main_precision, INT64=int64, INTERPRET=interpreting(),
    )  # fmt: skip


def _build_constexprs(*, r: int, tiles: Tiles, fd: torch.dtype, form: tuple[bool, str], int64: bool) -> dict:
    """The constexpr arguments of ``_bat_build_kernel``."""
    sub, bn, bk = _tiling(r, tiles.block_n, tiles.block_k)
    return dict(
        SUB=sub, r=r, R=configs.bat_padded_r(r), BN=bn, BK=bk, FD=_TL_DTYPES[fd], OPS_INPUT=form[0], FORM_PREC=form[1],
        INT64=int64, INTERPRET=interpreting(),
    )  # fmt: skip


def _dblock_constexprs(
    *, r: int, tiles: Tiles, fd: torch.dtype, main_precision: str, epi_precision: str, atomic: bool, int64: bool
) -> dict:
    """The constexpr arguments of ``_bat_dblock_kernel``."""
    sub, bn, bk = _tiling(r, tiles.block_n, tiles.block_k)
    return dict(
        SUB=sub, r=r, R=configs.bat_padded_r(r), BN=bn, BK=bk, BM=tiles.block_m, FD=_TL_DTYPES[fd],
        MAIN_PREC=main_precision, EPI_PREC=epi_precision, ATOMIC=atomic, INT64=int64, INTERPRET=interpreting(),
    )  # fmt: skip


def _dblock_grid(r: int, tiles: Tiles, nb: int, kb: int) -> tuple[int, int]:
    """(programs, split units) of the dB kernel: programs per split, and the in-blocks (SUB) or K tiles
    (arranged) that the splits share."""
    sub, bn, bk = _tiling(r, tiles.block_n, tiles.block_k)
    rp = configs.bat_padded_r(r)
    if sub:
        return nb * (rp // bk), kb
    return triton.cdiv(nb, bn // rp), triton.cdiv(kb, bk // rp)


def _splits(config_split: int, programs: int, units: int, device: torch.device) -> int:
    """K splits of the dB kernel: the config's, or (0) enough for about two programs per SM."""
    if config_split > 0:
        return min(config_split, units)
    return max(1, min(units, math.ceil(2 * configs.sm_count(device) / programs)))


# ----------------------------------------------------------------------------------------------------------
# Launchers.
# ----------------------------------------------------------------------------------------------------------


def _launch_gemm(
    a: torch.Tensor,
    weight: torch.Tensor,
    block: torch.Tensor | None,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    *,
    forward: bool,
    tiles: Tiles,
    fd: torch.dtype,
    form: tuple[bool, str],
) -> torch.Tensor:
    """``out = a @ W'^T + bias`` (forward) or ``out = a @ W'`` (dx). With ``block``, W' is formed on the fly
    from ``weight``; with ``block=None``, ``weight`` is W' itself (a plain GEMM)."""
    fused = block is not None
    r = block.shape[-1] if fused else 1
    meta = _gemm_constexprs(
        forward=forward, fused=fused, has_bias=bias is not None, r=r, tiles=tiles, fd=fd, form=form,
        main_precision=fp32_dot_precision(a.device, fd), int64=needs_int64(a, weight, out),
    )  # fmt: skip
    n, k = weight.shape
    nb, kb = n // r, k // r
    cols = _count_tiles(nb, meta["BN"], meta["R"]) if forward else _count_tiles(kb, meta["BK"], meta["R"])
    grid = (triton.cdiv(a.shape[0], tiles.block_m) * cols,)
    blk = block if fused else weight  # not read when not fused
    bstr = block.stride() if fused else (0, 0, 0)
    _bat_gemm_kernel[grid](
        a, weight, blk, bias if bias is not None else out, out,
        a.shape[0], nb, kb,
        a.stride(0), a.stride(1), weight.stride(0), weight.stride(1), *bstr, out.stride(0), out.stride(1),
        **meta, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    return out


def materialize_weight(
    weight: torch.Tensor, block: torch.Tensor, dtype: torch.dtype, tiles: Tiles, form_precision: str = "tf32x3"
) -> torch.Tensor:
    """W' (N, K) in ``dtype``, ``W'_ij = W_ij (I + B_i) + B_i`` formed in the delta dtype by one kernel launch.

    A transient of one call: the caller drops it after its GEMM.
    """
    n, k = weight.shape
    r = block.shape[-1]
    fd = delta_dtype(weight.dtype, block.dtype)
    out = torch.empty(n, k, dtype=dtype, device=weight.device)
    form = _form_mode(form_precision, weight.dtype, fd, fp32_dot_precision(weight.device))
    meta = _build_constexprs(r=r, tiles=tiles, fd=fd, form=form, int64=needs_int64(weight, out))
    grid = (_count_tiles(n // r, meta["BN"], meta["R"]), _count_tiles(k // r, meta["BK"], meta["R"]))
    with nvtx_range("bonekern.bat.build_weight"):
        _bat_build_kernel[grid](
            weight, block, out,
            n // r, k // r,
            weight.stride(0), weight.stride(1), *block.stride(), out.stride(0), out.stride(1),
            **meta, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )  # fmt: skip
    return out


def block_gradient(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    block: torch.Tensor,
    tiles: Tiles,
    split_k: int = 0,
    reduce: str = "partials",
    db_precision: str = "matched",
) -> torch.Tensor:
    """dB (N/r, r, r) in the block's dtype: ``dB_i = sum_j (W_ij + I)^T G_ij``; G = dY^T x is never stored.

    ``split_k`` K splits (0: about two programs per SM); ``reduce`` "partials" (per-split fp32 buffers summed in
    a fixed order: deterministic) or "atomic" (``tl.atomic_add`` into one buffer: order varies run to run).
    """
    n, k = weight.shape
    r = block.shape[-1]
    nb, kb = n // r, k // r
    fd = delta_dtype(x.dtype, block.dtype)
    programs, units = _dblock_grid(r, tiles, nb, kb)
    splits = _splits(split_k, programs, units, x.device)
    per_split = triton.cdiv(units, splits)
    splits = triton.cdiv(units, per_split)  # no empty split
    atomic = reduce == "atomic" and splits > 1
    if atomic:
        out = torch.zeros((1, nb, r, r), dtype=fd, device=x.device)
    elif splits == 1:
        out = torch.empty((1, nb, r, r), dtype=block.dtype, device=x.device)
    else:
        out = torch.empty((splits, nb, r, r), dtype=fd, device=x.device)
    main = fp32_dot_precision(x.device, fd)
    meta = _dblock_constexprs(
        r=r, tiles=tiles, fd=fd, main_precision=main, epi_precision=_db_precision(db_precision, x.dtype, fd, main),
        atomic=atomic, int64=needs_int64(dy, x, weight, out),
    )  # fmt: skip
    with nvtx_range("bonekern.bat.dblock"):
        _bat_dblock_kernel[(programs, splits)](
            dy, x, weight, out,
            dy.shape[0], nb, kb, per_split,
            dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), *out.stride(),
            **meta, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )  # fmt: skip
        db = out[0] if out.shape[0] == 1 else out.sum(0)  # fixed-order sum of the partials: deterministic
    return db.to(block.dtype)


# ----------------------------------------------------------------------------------------------------------
# The backend entry points.
# ----------------------------------------------------------------------------------------------------------

_GEMM_KEYS = ("block_m", "block_n", "block_k", "group_m", "num_warps", "num_stages")
_DBLOCK_EXTRA = ("split_k", "reduce", "precision")


@dataclass(frozen=True)
class ForwardPlan:
    """A bat forward config, checked: strategy, formation precision, GEMM, tiles and build-kernel tiles."""

    strategy: str
    form_precision: str
    gemm: str
    tiles: Tiles
    build: Tiles

    @staticmethod
    def parse(config: Config, default: Config) -> ForwardPlan:
        where = "bat forward Triton config"
        cfg = _complete(config, default, where)
        return ForwardPlan(
            _choice(cfg, "strategy", STRATEGIES, where),
            _choice(cfg, "form_precision", FORM_PRECISIONS, where),
            _choice(cfg, "gemm", GEMMS, where),
            _tiles({k: cfg[k] for k in _GEMM_KEYS if k in cfg}, where),
            _tiles(cfg["build"], where + "['build']"),
        )


@dataclass(frozen=True)
class BackwardPlan:
    """A bat backward config, checked: dx strategy/precision/GEMM/tiles, build tiles, and the dB launch."""

    strategy: str
    form_precision: str
    gemm: str
    dx: Tiles
    build: Tiles
    dblock: Tiles
    split_k: int
    reduce: str
    db_precision: str

    @staticmethod
    def parse(config: Config, default: Config) -> BackwardPlan:
        where = "bat backward Triton config"
        cfg = _complete(config, default, where)
        sub = cfg["dblock"]
        w = where + "['dblock']"
        dblock = _tiles(sub, w, _DBLOCK_EXTRA)
        split = sub.get("split_k")
        if isinstance(split, bool) or not isinstance(split, int) or split < 0:
            raise ValueError(f"{w}['split_k'] must be an int >= 0 (0: fill the GPU); got {split!r}")
        return BackwardPlan(
            _choice(cfg, "strategy", STRATEGIES, where),
            _choice(cfg, "form_precision", FORM_PRECISIONS, where),
            _choice(cfg, "gemm", GEMMS, where),
            _tiles(cfg["dx"], where + "['dx']"),
            _tiles(cfg["build"], where + "['build']"),
            dblock,
            split,
            _choice(sub, "reduce", DB_REDUCES, w),
            _choice(sub, "precision", FORM_PRECISIONS, w),
        )


def bat_forward(
    x: torch.Tensor, weight: torch.Tensor, block: torch.Tensor, bias: torch.Tensor | None, config: Config
) -> torch.Tensor:
    """y (M, N) = x W'^T + b in x's dtype. x (M, K), weight (N, K) in x's dtype, block (N/r, r, r), bias (N,).

    ``config``: a dict from :func:`configs.bat_forward_configs` (missing entries take the problem's default).
    """
    problem = OpProblem.from_tensors("bat_forward", x.shape[0], weight, block, x.dtype)
    plan = ForwardPlan.parse(config, configs.default_config(problem))
    fd = delta_dtype(x.dtype, block.dtype)
    form = _form_mode(plan.form_precision, x.dtype, fd, fp32_dot_precision(x.device))
    if plan.strategy == "fused":
        y = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
        with nvtx_range("bonekern.bat.forward_fused"):
            return _launch_gemm(x, weight, block, bias, y, forward=True, tiles=plan.tiles, fd=fd, form=form)
    w_prime = materialize_weight(weight, block, x.dtype, plan.build, plan.form_precision)
    if plan.gemm == "cublas":
        with nvtx_range("bonekern.bat.forward_cublas"):
            return torch.nn.functional.linear(x, w_prime, bias)
    y = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    with nvtx_range("bonekern.bat.forward_gemm"):
        return _launch_gemm(x, w_prime, None, bias, y, forward=True, tiles=plan.tiles, fd=fd, form=form)


def bat_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    block: torch.Tensor,
    need_dx: bool,
    need_dblock: bool,
    config: Config,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dx (M, K) = dY W' in dY's dtype and dB (N/r, r, r) in the block's dtype; None where not asked for.

    ``config``: a dict from :func:`configs.bat_backward_configs` (missing entries take the problem's default).
    """
    problem = OpProblem.from_tensors("bat_backward", dy.shape[0], weight, block, dy.dtype)
    plan = BackwardPlan.parse(config, configs.default_config(problem))
    fd = delta_dtype(x.dtype, block.dtype)
    dx = dblock = None
    if need_dx:
        form = _form_mode(plan.form_precision, dy.dtype, fd, fp32_dot_precision(dy.device))
        if plan.strategy == "fused":
            dx = torch.empty(dy.shape[0], weight.shape[1], dtype=dy.dtype, device=dy.device)
            with nvtx_range("bonekern.bat.dx_fused"):
                _launch_gemm(dy, weight, block, None, dx, forward=False, tiles=plan.dx, fd=fd, form=form)
        else:
            w_prime = materialize_weight(weight, block, dy.dtype, plan.build, plan.form_precision)
            if plan.gemm == "cublas":
                with nvtx_range("bonekern.bat.dx_cublas"):
                    dx = torch.mm(dy, w_prime)
            else:
                dx = torch.empty(dy.shape[0], weight.shape[1], dtype=dy.dtype, device=dy.device)
                with nvtx_range("bonekern.bat.dx_gemm"):
                    _launch_gemm(dy, w_prime, None, None, dx, forward=False, tiles=plan.dx, fd=fd, form=form)
            del w_prime  # a transient of this call only
    if need_dblock:
        dblock = block_gradient(dy, x, weight, block, plan.dblock, plan.split_k, plan.reduce, plan.db_precision)
    return dx, dblock


# ----------------------------------------------------------------------------------------------------------
# Ahead-of-time compile cases (resource baseline; no GPU needed).
# ----------------------------------------------------------------------------------------------------------

AOT_SPECS: tuple[tuple[int, torch.dtype, bool], ...] = (
    (8, torch.bfloat16, False),
    (16, torch.bfloat16, False),
    (32, torch.bfloat16, False),
    (64, torch.bfloat16, False),
    (128, torch.bfloat16, False),
    (256, torch.bfloat16, True),
    (8, torch.float32, True),
    (16, torch.float32, True),
    (32, torch.float32, True),
    (64, torch.float32, True),
    (128, torch.float32, True),
)
"""(r, x's dtype, default tile set only) of the baseline's AOT cases: one r per r class of configs.py (broadcast
formation, 3-D ``tl.dot``, sub-block with one and with several s-chunks) for each dtype family's tables, every
candidate in bf16, the default tile set in fp32 and for r = 256. fp16 compiles to bf16's code with the other MMA
type; fp16, fp64 and the other inputs are compiled by :data:`CHECKED_SPECIALISATIONS`."""

_UNIT_STRIDES = ("stride_ak", "stride_wk", "stride_bq", "stride_cn", "stride_ok", "stride_xk", "stride_dn", "stride_oq")
"""Strides that are 1 for contiguous tensors; Triton's launcher specialises an int argument equal to 1 into the
constant 1, so the AOT cases do the same."""

AOT_KERNELS: tuple[str, ...] = (
    "bat_fwd_fused",
    "bat_fwd_gemm",
    "bat_dx_fused",
    "bat_dx_gemm",
    "bat_build",
    "bat_dblock",
)
"""AOT kernel names: the GEMM kernel as the forward / dx launch it, fused (W' formed per tile) or plain (on a
materialized W'), the W' build kernel and the dB kernel."""


def _tile_name(tiles: Tiles, with_m: bool = True) -> str:
    return configs.bat_tile_name(
        tiles.block_n, tiles.block_k, tiles.num_warps, tiles.num_stages, tiles.block_m if with_m else None
    )


def _aot_case(
    kernel: str,
    x_dtype: torch.dtype,
    r: int,
    tiles: Tiles,
    *,
    archs: tuple[str, ...] = configs.SHIPPED_ARCHS,
    block_dtype: torch.dtype = torch.float32,
    form_precision: str = "matched",
    bias: bool = True,
    tf32: bool = False,
    int64: bool = False,
    atomic: bool = False,
    variant: str = "",
    in_baseline: bool = True,
) -> AotCase:
    """The specialisation of ``kernel`` (one of :data:`AOT_KERNELS`) that the launchers compile for contiguous
    inputs: x, W, dY and the outputs in ``x_dtype``, the block in ``block_dtype``, block size ``r``, ``tiles``,
    ``form_precision`` (W' formation), a forward ``bias``, torch's ``allow_tf32`` = ``tf32``, ``int64`` offsets,
    an ``atomic`` dB reduction. Unit strides become the constant 1, every other integer is i32.

    ``config_name``: the tile set's name (build tiles without "m"), then ".r<r>" (not for the plain GEMMs, whose
    code does not depend on r), then ".<variant>" when given.
    """
    fd = delta_dtype(x_dtype, block_dtype)
    main = "tf32" if tf32 and fd != torch.float64 else "ieee"  # fp32_dot_precision on a GPU with this allow_tf32
    form = _form_mode(form_precision, x_dtype, fd, main)
    if kernel == "bat_build":
        fn, name = _bat_build_kernel, f"{_tile_name(tiles, with_m=False)}.r{r}"
        pointers = {"W": x_dtype, "BLK": block_dtype, "OUT": x_dtype}
        meta = _build_constexprs(r=r, tiles=tiles, fd=fd, form=form, int64=int64)
    elif kernel == "bat_dblock":
        fn, name = _bat_dblock_kernel, f"{_tile_name(tiles)}.r{r}"
        pointers = {"DY": x_dtype, "X": x_dtype, "W": x_dtype, "OUT": fd}
        epi = _db_precision("matched", x_dtype, fd, main)
        meta = _dblock_constexprs(
            r=r, tiles=tiles, fd=fd, main_precision=main, epi_precision=epi, atomic=atomic, int64=int64
        )
    elif kernel in AOT_KERNELS:
        forward, fused = kernel.startswith("bat_fwd"), kernel.endswith("_fused")
        fn, name = _bat_gemm_kernel, f"{_tile_name(tiles)}.r{r}" if fused else _tile_name(tiles)
        pointers = {"A_PTR": x_dtype, "W": x_dtype, "BLK": block_dtype, "BIAS": x_dtype, "C": x_dtype}
        meta = _gemm_constexprs(
            forward=forward, fused=fused, has_bias=forward and bias, r=r, tiles=tiles, fd=fd, form=form,
            main_precision=main, int64=int64,
        )  # fmt: skip
    else:
        raise ValueError(f"kernel must be one of {AOT_KERNELS}; got {kernel!r}")
    constexprs = {**{k: 1 for k in _UNIT_STRIDES if k in fn.arg_names}, **meta}
    signature = {
        a: "constexpr" if a in constexprs else f"*{TRITON_TYPE_NAMES[str(pointers[a])]}" if a in pointers else "i32"
        for a in fn.arg_names
    }
    return AotCase(
        kernel=kernel,
        fn=fn,
        signature=signature,
        constexprs=constexprs,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        config_name=f"{name}.{variant}" if variant else name,
        dtype=TRITON_TYPE_NAMES[str(x_dtype)],
        archs=archs,
        in_baseline=in_baseline,
    )


def _cases_for(arch: str, r: int, dtype: torch.dtype, default_tiles_only: bool) -> list[AotCase]:
    """The kernel specialisations the shipped configs of ``arch`` launch for contiguous inputs of ``dtype`` (block
    fp32, the PEFT default; torch's default allow_tf32=False), block size ``r``, large M, N, K (int32 offsets)."""
    out: list[AotCase] = []
    for op in ("bat_forward", "bat_backward"):
        problem = OpProblem(op, 4096, 4096, 4096, r, r, dtype, torch.float32, torch.device("cpu"))
        candidates = configs.candidate_configs_for(problem, arch)
        if default_tiles_only:  # the default tile set (both strategies) and the Triton GEMM
            candidates = [c for c in candidates if c["tiles"] == candidates[0]["tiles"] or c["gemm"] == "triton"]
        for cfg in candidates:
            forward = op == "bat_forward"
            plan = ForwardPlan.parse(cfg, cfg) if forward else BackwardPlan.parse(cfg, cfg)
            fused = plan.strategy == "fused"
            spec = dict(archs=(arch,), form_precision=plan.form_precision)
            if fused or plan.gemm == "triton":
                kernel = f"bat_{'fwd' if forward else 'dx'}_{'fused' if fused else 'gemm'}"
                out.append(_aot_case(kernel, dtype, r, plan.tiles if forward else plan.dx, **spec))
            if not fused:
                out.append(_aot_case("bat_build", dtype, r, plan.build, **spec))
            if not forward:
                out.append(_aot_case("bat_dblock", dtype, r, plan.dblock, **spec))
    return out


_f16, _f32, _f64 = torch.float16, torch.float32, torch.float64
CHECKED_SPECIALISATIONS: tuple[tuple[str, torch.dtype, int, str, dict], ...] = (
    # (kernel, x dtype, r, tile set, other inputs); "variant" names what differs from the baseline's inputs.
    ("bat_fwd_fused", _f64, 64, "m64n32k32w4s2", {}),
    ("bat_dx_fused", _f64, 8, "m64n16k32w8s2", {}),  # fp32's small-r set; m64n32k32w4s2 spills 1.1-1.6 KB in fp64
    ("bat_fwd_fused", _f32, 16, "m64n32k32w4s2", dict(block_dtype=_f64, variant="block_fp64")),
    ("bat_fwd_fused", _f16, 64, "m64n64k64w4s2", dict(int64=True, variant="int64")),
    ("bat_dx_fused", _f16, 48, "m64n64k64w4s2", dict(int64=True, variant="int64")),
    ("bat_fwd_fused", _f32, 64, "m64n32k32w4s2", dict(bias=False, form_precision="ieee", tf32=True,
                                                      variant="nobias.form_ieee.tf32")),
    ("bat_fwd_fused", _f32, 3, "m64n32k32w4s2", dict(form_precision="tf32x3", tf32=True, variant="form_tf32x3.tf32")),
    ("bat_dx_fused", _f16, 1, "m64n32k32w4s2", {}),
    ("bat_fwd_gemm", _f16, 1, "m64n64k64w4s2", dict(int64=True, variant="int64")),
    ("bat_dx_gemm", _f64, 1, "m64n32k32w4s2", dict(int64=True, variant="int64")),
    ("bat_dblock", _f64, 64, "m64n32k32w4s2", {}),
    ("bat_dblock", _f32, 16, "m64n32k32w4s2", dict(block_dtype=_f64, atomic=True, int64=True,
                                                   variant="block_fp64.atomic.int64")),
    ("bat_dblock", _f16, 3, "m64n32k32w4s2", dict(atomic=True, variant="atomic")),
    ("bat_dblock", _f16, 48, "m64n64k64w4s2", dict(int64=True, variant="int64")),
    ("bat_build", _f64, 64, "n32k32w4s2", dict(form_precision="tf32x3")),
    ("bat_build", _f16, 1, "n32k32w4s2", dict(form_precision="tf32x3", int64=True, variant="int64")),
    ("bat_build", _f16, 48, "n32k32w4s2", dict(form_precision="tf32x3", int64=True, variant="int64")),
)  # fmt: skip
"""Specialisations the baseline's inputs (bf16 / fp32 x, fp32 block, int32 offsets, partial-sum dB) never reach:
fp64 and fp16 x, an fp64 block, int64 offsets, the atomic dB reduction, explicit formation precisions with TF32
allowed, no bias, r = 1, 3 and 48 (padded lanes). The interpreter runs them all (tests/test_triton_bat.py); these
compiles show that Triton's code generator accepts them for sm_80, sm_90 and sm_100 within the same resource rules. Not
stored in the baseline (``in_baseline=False``)."""


def aot_cases() -> list[AotCase]:
    """Every bat kernel x every shipped config (see :data:`AOT_SPECS`; one case per distinct specialisation, with
    the architectures whose configs launch it), then :data:`CHECKED_SPECIALISATIONS` for both families."""
    found: dict[tuple, tuple[AotCase, set[str]]] = {}
    for arch in configs.SHIPPED_ARCHS:
        for r, dtype, default_only in AOT_SPECS:
            for case in _cases_for(arch, r, dtype, default_only):
                constexprs = tuple(sorted((k, str(v)) for k, v in case.constexprs.items()))
                key = (case.kernel, case.dtype, case.num_warps, case.num_stages, constexprs)
                found.setdefault(key, (case, set()))[1].add(arch)
    shipped = [dataclasses.replace(case, archs=tuple(sorted(archs))) for case, archs in found.values()]
    checked = [
        _aot_case(kernel, x_dtype, r, Tiles(**configs.bat_tiles(tiles)), in_baseline=False, **inputs)
        for kernel, x_dtype, r, tiles, inputs in CHECKED_SPECIALISATIONS
    ]
    return shipped + checked
