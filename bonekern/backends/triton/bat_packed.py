"""Triton kernels for bat over a packed quantised weight: W dequantised inside the tile, never written.

bat over a quantised base (:mod:`bonekern.quant_ops`) forms ``W'_ij = W_ij (I + B_i) + B_i`` a chunk of out-blocks
at a time, in forward (``y = x W'^T``) and again in backward (``dx = dY W'``, ``dB_i = sum_j (W_ij + I)^T G_ij``
with ``G = dY^T x``). The torch path dequantises the chunk's rows (a (c*r, K) float W_c) and builds W'_c from it.
These kernels read the packed weight (:class:`bonekern.quant.PackedWeight`: bitsandbytes nf4 / fp4 codes and
absmax, or int8 rows and their scale) and dequantise each r x r block in registers:

- ``_packed_build_kernel``: block (i, j) of W'_c: ``W_ij + W_ij B_i + B_i``.
- ``_packed_dblock_kernel``: ``sum_j W_ij^T G_ij`` (r, r) of out-block i from G_c (c*r, K) (which cuBLAS forms);
  the identity part ``sum_j G_ij = dY_i^T S`` is added on the host, as the torch path does.

So the GPU writes W'_c (forward and dx, the operand cuBLAS multiplies) and dB, never a dequantised W. An r x r block
takes RB = max(16, r rounded up to a power of two) lanes (``tl.dot`` needs 16; lanes past r read 0); each program
writes one [SB, SB] sub-tile of it (SB = min(RB, 16)), reducing over the block's RB lanes KB = min(RB, 32) at a time
(larger tiles spilled in ptxas: an r = 128 block whole, 32-wide dB sub-tiles on sm_80 / sm_90; resources.py).
Arithmetic in float32 (the delta dtype; an fp64 block takes the torch path). The dequantisation repeats
:class:`~bonekern.quant.PackedWeight`'s formulas operation for operation, so the in-tile W is bitsandbytes' W
exactly; the W B_i and W^T G products follow torch's allow_tf32 ("ieee" by default, as torch's own fp32 matmul).
The grids: the build (blocks, K / r, (RB / SB)^2), the dB products (blocks, (RB / SB)^2).

Shapes: N % r == 0 and K % r == 0 (bat's own requirement), K % blocksize == 0 for the 4-bit formats (rows hold
whole absmax blocks). Element offsets are int32 unless the weight's N * K or another tensor's largest offset
passes 2^31 - 1 (:func:`~.common.needs_int64`); then the kernels are specialised for int64 offsets.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...quant import INT8_INV_127, PackedWeight
from .common import AOT_ENV, INT32_LIMIT, AotCase, KernelEnv, LaunchSpec, aot_case, needs_int64
from .tiles import BAT_PACKED, SHIPPED_ARCHS

FORMATS: tuple[str, ...] = ("code4", "int8")
"""The :class:`~bonekern.quant.PackedWeight` formats these kernels read."""


INV_127 = tl.constexpr(INT8_INV_127)
"""bitsandbytes' 1 / 127 as a compile-time constant of the kernels."""


