"""Triton kernels for the bone family (variants bone and mini), forward and backward, and their host functions.

Notation (DESIGN.md section 1): x (M, K), W (N, K), block (r, C) with C | N acting as D[k, n] = block[k, n % C]
(C = N for bone, C = mini_r for mini; the kernels read ``block[k, n % C]`` by index and never form the repeated
matrix), G = ceil(K / r) groups, S (M, r) the group sums of x (zero padding when K % r != 0 comes from masked
loads: no padded copy of x exists).

Forward, y = x W^T + b + S D, one of three strategies (``config["strategy"]``; which r each serves is written
once, in :func:`configs.forward_strategy_serves`):

- ``"group"`` (fused): r a power of two, r <= BLOCK_K. The GEMM's K loop reshapes each x tile it loads to
  (BLOCK_M, BLOCK_K / w, w), w = max(r, 16), and sums the middle axis into an (BLOCK_M, w) accumulator whose
  column j holds group offset j % r; the epilogue adds it times D[j % r, n % C] with one ``tl.dot`` (w >= 16 is
  what ``tl.dot`` needs, so r = 1, 2, 4, 8 take the same path). Programs with pid_n == 0 fold w down to r and
  write S.
- ``"chunk"`` (fused): any r (shipped for r >= 16). Loops over column chunks c0 of a group (BLOCK_K wide) and,
  inside, over the G groups (x columns g*r + c0 + [0, BLOCK_K)); after the inner loop the S chunk is complete,
  so ``acc += S_chunk @ D[c0:c0+BLOCK_K, n-tile]`` right there. Lanes past r are masked (wasted when BLOCK_K
  does not divide r).
- ``"two_pass"``: any r. A group-sum kernel writes S first (for r < 16 through a 0/1 "one-hot" matrix on the
  tensor cores, else by summing the groups), then ONE GEMM kernel loops over K for x/W and then over r for S/D:
  the product [x | S] [W^T ; D] without concatenating anything in memory.

Backward:

- dx = dY W + T[:, k % r] with T = dY D^T (M, r) in fp32: a small kernel writes T, split over N into
  ``split_n`` partial buffers when M * r alone gives too few programs; the dx GEMM sums the partials for
  T[:, k % r] in its epilogue (fixed order: deterministic). T reads D[j, n % C] by index, so mini needs no
  fold of dY here (T is r/K of the dx GEMM's work either way).
- dblock = S^T F, F = dY folded over mini's repeats (F[m, c] = sum_i dY[m, i*C + c]; F = dY for bone), a GEMM
  reducing over tokens: the fold happens inside the kernel (summing the repeats' dY tiles, or for C < 16 through
  a one-hot ``tl.dot``), so dDm (r, C) comes out directly. Split over M into ``split_m`` partial buffers that a
  second kernel sums in a fixed order (deterministic; no atomics); with one split the kernel writes dblock.
- Only what ``need_dx`` / ``need_dblock`` ask for is launched.

Precision: every accumulator is fp32 (fp64 when x or the block is fp64); S, T, the partial sums and every
adapter operand (S, T, D) are fp32, never rounded to x's dtype. fp32 inputs: every ``tl.dot`` follows
``torch.backends.cuda.matmul.allow_tf32`` ("tf32" when set, else "ieee"), as torch's own fp32 matmuls do.
fp16/bf16 inputs: the x/W GEMM runs in x's dtype; the small fp32 adapter dots (S D, dY D^T, S^T dY) use TF32
on the GPU: its 10-bit mantissa error is below the half-precision rounding of the output, while "ieee" (FMA
units) spilled kilobytes in every fused kernel and "tf32x3" spilled in the fused kernels on sm_80 and in
"chunk" on sm_90 (compiled with resources.py). The one-hot dots are always "ieee" (they are sums and must be
exact). Under the interpreter every dot is exact fp32, and bf16 operands are cast to fp32 (its bf16 dot is
wrong).

Indexing: offsets are int32 unless some tensor's largest element offset passes 2^31 - 1
(:func:`common.needs_int64`), then the kernel is specialised with int64 row/column offsets. Any 2-D strides
are read as given (x, W, dY and the block are never copied; a non-unit inner stride costs coalescing only).
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from ...profiling import nvtx_range
from ...validation import delta_dtype
from ..base import Config
from . import configs
from .common import TRITON_TYPE_NAMES, AotCase, fp32_dot_precision, interpreting, needs_int64

# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped program order: GROUP_M row tiles share each column tile of the second operand in L2."""
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size
    return pid_m, pid_n


