"""Host side of the CUDA kernels: one function per kernel, which checks its tensors, picks the instantiation
(types, vector width, tile) and computes the launch geometry. The launch itself goes through the
:class:`~.launcher.Launcher` registered for the tensors' device.

Shapes follow :mod:`bonekern.backends.base`; "acc" is the accumulation dtype (float32, or float64). Every kernel
runs :data:`~.sources.BLOCK_THREADS` threads per block.
"""

from __future__ import annotations

import torch

from ...dropout import DropoutSpec
from .launcher import KernelArg, launcher_for
from .sources import BLOCK_THREADS, FAMILIES, kernel_name, tile_shape

MAX_GRID_STRIDE_BLOCKS = 4096
"""Blocks of a grid-stride kernel: enough to fill any current GPU several times over; each block then loops."""

GEMM_TILE_K = 16
"""BK of every tile in tile_gemm.cuh: the Bat gradient's split lengths are multiples of it."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _launch(
    family: str,
    storage: torch.dtype,
    acc: torch.dtype,
    variant: str,
    grid: tuple[int, int, int],
    args: tuple[KernelArg, ...],
    device: torch.device,
    block: tuple[int, int, int] = (BLOCK_THREADS, 1, 1),
) -> None:
    launcher = launcher_for(device)
    if launcher is None:
        raise RuntimeError(f"no CUDA kernel launcher for {device} tensors (the CuPy backend needs a CUDA GPU)")
    launcher.launch(FAMILIES[family].source, kernel_name(family, storage, acc, variant), grid, block, args, device)


def _elements_per_vector(t: torch.Tensor) -> int:
    return 16 // t.element_size()


def _vectorizable(t: torch.Tensor, *extents: int) -> bool:
    """Whether 2-D ``t`` can be accessed in 16-byte vectors along its rows: unit column stride, 16-byte aligned
    start and row stride, and every extent in ``extents`` a multiple of the vector length."""
    v = _elements_per_vector(t)
    return (
        t.stride(1) == 1
        and t.data_ptr() % 16 == 0
        and (t.shape[0] == 1 or t.stride(0) % v == 0)
        and all(e % v == 0 for e in extents)
    )


def default_threads_per_row(cols: int, vector: int) -> int:
    """Threads per row for :func:`group_sum`: a warp, doubled while every thread would still read >= 4 units."""
    units = _ceil_div(cols, vector)
    threads = 32
    while threads < BLOCK_THREADS and threads * 4 < units:
        threads *= 2
    return threads


def group_sum(
    x: torch.Tensor, width: int, acc: torch.dtype, *, vector: bool = True, threads_per_row: int = 0
) -> torch.Tensor:
    """out[m, c] = sum over g of x[m, g * width + c] (missing columns count as zero): (M, width) in ``acc``.

    x: (M, cols) with any strides (16-byte vector loads when aligned and ``vector``). Bone's S is
    ``group_sum(x, r)``; mini's fold of dY is ``group_sum(dy, C)``; ``group_sum(t, t.shape[1])`` is a widening copy.
    threads_per_row: a power of two in [32, 256]; 0 picks :func:`default_threads_per_row`.
    """
    m, cols = x.shape
    out = torch.empty(m, width, dtype=acc, device=x.device)
    use_vector = vector and _vectorizable(x, cols, width)
    unit = _elements_per_vector(x) if use_vector else 1
    threads = threads_per_row or default_threads_per_row(cols, unit)
    if threads not in (32, 64, 128, 256):
        raise ValueError(f"threads_per_row must be 32, 64, 128 or 256; got {threads}")
    rows_per_block = BLOCK_THREADS // threads
    _launch(
        "group_sum",
        x.dtype,
        acc,
        "vec16" if use_vector else "scalar",
        (_ceil_div(m, rows_per_block), 1, 1),
        (x, out, m, cols, x.stride(0), x.stride(1), width),
        x.device,
        block=(threads, rows_per_block, 1),
    )
    return out


def add_adapter_(y: torch.Tensor, s: torch.Tensor, d: torch.Tensor, *, tile: str = "t64x64") -> torch.Tensor:
    """In place: y[m, n] += sum_c s[m, c] d[c, n % C], summed in acc and rounded once into y's dtype.

    y: (M, N) with unit column stride; s: (M, r) contiguous in acc; d: (r, C) contiguous in acc with C | N.
    """
    m, n = y.shape
    r, cols = d.shape
    _check_acc_operands(y, s, d)
    if y.stride(1) != 1 or s.shape != (m, r) or n % cols:
        raise ValueError(f"add_adapter_: y {tuple(y.shape)} (strides {y.stride()}), s {tuple(s.shape)}, d {(r, cols)}")
    bm, bn = tile_shape(tile)
    grid = (_ceil_div(m, bm) * _ceil_div(n, bn), 1, 1)
    _launch("bone_add_adapter", y.dtype, s.dtype, tile, grid, (y, s, d, m, n, y.stride(0), r, cols), y.device)
    return y


def write_adapter_(y: torch.Tensor, s: torch.Tensor, d: torch.Tensor, *, tile: str = "t64x64") -> torch.Tensor:
    """y[m, n] = sum_c s[m, c] d[c, n % C], summed in acc and rounded once into y's dtype (y is not read).

    y: (M, N) with unit column stride; s: (M, r) contiguous in acc; d: (r, C) contiguous in acc with C | N.
    """
    m, n = y.shape
    r, cols = d.shape
    _check_acc_operands(y, s, d)
    if y.stride(1) != 1 or s.shape != (m, r) or n % cols:
        shapes = f"y {tuple(y.shape)} (strides {y.stride()}), s {tuple(s.shape)}, d {(r, cols)}"
        raise ValueError(f"write_adapter_: {shapes}")
    bm, bn = tile_shape(tile)
    grid = (_ceil_div(m, bm) * _ceil_div(n, bn), 1, 1)
    _launch("bone_write_adapter", y.dtype, s.dtype, tile, grid, (y, s, d, m, n, y.stride(0), r, cols), y.device)
    return y


def _dropout_args(dropout: DropoutSpec | None) -> tuple[int, int, int]:
    """(seed, offset, threshold) kernel arguments of a spec; zeros (not read) without one."""
    return (0, 0, 0) if dropout is None else (dropout.seed, dropout.offset, dropout.threshold)


def adapter_group_sum(x: torch.Tensor, r: int, acc: torch.dtype, dropout: DropoutSpec) -> torch.Tensor:
    """S[m, j] = sum over g of x[m, g * r + j] * keep(m, g * r + j): (M, r) in ``acc``, NOT yet scaled by
    1 / (1 - p). x: (M, K) with any strides; the mask is :func:`bonekern.dropout.keep_mask`'s."""
    m, k = x.shape
    s = torch.empty(m, r, dtype=acc, device=x.device)
    blocks = max(1, min(MAX_GRID_STRIDE_BLOCKS, _ceil_div(m * r, BLOCK_THREADS)))
    args = (x, s, m, k, x.stride(0), x.stride(1), r, *_dropout_args(dropout))
    _launch("adapter_group_sum", x.dtype, acc, "dropout", (blocks, 1, 1), args, x.device)
    return s