@triton.jit
def _packed_tile(
    DATA,
    SCALE,
    CODE,
    rows,
    row_ok,
    cols,
    col_ok,
    K,
    FORMAT: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
):
    """W[rows, cols] dequantised to float32, [len(rows), len(cols)] (0 where masked). rows, cols: int32 or int64
    (the caller widens them when offsets need int64)."""
    ok = row_ok[:, None] & col_ok[None, :]
    if FORMAT == "int8":
        q = tl.load(DATA + rows[:, None] * K + cols[None, :], mask=ok, other=0)  # int8
        scale = tl.load(SCALE + rows, mask=row_ok, other=0.0)  # SCB
        w = q.to(tl.float32) * scale[:, None] * INV_127
    else:  # "code4": two 4-bit codes a byte, the even element in the high nibble
        flat = rows[:, None] * K + cols[None, :]
        byte = tl.load(DATA + flat // 2, mask=ok, other=0).to(tl.int32)
        code = tl.where(flat % 2 == 0, byte >> 4, byte & 15)  # 0..15
        w = tl.load(CODE + code, mask=ok, other=0.0) * tl.load(SCALE + flat // BLOCKSIZE, mask=ok, other=0.0)
    return w


@triton.jit
def _lanes(start, count, limit, INDEX_64: tl.constexpr):
    """start + [0, count) and its mask (< limit), int64 when INDEX_64."""
    offs = start + tl.arange(0, count)
    ok = tl.arange(0, count) < limit
    if INDEX_64:
        offs = offs.to(tl.int64)
    return offs, ok


@triton.jit
def _packed_build_kernel(
    DATA,
    SCALE,
    CODE,
    BLK,
    OUT,
    row_start,
    block_start,
    K,
    r,
    stride_bi,
    stride_bs,
    stride_bq,
    stride_on,
    stride_ok,
    RB: tl.constexpr,
    SB: tl.constexpr,
    KB: tl.constexpr,
    FORMAT: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    PREC: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """OUT (c*r, K) = W'_c for the chunk starting at W row ``row_start`` (= ``block_start * r``), in OUT's dtype.
    Program (i, j, t) writes the [SB, SB] sub-tile t of block (i, j): ``W'[p, q] = W[p, q] + (W[p, :] B_i)[q] +
    B_i[p, q]``, p, q the sub-tile's rows and columns within the block."""
    i = tl.program_id(0)
    j = tl.program_id(1)
    t = tl.program_id(2)
    per_row: tl.constexpr = RB // SB
    p0 = (t // per_row) * SB
    q0 = (t % per_row) * SB
    p, p_ok = _lanes(p0, SB, r - p0, INDEX_64)  # [SB]: rows of the block
    q, q_ok = _lanes(q0, SB, r - q0, INDEX_64)  # [SB]: columns of the block
    w_rows = row_start + i * r + p  # [SB]
    b_blk = BLK + (block_start + i) * stride_bi
    w_prime = _packed_tile(DATA, SCALE, CODE, w_rows, p_ok, j * r + q, q_ok, K, FORMAT, BLOCKSIZE)  # [SB, SB]: W
    for s0 in tl.static_range(0, RB, KB):  # + W B, KB of the block's columns at a time
        s, s_ok = _lanes(s0, KB, r - s0, INDEX_64)  # [KB]
        w_ps = _packed_tile(DATA, SCALE, CODE, w_rows, p_ok, j * r + s, s_ok, K, FORMAT, BLOCKSIZE)  # [SB, KB]
        b_ptrs = b_blk + s[:, None] * stride_bs + q[None, :] * stride_bq  # [KB, SB]
        b_sq = tl.load(b_ptrs, mask=s_ok[:, None] & q_ok[None, :], other=0.0).to(tl.float32)
        w_prime = tl.dot(w_ps, b_sq, w_prime, input_precision=PREC, out_dtype=tl.float32)
    b_ptrs = b_blk + p[:, None] * stride_bs + q[None, :] * stride_bq  # [SB, SB]
    w_prime += tl.load(b_ptrs, mask=p_ok[:, None] & q_ok[None, :], other=0.0).to(tl.float32)  # + B
    o_ptrs = OUT + (i * r + p)[:, None] * stride_on + (j * r + q)[None, :] * stride_ok  # [SB, SB]
    tl.store(o_ptrs, w_prime.to(OUT.dtype.element_ty), mask=p_ok[:, None] & q_ok[None, :])


@triton.jit
def _packed_dblock_kernel(
    DATA,
    SCALE,
    CODE,
    G,
    OUT,
    row_start,
    K,
    r,
    stride_gn,
    stride_gk,
    stride_oi,
    stride_os,
    stride_oq,
    RB: tl.constexpr,
    SB: tl.constexpr,
    KB: tl.constexpr,
    FORMAT: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    PREC: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """OUT[i][s, q] = sum_j sum_p W_ij[p, s] G_ij[p, q] for out-block i of the chunk at W row ``row_start``
    (G: (c*r, K)); program (i, t) writes the [SB, SB] sub-tile t of OUT[i], reducing over p in RB lanes."""
    i = tl.program_id(0)
    t = tl.program_id(1)
    per_row: tl.constexpr = RB // SB
    s0 = (t // per_row) * SB
    q0 = (t % per_row) * SB
    s, s_ok = _lanes(s0, SB, r - s0, INDEX_64)  # [SB]
    q, q_ok = _lanes(q0, SB, r - q0, INDEX_64)  # [SB]
    acc = tl.zeros((SB, SB), dtype=tl.float32)  # [SB, SB]
    for j in range(0, K // r):
        for pc in tl.static_range(0, RB, KB):  # the block's rows (the reduction), KB at a time
            p, p_ok = _lanes(pc, KB, r - pc, INDEX_64)  # [KB]
            w_rows = row_start + i * r + p  # [KB]
            w = _packed_tile(DATA, SCALE, CODE, w_rows, p_ok, j * r + s, s_ok, K, FORMAT, BLOCKSIZE)  # [KB, SB]
            g_ptrs = G + (i * r + p)[:, None] * stride_gn + (j * r + q)[None, :] * stride_gk  # [KB, SB]
            g = tl.load(g_ptrs, mask=p_ok[:, None] & q_ok[None, :], other=0.0)
            acc = tl.dot(tl.trans(w), g, acc, input_precision=PREC, out_dtype=tl.float32)  # [SB, KB] x [KB, SB]
    o_ptrs = OUT + i * stride_oi + s[:, None] * stride_os + q[None, :] * stride_oq  # [SB, SB]
    tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=s_ok[:, None] & q_ok[None, :])


# ----------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------


BUILD_SUB = 16
"""Largest sub-tile width of the W'_c build."""
DBLOCK_SUB = 16
"""Largest sub-tile width of the dB products."""
REDUCE_STEP = 32
"""Lanes of the block's inner dimension each ``tl.dot`` reduces over (W B: its columns; W^T G: its rows)."""


def padded_lanes(r: int) -> int:
    """RB: r rounded up to a power of two, at least 16 (``tl.dot``'s smallest size)."""
    return max(16, 1 << (r - 1).bit_length())


def supports(packed: PackedWeight | None, r: int, delta_dtype: torch.dtype) -> bool:
    """Whether these kernels serve ``packed`` at block size ``r`` with arithmetic in ``delta_dtype``."""
    if packed is None or packed.format not in FORMATS or delta_dtype != torch.float32:
        return False
    n, k = packed.shape
    if n % r or k % r:
        return False
    return packed.format == "int8" or (packed.blocksize > 0 and k % packed.blocksize == 0)


def _constexprs(packed: PackedWeight, r: int, env: KernelEnv, sub_cap: int) -> dict:
    """RB, SB, KB, the format, the blocksize and the dot precision (TF32 exactly when torch allows it for fp32)."""
    rb = padded_lanes(r)
    return dict(
        RB=rb,
        SB=min(rb, sub_cap),
        KB=min(rb, REDUCE_STEP),
        FORMAT=packed.format,
        BLOCKSIZE=packed.blocksize or 1,
        PREC="tf32" if env.tf32 else "ieee",
    )


def build_launch(packed: PackedWeight, r: int, blocks: int, env: KernelEnv) -> LaunchSpec:
    """The W'_c build of ``blocks`` out-blocks: grid (blocks, K / r, sub-tiles per block)."""
    tile = BAT_PACKED["build"]
    constexprs = _constexprs(packed, r, env, BUILD_SUB)
    grid = (blocks, packed.shape[1] // r, (constexprs["RB"] // constexprs["SB"]) ** 2)
    return LaunchSpec("bat_packed_build", _packed_build_kernel, grid, constexprs, tile.num_warps, tile.num_stages)


def dblock_launch(packed: PackedWeight, r: int, blocks: int, env: KernelEnv) -> LaunchSpec:
    """The sum_j W_ij^T G_ij of ``blocks`` out-blocks: grid (blocks, sub-tiles per block)."""
    tile = BAT_PACKED["dblock"]
    constexprs = _constexprs(packed, r, env, DBLOCK_SUB)
    grid = (blocks, (constexprs["RB"] // constexprs["SB"]) ** 2)
    return LaunchSpec("bat_packed_dblock", _packed_dblock_kernel, grid, constexprs, tile.num_warps, tile.num_stages)


def _packed_args(packed: PackedWeight) -> dict:
    code = packed.code if packed.code is not None else packed.scale  # int8 reads no code table
    return dict(DATA=packed.data, SCALE=packed.scale, CODE=code, K=packed.shape[1])


def packed_bat_rows(
    packed: PackedWeight, block: torch.Tensor, start: int, stop: int, dtype: torch.dtype
) -> torch.Tensor:
    """W'_c (stop - start, K) in ``dtype`` for W rows ``start .. stop`` (whole out-blocks) of bat block
    (N // r, r, r); W is dequantised in-tile from ``packed``."""
    r = block.shape[-1]
    out = torch.empty(stop - start, packed.shape[1], dtype=dtype, device=block.device)  # [c*r, K]
    spec = build_launch(packed, r, (stop - start) // r, KernelEnv.of(block.device))
    spec(
        needs_int64(packed.data, out, block) or packed.shape[0] * packed.shape[1] > INT32_LIMIT,
        **_packed_args(packed),
        BLK=block,
        OUT=out,
        row_start=start,
        block_start=start // r,
        r=r,
        stride_bi=block.stride(0),
        stride_bs=block.stride(1),
        stride_bq=block.stride(2),
        stride_on=out.stride(0),
        stride_ok=out.stride(1),
    )
    return out


def packed_block_products(packed: PackedWeight, g: torch.Tensor, start: int, r: int) -> torch.Tensor:
    """(c, r, r) float32: ``sum_j W_ij^T G_ij`` for the c out-blocks of G's rows (G: (c*r, K), rows ``start ..``
    of the weight's out-rows), W dequantised in-tile from ``packed``."""
    blocks = g.shape[0] // r
    out = torch.empty(blocks, r, r, dtype=torch.float32, device=g.device)
    spec = dblock_launch(packed, r, blocks, KernelEnv.of(g.device))
    spec(
        needs_int64(packed.data, g, out) or packed.shape[0] * packed.shape[1] > INT32_LIMIT,
        **_packed_args(packed),
        G=g,
        OUT=out,
        row_start=start,
        r=r,
        stride_gn=g.stride(0),
        stride_gk=g.stride(1),
        stride_oi=out.stride(0),
        stride_os=out.stride(1),
        stride_oq=out.stride(2),
    )
    return out


# ----------------------------------------------------------------------------------------------------------
# Ahead-of-time cases
# ----------------------------------------------------------------------------------------------------------

AOT_SPECS: tuple[tuple[str, int, torch.dtype], ...] = (
    ("code4", 64, torch.bfloat16),
    ("code4", 64, torch.float32),
    ("code4", 16, torch.float32),
    ("code4", 128, torch.float32),
    ("int8", 64, torch.bfloat16),
    ("int8", 64, torch.float32),
    ("int8", 8, torch.float32),
)
"""(format, r, W' dtype) the AOT check compiles: r = 8 (padded to 16 lanes), 16, 64, 128; W' in bf16 (forward of
a bf16 model) and fp32 (backward, fp32 models)."""


def _fake(fmt: str, r: int) -> PackedWeight:
    """A PackedWeight-shaped stand-in for the AOT signature (only dtypes and the format matter there)."""
    data = torch.empty(0, dtype=torch.uint8 if fmt == "code4" else torch.int8)
    scale = torch.empty(0, dtype=torch.float32)
    return PackedWeight(fmt, (4096, 4096), data, scale, scale if fmt == "code4" else None, 64 if fmt == "code4" else 0)


def aot_cases() -> list[AotCase]:
    """Both kernels for every :data:`AOT_SPECS` entry, for every shipped architecture family."""
    cases = []
    for fmt, r, dtype in AOT_SPECS:
        packed = _fake(fmt, r)
        data = packed.data.dtype
        common = {"DATA": data, "SCALE": torch.float32, "CODE": torch.float32}
        build = build_launch(packed, r, 64, AOT_ENV)
        pointers = {**common, "BLK": torch.float32, "OUT": dtype}
        cases.append(aot_case(build, pointers, f"{fmt}.r{r}", dtype, SHIPPED_ARCHS))
        if dtype == torch.float32:
            dblock = dblock_launch(packed, r, 64, AOT_ENV)
            pointers = {**common, "G": torch.float32, "OUT": torch.float32}
            cases.append(aot_case(dblock, pointers, f"{fmt}.r{r}", dtype, SHIPPED_ARCHS))
    return cases