@triton.jit
def _x_w_step(
    acc, x_rows, w_cols, cols, k_ok, m_ok, n_ok, stride_xk, stride_wk,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One K step of the base GEMM: loads x[m-tile, cols] and W[n-tile, cols]^T (masked lanes read 0, which is also
    PEFT's zero padding of x) and returns (acc + x W^T, the x tile) so the caller can sum the tile into S."""
    x = tl.load(x_rows + cols[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
    w = tl.load(w_cols + cols[:, None] * stride_wk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
    acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    return acc, x


@triton.jit
def _bone_fwd_kernel(
    x_ptr,
    w_ptr,
    d_ptr,
    bias_ptr,
    y_ptr,
    s_ptr,
    M,
    N,
    K,
    R,
    C,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_dr,
    stride_dc,
    stride_ym,
    stride_yn,
    stride_sm,
    stride_sr,
    STRATEGY: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    R_POW2: tl.constexpr,
    SUM_WIDTH: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    ADAPTER_PRECISION: tl.constexpr,
    ADAPTER_K: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """y[m-tile, n-tile] = x W^T + b + S D; strategies as in the module docstring. "group"/"chunk" also write S
    (programs with pid_n == 0); "two_pass" reads it, ADAPTER_K fp32 columns at a time. R_POW2 and SUM_WIDTH
    (= max(r, 16)) are used by "group" only. PRECISION: the x/W dot; ADAPTER_PRECISION: the fp32 S/D dots."""
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    if INDEX_64:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    w_cols = w_ptr + offs_n[None, :] * stride_wn
    d_cols = d_ptr + (offs_n % C)[None, :] * stride_dc  # D[k, n] = block[k, n % C]
    s_rows = s_ptr + offs_m[:, None] * stride_sm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)

    if STRATEGY == "group":
        s_wide = tl.zeros((BLOCK_M, SUM_WIDTH), dtype=ACC_DTYPE)  # column j: group offset j % r
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + offs_k
            k_ok = cols < K
            acc, x = _x_w_step(
                acc, x_rows, w_cols, cols, k_ok, m_ok, n_ok, stride_xk, stride_wk, DOT_DTYPE, ACC_DTYPE, PRECISION
            )
            x_groups = tl.reshape(x.to(ACC_DTYPE), (BLOCK_M, BLOCK_K // SUM_WIDTH, SUM_WIDTH))
            s_wide += tl.sum(x_groups, axis=1)
        offs_j = tl.arange(0, SUM_WIDTH)
        d = tl.load(d_cols + (offs_j % R_POW2)[:, None] * stride_dr, mask=n_ok[None, :], other=0.0)
        acc = tl.dot(s_wide, d.to(ACC_DTYPE), acc, input_precision=ADAPTER_PRECISION, out_dtype=ACC_DTYPE)
        if pid_n == 0:
            s = tl.sum(tl.reshape(s_wide, (BLOCK_M, SUM_WIDTH // R_POW2, R_POW2)), axis=1)
            offs_r = tl.arange(0, R_POW2)
            tl.store(s_rows + offs_r[None, :] * stride_sr, s, mask=m_ok[:, None])
    elif STRATEGY == "chunk":
        for c0 in range(0, R, BLOCK_K):
            offs_c = c0 + offs_k
            c_ok = offs_c < R
            s = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DTYPE)
            for g in range(0, tl.cdiv(K, R)):
                cols = g * R + offs_c
                k_ok = c_ok & (cols < K)
                acc, x = _x_w_step(
                    acc, x_rows, w_cols, cols, k_ok, m_ok, n_ok, stride_xk, stride_wk, DOT_DTYPE, ACC_DTYPE, PRECISION
                )
                s += x.to(ACC_DTYPE)
            d = tl.load(d_cols + offs_c[:, None] * stride_dr, mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(s, d.to(ACC_DTYPE), acc, input_precision=ADAPTER_PRECISION, out_dtype=ACC_DTYPE)
            if pid_n == 0:
                tl.store(s_rows + offs_c[None, :] * stride_sr, s, mask=m_ok[:, None] & c_ok[None, :])
    else:  # "two_pass": S was written by _group_sum_kernel
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + offs_k
            k_ok = cols < K
            acc, x = _x_w_step(
                acc, x_rows, w_cols, cols, k_ok, m_ok, n_ok, stride_xk, stride_wk, DOT_DTYPE, ACC_DTYPE, PRECISION
            )
        offs_rk = tl.arange(0, ADAPTER_K)
        for c0 in range(0, R, ADAPTER_K):
            offs_c = c0 + offs_rk
            c_ok = offs_c < R
            s = tl.load(s_rows + offs_c[None, :] * stride_sr, mask=m_ok[:, None] & c_ok[None, :], other=0.0)
            d = tl.load(d_cols + offs_c[:, None] * stride_dr, mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(s.to(ACC_DTYPE), d.to(ACC_DTYPE), acc, input_precision=ADAPTER_PRECISION, out_dtype=ACC_DTYPE)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(ACC_DTYPE)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _group_sum_kernel(
    x_ptr,
    s_ptr,
    M,
    K,
    R,
    stride_xm,
    stride_xk,
    stride_sm,
    stride_sr,
    ONEHOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """S[m-tile, r-tile] = sum over g of x[:, g*r + j] (first pass of "two_pass").

    ONEHOT (r <= BLOCK_R, meant for r < 16): each (BLOCK_M, BLOCK_K) x tile is multiplied by the 0/1 matrix
    P[k, j] = (k % r == j), so any r reads x in wide contiguous tiles; "ieee" keeps the sums exact. Otherwise
    one r-tile of columns is summed over the G groups.
    """
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    r_ok = offs_r < R
    if INDEX_64:
        offs_m = offs_m.to(tl.int64)
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    s = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
    if ONEHOT:
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + offs_k
            x = tl.load(x_rows + cols[None, :] * stride_xk, mask=m_ok[:, None] & (cols < K)[None, :], other=0.0)
            onehot = ((cols % R)[:, None] == offs_r[None, :]).to(DOT_DTYPE)
            s = tl.dot(x.to(DOT_DTYPE), onehot, s, input_precision="ieee", out_dtype=ACC_DTYPE)
    else:
        for g in range(0, tl.cdiv(K, R)):
            cols = g * R + offs_r
            x = tl.load(
                x_rows + cols[None, :] * stride_xk, mask=m_ok[:, None] & (r_ok & (cols < K))[None, :], other=0.0
            )
            s += x.to(ACC_DTYPE)
    s_ptrs = s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr
    tl.store(s_ptrs, s, mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _bone_bwd_t_kernel(
    dy_ptr,
    d_ptr,
    t_ptr,
    M,
    N,
    R,
    C,
    N_PER_SPLIT,
    stride_dym,
    stride_dyn,
    stride_dr,
    stride_dc,
    stride_ts,
    stride_tm,
    stride_tr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    ADAPTER_PRECISION: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """T_part[split, m-tile, r-tile] = sum over n in the split's columns of dY[m, n] * block[j, n % C]."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    r_ok = offs_r < R
    if INDEX_64:
        offs_m = offs_m.to(tl.int64)
        pid_s = pid_s.to(tl.int64)  # pid_s * stride_ts may pass 2^31 even when one split does not
    n_start = pid_s * N_PER_SPLIT
    n_end = tl.minimum(N, n_start + N_PER_SPLIT)
    dy_rows = dy_ptr + offs_m[:, None] * stride_dym
    d_rows = d_ptr + offs_r[None, :] * stride_dr
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_end
        if INDEX_64:
            offs_n = offs_n.to(tl.int64)
        dy = tl.load(dy_rows + offs_n[None, :] * stride_dyn, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        d = tl.load(d_rows + (offs_n % C)[:, None] * stride_dc, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(dy.to(ACC_DTYPE), d.to(ACC_DTYPE), acc, input_precision=ADAPTER_PRECISION, out_dtype=ACC_DTYPE)
    t_ptrs = t_ptr + pid_s * stride_ts + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr
    tl.store(t_ptrs, acc, mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _bone_bwd_dx_kernel(
    dy_ptr,
    w_ptr,
    t_ptr,
    dx_ptr,
    M,
    N,
    K,
    R,
    T_SPLITS,
    stride_dym,
    stride_dyn,
    stride_wn,
    stride_wk,
    stride_ts,
    stride_tm,
    stride_tr,
    stride_dxm,
    stride_dxk,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """dx[m-tile, k-tile] = dY W + sum over splits of T_part[split, m, k % r]; BLOCK_N is the reduction step."""
    pid_m, pid_k = _swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    k_ok = offs_k < K
    if INDEX_64:
        offs_m = offs_m.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
    dy_rows = dy_ptr + offs_m[:, None] * stride_dym
    w_cols = w_ptr + offs_k[None, :] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DTYPE)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + offs_n
        n_ok = rows < N
        if INDEX_64:
            rows = rows.to(tl.int64)
        dy = tl.load(dy_rows + rows[None, :] * stride_dyn, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        w = tl.load(w_cols + rows[:, None] * stride_wn, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(dy.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    t_ptrs = t_ptr + offs_m[:, None] * stride_tm + (offs_k % R)[None, :] * stride_tr
    mask = m_ok[:, None] & k_ok[None, :]
    for _ in range(0, T_SPLITS):
        acc += tl.load(t_ptrs, mask=mask, other=0.0)
        t_ptrs += stride_ts  # 64-bit pointer steps: no int32 split * stride_ts product to overflow
    dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bone_bwd_dblock_kernel(
    s_ptr,
    dy_ptr,
    out_ptr,
    M,
    N,
    R,
    C,
    M_PER_SPLIT,
    stride_sm,
    stride_sr,
    stride_dym,
    stride_dyn,
    stride_os,
    stride_or,
    stride_oc,
    ONEHOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    ADAPTER_PRECISION: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """out[split, r-tile, c-tile] = S^T F over the split's tokens, F[m, c] = sum over repeats i of dY[m, i*C + c].

    ONEHOT (C <= BLOCK_C, meant for C < 16): F is formed from wide dY tiles times the 0/1 matrix
    P[n, c] = (n % C == c) ("ieee": exact sums). Otherwise the N // C repeats' (BLOCK_M, BLOCK_C) dY tiles are
    added (one repeat for bone). BLOCK_N is the dY tile width of the one-hot fold.
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    r_ok = offs_r < R
    c_ok = offs_c < C
    m_start = pid_s * M_PER_SPLIT
    m_end = tl.minimum(M, m_start + M_PER_SPLIT)
    if INDEX_64:
        pid_s = pid_s.to(tl.int64)  # for pid_s * stride_os below
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC_DTYPE)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_end
        if INDEX_64:
            offs_m = offs_m.to(tl.int64)
        s_t = tl.load(
            s_ptr + offs_r[:, None] * stride_sr + offs_m[None, :] * stride_sm,
            mask=r_ok[:, None] & m_ok[None, :],
            other=0.0,
        )
        dy_rows = dy_ptr + offs_m[:, None] * stride_dym
        f = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC_DTYPE)
        if ONEHOT:
            offs_n = tl.arange(0, BLOCK_N)
            for n0 in range(0, N, BLOCK_N):
                cols = n0 + offs_n
                dy = tl.load(dy_rows + cols[None, :] * stride_dyn, mask=m_ok[:, None] & (cols < N)[None, :], other=0.0)
                onehot = ((cols % C)[:, None] == offs_c[None, :]).to(DOT_DTYPE)
                f = tl.dot(dy.to(DOT_DTYPE), onehot, f, input_precision="ieee", out_dtype=ACC_DTYPE)
        else:
            for rep in range(0, N // C):
                cols = rep * C + offs_c
                dy = tl.load(dy_rows + cols[None, :] * stride_dyn, mask=m_ok[:, None] & c_ok[None, :], other=0.0)
                f += dy.to(ACC_DTYPE)
        acc = tl.dot(s_t.to(ACC_DTYPE), f, acc, input_precision=ADAPTER_PRECISION, out_dtype=ACC_DTYPE)
    out_ptrs = out_ptr + pid_s * stride_os + offs_r[:, None] * stride_or + offs_c[None, :] * stride_oc
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & c_ok[None, :])


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, NUMEL, SPLITS, BLOCK: tl.constexpr, INDEX_64: tl.constexpr):
    """out[i] = sum over s of part[s, i] in a fixed order (part contiguous (SPLITS, NUMEL)); cast to out's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < NUMEL
    if INDEX_64:
        offs = offs.to(tl.int64)
    acc = tl.load(part_ptr + offs, mask=ok, other=0.0)
    for s in range(1, SPLITS):
        acc += tl.load(part_ptr + s * NUMEL + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------------------
# Host functions
# ----------------------------------------------------------------------------------------------------------


class _Dtypes(NamedTuple):
    """Compute types of one launch.

    dot: GEMM operand type (x's dtype; fp32 for bf16 under the interpreter, whose bf16 dot is wrong; fp64 when
        the delta dtype is fp64). acc: accumulator and adapter-term type (the delta dtype).
    precision: ``input_precision`` of the x/W (dY/W) dot; matters for fp32 only: "tf32" or "ieee" as torch's
        ``allow_tf32`` says. adapter_precision: of the fp32 S/D/T dots: for fp32 inputs the same; for fp16/bf16
        inputs on the GPU "tf32" (see the module docstring). delta: torch dtype of S, T and the partial sums.
    """

    dot: Any
    acc: Any
    precision: str
    adapter_precision: str
    delta: torch.dtype


_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def _compute_dtypes(x_dtype: torch.dtype, block_dtype: torch.dtype, device: torch.device) -> _Dtypes:
    """How the kernels compute for inputs of ``x_dtype`` and a block of ``block_dtype`` on ``device``."""
    return _dtypes_for(
        x_dtype, block_dtype, fp32_dot_precision(device) == "tf32", device.type == "cuda", interpreting()
    )


def _dtypes_for(x_dtype: torch.dtype, block_dtype: torch.dtype, tf32: bool, gpu: bool, interpret: bool) -> _Dtypes:
    """:class:`_Dtypes` for the given inputs, whether torch allows TF32, whether the kernels run on a GPU, and
    whether they are interpreted."""
    delta = delta_dtype(x_dtype, block_dtype)
    acc = _TL_DTYPES[delta]
    if delta == torch.float64:
        return _Dtypes(tl.float64, acc, "ieee", "ieee", delta)
    dot = tl.float32 if (x_dtype == torch.bfloat16 and interpret) else _TL_DTYPES[x_dtype]
    precision = "tf32" if tf32 else "ieee"
    if x_dtype == torch.float32 or not gpu:
        return _Dtypes(dot, acc, precision, precision, delta)
    return _Dtypes(dot, acc, precision, "tf32", delta)


def adapter_chunk(block_k: int, x_itemsize: int) -> int:
    """ "two_pass" reads S/D (fp32) in chunks of this many columns: the x tile's bytes per row, so the r loop's
    pipeline buffers are no larger than the K loop's (they share shared memory)."""
    return min(block_k, max(16, block_k * x_itemsize // 4))


def _split_range(total: int, step: int, splits: int) -> tuple[int, int]:
    """Cut ``total`` items into at most ``splits`` chunks that are multiples of ``step``: (per_split, count)."""
    steps = triton.cdiv(total, step)
    splits = max(1, min(int(splits), steps))
    per = triton.cdiv(steps, splits) * step
    return per, triton.cdiv(total, per)


def _strides(t: torch.Tensor | None) -> tuple[int, ...]:
    return (0, 0) if t is None else tuple(t.stride())


def bone_forward(
    x: torch.Tensor, weight: torch.Tensor, block: torch.Tensor, bias: torch.Tensor | None, config: Config
) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x W^T + b + S D (M, N) in x's dtype and S (M, r) in the delta dtype.

    x (M, K) with any strides; weight (N, K); block (r, C), C | N; bias (N,) or None; ``config`` from
    :func:`configs.bone_forward_configs` (validated here: a strategy that cannot serve r raises ValueError).
    """
    m, k = x.shape
    n = weight.shape[0]
    r, c = block.shape
    cfg = configs.check_bone_forward_config(config, r)
    strategy = cfg["strategy"]
    dt = _compute_dtypes(x.dtype, block.dtype, x.device)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    s = torch.empty((m, r), dtype=dt.delta, device=x.device)
    index_64 = needs_int64(x, weight, block, y, s)

    if strategy == "two_pass":
        gs = configs.group_sum_launch(r, configs.dtype_family(x.dtype))
        with nvtx_range("bonekern.triton.bone_group_sum"):
            _group_sum_kernel[(triton.cdiv(m, gs["block_m"]), triton.cdiv(r, gs["block_r"]))](
                x, s, m, k, r, *x.stride(), *s.stride(),
                ONEHOT=gs["onehot"], BLOCK_M=gs["block_m"], BLOCK_R=gs["block_r"], BLOCK_K=gs["block_k"],
                DOT_DTYPE=dt.dot if gs["onehot"] else dt.acc, ACC_DTYPE=dt.acc, INDEX_64=index_64,
                num_warps=gs["num_warps"], num_stages=gs["num_stages"],
            )  # fmt: skip
    bm, bn = cfg["block_m"], cfg["block_n"]
    r_pow2 = r if strategy == "group" else 1
    adapter_k = adapter_chunk(cfg["block_k"], x.element_size())
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    with nvtx_range(f"bonekern.triton.bone_fwd[{strategy}]"):
        _bone_fwd_kernel[grid](
            x, weight, block, bias if bias is not None else y, y, s,
            m, n, k, r, c,
            *x.stride(), *weight.stride(), *block.stride(), *y.stride(), *s.stride(),
            STRATEGY=strategy, HAS_BIAS=bias is not None,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=cfg["block_k"], GROUP_M=cfg["group_m"],
            R_POW2=r_pow2, SUM_WIDTH=max(r_pow2, 16),
            DOT_DTYPE=dt.dot, ACC_DTYPE=dt.acc, PRECISION=dt.precision, ADAPTER_PRECISION=dt.adapter_precision,
            ADAPTER_K=adapter_k, INDEX_64=index_64, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )  # fmt: skip
    return y, s


def bone_backward(
    dy: torch.Tensor,
    s: torch.Tensor,
    weight: torch.Tensor,
    block: torch.Tensor,
    need_dx: bool,
    need_dblock: bool,
    config: Config,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dx (M, K) in dy's dtype and dblock (r, C) in the block's dtype; None where not asked for.

    dy (M, N) any strides (autograd may hand an expanded, stride-0 tensor); s (M, r) from :func:`bone_forward`;
    weight (N, K); block (r, C). ``config`` from :func:`configs.bone_backward_configs`.
    """
    m, n = dy.shape
    k = weight.shape[1]
    r, c = block.shape
    cfg = configs.check_bone_backward_config(config)
    dt = _compute_dtypes(dy.dtype, block.dtype, dy.device)
    dx = dblock = None
    if need_dx:
        tc, xc = cfg["t"], cfg["dx"]
        n_per_split, t_splits = _split_range(n, tc["block_n"], tc["split_n"])
        t = torch.empty((t_splits, m, r), dtype=dt.delta, device=dy.device)
        dx = torch.empty((m, k), dtype=dy.dtype, device=dy.device)
        index_64 = needs_int64(dy, weight, block, t, dx)
        with nvtx_range("bonekern.triton.bone_bwd_t"):
            _bone_bwd_t_kernel[(triton.cdiv(m, tc["block_m"]), triton.cdiv(r, tc["block_r"]), t_splits)](
                dy, block, t, m, n, r, c, n_per_split,
                *dy.stride(), *block.stride(), *t.stride(),
                BLOCK_M=tc["block_m"], BLOCK_N=tc["block_n"], BLOCK_R=tc["block_r"],
                ACC_DTYPE=dt.acc, ADAPTER_PRECISION=dt.adapter_precision, INDEX_64=index_64,
                num_warps=tc["num_warps"], num_stages=tc["num_stages"],
            )  # fmt: skip
        grid = (triton.cdiv(m, xc["block_m"]) * triton.cdiv(k, xc["block_k"]),)
        with nvtx_range("bonekern.triton.bone_bwd_dx"):
            _bone_bwd_dx_kernel[grid](
                dy, weight, t, dx, m, n, k, r, t_splits,
                *dy.stride(), *weight.stride(), *t.stride(), *dx.stride(),
                BLOCK_M=xc["block_m"], BLOCK_K=xc["block_k"], BLOCK_N=xc["block_n"], GROUP_M=xc["group_m"],
                DOT_DTYPE=dt.dot, ACC_DTYPE=dt.acc, PRECISION=dt.precision, INDEX_64=index_64,
                num_warps=xc["num_warps"], num_stages=xc["num_stages"],
            )  # fmt: skip
    if need_dblock:
        bc = cfg["dblock"]
        onehot = c < 16 and c < n
        block_c = 16 if onehot else bc["block_c"]
        m_per_split, m_splits = _split_range(m, bc["block_m"], bc["split_m"])
        dblock = torch.empty((r, c), dtype=block.dtype, device=block.device)
        part = dblock if m_splits == 1 else torch.empty((m_splits, r, c), dtype=dt.delta, device=dy.device)
        stride_part = (0, *part.stride()) if m_splits == 1 else part.stride()
        grid = (triton.cdiv(r, bc["block_r"]), triton.cdiv(c, block_c), m_splits)
        with nvtx_range("bonekern.triton.bone_bwd_dblock"):
            _bone_bwd_dblock_kernel[grid](
                s, dy, part, m, n, r, c, m_per_split,
                *s.stride(), *dy.stride(), *stride_part,
                ONEHOT=onehot, BLOCK_M=bc["block_m"], BLOCK_R=bc["block_r"], BLOCK_C=block_c,
                BLOCK_N=bc["block_n"], DOT_DTYPE=dt.dot if onehot else dt.acc, ACC_DTYPE=dt.acc,
                ADAPTER_PRECISION=dt.adapter_precision, INDEX_64=needs_int64(s, dy, part),
                num_warps=bc["num_warps"], num_stages=bc["num_stages"],
            )  # fmt: skip
        if m_splits > 1:
            numel = r * c
            with nvtx_range("bonekern.triton.bone_bwd_dblock_sum"):
                _sum_splits_kernel[(triton.cdiv(numel, 1024),)](
                    part, dblock, numel, m_splits, BLOCK=1024, INDEX_64=needs_int64(part), num_warps=4, num_stages=1
                )  # fmt: skip
    return dx, dblock


# ----------------------------------------------------------------------------------------------------------
# Ahead-of-time compile cases (resources.py): every kernel x shipped config x dtype
# ----------------------------------------------------------------------------------------------------------


def _aot_case(
    kernel: str,
    fn: Any,
    dtype: torch.dtype,
    pointers: dict[str, torch.dtype],
    unit_strides: tuple[str, ...],
    constexprs: dict[str, Any],
    config_name: str,
    archs: tuple[str, ...],
    num_warps: int,
    num_stages: int,
) -> AotCase:
    """One AotCase: pointer arguments typed by ``pointers``, ``unit_strides`` specialised to 1 (as Triton does for
    contiguous tensors), every other non-constexpr argument i32."""
    names = list(inspect.signature(fn.fn).parameters)
    missing = set(constexprs) - set(names)
    if missing:
        raise ValueError(f"{kernel}: constexprs {sorted(missing)} are not parameters of {fn.fn.__name__}")
    signature: dict[str, str] = {}
    values = dict(constexprs)
    for name in names:
        if name in pointers:
            signature[name] = "*" + TRITON_TYPE_NAMES[str(pointers[name])]
        elif name in unit_strides:
            signature[name] = "constexpr"
            values[name] = 1
        elif name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = "i32"
    return AotCase(
        kernel=kernel,
        fn=fn,
        signature=signature,
        constexprs=values,
        num_warps=num_warps,
        num_stages=num_stages,
        config_name=config_name,
        dtype=TRITON_TYPE_NAMES[str(dtype)],
        archs=archs,
    )


def _gemm_aot_cases(name: str, offered: tuple[str, ...], archs: tuple[str, ...], dtype: torch.dtype) -> list[AotCase]:
    """Forward (each offered strategy; "group" for r = block_k and r = 8) and dx cases of one GEMM tile set."""
    f32 = torch.float32
    tiles = configs.GEMM_TILES[name]
    dt = _dtypes_for(dtype, f32, tf32=False, gpu=True, interpret=False)
    launch = dict(archs=archs, num_warps=tiles["num_warps"], num_stages=tiles["num_stages"])
    fwd = dict(
        HAS_BIAS=True, BLOCK_M=tiles["block_m"], BLOCK_N=tiles["block_n"], BLOCK_K=tiles["block_k"], GROUP_M=8,
        DOT_DTYPE=dt.dot, ACC_DTYPE=dt.acc, PRECISION=dt.precision, ADAPTER_PRECISION=dt.adapter_precision,
        ADAPTER_K=adapter_chunk(tiles["block_k"], dtype.itemsize), INDEX_64=False,
    )  # fmt: skip
    variants = {
        "group": {f"group.{name}.r{tiles['block_k']}": tiles["block_k"], f"group.{name}.r8": 8},
        "chunk": {f"chunk.{name}": 1},
        "two_pass": {f"two_pass.{name}": 1},
    }
    cases = []
    for strategy in offered:
        for config_name, r_pow2 in variants[strategy].items():
            cases.append(
                _aot_case(
                    "bone_fwd", _bone_fwd_kernel, dtype,
                    dict(x_ptr=dtype, w_ptr=dtype, d_ptr=f32, bias_ptr=dtype, y_ptr=dtype, s_ptr=f32),
                    ("stride_xk", "stride_wk", "stride_dc", "stride_yn", "stride_sr"),
                    dict(fwd, STRATEGY=strategy, R_POW2=r_pow2, SUM_WIDTH=max(16, r_pow2)), config_name, **launch,
                )
            )  # fmt: skip
    dx = configs.dx_tiles(name)
    cases.append(
        _aot_case(
            "bone_bwd_dx", _bone_bwd_dx_kernel, dtype, dict(dy_ptr=dtype, w_ptr=dtype, t_ptr=f32, dx_ptr=dtype),
            ("stride_dyn", "stride_wk", "stride_tr", "stride_dxk"),
            dict(BLOCK_M=dx["block_m"], BLOCK_K=dx["block_k"], BLOCK_N=dx["block_n"], GROUP_M=8, DOT_DTYPE=dt.dot,
                 ACC_DTYPE=dt.acc, PRECISION=dt.precision, INDEX_64=False),
            name, archs=archs, num_warps=dx["num_warps"], num_stages=dx["num_stages"],
        )
    )  # fmt: skip
    return cases


def _small_aot_cases(family: str, dtype: torch.dtype) -> list[AotCase]:
    """Group-sum (one-hot and group loop), T (block_r 16 and 64) and dblock (block_r x block_c in {16, 64}; c16 is
    the one-hot fold) cases for one dtype; their launch does not depend on the architecture."""
    f32 = torch.float32
    dt = _dtypes_for(dtype, f32, tf32=False, gpu=True, interpret=False)
    archs = configs.SHIPPED_ARCHS
    small = configs.small_kernel_launch("sm90", family)
    cases = []
    for r in (8, 64):
        gs = configs.group_sum_launch(r, family)
        cases.append(
            _aot_case(
                "bone_group_sum", _group_sum_kernel, dtype, dict(x_ptr=dtype, s_ptr=f32), ("stride_xk", "stride_sr"),
                dict(ONEHOT=gs["onehot"], BLOCK_M=gs["block_m"], BLOCK_R=gs["block_r"], BLOCK_K=gs["block_k"],
                     DOT_DTYPE=dt.dot if gs["onehot"] else dt.acc, ACC_DTYPE=dt.acc, INDEX_64=False),
                "onehot" if gs["onehot"] else "groups", archs, gs["num_warps"], gs["num_stages"],
            )
        )  # fmt: skip
    t = configs.t_launch("sm90", family)
    for block_r in (16, 64):
        cases.append(
            _aot_case(
                "bone_bwd_t", _bone_bwd_t_kernel, dtype, dict(dy_ptr=dtype, d_ptr=f32, t_ptr=f32),
                ("stride_dyn", "stride_dc", "stride_tr"),
                dict(BLOCK_M=t["block_m"], BLOCK_N=t["block_n"], BLOCK_R=block_r, ACC_DTYPE=dt.acc,
                     ADAPTER_PRECISION=dt.adapter_precision, INDEX_64=False),
                f"r{block_r}", archs, t["num_warps"], t["num_stages"],
            )
        )  # fmt: skip
        for block_c in (16, 64):
            onehot = block_c == 16
            cases.append(
                _aot_case(
                    "bone_bwd_dblock", _bone_bwd_dblock_kernel, dtype, dict(s_ptr=f32, dy_ptr=dtype, out_ptr=f32),
                    ("stride_sr", "stride_dyn", "stride_oc"),
                    dict(ONEHOT=onehot, BLOCK_M=small["block_m"], BLOCK_R=block_r, BLOCK_C=block_c,
                         BLOCK_N=small["block_n"], DOT_DTYPE=dt.dot if onehot else dt.acc, ACC_DTYPE=dt.acc,
                         ADAPTER_PRECISION=dt.adapter_precision, INDEX_64=False),
                    f"r{block_r}.c{block_c}{'.onehot' if onehot else ''}", archs, small["num_warps"],
                    small["num_stages"],
                )
            )  # fmt: skip
    return cases


def aot_cases() -> list[AotCase]:
    """Every bone/mini kernel specialisation the shipped configs of :mod:`configs` launch on sm_80/sm_90.

    Modelled launch: block in fp32 (PEFT's default), torch's default ``allow_tf32 = False``, int32 offsets.
    bf16 and fp32 get every shipped tile set of their family; fp16 compiles to the same code as bf16 with the other
    MMA type, so it is compiled for each architecture's default tile set and the small kernels only.
    """
    cases: list[AotCase] = []
    for family, dtypes in (("half", (torch.bfloat16, torch.float16)), ("fp32", (torch.float32,))):
        shipped: dict[str, tuple[tuple[str, ...], list[str]]] = {}
        defaults = set()
        for arch in configs.SHIPPED_ARCHS:
            entries = configs.GEMM_TILES_BY_FAMILY[(arch, family)]
            defaults.add(entries[0][0])
            for name, offered in entries:
                shipped.setdefault(name, (offered, []))[1].append(arch)
        for dtype in dtypes:
            for name, (offered, archs) in shipped.items():
                if dtype == torch.float16 and name not in defaults:
                    continue
                cases.extend(_gemm_aot_cases(name, offered, tuple(archs), dtype))
            cases.extend(_small_aot_cases(family, dtype))
    for out in (torch.float32, torch.bfloat16):
        cases.append(
            _aot_case(
                "bone_bwd_dblock_sum", _sum_splits_kernel, out, dict(part_ptr=torch.float32, out_ptr=out), (),
                dict(BLOCK=1024, INDEX_64=False), "block1024", configs.SHIPPED_ARCHS, 4, 1,
            )
        )  # fmt: skip
    return cases