def adapter_spread(t: torch.Tensor, k: int, dtype: torch.dtype, dropout: DropoutSpec | None) -> torch.Tensor:
    """dx[m, k] = t[m, k % r] (times keep(m, k) under ``dropout``): a new (M, K) tensor of ``dtype``.

    t: (M, r) contiguous in acc (already scaled by 1 / (1 - p) under dropout).
    """
    m, r = t.shape
    _check_acc_operands(t, t)
    dx = torch.empty(m, k, dtype=dtype, device=t.device)
    blocks = max(1, min(MAX_GRID_STRIDE_BLOCKS, _ceil_div(m * k, BLOCK_THREADS)))
    variant = "plain" if dropout is None else "dropout"
    args = (dx, t, m, k, dx.stride(0), r, *_dropout_args(dropout))
    _launch("adapter_spread", dtype, t.dtype, variant, (blocks, 1, 1), args, t.device)
    return dx


def add_grouped_(dx: torch.Tensor, t: torch.Tensor, *, vector: bool = True) -> torch.Tensor:
    """In place: dx[m, k] += t[m, k % r], summed in acc and rounded once into dx's dtype.

    dx: (M, K) with unit column stride; t: (M, r) contiguous in acc.
    """
    m, k = dx.shape
    r = t.shape[1]
    _check_acc_operands(dx, t)
    if dx.stride(1) != 1 or t.shape[0] != m:
        raise ValueError(f"add_grouped_: dx {tuple(dx.shape)} (strides {dx.stride()}), t {tuple(t.shape)}")
    use_vector = vector and _vectorizable(dx, k, r)
    unit = _elements_per_vector(dx) if use_vector else 1
    blocks = min(MAX_GRID_STRIDE_BLOCKS, _ceil_div(m * k // unit, BLOCK_THREADS))
    _launch(
        "bone_add_grouped",
        dx.dtype,
        t.dtype,
        "vec16" if use_vector else "scalar",
        (blocks, 1, 1),
        (dx, t, m, k, dx.stride(0), r),
        dx.device,
    )
    return dx


def bat_weight_(out: torch.Tensor, weight_rows: torch.Tensor, b: torch.Tensor, *, tile: str = "t64x64") -> torch.Tensor:
    """Write W'_ij = W_ij B_i + W_ij + B_i (= W_ij (I + B_i) + B_i) for a run of c out-blocks into ``out``.

    out, weight_rows: (c * r, K) contiguous, same dtype; b: (c, r, r) contiguous in acc. Computed in acc.
    """
    count, r, _ = b.shape
    k = weight_rows.shape[1]
    _check_acc_operands(weight_rows, b)
    if not (out.is_contiguous() and weight_rows.is_contiguous() and out.shape == weight_rows.shape == (count * r, k)):
        raise ValueError(
            f"bat_weight_: out {tuple(out.shape)}, weight rows {tuple(weight_rows.shape)}, b {tuple(b.shape)}"
        )
    if out.dtype != weight_rows.dtype:
        raise TypeError(f"bat_weight_: out must have the weight's dtype {weight_rows.dtype}; got {out.dtype}")
    bm, bn = tile_shape(tile)
    grid = (count * _ceil_div(k, bm) * _ceil_div(r, bn), 1, 1)
    _launch("bat_weight", out.dtype, b.dtype, tile, grid, (out, weight_rows, b, k, r), out.device)
    return out


def bat_block_grad(
    g: torch.Tensor, weight_rows: torch.Tensor, r: int, *, splits: int = 1, tile: str = "t64x64"
) -> torch.Tensor:
    """The W part of Bat's block gradient, sum_j W_ij^T G_ij, for a run of c out-blocks: (c, r, r) in acc.

    (The full dB_i = sum_j (W_ij + I)^T G_ij also needs sum_j G_ij = dY_i^T S(x); the backend adds that rank-r
    product.) g: rows of G = dY^T x for those out-blocks, (c * r, K) contiguous in acc; weight_rows: the same rows
    of W, contiguous. The sum over the K / r in-blocks is cut into ``splits`` ranges reduced in parallel; their
    partial sums (a (splits, c, r, r) temporary) are then added here, in a fixed order (deterministic).
    """
    rows, k = g.shape
    count = rows // r
    _check_acc_operands(weight_rows, g)
    if not (g.is_contiguous() and weight_rows.is_contiguous() and weight_rows.shape == g.shape and rows == count * r):
        raise ValueError(f"bat_block_grad: g {tuple(g.shape)}, weight rows {tuple(weight_rows.shape)}, r = {r}")
    per_split = _ceil_div(_ceil_div(k, max(1, splits)), GEMM_TILE_K) * GEMM_TILE_K
    splits = _ceil_div(k, per_split)
    if splits > 65535:
        raise ValueError(f"bat_block_grad: at most 65535 splits; got {splits}")
    partial = torch.empty(splits, count, r, r, dtype=g.dtype, device=g.device)
    bm, bn = tile_shape(tile)
    grid = (count * _ceil_div(r, bm) * _ceil_div(r, bn), splits, 1)
    args = (partial, g, weight_rows, count, k, r, per_split)
    _launch("bat_block_grad", weight_rows.dtype, g.dtype, tile, grid, args, g.device)
    return partial[0] if splits == 1 else partial.sum(0)


def _check_acc_operands(storage: torch.Tensor, *acc_operands: torch.Tensor) -> None:
    """The accumulation-type operands share one dtype (float32/float64) and are contiguous."""
    acc = acc_operands[0].dtype
    for t in acc_operands:
        if t.dtype != acc or acc not in (torch.float32, torch.float64) or not t.is_contiguous():
            raise TypeError(
                f"kernel operands in the accumulation dtype must be contiguous float32/float64; got {t.dtype}"
            )
    if any(t.device != storage.device for t in acc_operands):
        raise ValueError("kernel operands must be on one device")
