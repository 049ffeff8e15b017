"""Triton kernels for the bat variant, forward and backward, and the host functions that launch them.

Math (docs/math.md): B is (N/r, r, r); ``W'_ij = W_ij (I + B_i) + B_i`` for out-block i, in-block j;
``y = x W'^T + b``; ``dx = dY W'``; with ``G = dY^T x`` cut into r x r blocks, ``dB_i = sum_j (W_ij + I)^T G_ij``.
Only x is kept for backward; W' never outlives one call.

Kernels (one launch each; all accumulate in fp32, in fp64 when x or the block is fp64):

- ``_bat_gemm_kernel``: ``C = A @ op(W')``, ``op`` a transpose for the forward (``y = x W'^T + b``, bias in the
  epilogue) and the identity for ``dx = dY W'``. With ``FUSED`` it forms each W' tile from W and B right before
  the tile's ``tl.dot`` (strategy "fused"); without, it is a plain tiled GEMM on a W' that
  ``_bat_build_kernel`` wrote (strategy "materialize" with ``gemm="triton"``).
- ``_bat_build_kernel``: writes W' (N, K) in x's dtype, one tile per program (strategy "materialize"). The GEMM
  after it is cuBLAS (``F.linear`` / ``torch.mm``) by default: NVIDIA's per-shape tuned kernels are the bar a
  plain Triton GEMM can at best meet; the Triton GEMM is a config option for the autotuner.
- ``_bat_dblock_kernel``: dB. A program owns out-blocks (or one out-block's column chunk) and a split of the
  in-blocks; per K tile it accumulates ``G_tile = dY_tile^T x_tile`` over all of M in registers and contracts it
  in the epilogue: ``dB_i += (W_ij + I)^T G_ij``. G (N x K) is never written to memory.

When to use which: "fused" re-forms W' once per m-tile (``r / block_m`` extra tensor-core MACs per tile) and
never writes it; "materialize" forms it once (memory bound: a read of W and a write of W') and re-reads it in
the GEMM. Fused wins for few tokens, materialize for many; configs.py picks by M (a model until tuned).

Host side: :func:`bat_forward_launch` and :func:`bat_backward_launch` turn a typed config (:mod:`configs`), the
dtypes and the sizes into the :class:`~common.LaunchSpec` of every kernel the op launches; :func:`bat_forward` /
:func:`bat_backward` allocate the outputs and call them, and :func:`aot_cases` compiles the same specs ahead of
time (``resources.py``).

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
the kernel is specialised (``INDEX_64``): its strides become int64, so every ``index * stride`` is computed in int64
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
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ...profiling import nvtx_range
from ...validation import delta_dtype
from ..base import OpProblem
from .common import AOT_ENV, AotCase, KernelEnv, LaunchSpec, aot_case, needs_int64
from .configs import BatBackwardConfig, BatDblockConfig, BatForwardConfig, candidates, cdiv
from .tiles import SHIPPED_ARCHS, GemmTile, Tile, bat_padded_r

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
def _wide(stride, INDEX_64: tl.constexpr):
    """``stride`` as int64 when INDEX_64 (then every ``index * stride`` offset is computed in int64), else as is.
    Indices themselves stay int32: each is below M, N or K."""
    if INDEX_64:
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
    """Element indices [LANES] of tile ``tile`` along one dimension of W, and their in-range mask [LANES]."""
    lane = tl.arange(0, LANES)  # [LANES]
    if LANES >= R:
        blk = tile * (LANES // R) + lane // R
        within = lane % R
    else:
        blk = tile // (R // LANES)
        within = (tile % (R // LANES)) * LANES + lane
    return blk * r + within, (blk < blocks) & (within < r)


@triton.jit
def _sub_coords(tile, LANES: tl.constexpr, R: tl.constexpr):
    """Sub-block tiling: the block index (scalar) and the lanes within it [LANES] of tile ``tile``."""
    return tile // (R // LANES), (tile % (R // LANES)) * LANES + tl.arange(0, LANES)


@triton.jit
def _load_b2(BLK, i, s, q, NB, stride_bi, stride_bs, stride_bq, r: tl.constexpr, FD: tl.constexpr):
    """B[i, s, q] as a [len(s), len(q)] tile in FD, zero outside the block (s, q >= r) or past the last block."""
    mask = (s[:, None] < r) & (q[None, :] < r) & (i < NB)
    ptrs = BLK + i * stride_bi + s[:, None] * stride_bs + q[None, :] * stride_bq
    return tl.load(ptrs, mask=mask, other=0.0).to(FD)


@triton.jit
def _load_sub_b(
    BLK,
    i,
    p,
    q,
    NB,
    stride_bi,
    stride_bs,
    stride_bq,
    BN: tl.constexpr,
    BK: tl.constexpr,
    R: tl.constexpr,
    r: tl.constexpr,
    FD: tl.constexpr,
):
    """B for a sub-block tile: (b_sq, b_pq) = (B_i[:, q] [R, BK], B_i[p, q] [BN, BK]), one load when they are the
    same tile (BN == R). b_sq is only needed when BK == R (else :func:`_form_sub` loads B in chunks)."""
    b_pq = _load_b2(BLK, i, p, q, NB, stride_bi, stride_bs, stride_bq, r, FD)  # [BN, BK]
    if BK == R and BN != R:
        b_sq = _load_b2(BLK, i, tl.arange(0, R), q, NB, stride_bi, stride_bs, stride_bq, r, FD)  # [R, BK]
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
def _form_sub(
    w,
    W,
    BLK,
    rows,
    row_ok,
    i,
    j,
    q,
    b_sq,
    b_pq,
    NB,
    stride_wn,
    stride_wk,
    stride_bi,
    stride_bs,
    stride_bq,
    BN: tl.constexpr,
    BK: tl.constexpr,
    R: tl.constexpr,
    r: tl.constexpr,
    FD: tl.constexpr,
    OPS_INPUT: tl.constexpr,
    PREC: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Sub-block W' tile [BN, BK] in FD: ``W[p, q] + sum_s W[p, s] B_i[s, q] + B_i[p, q]``.

    w: the W tile [BN, BK] (rows, in-block j's lanes q); b_pq = B_i[p, q] [BN, BK]; b_sq = B_i[:, q] [R, BK], used
    when BK == R (the W tile then holds every s of its rows). When BK < R the s sum runs over R / BK chunks of W's
    rows.
    """
    if BK == R:
        delta = _product(w, b_sq, FD, OPS_INPUT, PREC, INTERPRET)  # [BN, BK]
    else:
        delta = tl.zeros((BN, BK), dtype=FD)  # [BN, BK]
        for s0 in range(0, R, BK):
            s = s0 + tl.arange(0, BK)  # [BK]
            w_s = tl.load(
                W + rows[:, None] * stride_wn + (j * r + s)[None, :] * stride_wk,
                mask=row_ok[:, None] & (s < r)[None, :],
                other=0.0,
            )  # [BN, BK]: W[rows, in-block j's columns s]
            b_s = _load_b2(BLK, i, s, q, NB, stride_bi, stride_bs, stride_bq, r, FD)  # [BK, BK]
            delta += _product(w_s, b_s, FD, OPS_INPUT, PREC, INTERPRET)
    return w.to(FD) + delta + b_pq


