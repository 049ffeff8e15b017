"""Triton kernels for the bone family (variants bone and mini), forward and backward, and their host functions.

Notation (docs/math.md): x (M, K), W (N, K), block (r, C) with C | N acting as D[k, n] = block[k, n % C]
(C = N for bone, C = mini_r for mini; the kernels read ``block[k, n % C]`` by index and never form the repeated
matrix), G = ceil(K / r) groups, S (M, r) the group sums of x (zero padding when K % r != 0 comes from masked
loads: no padded copy of x exists).

Forward, y = x W^T + b + S D, one of three strategies (``BoneForwardConfig.strategy``; which r each serves is
written once, in :func:`configs.forward_strategy_serves`):

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

Host side: :func:`bone_forward_launch` and :func:`bone_backward_launch` turn a typed config (:mod:`configs`), the
dtypes and the sizes into the :class:`~common.LaunchSpec` of every kernel the op launches; :func:`bone_forward` /
:func:`bone_backward` allocate the outputs and call them, and :func:`aot_cases` compiles the same specs ahead of
time (``resources.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from ...profiling import nvtx_range
from ...validation import delta_dtype
from ..base import OpProblem
from .common import AOT_ENV, AotCase, KernelEnv, LaunchSpec, aot_case, needs_int64
from .configs import (
    BoneBackwardConfig,
    BoneDblockConfig,
    BoneForwardConfig,
    BoneTConfig,
    bone_backward_candidates,
    cdiv,
)
from .dropout import DROPOUT_SCALARS, dropout_scalars, keep
from .tiles import BONE_GEMM, BONE_SUM_SPLITS, SHIPPED_ARCHS, GemmTile, Tile, bone_group_sum_tiles, dtype_family

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
    acc,
    x_rows,
    w_cols,
    cols,
    k_ok,
    m_ok,
    n_ok,
    stride_xk,
    stride_wk,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One K step of the base GEMM: loads x[m-tile, cols] and W[n-tile, cols]^T (masked lanes read 0, which is also
    PEFT's zero padding of x) and returns (acc + x W^T, the x tile) so the caller can sum the tile into S.

    acc [BLOCK_M, BLOCK_N]; x_rows [BLOCK_M, 1] and w_cols [1, BLOCK_N] row / column pointers; cols, k_ok [BLOCK_K];
    m_ok [BLOCK_M]; n_ok [BLOCK_N]."""
    x = tl.load(x_rows + cols[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
    w = tl.load(w_cols + cols[:, None] * stride_wk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
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
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    m_ok = offs_m < M
    n_ok = offs_n < N
    if INDEX_64:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    x_rows = x_ptr + offs_m[:, None] * stride_xm  # [BLOCK_M, 1]
    w_cols = w_ptr + offs_n[None, :] * stride_wn  # [1, BLOCK_N]
    d_cols = d_ptr + (offs_n % C)[None, :] * stride_dc  # [1, BLOCK_N]: D[k, n] = block[k, n % C]
    s_rows = s_ptr + offs_m[:, None] * stride_sm  # [BLOCK_M, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)  # [BLOCK_M, BLOCK_N]

    if STRATEGY == "group":
        s_wide = tl.zeros((BLOCK_M, SUM_WIDTH), dtype=ACC_DTYPE)  # [BLOCK_M, SUM_WIDTH]; column j: offset j % r
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + offs_k  # [BLOCK_K]
            # x: [BLOCK_M, BLOCK_K]
            acc, x = _x_w_step(
                acc=acc,
                x_rows=x_rows,
                w_cols=w_cols,
                cols=cols,
                k_ok=cols < K,
                m_ok=m_ok,
                n_ok=n_ok,
                stride_xk=stride_xk,
                stride_wk=stride_wk,
                DOT_DTYPE=DOT_DTYPE,
                ACC_DTYPE=ACC_DTYPE,
                PRECISION=PRECISION,
            )
            # [BLOCK_M, BLOCK_K // SUM_WIDTH, SUM_WIDTH]
            x_groups = tl.reshape(x.to(ACC_DTYPE), (BLOCK_M, BLOCK_K // SUM_WIDTH, SUM_WIDTH))
            s_wide += tl.sum(x_groups, axis=1)
        offs_j = tl.arange(0, SUM_WIDTH)  # [SUM_WIDTH]
        # [SUM_WIDTH, BLOCK_N]
        d = tl.load(d_cols + (offs_j % R_POW2)[:, None] * stride_dr, mask=n_ok[None, :], other=0.0)
        acc = tl.dot(s_wide, d.to(ACC_DTYPE), acc, input_precision=ADAPTER_PRECISION, out_dtype=ACC_DTYPE)
        if pid_n == 0:
            s = tl.sum(tl.reshape(s_wide, (BLOCK_M, SUM_WIDTH // R_POW2, R_POW2)), axis=1)  # [BLOCK_M, R_POW2]
            offs_r = tl.arange(0, R_POW2)  # [R_POW2]
            tl.store(s_rows + offs_r[None, :] * stride_sr, s, mask=m_ok[:, None])
    elif STRATEGY == "chunk":
        for c0 in range(0, R, BLOCK_K):
            offs_c = c0 + offs_k  # [BLOCK_K]: columns c0 .. of a group
            c_ok = offs_c < R
            s = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DTYPE)  # [BLOCK_M, BLOCK_K]
            for g in range(0, tl.cdiv(K, R)):
                cols = g * R + offs_c  # [BLOCK_K]
                # x: [BLOCK_M, BLOCK_K]
                acc, x = _x_w_step(
                    acc=acc,
                    x_rows=x_rows,
                    w_cols=w_cols,
                    cols=cols,
                    k_ok=c_ok & (cols < K),
                    m_ok=m_ok,
                    n_ok=n_ok,
                    stride_xk=stride_xk,
                    stride_wk=stride_wk,
                    DOT_DTYPE=DOT_DTYPE,
                    ACC_DTYPE=ACC_DTYPE,
                    PRECISION=PRECISION,
                )
                s += x.to(ACC_DTYPE)
            # [BLOCK_K, BLOCK_N]
            d = tl.load(d_cols + offs_c[:, None] * stride_dr, mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(s, d.to(ACC_DTYPE), acc, input_precision=ADAPTER_PRECISION, out_dtype=ACC_DTYPE)
            if pid_n == 0:
                tl.store(s_rows + offs_c[None, :] * stride_sr, s, mask=m_ok[:, None] & c_ok[None, :])
    else:  # "two_pass": S was written by _group_sum_kernel
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + offs_k  # [BLOCK_K]
            acc, x = _x_w_step(
                acc=acc,
                x_rows=x_rows,
                w_cols=w_cols,
                cols=cols,
                k_ok=cols < K,
                m_ok=m_ok,
                n_ok=n_ok,
                stride_xk=stride_xk,
                stride_wk=stride_wk,
                DOT_DTYPE=DOT_DTYPE,
                ACC_DTYPE=ACC_DTYPE,
                PRECISION=PRECISION,
            )
        offs_rk = tl.arange(0, ADAPTER_K)  # [ADAPTER_K]
        for c0 in range(0, R, ADAPTER_K):
            offs_c = c0 + offs_rk  # [ADAPTER_K]
            c_ok = offs_c < R
            # s: [BLOCK_M, ADAPTER_K], d: [ADAPTER_K, BLOCK_N]
            s = tl.load(s_rows + offs_c[None, :] * stride_sr, mask=m_ok[:, None] & c_ok[None, :], other=0.0)
            d = tl.load(d_cols + offs_c[:, None] * stride_dr, mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(s.to(ACC_DTYPE), d.to(ACC_DTYPE), acc, input_precision=ADAPTER_PRECISION, out_dtype=ACC_DTYPE)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(ACC_DTYPE)[None, :]  # [1, BLOCK_N]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn  # [BLOCK_M, BLOCK_N]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=DROPOUT_SCALARS)
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
    SEED,
    OFFSET_LO,
    OFFSET_HI,
    THRESHOLD,
    DROPOUT: tl.constexpr,
    ONEHOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """S[m-tile, r-tile] = sum over g of x[:, g*r + j] (first pass of "two_pass", and the adapter's group sum).

    ONEHOT (r <= BLOCK_R, meant for r < 16): each (BLOCK_M, BLOCK_K) x tile is multiplied by the 0/1 matrix
    P[k, j] = (k % r == j), so any r reads x in wide contiguous tiles; "ieee" keeps the sums exact. Otherwise
    one r-tile of columns is summed over the G groups.

    DROPOUT (adapter only): each loaded x tile is zeroed where :func:`dropout.keep` drops the element (the mask of
    the spec SEED, OFFSET_LO, OFFSET_HI, THRESHOLD); the host multiplies S by 1 / (1 - p) afterwards.
    """
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    m_ok = offs_m < M
    r_ok = offs_r < R
    if INDEX_64:
        offs_m = offs_m.to(tl.int64)
    x_rows = x_ptr + offs_m[:, None] * stride_xm  # [BLOCK_M, 1]
    s = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)  # [BLOCK_M, BLOCK_R]
    if ONEHOT:
        offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + offs_k  # [BLOCK_K]
            # [BLOCK_M, BLOCK_K]
            x = tl.load(x_rows + cols[None, :] * stride_xk, mask=m_ok[:, None] & (cols < K)[None, :], other=0.0)
            if DROPOUT:
                x = tl.where(keep(offs_m, cols, K, SEED, OFFSET_LO, OFFSET_HI, THRESHOLD), x, 0.0)
            onehot = ((cols % R)[:, None] == offs_r[None, :]).to(DOT_DTYPE)  # [BLOCK_K, BLOCK_R]
            s = tl.dot(x.to(DOT_DTYPE), onehot, s, input_precision="ieee", out_dtype=ACC_DTYPE)
    else:
        for g in range(0, tl.cdiv(K, R)):
            cols = g * R + offs_r  # [BLOCK_R]
            # [BLOCK_M, BLOCK_R]
            x = tl.load(
                x_rows + cols[None, :] * stride_xk, mask=m_ok[:, None] & (r_ok & (cols < K))[None, :], other=0.0
            )
            if DROPOUT:
                x = tl.where(keep(offs_m, cols, K, SEED, OFFSET_LO, OFFSET_HI, THRESHOLD), x, 0.0)
            s += x.to(ACC_DTYPE)
    s_ptrs = s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr  # [BLOCK_M, BLOCK_R]
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
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    m_ok = offs_m < M
    r_ok = offs_r < R
    if INDEX_64:
        offs_m = offs_m.to(tl.int64)
        pid_s = pid_s.to(tl.int64)  # pid_s * stride_ts may pass 2^31 even when one split does not
    n_start = pid_s * N_PER_SPLIT
    n_end = tl.minimum(N, n_start + N_PER_SPLIT)
    dy_rows = dy_ptr + offs_m[:, None] * stride_dym  # [BLOCK_M, 1]
    d_rows = d_ptr + offs_r[None, :] * stride_dr  # [1, BLOCK_R]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)  # [BLOCK_M, BLOCK_R]
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        n_ok = offs_n < n_end
        if INDEX_64:
            offs_n = offs_n.to(tl.int64)
        # dy: [BLOCK_M, BLOCK_N], d: [BLOCK_N, BLOCK_R]
        dy = tl.load(dy_rows + offs_n[None, :] * stride_dyn, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        d = tl.load(d_rows + (offs_n % C)[:, None] * stride_dc, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(dy.to(ACC_DTYPE), d.to(ACC_DTYPE), acc, input_precision=ADAPTER_PRECISION, out_dtype=ACC_DTYPE)
    # [BLOCK_M, BLOCK_R]
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
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # [BLOCK_K]
    offs_n = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    m_ok = offs_m < M
    k_ok = offs_k < K
    if INDEX_64:
        offs_m = offs_m.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
    dy_rows = dy_ptr + offs_m[:, None] * stride_dym  # [BLOCK_M, 1]
    w_cols = w_ptr + offs_k[None, :] * stride_wk  # [1, BLOCK_K]
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DTYPE)  # [BLOCK_M, BLOCK_K]
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + offs_n  # [BLOCK_N]
        n_ok = rows < N
        if INDEX_64:
            rows = rows.to(tl.int64)
        # dy: [BLOCK_M, BLOCK_N], w: [BLOCK_N, BLOCK_K]
        dy = tl.load(dy_rows + rows[None, :] * stride_dyn, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        w = tl.load(w_cols + rows[:, None] * stride_wn, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(dy.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    t_ptrs = t_ptr + offs_m[:, None] * stride_tm + (offs_k % R)[None, :] * stride_tr  # [BLOCK_M, BLOCK_K]
    mask = m_ok[:, None] & k_ok[None, :]
    for _ in range(0, T_SPLITS):
        acc += tl.load(t_ptrs, mask=mask, other=0.0)
        t_ptrs += stride_ts  # 64-bit pointer steps: no int32 split * stride_ts product to overflow
    dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk  # [BLOCK_M, BLOCK_K]
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
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    r_ok = offs_r < R
    c_ok = offs_c < C
    m_start = pid_s * M_PER_SPLIT
    m_end = tl.minimum(M, m_start + M_PER_SPLIT)
    if INDEX_64:
        pid_s = pid_s.to(tl.int64)  # for pid_s * stride_os below
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC_DTYPE)  # [BLOCK_R, BLOCK_C]
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        m_ok = offs_m < m_end
        if INDEX_64:
            offs_m = offs_m.to(tl.int64)
        # S^T: [BLOCK_R, BLOCK_M]
        s_t = tl.load(
            s_ptr + offs_r[:, None] * stride_sr + offs_m[None, :] * stride_sm,
            mask=r_ok[:, None] & m_ok[None, :],
            other=0.0,
        )
        dy_rows = dy_ptr + offs_m[:, None] * stride_dym  # [BLOCK_M, 1]
        f = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC_DTYPE)  # [BLOCK_M, BLOCK_C]
        if ONEHOT:
            offs_n = tl.arange(0, BLOCK_N)  # [BLOCK_N]
            for n0 in range(0, N, BLOCK_N):
                cols = n0 + offs_n  # [BLOCK_N]
                # [BLOCK_M, BLOCK_N]
                dy = tl.load(dy_rows + cols[None, :] * stride_dyn, mask=m_ok[:, None] & (cols < N)[None, :], other=0.0)
                onehot = ((cols % C)[:, None] == offs_c[None, :]).to(DOT_DTYPE)  # [BLOCK_N, BLOCK_C]
                f = tl.dot(dy.to(DOT_DTYPE), onehot, f, input_precision="ieee", out_dtype=ACC_DTYPE)
        else:
            for rep in range(0, N // C):
                cols = rep * C + offs_c  # [BLOCK_C]
                # [BLOCK_M, BLOCK_C]
                dy = tl.load(dy_rows + cols[None, :] * stride_dyn, mask=m_ok[:, None] & c_ok[None, :], other=0.0)
                f += dy.to(ACC_DTYPE)
        acc = tl.dot(s_t.to(ACC_DTYPE), f, acc, input_precision=ADAPTER_PRECISION, out_dtype=ACC_DTYPE)
    # [BLOCK_R, BLOCK_C]
    out_ptrs = out_ptr + pid_s * stride_os + offs_r[:, None] * stride_or + offs_c[None, :] * stride_oc
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & c_ok[None, :])


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, NUMEL, SPLITS, BLOCK: tl.constexpr, INDEX_64: tl.constexpr):
    """out[i] = sum over s of part[s, i] in a fixed order (part contiguous (SPLITS, NUMEL)); cast to out's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    ok = offs < NUMEL
    if INDEX_64:
        offs = offs.to(tl.int64)
    acc = tl.load(part_ptr + offs, mask=ok, other=0.0)  # [BLOCK]
    for s in range(1, SPLITS):
        acc += tl.load(part_ptr + s * NUMEL + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------------------
# Launch plans: from a typed config, the dtypes and the sizes to every kernel launch of the op
# ----------------------------------------------------------------------------------------------------------


class KernelDtypes(NamedTuple):
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


def kernel_dtypes(x_dtype: torch.dtype, block_dtype: torch.dtype, env: KernelEnv) -> KernelDtypes:
    """How the kernels compute for inputs of ``x_dtype`` and a block of ``block_dtype`` in ``env``."""
    delta = delta_dtype(x_dtype, block_dtype)
    acc = _TL_DTYPES[delta]
    if delta == torch.float64:
        return KernelDtypes(tl.float64, acc, "ieee", "ieee", delta)
    dot = tl.float32 if (x_dtype == torch.bfloat16 and env.interpret) else _TL_DTYPES[x_dtype]
    precision = "tf32" if env.tf32 else "ieee"
    if x_dtype == torch.float32 or not env.gpu:
        return KernelDtypes(dot, acc, precision, precision, delta)
    return KernelDtypes(dot, acc, precision, "tf32", delta)


def adapter_chunk(block_k: int, x_itemsize: int) -> int:
    """ "two_pass" reads S/D (fp32) in chunks of this many columns: the x tile's bytes per row, so the r loop's
    pipeline buffers are no larger than the K loop's (they share shared memory)."""
    return min(block_k, max(16, block_k * x_itemsize // 4))


def _split_range(total: int, step: int, splits: int) -> tuple[int, int]:
    """Cut ``total`` items into at most ``splits`` chunks that are multiples of ``step``: (per_split, count)."""
    steps = cdiv(total, step)
    splits = max(1, min(int(splits), steps))
    per = cdiv(steps, splits) * step
    return per, cdiv(total, per)


def group_sum_launch(
    x_dtype: torch.dtype, block_dtype: torch.dtype, env: KernelEnv, *, m: int, r: int, dropout: bool
) -> LaunchSpec:
    """The group-sum kernel's launch for x (M, K) of ``x_dtype`` and block size ``r``: S (M, r) in the delta dtype,
    with x dropped by a dropout spec given at the call when ``dropout`` (the adapter op; bone's "two_pass" never)."""
    dt = kernel_dtypes(x_dtype, block_dtype, env)
    gs = bone_group_sum_tiles(r, dtype_family(x_dtype))
    return LaunchSpec(
        kernel="bone_group_sum",
        fn=_group_sum_kernel,
        grid=(cdiv(m, gs.block_m), cdiv(r, gs.block_r)),
        constexprs=dict(
            DROPOUT=dropout,
            ONEHOT=gs.onehot,
            BLOCK_M=gs.block_m,
            BLOCK_R=gs.block_r,
            BLOCK_K=gs.block_k,
            DOT_DTYPE=dt.dot if gs.onehot else dt.acc,
            ACC_DTYPE=dt.acc,
        ),
        num_warps=gs.num_warps,
        num_stages=gs.num_stages,
    )


def run_group_sum(launch: LaunchSpec, index_64: bool, x: torch.Tensor, s: torch.Tensor, dropout: Any = None) -> None:
    """Launch ``launch`` (:func:`group_sum_launch`) writing S = group sums of x into ``s`` (M, r); ``dropout``: the
    :class:`~bonekern.dropout.DropoutSpec` of a launch built with ``dropout=True`` (the sums are not yet scaled)."""
    m, k = x.shape
    launch(
        index_64,
        x_ptr=x,
        s_ptr=s,
        M=m,
        K=k,
        R=s.shape[1],
        stride_xm=x.stride(0),
        stride_xk=x.stride(1),
        stride_sm=s.stride(0),
        stride_sr=s.stride(1),
        **dropout_scalars(dropout),
    )


class BoneForwardLaunch(NamedTuple):
    """The launches of bone forward: the group-sum kernel (strategy "two_pass" only, else None), then the GEMM."""

    group_sum: LaunchSpec | None
    forward: LaunchSpec


def bone_forward_launch(
    config: BoneForwardConfig,
    x_dtype: torch.dtype,
    block_dtype: torch.dtype,
    env: KernelEnv,
    *,
    m: int,
    n: int,
    r: int,
    has_bias: bool,
) -> BoneForwardLaunch:
    """Every launch of bone forward for ``config`` (from :func:`configs.prepare`), x (M, K) of ``x_dtype``, a block
    (r, C) of ``block_dtype``, y (M, N), with or without a bias."""
    dt = kernel_dtypes(x_dtype, block_dtype, env)
    group_sum = None
    if config.strategy == "two_pass":
        group_sum = group_sum_launch(x_dtype, block_dtype, env, m=m, r=r, dropout=False)
    tile = config.tile
    r_pow2 = r if config.strategy == "group" else 1
    forward = LaunchSpec(
        kernel="bone_fwd",
        fn=_bone_fwd_kernel,
        grid=(cdiv(m, tile.block_m) * cdiv(n, tile.block_n),),
        constexprs=dict(
            STRATEGY=config.strategy,
            HAS_BIAS=has_bias,
            BLOCK_M=tile.block_m,
            BLOCK_N=tile.block_n,
            BLOCK_K=tile.block_k,
            GROUP_M=tile.group_m,
            R_POW2=r_pow2,
            SUM_WIDTH=max(r_pow2, 16),
            DOT_DTYPE=dt.dot,
            ACC_DTYPE=dt.acc,
            PRECISION=dt.precision,
            ADAPTER_PRECISION=dt.adapter_precision,
            ADAPTER_K=adapter_chunk(tile.block_k, x_dtype.itemsize),
        ),
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
    )
    return BoneForwardLaunch(group_sum, forward)


class AdapterGradLaunch(NamedTuple):
    """The launches bone backward and the adapter backward share: T = dY D^T in ``t_splits`` partials (for dx),
    dblock = S^T F in ``m_splits`` partials, then their fixed-order sum (``dblock_sum``; None for one split)."""

    t: LaunchSpec
    t_splits: int
    dblock: LaunchSpec
    m_splits: int
    dblock_sum: LaunchSpec | None


def adapter_grad_launch(
    tc: BoneTConfig, bc: BoneDblockConfig, dt: KernelDtypes, *, m: int, n: int, r: int, c: int
) -> AdapterGradLaunch:
    """The T and dblock launches for dY (M, N) and a block (r, C) computed as ``dt`` says."""
    n_per_split, t_splits = _split_range(n, tc.tile.block_n, tc.split_n)
    t = LaunchSpec(
        kernel="bone_bwd_t",
        fn=_bone_bwd_t_kernel,
        grid=(cdiv(m, tc.tile.block_m), cdiv(r, tc.block_r), t_splits),
        constexprs=dict(
            BLOCK_M=tc.tile.block_m,
            BLOCK_N=tc.tile.block_n,
            BLOCK_R=tc.block_r,
            ACC_DTYPE=dt.acc,
            ADAPTER_PRECISION=dt.adapter_precision,
        ),
        num_warps=tc.tile.num_warps,
        num_stages=tc.tile.num_stages,
        scalars=dict(N_PER_SPLIT=n_per_split),
    )
    onehot = c < 16 and c < n
    block_c = 16 if onehot else bc.block_c
    m_per_split, m_splits = _split_range(m, bc.tile.block_m, bc.split_m)
    dblock = LaunchSpec(
        kernel="bone_bwd_dblock",
        fn=_bone_bwd_dblock_kernel,
        grid=(cdiv(r, bc.block_r), cdiv(c, block_c), m_splits),
        constexprs=dict(
            ONEHOT=onehot,
            BLOCK_M=bc.tile.block_m,
            BLOCK_R=bc.block_r,
            BLOCK_C=block_c,
            BLOCK_N=bc.tile.block_n,
            DOT_DTYPE=dt.dot if onehot else dt.acc,
            ACC_DTYPE=dt.acc,
            ADAPTER_PRECISION=dt.adapter_precision,
        ),
        num_warps=bc.tile.num_warps,
        num_stages=bc.tile.num_stages,
        scalars=dict(M_PER_SPLIT=m_per_split),
    )
    dblock_sum = None
    if m_splits > 1:
        dblock_sum = LaunchSpec(
            kernel="bone_bwd_dblock_sum",
            fn=_sum_splits_kernel,
            grid=(cdiv(r * c, BONE_SUM_SPLITS.block_n),),
            constexprs=dict(BLOCK=BONE_SUM_SPLITS.block_n),
            num_warps=BONE_SUM_SPLITS.num_warps,
            num_stages=BONE_SUM_SPLITS.num_stages,
            scalars=dict(NUMEL=r * c, SPLITS=m_splits),
        )
    return AdapterGradLaunch(t, t_splits, dblock, m_splits, dblock_sum)


class BoneBackwardLaunch(NamedTuple):
    """The launches of bone backward: the shared T / dblock launches (``grads``) and the dx GEMM, which adds
    dY W and T[:, k % r]."""

    grads: AdapterGradLaunch
    dx: LaunchSpec


def bone_backward_launch(
    config: BoneBackwardConfig,
    x_dtype: torch.dtype,
    block_dtype: torch.dtype,
    env: KernelEnv,
    *,
    m: int,
    n: int,
    k: int,
    r: int,
    c: int,
) -> BoneBackwardLaunch:
    """Every launch of bone backward for ``config``, dY (M, N) of ``x_dtype``, W (N, K), a block (r, C) of
    ``block_dtype``."""
    dt = kernel_dtypes(x_dtype, block_dtype, env)
    grads = adapter_grad_launch(config.t, config.dblock, dt, m=m, n=n, r=r, c=c)
    xc = config.dx
    dx = LaunchSpec(
        kernel="bone_bwd_dx",
        fn=_bone_bwd_dx_kernel,
        grid=(cdiv(m, xc.block_m) * cdiv(k, xc.block_k),),
        constexprs=dict(
            BLOCK_M=xc.block_m,
            BLOCK_K=xc.block_k,
            BLOCK_N=xc.block_n,
            GROUP_M=xc.group_m,
            DOT_DTYPE=dt.dot,
            ACC_DTYPE=dt.acc,
            PRECISION=dt.precision,
        ),
        num_warps=xc.num_warps,
        num_stages=xc.num_stages,
        scalars=dict(T_SPLITS=grads.t_splits),
    )
    return BoneBackwardLaunch(grads, dx)


def run_t(launch: AdapterGradLaunch, index_64: bool, dy: torch.Tensor, block: torch.Tensor, t: torch.Tensor) -> None:
    """Write the T partials (t_splits, M, r) = dY D^T into ``t``."""
    m, n = dy.shape
    r, c = block.shape
    with nvtx_range("bonekern.triton.bone_bwd_t"):
        launch.t(
            index_64,
            dy_ptr=dy,
            d_ptr=block,
            t_ptr=t,
            M=m,
            N=n,
            R=r,
            C=c,
            stride_dym=dy.stride(0),
            stride_dyn=dy.stride(1),
            stride_dr=block.stride(0),
            stride_dc=block.stride(1),
            stride_ts=t.stride(0),
            stride_tm=t.stride(1),
            stride_tr=t.stride(2),
        )


def run_dblock(launch: AdapterGradLaunch, dy: torch.Tensor, s: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """dblock = S^T dY folded over mini's repeats: (r, C) in the block's dtype (partials summed in a fixed order)."""
    m, n = dy.shape
    r, c = block.shape
    dblock = torch.empty((r, c), dtype=block.dtype, device=block.device)
    one = launch.m_splits == 1
    part = dblock if one else torch.empty((launch.m_splits, r, c), dtype=s.dtype, device=dy.device)
    stride_os, stride_or, stride_oc = (0, *part.stride()) if one else part.stride()
    with nvtx_range("bonekern.triton.bone_bwd_dblock"):
        launch.dblock(
            needs_int64(s, dy, part),
            s_ptr=s,
            dy_ptr=dy,
            out_ptr=part,
            M=m,
            N=n,
            R=r,
            C=c,
            stride_sm=s.stride(0),
            stride_sr=s.stride(1),
            stride_dym=dy.stride(0),
            stride_dyn=dy.stride(1),
            stride_os=stride_os,
            stride_or=stride_or,
            stride_oc=stride_oc,
        )
    if launch.dblock_sum is not None:
        with nvtx_range("bonekern.triton.bone_bwd_dblock_sum"):
            launch.dblock_sum(needs_int64(part), part_ptr=part, out_ptr=dblock)
    return dblock


# ----------------------------------------------------------------------------------------------------------
# Host functions (the backend's entry points)
# ----------------------------------------------------------------------------------------------------------


def bone_forward(
    x: torch.Tensor, weight: torch.Tensor, block: torch.Tensor, bias: torch.Tensor | None, config: BoneForwardConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x W^T + b + S D (M, N) in x's dtype and S (M, r) in the delta dtype.

    x (M, K) with any strides; weight (N, K); block (r, C), C | N; bias (N,) or None; ``config`` from
    :func:`configs.prepare` (which checked that its strategy serves r).
    """
    m, k = x.shape
    n = weight.shape[0]
    r, c = block.shape
    launch = bone_forward_launch(
        config, x.dtype, block.dtype, KernelEnv.of(x.device), m=m, n=n, r=r, has_bias=bias is not None
    )
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    s = torch.empty((m, r), dtype=delta_dtype(x.dtype, block.dtype), device=x.device)
    index_64 = needs_int64(x, weight, block, y, s)
    if launch.group_sum is not None:
        with nvtx_range("bonekern.triton.bone_group_sum"):
            run_group_sum(launch.group_sum, index_64, x, s)
    with nvtx_range(f"bonekern.triton.bone_fwd[{config.strategy}]"):
        launch.forward(
            index_64,
            x_ptr=x,
            w_ptr=weight,
            d_ptr=block,
            bias_ptr=bias if bias is not None else y,  # not read without a bias
            y_ptr=y,
            s_ptr=s,
            M=m,
            N=n,
            K=k,
            R=r,
            C=c,
            stride_xm=x.stride(0),
            stride_xk=x.stride(1),
            stride_wn=weight.stride(0),
            stride_wk=weight.stride(1),
            stride_dr=block.stride(0),
            stride_dc=block.stride(1),
            stride_ym=y.stride(0),
            stride_yn=y.stride(1),
            stride_sm=s.stride(0),
            stride_sr=s.stride(1),
        )
    return y, s


def bone_backward(
    dy: torch.Tensor,
    s: torch.Tensor,
    weight: torch.Tensor,
    block: torch.Tensor,
    need_dx: bool,
    need_dblock: bool,
    config: BoneBackwardConfig,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dx (M, K) in dy's dtype and dblock (r, C) in the block's dtype; None where not asked for.

    dy (M, N) any strides (autograd may hand an expanded, stride-0 tensor); s (M, r) from :func:`bone_forward`;
    weight (N, K); block (r, C). ``config`` from :func:`configs.prepare`.
    """
    m, n = dy.shape
    k = weight.shape[1]
    r, c = block.shape
    launch = bone_backward_launch(config, dy.dtype, block.dtype, KernelEnv.of(dy.device), m=m, n=n, k=k, r=r, c=c)
    delta = delta_dtype(dy.dtype, block.dtype)
    dx = dblock = None
    if need_dx:
        t = torch.empty((launch.grads.t_splits, m, r), dtype=delta, device=dy.device)
        dx = torch.empty((m, k), dtype=dy.dtype, device=dy.device)
        index_64 = needs_int64(dy, weight, block, t, dx)
        run_t(launch.grads, index_64, dy, block, t)
        with nvtx_range("bonekern.triton.bone_bwd_dx"):
            launch.dx(
                index_64,
                dy_ptr=dy,
                w_ptr=weight,
                t_ptr=t,
                dx_ptr=dx,
                M=m,
                N=n,
                K=k,
                R=r,
                stride_dym=dy.stride(0),
                stride_dyn=dy.stride(1),
                stride_wn=weight.stride(0),
                stride_wk=weight.stride(1),
                stride_ts=t.stride(0),
                stride_tm=t.stride(1),
                stride_tr=t.stride(2),
                stride_dxm=dx.stride(0),
                stride_dxk=dx.stride(1),
            )
    if need_dblock:
        dblock = run_dblock(launch.grads, dy, s, block)
    return dx, dblock


# ----------------------------------------------------------------------------------------------------------
# Ahead-of-time compile cases (resources.py): every kernel x shipped config x dtype
# ----------------------------------------------------------------------------------------------------------

_AOT_SIZE = 4096
"""M, N and K of the modelled launch (they choose no code: the sizes are runtime arguments)."""
_CPU = torch.device("cpu")


def _aot_pointers(kernel: str, x: torch.dtype, delta: torch.dtype, out: torch.dtype | None = None) -> dict:
    """Pointer argument -> dtype of ``kernel`` for x (and dY, W, y, dx) in ``x``, a block, S, T and the partial sums
    in ``delta`` (fp32: the modelled block is fp32), dblock in ``out``."""
    return {
        "bone_fwd": dict(x_ptr=x, w_ptr=x, d_ptr=delta, bias_ptr=x, y_ptr=x, s_ptr=delta),
        "bone_group_sum": dict(x_ptr=x, s_ptr=delta),
        "bone_bwd_t": dict(dy_ptr=x, d_ptr=delta, t_ptr=delta),
        "bone_bwd_dx": dict(dy_ptr=x, w_ptr=x, t_ptr=delta, dx_ptr=x),
        "bone_bwd_dblock": dict(s_ptr=delta, dy_ptr=x, out_ptr=delta),
        "bone_bwd_dblock_sum": dict(part_ptr=delta, out_ptr=out),
    }[kernel]


def _forward_cases(tile: Tile, offered: tuple[str, ...], archs: tuple[str, ...], dtype: torch.dtype) -> list[AotCase]:
    """Forward cases of one GEMM tile set: each offered strategy; "group" for r = block_k and r = 8 (R_POW2 is its
    only r-dependent constexpr), "chunk" and "two_pass" once (their code does not depend on r)."""
    f32 = torch.float32
    samples = {"group": (tile.block_k, 8), "chunk": (64,), "two_pass": (64,)}
    cases = []
    for strategy in offered:
        for r in samples[strategy]:
            config = BoneForwardConfig(strategy, GemmTile.of(tile), tile.name)
            launch = bone_forward_launch(
                config, dtype, f32, AOT_ENV, m=_AOT_SIZE, n=_AOT_SIZE, r=r, has_bias=True
            ).forward
            name = f"group.{tile.name}.r{r}" if strategy == "group" else f"{strategy}.{tile.name}"
            cases.append(aot_case(launch, _aot_pointers("bone_fwd", dtype, f32), name, dtype, archs))
    return cases


def _backward_launch(arch: str, dtype: torch.dtype, r: int, c: int, tile_name: str | None = None) -> BoneBackwardLaunch:
    """Bone backward's launches for the shipped config of ``arch`` (the one on tile set ``tile_name``, else the
    default) for block size r and C, two M splits (so the partial-sum kernel is part of it)."""
    problem = OpProblem("bone_backward", _AOT_SIZE, _AOT_SIZE, _AOT_SIZE, r, c, dtype, torch.float32, _CPU)
    configs = [cfg for cfg in bone_backward_candidates(problem, arch) if tile_name in (None, cfg.label)]
    config = dataclasses.replace(configs[0], dblock=dataclasses.replace(configs[0].dblock, split_m=2))
    return bone_backward_launch(config, dtype, torch.float32, AOT_ENV, m=_AOT_SIZE, n=_AOT_SIZE, k=_AOT_SIZE, r=r, c=c)


def _small_cases(dtype: torch.dtype) -> list[AotCase]:
    """Group-sum (one-hot and group loop: r = 8, 64), T (block_r 16 and 64) and dblock (block_r x block_c in
    {16, 64}; c16 is the one-hot fold) cases for one dtype; their launch is the same on every shipped
    architecture."""
    f32 = torch.float32
    cases = []
    default = BONE_GEMM[(SHIPPED_ARCHS[-1], dtype_family(dtype))][0][0]
    for r in (8, 64):
        config = BoneForwardConfig("two_pass", GemmTile.of(default), default.name)
        gs = bone_forward_launch(config, dtype, f32, AOT_ENV, m=_AOT_SIZE, n=_AOT_SIZE, r=r, has_bias=True).group_sum
        name = "onehot" if gs.constexprs["ONEHOT"] else "groups"
        cases.append(aot_case(gs, _aot_pointers("bone_group_sum", dtype, f32), name, dtype, SHIPPED_ARCHS))
    for r in (8, 64):  # block_r 16, 64
        launches = {c: _backward_launch(SHIPPED_ARCHS[-1], dtype, r, c) for c in (8, 64)}  # block_c 16 (one-hot), 64
        t = launches[64].grads.t
        block_r = t.constexprs["BLOCK_R"]
        cases.append(aot_case(t, _aot_pointers("bone_bwd_t", dtype, f32), f"r{block_r}", dtype, SHIPPED_ARCHS))
        for launch in launches.values():
            db = launch.grads.dblock
            onehot = ".onehot" if db.constexprs["ONEHOT"] else ""
            name = f"r{block_r}.c{db.constexprs['BLOCK_C']}{onehot}"
            cases.append(aot_case(db, _aot_pointers("bone_bwd_dblock", dtype, f32), name, dtype, SHIPPED_ARCHS))
    return cases


def aot_cases() -> list[AotCase]:
    """Every bone/mini kernel specialisation the shipped configs launch on sm_80/sm_90, each built by
    :func:`bone_forward_launch` / :func:`bone_backward_launch` as the launchers build it.

    Modelled launch (:data:`common.AOT_ENV`): block in fp32 (PEFT's default), torch's default
    ``allow_tf32 = False``, int32 offsets. bf16 and fp32 get every shipped tile set of their family; fp16 compiles
    to the same code as bf16 with the other MMA type, so it is compiled for each architecture's default tile set
    and the small kernels only.
    """
    cases: list[AotCase] = []
    f32 = torch.float32
    for family, dtypes in (("half", (torch.bfloat16, torch.float16)), ("fp32", (torch.float32,))):
        shipped: dict[str, tuple[Tile, tuple[str, ...], list[str]]] = {}
        defaults = set()
        for arch in SHIPPED_ARCHS:
            entries = BONE_GEMM[(arch, family)]
            defaults.add(entries[0][0].name)
            for tile, offered in entries:
                shipped.setdefault(tile.name, (tile, offered, []))[2].append(arch)
        for dtype in dtypes:
            for name, (tile, offered, archs) in shipped.items():
                if dtype == torch.float16 and name not in defaults:
                    continue
                cases += _forward_cases(tile, offered, tuple(archs), dtype)
                dx = _backward_launch(archs[0], dtype, 64, 64, tile_name=name).dx
                cases.append(aot_case(dx, _aot_pointers("bone_bwd_dx", dtype, f32), name, dtype, tuple(archs)))
            cases += _small_cases(dtype)
    for out in (torch.float32, torch.bfloat16):
        total = _backward_launch(SHIPPED_ARCHS[-1], out, 64, 64).grads.dblock_sum
        name = f"block{total.constexprs['BLOCK']}"
        cases.append(aot_case(total, _aot_pointers("bone_bwd_dblock_sum", out, f32, out), name, out, SHIPPED_ARCHS))
    return cases