@triton.jit
def _arranged_coords(i0, j0, NB, KB, A: tl.constexpr, BB: tl.constexpr, R: tl.constexpr, r: tl.constexpr):
    """Row index [A, R*BB, 1], column index [1, R*BB, R], mask [A, R*BB, R] and the row-in-block p [1, R*BB, 1]
    of W in the block-row arrangement of out-blocks ``i0 ..`` x in-blocks ``j0 ..``."""
    ia = tl.arange(0, A)[:, None, None]  # [A, 1, 1]
    t = tl.arange(0, R * BB)[None, :, None]  # [1, R*BB, 1]
    s = tl.arange(0, R)[None, None, :]  # [1, 1, R]
    p = t // BB
    bi = i0 + ia
    bj = j0 + t % BB
    ok = (bi < NB) & (bj < KB) & (p < r) & (s < r)
    return bi * r + p, bj * r + s, ok, p


@triton.jit
def _load_b_arranged(
    BLK,
    i0,
    NB,
    stride_bi,
    stride_bs,
    stride_bq,
    A: tl.constexpr,
    BB: tl.constexpr,
    R: tl.constexpr,
    r: tl.constexpr,
    FD: tl.constexpr,
):
    """B for out-blocks ``i0 .. i0 + A`` in FD, twice: [A, R, R] as the right operand of W3 @ B3, and broadcast
    to the arrangement [A, R*BB, R], element [ia, p*BB + jb, q] = B[i0 + ia, p, q]."""
    ia = tl.arange(0, A)[:, None, None]  # [A, 1, 1]
    u = tl.arange(0, R)[None, :, None]  # [1, R, 1]
    q = tl.arange(0, R)[None, None, :]  # [1, 1, R]
    p = tl.arange(0, R * BB)[None, :, None] // BB  # [1, R*BB, 1]
    bi = i0 + ia
    # [A, R, R]
    b3 = tl.load(BLK + bi * stride_bi + u * stride_bs + q * stride_bq, mask=(bi < NB) & (u < r) & (q < r), other=0.0)
    # [A, R*BB, R]
    b_x = tl.load(BLK + bi * stride_bi + p * stride_bs + q * stride_bq, mask=(bi < NB) & (p < r) & (q < r), other=0.0)
    return b3.to(FD), b_x.to(FD)


@triton.jit
def _form_arranged(
    w3,
    b3,
    b_x,
    A: tl.constexpr,
    BB: tl.constexpr,
    R: tl.constexpr,
    FD: tl.constexpr,
    OPS_INPUT: tl.constexpr,
    PREC: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Arranged W' tile, returned as [A*R, BB*R] in FD: W3 + W3 @ B3 + B broadcast over in-blocks (w3, b_x:
    [A, R*BB, R]; b3: [A, R, R])."""
    if R < 16:
        delta = tl.sum(w3.to(FD)[:, :, :, None] * b3[:, None, :, :], axis=2)  # [A, R*BB, R]
    else:
        delta = _product(w3, b3, FD, OPS_INPUT, PREC, INTERPRET)  # [A, R*BB, R]
    return tl.reshape(w3.to(FD) + delta + b_x, (A * R, BB * R))


# ----------------------------------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _bat_gemm_kernel(
    A_PTR,
    W,
    BLK,
    BIAS,
    C,
    M,
    NB,
    KB,
    stride_am,
    stride_ak,
    stride_wn,
    stride_wk,
    stride_bi,
    stride_bs,
    stride_bq,
    stride_cm,
    stride_cn,
    FORWARD: tl.constexpr,
    FUSED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SUB: tl.constexpr,
    r: tl.constexpr,
    R: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BM: tl.constexpr,
    GROUP_M: tl.constexpr,
    FD: tl.constexpr,
    OPS_INPUT: tl.constexpr,
    FORM_PREC: tl.constexpr,
    MAIN_PREC: tl.constexpr,
    INDEX_64: tl.constexpr,
    INTERPRET: tl.constexpr,
):
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

    stride_am = _wide(stride_am, INDEX_64)
    stride_ak = _wide(stride_ak, INDEX_64)
    stride_wn = _wide(stride_wn, INDEX_64)
    stride_wk = _wide(stride_wk, INDEX_64)
    stride_bi = _wide(stride_bi, INDEX_64)
    stride_cm = _wide(stride_cm, INDEX_64)
    stride_cn = _wide(stride_cn, INDEX_64)
    offs_m = pid_m * BM + tl.arange(0, BM)  # [BM]
    m_ok = offs_m < M
    if FORWARD:
        out_idx, out_ok = _coords(pid_c, BN, R, r, NB)  # [BN]
        acc = tl.zeros((BM, BN), dtype=FD)  # [BM, BN]
    else:
        out_idx, out_ok = _coords(pid_c, BK, R, r, KB)  # [BK]
        acc = tl.zeros((BM, BK), dtype=FD)  # [BM, BK]
    # Forward: B depends on the n-tile only (and, for sub-blocks, on q, fixed when BK == R): load it once.
    PRELOAD: tl.constexpr = FUSED and FORWARD and (not SUB or BK == R)
    if PRELOAD:
        if SUB:
            i, p = _sub_coords(pid_c, BN, R)
            q = tl.arange(0, BK)  # [BK]
            b_sq, b_pq = _load_sub_b(
                BLK=BLK,
                i=i,
                p=p,
                q=q,
                NB=NB,
                stride_bi=stride_bi,
                stride_bs=stride_bs,
                stride_bq=stride_bq,
                BN=BN,
                BK=BK,
                R=R,
                r=r,
                FD=FD,
            )
        else:
            b3, b_x = _load_b_arranged(
                BLK=BLK,
                i0=pid_c * (BN // R),
                NB=NB,
                stride_bi=stride_bi,
                stride_bs=stride_bs,
                stride_bq=stride_bq,
                A=BN // R,
                BB=BK // R,
                R=R,
                r=r,
                FD=FD,
            )

    for step in range(0, steps):
        if FORWARD:
            n_tile = pid_c
            k_tile = step
            depth_idx, depth_ok = _coords(step, BK, R, r, KB)  # [BK]
        else:
            n_tile = step
            k_tile = pid_c
            depth_idx, depth_ok = _coords(step, BN, R, r, NB)  # [BN]
        # [BM, BK] forward, [BM, BN] dx
        a_tile = tl.load(
            A_PTR + offs_m[:, None] * stride_am + depth_idx[None, :] * stride_ak,
            mask=m_ok[:, None] & depth_ok[None, :],
            other=0.0,
        )
        if FUSED and not SUB:
            A: tl.constexpr = BN // R
            BB: tl.constexpr = BK // R
            w_rows, w_cols, w_ok, _ = _arranged_coords(n_tile * A, k_tile * BB, NB, KB, A, BB, R, r)
            w3 = tl.load(W + w_rows * stride_wn + w_cols * stride_wk, mask=w_ok, other=0.0)  # [A, R*BB, R]
            if not PRELOAD:
                b3, b_x = _load_b_arranged(
                    BLK=BLK,
                    i0=n_tile * A,
                    NB=NB,
                    stride_bi=stride_bi,
                    stride_bs=stride_bs,
                    stride_bq=stride_bq,
                    A=A,
                    BB=BB,
                    R=R,
                    r=r,
                    FD=FD,
                )
            w = _form_arranged(w3, b3, b_x, A, BB, R, FD, OPS_INPUT, FORM_PREC, INTERPRET)  # [BN, BK]
        else:
            rows, row_ok = _coords(n_tile, BN, R, r, NB)  # [BN]
            cols, col_ok = _coords(k_tile, BK, R, r, KB)  # [BK]
            # [BN, BK]
            w = tl.load(
                W + rows[:, None] * stride_wn + cols[None, :] * stride_wk,
                mask=row_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            if FUSED:
                j, q = _sub_coords(k_tile, BK, R)
                if not PRELOAD:
                    i, p = _sub_coords(n_tile, BN, R)
                    b_sq, b_pq = _load_sub_b(
                        BLK=BLK,
                        i=i,
                        p=p,
                        q=q,
                        NB=NB,
                        stride_bi=stride_bi,
                        stride_bs=stride_bs,
                        stride_bq=stride_bq,
                        BN=BN,
                        BK=BK,
                        R=R,
                        r=r,
                        FD=FD,
                    )
                w = _form_sub(
                    w=w,
                    W=W,
                    BLK=BLK,
                    rows=rows,
                    row_ok=row_ok,
                    i=i,
                    j=j,
                    q=q,
                    b_sq=b_sq,
                    b_pq=b_pq,
                    NB=NB,
                    stride_wn=stride_wn,
                    stride_wk=stride_wk,
                    stride_bi=stride_bi,
                    stride_bs=stride_bs,
                    stride_bq=stride_bq,
                    BN=BN,
                    BK=BK,
                    R=R,
                    r=r,
                    FD=FD,
                    OPS_INPUT=OPS_INPUT,
                    PREC=FORM_PREC,
                    INTERPRET=INTERPRET,
                )
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
        acc += tl.load(BIAS + out_idx, mask=out_ok, other=0.0).to(FD)[None, :]  # [1, BN]
    c_ptrs = C + offs_m[:, None] * stride_cm + out_idx[None, :] * stride_cn  # [BM, BN] forward, [BM, BK] dx
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=m_ok[:, None] & out_ok[None, :])


@triton.jit
def _bat_build_kernel(
    W,
    BLK,
    OUT,
    NB,
    KB,
    stride_wn,
    stride_wk,
    stride_bi,
    stride_bs,
    stride_bq,
    stride_on,
    stride_ok,
    SUB: tl.constexpr,
    r: tl.constexpr,
    R: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    FD: tl.constexpr,
    OPS_INPUT: tl.constexpr,
    FORM_PREC: tl.constexpr,
    INDEX_64: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """OUT (N, K) = W' in OUT's dtype; program (n-tile, k-tile) writes one [BN, BK] tile."""
    stride_wn = _wide(stride_wn, INDEX_64)
    stride_wk = _wide(stride_wk, INDEX_64)
    stride_bi = _wide(stride_bi, INDEX_64)
    stride_on = _wide(stride_on, INDEX_64)
    stride_ok = _wide(stride_ok, INDEX_64)
    n_tile = tl.program_id(0)
    k_tile = tl.program_id(1)
    rows, row_ok = _coords(n_tile, BN, R, r, NB)  # [BN]
    cols, col_ok = _coords(k_tile, BK, R, r, KB)  # [BK]
    if SUB:
        # [BN, BK]
        w = tl.load(
            W + rows[:, None] * stride_wn + cols[None, :] * stride_wk,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        i, p = _sub_coords(n_tile, BN, R)
        j, q = _sub_coords(k_tile, BK, R)
        b_sq, b_pq = _load_sub_b(
            BLK=BLK,
            i=i,
            p=p,
            q=q,
            NB=NB,
            stride_bi=stride_bi,
            stride_bs=stride_bs,
            stride_bq=stride_bq,
            BN=BN,
            BK=BK,
            R=R,
            r=r,
            FD=FD,
        )
        w_prime = _form_sub(
            w=w,
            W=W,
            BLK=BLK,
            rows=rows,
            row_ok=row_ok,
            i=i,
            j=j,
            q=q,
            b_sq=b_sq,
            b_pq=b_pq,
            NB=NB,
            stride_wn=stride_wn,
            stride_wk=stride_wk,
            stride_bi=stride_bi,
            stride_bs=stride_bs,
            stride_bq=stride_bq,
            BN=BN,
            BK=BK,
            R=R,
            r=r,
            FD=FD,
            OPS_INPUT=OPS_INPUT,
            PREC=FORM_PREC,
            INTERPRET=INTERPRET,
        )  # [BN, BK]
    else:
        A: tl.constexpr = BN // R
        BB: tl.constexpr = BK // R
        w_rows, w_cols, w_ok, _ = _arranged_coords(n_tile * A, k_tile * BB, NB, KB, A, BB, R, r)
        w3 = tl.load(W + w_rows * stride_wn + w_cols * stride_wk, mask=w_ok, other=0.0)  # [A, R*BB, R]
        b3, b_x = _load_b_arranged(
            BLK=BLK,
            i0=n_tile * A,
            NB=NB,
            stride_bi=stride_bi,
            stride_bs=stride_bs,
            stride_bq=stride_bq,
            A=A,
            BB=BB,
            R=R,
            r=r,
            FD=FD,
        )
        w_prime = _form_arranged(w3, b3, b_x, A, BB, R, FD, OPS_INPUT, FORM_PREC, INTERPRET)  # [BN, BK]
    tl.store(
        OUT + rows[:, None] * stride_on + cols[None, :] * stride_ok,
        w_prime.to(OUT.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


@triton.jit
def _g_tile(
    DY,
    X,
    rows,
    row_ok,
    cols,
    col_ok,
    M,
    stride_dm,
    stride_dn,
    stride_xm,
    stride_xk,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BM: tl.constexpr,
    FD: tl.constexpr,
    MAIN_PREC: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """G[rows, cols] = sum over all M of dY[:, rows]^T x[:, cols], [BN, BK] in FD, accumulated in registers."""
    g = tl.zeros((BN, BK), dtype=FD)  # [BN, BK]
    for m0 in range(0, M, BM):
        offs_m = m0 + tl.arange(0, BM)  # [BM]
        m_ok = offs_m < M
        # [BM, BN]
        dy = tl.load(
            DY + offs_m[:, None] * stride_dm + rows[None, :] * stride_dn,
            mask=m_ok[:, None] & row_ok[None, :],
            other=0.0,
        )
        # [BM, BK]
        x = tl.load(
            X + offs_m[:, None] * stride_xm + cols[None, :] * stride_xk,
            mask=m_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
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
    DY,
    X,
    W,
    OUT,
    M,
    NB,
    KB,
    per_split,
    stride_dm,
    stride_dn,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_os,
    stride_oi,
    stride_op,
    stride_oq,
    SUB: tl.constexpr,
    r: tl.constexpr,
    R: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BM: tl.constexpr,
    FD: tl.constexpr,
    MAIN_PREC: tl.constexpr,
    EPI_PREC: tl.constexpr,
    ATOMIC: tl.constexpr,
    INDEX_64: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """dB_i = sum_j (W_ij + I)^T G_ij with G = dY^T x formed tile by tile in registers, never stored.

    Program (t, s): split s covers ``per_split`` in-blocks (SUB) or K tiles (arranged) of the in-blocks.
    - SUB: t = (out-block i, q-chunk of BK lanes); dB_i[:, q] [R, BK] += (W[p-chunk, j] + I)^T @ G[p-chunk, q]
      for every p-chunk (BN lanes) of block i and every in-block j of the split.
    - arranged: t = A = BN // R out-blocks; per K tile of BB = BK // R in-blocks, G [BN, BK] is reshaped to the
      block-row arrangement and ``dB [A, R, R] += (W3 + I)^T @ G3``.
    OUT is (splits, N/r, r, r): the program writes OUT[s], or with ATOMIC adds into OUT[0].
    """
    stride_dm = _wide(stride_dm, INDEX_64)
    stride_dn = _wide(stride_dn, INDEX_64)
    stride_xm = _wide(stride_xm, INDEX_64)
    stride_xk = _wide(stride_xk, INDEX_64)
    stride_wn = _wide(stride_wn, INDEX_64)
    stride_wk = _wide(stride_wk, INDEX_64)
    stride_os = _wide(stride_os, INDEX_64)
    stride_oi = _wide(stride_oi, INDEX_64)
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    if SUB:
        i, q = _sub_coords(pid, BK, R)  # q: [BK]
        s_all = tl.arange(0, R)  # [R]
        db = tl.zeros((R, BK), dtype=FD)  # [R, BK]
        first = pid_s * per_split
        last = tl.minimum(first + per_split, KB)
        for j in range(first, last):
            cols = j * r + q  # [BK]
            col_ok = q < r
            for p0 in range(0, R, BN):
                p = p0 + tl.arange(0, BN)  # [BN]
                rows = i * r + p
                row_ok = (p < r) & (i < NB)
                g = _g_tile(
                    DY=DY,
                    X=X,
                    rows=rows,
                    row_ok=row_ok,
                    cols=cols,
                    col_ok=col_ok,
                    M=M,
                    stride_dm=stride_dm,
                    stride_dn=stride_dn,
                    stride_xm=stride_xm,
                    stride_xk=stride_xk,
                    BN=BN,
                    BK=BK,
                    BM=BM,
                    FD=FD,
                    MAIN_PREC=MAIN_PREC,
                    INTERPRET=INTERPRET,
                )  # [BN, BK]
                w_ok = row_ok[:, None] & (s_all < r)[None, :]  # [BN, R]
                w = tl.load(
                    W + rows[:, None] * stride_wn + (j * r + s_all)[None, :] * stride_wk, mask=w_ok, other=0.0
                ).to(FD)  # [BN, R]
                w += tl.where((p[:, None] == s_all[None, :]) & w_ok, 1.0, 0.0).to(FD)
                db = tl.dot(tl.trans(w), g, db, input_precision=EPI_PREC, out_dtype=FD)
        u = s_all[:, None]  # [R, 1]
        mask = (u < r) & (q[None, :] < r) & (i < NB)  # [R, BK]
        offs = i * stride_oi + u * stride_op + q[None, :] * stride_oq  # [R, BK]
    else:
        A: tl.constexpr = BN // R
        BB: tl.constexpr = BK // R
        i0 = pid * A
        rows, row_ok = _coords(pid, BN, R, r, NB)  # [BN]
        first = pid_s * per_split
        last = tl.minimum(first + per_split, tl.cdiv(KB, BB))
        db = tl.zeros((A, R, R), dtype=FD)  # [A, R, R]
        for kt in range(first, last):
            cols, col_ok = _coords(kt, BK, R, r, KB)  # [BK]
            g = _g_tile(
                DY=DY,
                X=X,
                rows=rows,
                row_ok=row_ok,
                cols=cols,
                col_ok=col_ok,
                M=M,
                stride_dm=stride_dm,
                stride_dn=stride_dn,
                stride_xm=stride_xm,
                stride_xk=stride_xk,
                BN=BN,
                BK=BK,
                BM=BM,
                FD=FD,
                MAIN_PREC=MAIN_PREC,
                INTERPRET=INTERPRET,
            )  # [BN, BK]
            w_rows, w_cols, w_ok, p = _arranged_coords(i0, kt * BB, NB, KB, A, BB, R, r)
            w3 = tl.load(W + w_rows * stride_wn + w_cols * stride_wk, mask=w_ok, other=0.0).to(FD)  # [A, R*BB, R]
            w3 += tl.where((p == tl.arange(0, R)[None, None, :]) & w_ok, 1.0, 0.0).to(FD)
            g3 = tl.reshape(g, (A, R * BB, R))  # [A, R*BB, R]
            if R < 16:
                db += tl.sum(w3[:, :, :, None] * g3[:, :, None, :], axis=1)
            else:
                db = tl.dot(tl.permute(w3, (0, 2, 1)), g3, db, input_precision=EPI_PREC, out_dtype=FD)
        ia = tl.arange(0, A)[:, None, None]  # [A, 1, 1]
        u = tl.arange(0, R)[None, :, None]  # [1, R, 1]
        q = tl.arange(0, R)[None, None, :]  # [1, 1, R]
        mask = (i0 + ia < NB) & (u < r) & (q < r)  # [A, R, R]
        offs = (i0 + ia) * stride_oi + u * stride_op + q * stride_oq  # [A, R, R]
    if ATOMIC:
        tl.atomic_add(OUT + offs, db.to(OUT.dtype.element_ty), mask=mask, sem="relaxed")
    else:
        tl.store(OUT + pid_s * stride_os + offs, db.to(OUT.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Launch plans: from a typed config, the dtypes and the sizes to every kernel launch of the op
# ----------------------------------------------------------------------------------------------------------

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def _tiling(r: int, block_n: int, block_k: int) -> tuple[bool, int, int]:
    """(SUB, BN, BK): sub-block tiles (inside one r-block, lanes clamped to R) when R >= min(block_n, block_k),
    else arranged tiles of whole blocks (block_n // R out-blocks x block_k // R in-blocks)."""
    rp = bat_padded_r(r)
    if rp >= min(block_n, block_k):
        return True, min(block_n, rp), min(block_k, rp)
    return False, block_n, block_k


def _count_tiles(blocks: int, lanes: int, rp: int) -> int:
    """Host twin of the kernels' ``_num_tiles``."""
    return cdiv(blocks, lanes // rp) if lanes >= rp else blocks * (rp // lanes)


def _main_precision(env: KernelEnv, fd: torch.dtype) -> str:
    """``input_precision`` of the GEMMs' fp32 dots: "tf32" exactly when torch allows it (never for fp64)."""
    return "tf32" if env.tf32 and fd != torch.float64 else "ieee"


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


def _gemm_launch(
    *,
    forward: bool,
    fused: bool,
    has_bias: bool,
    tile: GemmTile,
    r: int,
    x_dtype: torch.dtype,
    fd: torch.dtype,
    form_precision: str,
    env: KernelEnv,
    m: int,
    n: int,
    k: int,
) -> LaunchSpec:
    """``_bat_gemm_kernel``: y = x W'^T (+ bias) (``forward``) or dx = dY W', W' formed per tile (``fused``) or
    read as a materialized W' (then a plain GEMM with r = 1)."""
    r = r if fused else 1
    sub, bn, bk = _tiling(r, tile.block_n, tile.block_k)
    rp = bat_padded_r(r)
    nb, kb = n // r, k // r
    main = _main_precision(env, fd)
    form = _form_mode(form_precision, x_dtype, fd, main)
    cols = _count_tiles(nb, bn, rp) if forward else _count_tiles(kb, bk, rp)
    return LaunchSpec(
        kernel=f"bat_{'fwd' if forward else 'dx'}_{'fused' if fused else 'gemm'}",
        fn=_bat_gemm_kernel,
        grid=(cdiv(m, tile.block_m) * cols,),
        constexprs=dict(
            FORWARD=forward,
            FUSED=fused,
            HAS_BIAS=has_bias,
            SUB=sub,
            r=r,
            R=rp,
            BN=bn,
            BK=bk,
            BM=tile.block_m,
            GROUP_M=tile.group_m,
            FD=_TL_DTYPES[fd],
            OPS_INPUT=form[0],
            FORM_PREC=form[1],
            MAIN_PREC=main,
            INTERPRET=env.interpret,
        ),
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
        scalars=dict(NB=nb, KB=kb),
    )


def _build_launch(
    *, tile: Tile, r: int, x_dtype: torch.dtype, fd: torch.dtype, form_precision: str, env: KernelEnv, n: int, k: int
) -> LaunchSpec:
    """``_bat_build_kernel``: W' (N, K) in x's dtype, one [BN, BK] tile per program."""
    sub, bn, bk = _tiling(r, tile.block_n, tile.block_k)
    rp = bat_padded_r(r)
    form = _form_mode(form_precision, x_dtype, fd, _main_precision(env, fd))
    nb, kb = n // r, k // r
    return LaunchSpec(
        kernel="bat_build",
        fn=_bat_build_kernel,
        grid=(_count_tiles(nb, bn, rp), _count_tiles(kb, bk, rp)),
        constexprs=dict(
            SUB=sub,
            r=r,
            R=rp,
            BN=bn,
            BK=bk,
            FD=_TL_DTYPES[fd],
            OPS_INPUT=form[0],
            FORM_PREC=form[1],
            INTERPRET=env.interpret,
        ),
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
        scalars=dict(NB=nb, KB=kb),
    )


def _dblock_launch(
    config: BatDblockConfig, *, r: int, x_dtype: torch.dtype, fd: torch.dtype, env: KernelEnv, n: int, k: int
) -> tuple[LaunchSpec, int]:
    """``_bat_dblock_kernel`` and its K split count. A program owns out-blocks (or one out-block's column chunk);
    the K splits share the in-blocks (sub-block tiles) or K tiles (arranged): the config's ``split_k``, or (0)
    enough for about two programs per SM, never an empty split."""
    tile = config.tile
    sub, bn, bk = _tiling(r, tile.block_n, tile.block_k)
    rp = bat_padded_r(r)
    nb, kb = n // r, k // r
    programs, units = (nb * (rp // bk), kb) if sub else (cdiv(nb, bn // rp), cdiv(kb, bk // rp))
    if config.split_k > 0:
        splits = min(config.split_k, units)
    else:
        splits = max(1, min(units, math.ceil(2 * env.sm_count / programs)))
    per_split = cdiv(units, splits)
    splits = cdiv(units, per_split)  # no empty split
    main = _main_precision(env, fd)
    spec = LaunchSpec(
        kernel="bat_dblock",
        fn=_bat_dblock_kernel,
        grid=(programs, splits),
        constexprs=dict(
            SUB=sub,
            r=r,
            R=rp,
            BN=bn,
            BK=bk,
            BM=tile.block_m,
            FD=_TL_DTYPES[fd],
            MAIN_PREC=main,
            EPI_PREC=_db_precision(config.precision, x_dtype, fd, main),
            ATOMIC=config.reduce == "atomic" and splits > 1,
            INTERPRET=env.interpret,
        ),
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
        scalars=dict(NB=nb, KB=kb, per_split=per_split),
    )
    return spec, splits


class BatForwardLaunch(NamedTuple):
    """The launches of bat forward: the W' build ("materialize" only, else None), then the GEMM: the fused one,
    the Triton GEMM on W', or None for cuBLAS (``F.linear``) on W'."""

    build: LaunchSpec | None
    gemm: LaunchSpec | None


def bat_forward_launch(
    config: BatForwardConfig,
    x_dtype: torch.dtype,
    block_dtype: torch.dtype,
    env: KernelEnv,
    *,
    m: int,
    n: int,
    k: int,
    r: int,
    has_bias: bool,
) -> BatForwardLaunch:
    """Every launch of bat forward for ``config`` (from :func:`configs.prepare`), x (M, K) of ``x_dtype``, W (N, K),
    a block (N/r, r, r) of ``block_dtype``, with or without a bias."""
    fd = delta_dtype(x_dtype, block_dtype)
    fused = config.strategy == "fused"
    gemm = build = None
    if not fused:
        build = _build_launch(
            tile=config.build, r=r, x_dtype=x_dtype, fd=fd, form_precision=config.form_precision, env=env, n=n, k=k
        )
    if fused or config.gemm == "triton":
        gemm = _gemm_launch(
            forward=True,
            fused=fused,
            has_bias=has_bias,
            tile=config.tile,
            r=r,
            x_dtype=x_dtype,
            fd=fd,
            form_precision=config.form_precision,
            env=env,
            m=m,
            n=n,
            k=k,
        )
    return BatForwardLaunch(build, gemm)


class BatBackwardLaunch(NamedTuple):
    """The launches of bat backward: for dx, the W' build ("materialize" only) and the GEMM (fused, Triton, or
    None for cuBLAS ``torch.mm``); for dB, the dB kernel with ``dblock_splits`` K splits."""

    build: LaunchSpec | None
    dx: LaunchSpec | None
    dblock: LaunchSpec
    dblock_splits: int


def bat_backward_launch(
    config: BatBackwardConfig,
    x_dtype: torch.dtype,
    block_dtype: torch.dtype,
    env: KernelEnv,
    *,
    m: int,
    n: int,
    k: int,
    r: int,
) -> BatBackwardLaunch:
    """Every launch of bat backward for ``config``, x and dY of ``x_dtype`` (M tokens), W (N, K), a block
    (N/r, r, r) of ``block_dtype``."""
    fd = delta_dtype(x_dtype, block_dtype)
    fused = config.strategy == "fused"
    build = dx = None
    if not fused:
        build = _build_launch(
            tile=config.build, r=r, x_dtype=x_dtype, fd=fd, form_precision=config.form_precision, env=env, n=n, k=k
        )
    if fused or config.gemm == "triton":
        dx = _gemm_launch(
            forward=False,
            fused=fused,
            has_bias=False,
            tile=config.dx,
            r=r,
            x_dtype=x_dtype,
            fd=fd,
            form_precision=config.form_precision,
            env=env,
            m=m,
            n=n,
            k=k,
        )
    dblock, splits = _dblock_launch(config.dblock, r=r, x_dtype=x_dtype, fd=fd, env=env, n=n, k=k)
    return BatBackwardLaunch(build, dx, dblock, splits)


# ----------------------------------------------------------------------------------------------------------
# Host functions (the backend's entry points)
# ----------------------------------------------------------------------------------------------------------


def _run_gemm(
    spec: LaunchSpec,
    a: torch.Tensor,
    weight: torch.Tensor,
    block: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
) -> torch.Tensor:
    """``out = a @ W'^T + bias`` (forward) or ``out = a @ W'`` (dx). Fused: W' is formed on the fly from ``weight``
    and ``block``; else ``weight`` is W' itself (``block`` is then not read)."""
    spec(
        needs_int64(a, weight, out),
        A_PTR=a,
        W=weight,
        BLK=block,
        BIAS=bias if bias is not None else out,  # not read without a bias
        C=out,
        M=a.shape[0],
        stride_am=a.stride(0),
        stride_ak=a.stride(1),
        stride_wn=weight.stride(0),
        stride_wk=weight.stride(1),
        stride_bi=block.stride(0),
        stride_bs=block.stride(1),
        stride_bq=block.stride(2),
        stride_cm=out.stride(0),
        stride_cn=out.stride(1),
    )
    return out


def _build_weight(spec: LaunchSpec, weight: torch.Tensor, block: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W' (N, K) in ``dtype``, ``W'_ij = W_ij (I + B_i) + B_i`` formed in the delta dtype by one launch. A transient
    of one call: the caller drops it after its GEMM."""
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    with nvtx_range("bonekern.bat.build_weight"):
        spec(
            needs_int64(weight, out),
            W=weight,
            BLK=block,
            OUT=out,
            stride_wn=weight.stride(0),
            stride_wk=weight.stride(1),
            stride_bi=block.stride(0),
            stride_bs=block.stride(1),
            stride_bq=block.stride(2),
            stride_on=out.stride(0),
            stride_ok=out.stride(1),
        )
    return out


def _block_gradient(
    spec: LaunchSpec, splits: int, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, block: torch.Tensor
) -> torch.Tensor:
    """dB (N/r, r, r) in the block's dtype: ``dB_i = sum_j (W_ij + I)^T G_ij``; G = dY^T x is never stored. Per-split
    fp32 partials summed in a fixed order (deterministic), or with ATOMIC ``tl.atomic_add`` into one buffer."""
    nb, r = block.shape[0], block.shape[-1]
    fd = delta_dtype(x.dtype, block.dtype)
    if spec.constexprs["ATOMIC"]:
        out = torch.zeros((1, nb, r, r), dtype=fd, device=x.device)
    elif splits == 1:
        out = torch.empty((1, nb, r, r), dtype=block.dtype, device=x.device)
    else:
        out = torch.empty((splits, nb, r, r), dtype=fd, device=x.device)
    with nvtx_range("bonekern.bat.dblock"):
        spec(
            needs_int64(dy, x, weight, out),
            DY=dy,
            X=x,
            W=weight,
            OUT=out,
            M=dy.shape[0],
            stride_dm=dy.stride(0),
            stride_dn=dy.stride(1),
            stride_xm=x.stride(0),
            stride_xk=x.stride(1),
            stride_wn=weight.stride(0),
            stride_wk=weight.stride(1),
            stride_os=out.stride(0),
            stride_oi=out.stride(1),
            stride_op=out.stride(2),
            stride_oq=out.stride(3),
        )
        db = out[0] if out.shape[0] == 1 else out.sum(0)  # fixed-order sum of the partials: deterministic
    return db.to(block.dtype)


def bat_forward(
    x: torch.Tensor, weight: torch.Tensor, block: torch.Tensor, bias: torch.Tensor | None, config: BatForwardConfig
) -> torch.Tensor:
    """y (M, N) = x W'^T + b in x's dtype. x (M, K), weight (N, K) in x's dtype, block (N/r, r, r), bias (N,).

    ``config`` from :func:`configs.prepare`.
    """
    (m, k), n, r = x.shape, weight.shape[0], block.shape[-1]
    launch = bat_forward_launch(
        config, x.dtype, block.dtype, KernelEnv.of(x.device), m=m, n=n, k=k, r=r, has_bias=bias is not None
    )
    if launch.build is None:
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
        with nvtx_range("bonekern.bat.forward_fused"):
            return _run_gemm(launch.gemm, x, weight, block, bias, y)
    w_prime = _build_weight(launch.build, weight, block, x.dtype)
    if launch.gemm is None:
        with nvtx_range("bonekern.bat.forward_cublas"):
            return torch.nn.functional.linear(x, w_prime, bias)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    with nvtx_range("bonekern.bat.forward_gemm"):
        return _run_gemm(launch.gemm, x, w_prime, block, bias, y)


def bat_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    block: torch.Tensor,
    need_dx: bool,
    need_dblock: bool,
    config: BatBackwardConfig,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dx (M, K) = dY W' in dY's dtype and dB (N/r, r, r) in the block's dtype; None where not asked for.

    ``config`` from :func:`configs.prepare`.
    """
    (m, n), k, r = dy.shape, weight.shape[1], block.shape[-1]
    launch = bat_backward_launch(config, dy.dtype, block.dtype, KernelEnv.of(dy.device), m=m, n=n, k=k, r=r)
    dx = dblock = None
    if need_dx:
        if launch.build is None:
            dx = torch.empty(m, k, dtype=dy.dtype, device=dy.device)
            with nvtx_range("bonekern.bat.dx_fused"):
                _run_gemm(launch.dx, dy, weight, block, None, dx)
        else:
            w_prime = _build_weight(launch.build, weight, block, dy.dtype)
            if launch.dx is None:
                with nvtx_range("bonekern.bat.dx_cublas"):
                    dx = torch.mm(dy, w_prime)
            else:
                dx = torch.empty(m, k, dtype=dy.dtype, device=dy.device)
                with nvtx_range("bonekern.bat.dx_gemm"):
                    _run_gemm(launch.dx, dy, w_prime, block, None, dx)
            del w_prime  # a transient of this call only
    if need_dblock:
        dblock = _block_gradient(launch.dblock, launch.dblock_splits, dy, x, weight, block)
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
"""(r, x's dtype, default tile set only) of the baseline's AOT cases: one r per r class of :mod:`tiles` (broadcast
formation, 3-D ``tl.dot``, sub-block with one and with several s-chunks) for each dtype family's tables, every
candidate in bf16, the default tile set in fp32 and for r = 256. fp16 compiles to bf16's code with the other MMA
type; fp16, fp64 and the other inputs are compiled by :data:`CHECKED_SPECIALISATIONS`."""

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

_AOT_SIZE = 4096
"""M, N and K of the modelled launch (they choose no code: the sizes are runtime arguments)."""


def _named_case(
    spec: LaunchSpec,
    tile: Tile,
    x_dtype: torch.dtype,
    block_dtype: torch.dtype,
    r: int,
    archs: tuple[str, ...],
    *,
    variant: str = "",
    index_64: bool = False,
    in_baseline: bool = True,
) -> AotCase:
    """The AotCase of ``spec`` for contiguous inputs: x, W, dY and the outputs in ``x_dtype``, the block in
    ``block_dtype``. ``config_name``: the tile set's name, then ".r<r>" (not for the plain GEMMs, whose code does
    not depend on r), then ".<variant>" when given."""
    fd = delta_dtype(x_dtype, block_dtype)
    if spec.kernel == "bat_build":
        pointers = {"W": x_dtype, "BLK": block_dtype, "OUT": x_dtype}
    elif spec.kernel == "bat_dblock":
        pointers = {"DY": x_dtype, "X": x_dtype, "W": x_dtype, "OUT": fd}
    else:
        pointers = {"A_PTR": x_dtype, "W": x_dtype, "BLK": block_dtype, "BIAS": x_dtype, "C": x_dtype}
    name = tile.name if spec.kernel in ("bat_fwd_gemm", "bat_dx_gemm") else f"{tile.name}.r{r}"
    name = f"{name}.{variant}" if variant else name
    return aot_case(spec, pointers, name, x_dtype, archs, index_64=index_64, in_baseline=in_baseline)


def _launched_cases(
    config: BatForwardConfig | BatBackwardConfig,
    x_dtype: torch.dtype,
    r: int,
    archs: tuple[str, ...],
    *,
    block_dtype: torch.dtype = torch.float32,
    env: KernelEnv = AOT_ENV,
    bias: bool = True,
    **named,
) -> dict[str, AotCase]:
    """Every kernel ``config`` launches for block size ``r`` (the launchers' own :func:`bat_forward_launch` /
    :func:`bat_backward_launch`), as AOT cases by kernel name."""
    sizes = dict(m=_AOT_SIZE, n=_AOT_SIZE, k=_AOT_SIZE, r=r)
    if isinstance(config, BatForwardConfig):
        fwd = bat_forward_launch(config, x_dtype, block_dtype, env, has_bias=bias, **sizes)
        launched = [(fwd.gemm, config.tile), (fwd.build, config.build)]
    else:
        bwd = bat_backward_launch(config, x_dtype, block_dtype, env, **sizes)
        launched = [(bwd.dx, config.dx), (bwd.build, config.build), (bwd.dblock, config.dblock.tile)]
    return {
        spec.kernel: _named_case(spec, tile, x_dtype, block_dtype, r, archs, **named)
        for spec, tile in launched
        if spec is not None
    }


def _cases_for(arch: str, r: int, dtype: torch.dtype, default_tiles_only: bool) -> list[AotCase]:
    """The kernel specialisations the shipped configs of ``arch`` launch for contiguous inputs of ``dtype`` (block
    fp32, the PEFT default; torch's default allow_tf32=False), block size ``r``, large M, N, K (int32 offsets)."""
    out: list[AotCase] = []
    for op in ("bat_forward", "bat_backward"):
        problem = OpProblem(op, _AOT_SIZE, _AOT_SIZE, _AOT_SIZE, r, r, dtype, torch.float32, torch.device("cpu"))
        shipped = candidates(problem, arch)
        if default_tiles_only:  # the default tile set (both strategies) and the Triton GEMM
            shipped = [c for c in shipped if c.label == shipped[0].label or c.gemm == "triton"]
        for config in shipped:
            out += _launched_cases(config, dtype, r, (arch,)).values()
    return out


_f16, _f32, _f64 = torch.float16, torch.float32, torch.float64
CHECKED_SPECIALISATIONS: tuple[tuple[str, torch.dtype, int, str, dict], ...] = (
    # (kernel, x dtype, r, tile set, other inputs); "variant" names what differs from the baseline's inputs.
    ("bat_fwd_fused", _f64, 64, "m64n32k32w4s2", {}),
    ("bat_dx_fused", _f64, 8, "m64n16k32w8s2", {}),  # fp32's small-r set; m64n32k32w4s2 spills 1.1-1.6 KB in fp64
    ("bat_fwd_fused", _f32, 16, "m64n32k32w4s2", dict(block_dtype=_f64, variant="block_fp64")),
    ("bat_fwd_fused", _f16, 64, "m64n64k64w4s2", dict(int64=True, variant="int64")),
    ("bat_dx_fused", _f16, 48, "m64n64k64w4s2", dict(int64=True, variant="int64")),
    (
        "bat_fwd_fused",
        _f32,
        64,
        "m64n32k32w4s2",
        dict(bias=False, form_precision="ieee", tf32=True, variant="nobias.form_ieee.tf32"),
    ),
    ("bat_fwd_fused", _f32, 3, "m64n16k32w8s2", dict(form_precision="tf32x3", tf32=True, variant="form_tf32x3.tf32")),
    ("bat_dx_fused", _f16, 1, "m64n32k32w4s2", {}),
    ("bat_fwd_gemm", _f16, 1, "m64n64k64w4s2", dict(int64=True, variant="int64")),
    ("bat_dx_gemm", _f64, 1, "m64n32k32w4s2", dict(int64=True, variant="int64")),
    ("bat_dblock", _f64, 64, "m64n32k32w4s2", {}),
    (
        "bat_dblock",
        _f32,
        16,
        "m64n32k32w4s2",
        dict(block_dtype=_f64, atomic=True, int64=True, variant="block_fp64.atomic.int64"),
    ),
    ("bat_dblock", _f16, 3, "m64n32k32w4s2", dict(atomic=True, variant="atomic")),
    ("bat_dblock", _f16, 48, "m64n64k64w4s2", dict(int64=True, variant="int64")),
    ("bat_build", _f64, 64, "n32k32w4s2", dict(form_precision="tf32x3")),
    ("bat_build", _f16, 1, "n32k32w4s2", dict(form_precision="tf32x3", int64=True, variant="int64")),
    ("bat_build", _f16, 48, "n32k32w4s2", dict(form_precision="tf32x3", int64=True, variant="int64")),
)
"""Specialisations the baseline's inputs (bf16 / fp32 x, fp32 block, int32 offsets, partial-sum dB) never reach:
fp64 and fp16 x, an fp64 block, int64 offsets, the atomic dB reduction, explicit formation precisions with TF32
allowed, no bias, r = 1, 3 and 48 (padded lanes). The interpreter runs them all (tests/triton/test_triton_bat.py); these
compiles show that Triton's code generator accepts them for sm_80, sm_90 and sm_100 within the same resource rules.
Not stored in the baseline (``in_baseline=False``)."""


def _checked_case(
    kernel: str,
    x_dtype: torch.dtype,
    r: int,
    tile_name: str,
    *,
    block_dtype: torch.dtype = torch.float32,
    form_precision: str = "matched",
    bias: bool = True,
    tf32: bool = False,
    int64: bool = False,
    atomic: bool = False,
    variant: str = "",
) -> AotCase:
    """One :data:`CHECKED_SPECIALISATIONS` entry: a config that launches ``kernel`` on ``tile_name`` (the other
    kernels' tiles do not matter), with torch's ``allow_tf32`` = ``tf32`` and an ``atomic`` dB over two splits."""
    tile = Tile.parse(tile_name)
    gemm = GemmTile.of(tile) if tile.block_m is not None else GemmTile.of(Tile.parse("m64n32k32w4s2"))
    build = tile if tile.block_m is None else Tile.parse("n32k32w4s1")
    fused = kernel.endswith("_fused")
    strategy, gemm_impl = ("fused", "cublas") if fused else ("materialize", "triton")
    if kernel.startswith("bat_fwd") or kernel == "bat_build":
        config = BatForwardConfig(strategy, form_precision, gemm_impl, gemm, build)
    else:
        reduce = "atomic" if atomic else "partials"
        dblock = BatDblockConfig(gemm, split_k=2 if atomic else 0, reduce=reduce, precision="matched")
        config = BatBackwardConfig(strategy, form_precision, gemm_impl, gemm, build, dblock)
    env = dataclasses.replace(AOT_ENV, tf32=tf32)
    cases = _launched_cases(
        config,
        x_dtype,
        r,
        SHIPPED_ARCHS,
        block_dtype=block_dtype,
        env=env,
        bias=bias,
        variant=variant,
        index_64=int64,
        in_baseline=False,
    )
    return cases[kernel]


def aot_cases() -> list[AotCase]:
    """Every bat kernel x every shipped config (see :data:`AOT_SPECS`; one case per distinct specialisation, with
    the architectures whose configs launch it), then :data:`CHECKED_SPECIALISATIONS` for both families."""
    found: dict[tuple, tuple[AotCase, set[str]]] = {}
    for arch in SHIPPED_ARCHS:
        for r, dtype, default_only in AOT_SPECS:
            for case in _cases_for(arch, r, dtype, default_only):
                constexprs = tuple(sorted((k, str(v)) for k, v in case.constexprs.items()))
                key = (case.kernel, case.dtype, case.num_warps, case.num_stages, constexprs)
                found.setdefault(key, (case, set()))[1].add(arch)
    shipped = [dataclasses.replace(case, archs=tuple(sorted(archs))) for case, archs in found.values()]
    checked = [
        _checked_case(kernel, x_dtype, r, tile, **inputs)
        for kernel, x_dtype, r, tile, inputs in CHECKED_SPECIALISATIONS
    ]
    return shipped + checked
