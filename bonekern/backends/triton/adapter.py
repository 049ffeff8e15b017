"""Triton kernels for the bone/mini adapter term alone (no weight), forward and backward, and their host functions.

The base layer runs its own forward and backward (quantised, hooked, sharded); bonekern adds delta = S D, with
S = group_sum(dropout(x)) (M, r) and D[j, n] = block[j, n % C] (docs/math.md). Dropout is the counter-based mask
of :mod:`bonekern.dropout`, evaluated in the kernels (:mod:`.dropout`): nothing of M x K is written or kept.

Forward, two kernels (x is read once; S (M, r) is the only intermediate):

1. the group-sum kernel of bone.py (``bone._group_sum_kernel`` with ``DROPOUT``): each (BLOCK_M, BLOCK_K) x tile is
   zeroed where the mask drops it and summed into S (for r < 16 through the exact one-hot dot, else group by
   group); the host then scales S by 1 / (1 - p) in S's dtype (an (M, r) pass: r / K of the x read);
2. :func:`_adapter_delta_kernel`: delta[m-tile, n-tile] = S[m-tile, :] D[:, n-tile], BLOCK_R-wide steps over r,
   reading block[j, n % C] by index (mini's repeat is never formed), one rounding into x's dtype.

Backward (only what ``need_dx`` / ``need_dblock`` ask for is launched):

- dx: T = dY D^T (M, r) by bone backward's T kernel (split over N into ``split_n`` partials), scaled by 1 / (1 - p)
  on the host, then :func:`_adapter_dx_kernel` writes dx[m, k] = sum over the partials (fixed order) of
  T[m, k % r], times the regenerated keep(m, k): dx is written once, never read.
- dblock = S^T dY folded mod C: bone backward's dblock kernel (partials over M summed in a fixed order:
  deterministic, no atomics).

Precision as in bone.py (:func:`bone.kernel_dtypes`): S, T and the partials in the delta dtype (fp32, or fp64);
the fp32 S/D and T dots follow torch's ``allow_tf32`` for fp32 inputs and use TF32 on the GPU for fp16/bf16 inputs.

Host side: :func:`adapter_forward_launch` / :func:`adapter_backward_launch` build every :class:`~common.LaunchSpec`
of the op from its typed config; the host functions and :func:`aot_cases` use the same functions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ...dropout import DropoutSpec
from ...profiling import nvtx_range
from ...validation import delta_dtype
from ..base import OpProblem
from .bone import (
    AdapterGradLaunch,
    adapter_grad_launch,
    group_sum_launch,
    kernel_dtypes,
    run_dblock,
    run_group_sum,
    run_t,
)
from .common import AOT_ENV, AotCase, KernelEnv, LaunchSpec, aot_case, needs_int64
from .configs import AdapterBackwardConfig, AdapterForwardConfig, adapter_backward_candidates, cdiv
from .dropout import DROPOUT_SCALARS, dropout_scalars, keep
from .tiles import ADAPTER_DELTA, ADAPTER_DX, SHIPPED_ARCHS, bone_adapter_block, dtype_family

# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _adapter_delta_kernel(
    s_ptr,
    d_ptr,
    y_ptr,
    M,
    N,
    R,
    C,
    stride_sm,
    stride_sr,
    stride_dr,
    stride_dc,
    stride_ym,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    ADAPTER_PRECISION: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """delta[m-tile, n-tile] = sum over r-steps of S[m-tile, j] block[j, n % C], rounded once into y's dtype."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_j = tl.arange(0, BLOCK_R)  # [BLOCK_R]
    m_ok = offs_m < M
    n_ok = offs_n < N
    if INDEX_64:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    s_rows = s_ptr + offs_m[:, None] * stride_sm  # [BLOCK_M, 1]
    d_cols = d_ptr + (offs_n % C)[None, :] * stride_dc  # [1, BLOCK_N]: D[j, n] = block[j, n % C]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)  # [BLOCK_M, BLOCK_N]
    for j0 in range(0, R, BLOCK_R):
        cols = j0 + offs_j  # [BLOCK_R]
        j_ok = cols < R
        # s: [BLOCK_M, BLOCK_R], d: [BLOCK_R, BLOCK_N]
        s = tl.load(s_rows + cols[None, :] * stride_sr, mask=m_ok[:, None] & j_ok[None, :], other=0.0)
        d = tl.load(d_cols + cols[:, None] * stride_dr, mask=j_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(s.to(ACC_DTYPE), d.to(ACC_DTYPE), acc, input_precision=ADAPTER_PRECISION, out_dtype=ACC_DTYPE)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn  # [BLOCK_M, BLOCK_N]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=DROPOUT_SCALARS)
def _adapter_dx_kernel(
    t_ptr,
    dx_ptr,
    M,
    K,
    R,
    T_SPLITS,
    stride_ts,
    stride_tm,
    stride_tr,
    stride_dxm,
    stride_dxk,
    SEED,
    OFFSET_LO,
    OFFSET_HI,
    THRESHOLD,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """dx[m-tile, k-tile] = (sum over the T partials, in order, of T[split, m, k % r]) * keep(m, k) (DROPOUT), cast
    to dx's dtype; T arrives scaled by 1 / (1 - p)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # [BLOCK_K]
    mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]  # [BLOCK_M, BLOCK_K]
    if INDEX_64:
        offs_m = offs_m.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
    t_ptrs = t_ptr + offs_m[:, None] * stride_tm + (offs_k % R)[None, :] * stride_tr  # [BLOCK_M, BLOCK_K]
    acc = tl.load(t_ptrs, mask=mask, other=0.0)  # [BLOCK_M, BLOCK_K]
    for _ in range(1, T_SPLITS):
        t_ptrs += stride_ts  # 64-bit pointer steps: no int32 split * stride_ts product to overflow
        acc += tl.load(t_ptrs, mask=mask, other=0.0)
    if DROPOUT:
        acc = tl.where(keep(offs_m, offs_k, K, SEED, OFFSET_LO, OFFSET_HI, THRESHOLD), acc, 0.0)
    dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk  # [BLOCK_M, BLOCK_K]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Launch plans
# ----------------------------------------------------------------------------------------------------------


class AdapterForwardLaunch(NamedTuple):
    """The launches of the adapter forward: the group sum (with dropout or not), then delta = S D."""

    group_sum: LaunchSpec
    delta: LaunchSpec


def adapter_forward_launch(
    config: AdapterForwardConfig,
    x_dtype: torch.dtype,
    block_dtype: torch.dtype,
    env: KernelEnv,
    *,
    m: int,
    n: int,
    r: int,
    dropout: bool,
) -> AdapterForwardLaunch:
    """Every launch of the adapter forward for ``config``, x (M, K) of ``x_dtype``, a block (r, C) of
    ``block_dtype``, delta (M, N); ``dropout``: a spec will be given at the call."""
    dt = kernel_dtypes(x_dtype, block_dtype, env)
    tile = config.tile
    delta = LaunchSpec(
        kernel="adapter_delta",
        fn=_adapter_delta_kernel,
        grid=(cdiv(m, tile.block_m), cdiv(n, tile.block_n)),
        constexprs=dict(
            BLOCK_M=tile.block_m,
            BLOCK_N=tile.block_n,
            BLOCK_R=config.block_r,
            ACC_DTYPE=dt.acc,
            ADAPTER_PRECISION=dt.adapter_precision,
        ),
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
    )
    return AdapterForwardLaunch(group_sum_launch(x_dtype, block_dtype, env, m=m, r=r, dropout=dropout), delta)


class AdapterBackwardLaunch(NamedTuple):
    """The launches of the adapter backward: T and dblock (bone backward's, ``grads``), then the dx kernel."""

    grads: AdapterGradLaunch
    dx: LaunchSpec


def adapter_backward_launch(
    config: AdapterBackwardConfig,
    x_dtype: torch.dtype,
    block_dtype: torch.dtype,
    env: KernelEnv,
    *,
    m: int,
    n: int,
    k: int,
    r: int,
    c: int,
    dropout: bool,
) -> AdapterBackwardLaunch:
    """Every launch of the adapter backward for ``config``, dY (M, N) of ``x_dtype``, dx (M, K), a block (r, C) of
    ``block_dtype``; ``dropout``: a spec will be given at the call."""
    dt = kernel_dtypes(x_dtype, block_dtype, env)
    grads = adapter_grad_launch(config.t, config.dblock, dt, m=m, n=n, r=r, c=c)
    tile = config.dx
    dx = LaunchSpec(
        kernel="adapter_dx",
        fn=_adapter_dx_kernel,
        grid=(cdiv(m, tile.block_m), cdiv(k, tile.block_k)),
        constexprs=dict(DROPOUT=dropout, BLOCK_M=tile.block_m, BLOCK_K=tile.block_k),
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
        scalars=dict(T_SPLITS=grads.t_splits),
    )
    return AdapterBackwardLaunch(grads, dx)


# ----------------------------------------------------------------------------------------------------------
# Host functions (the backend's entry points)
# ----------------------------------------------------------------------------------------------------------


def adapter_forward(
    x: torch.Tensor,
    block: torch.Tensor,
    out_features: int,
    dropout: DropoutSpec | None,
    config: AdapterForwardConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """delta = S D (M, N) in x's dtype and S (M, r) in the delta dtype (scaled by 1 / (1 - p) under dropout).

    x (M, K) with any strides; block (r, C), C | out_features; ``config`` from :func:`configs.prepare`.
    """
    m = x.shape[0]
    r, c = block.shape
    n = out_features
    launch = adapter_forward_launch(
        config, x.dtype, block.dtype, KernelEnv.of(x.device), m=m, n=n, r=r, dropout=dropout is not None
    )
    s = torch.empty((m, r), dtype=delta_dtype(x.dtype, block.dtype), device=x.device)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    index_64 = needs_int64(x, block, s, y)
    with nvtx_range("bonekern.triton.adapter_group_sum"):
        run_group_sum(launch.group_sum, index_64, x, s, dropout)
    if dropout is not None:
        s.mul_(dropout.scale)
    with nvtx_range("bonekern.triton.adapter_delta"):
        launch.delta(
            index_64,
            s_ptr=s,
            d_ptr=block,
            y_ptr=y,
            M=m,
            N=n,
            R=r,
            C=c,
            stride_sm=s.stride(0),
            stride_sr=s.stride(1),
            stride_dr=block.stride(0),
            stride_dc=block.stride(1),
            stride_ym=y.stride(0),
            stride_yn=y.stride(1),
        )
    return y, s


def adapter_backward(
    dy: torch.Tensor,
    s: torch.Tensor,
    block: torch.Tensor,
    in_features: int,
    dropout: DropoutSpec | None,
    need_dx: bool,
    need_dblock: bool,
    config: AdapterBackwardConfig,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dx (M, K = in_features) in dy's dtype and dblock (r, C) in the block's dtype; None where not asked for.

    dy (M, N) any strides; s (M, r) from :func:`adapter_forward`; the same ``dropout`` spec as the forward.
    """
    m, n = dy.shape
    r, c = block.shape
    k = in_features
    launch = adapter_backward_launch(
        config, dy.dtype, block.dtype, KernelEnv.of(dy.device), m=m, n=n, k=k, r=r, c=c, dropout=dropout is not None
    )
    dx = dblock = None
    if need_dx:
        t = torch.empty((launch.grads.t_splits, m, r), dtype=delta_dtype(dy.dtype, block.dtype), device=dy.device)
        dx = torch.empty((m, k), dtype=dy.dtype, device=dy.device)
        index_64 = needs_int64(dy, block, t, dx)
        run_t(launch.grads, index_64, dy, block, t)
        if dropout is not None:
            t.mul_(dropout.scale)
        with nvtx_range("bonekern.triton.adapter_dx"):
            launch.dx(
                index_64,
                t_ptr=t,
                dx_ptr=dx,
                M=m,
                K=k,
                R=r,
                stride_ts=t.stride(0),
                stride_tm=t.stride(1),
                stride_tr=t.stride(2),
                stride_dxm=dx.stride(0),
                stride_dxk=dx.stride(1),
                **dropout_scalars(dropout),
            )
    if need_dblock:
        dblock = run_dblock(launch.grads, dy, s, block)
    return dx, dblock


# ----------------------------------------------------------------------------------------------------------
# Ahead-of-time compile cases (resources.py)
# ----------------------------------------------------------------------------------------------------------

_AOT_SIZE = 4096
"""M, N and K of the modelled launch (runtime arguments: they choose no code)."""
_CPU = torch.device("cpu")
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def backward_grads_launch(arch: str, dtype: torch.dtype, r: int, c: int) -> AdapterGradLaunch:
    """The T / dblock launches the shipped adapter backward config of ``arch`` makes for block size r and C: the
    same specialisations as bone backward's (``bone.aot_cases`` compiles them; a test holds the two equal)."""
    problem = OpProblem("adapter_backward", _AOT_SIZE, _AOT_SIZE, _AOT_SIZE, r, c, dtype, torch.float32, _CPU)
    config = adapter_backward_candidates(problem, arch)[0]
    return adapter_backward_launch(
        config, dtype, torch.float32, AOT_ENV, m=_AOT_SIZE, n=_AOT_SIZE, k=_AOT_SIZE, r=r, c=c, dropout=True
    ).grads


def aot_cases() -> list[AotCase]:
    """The adapter's own kernel specialisations on sm_80/sm_90: the group sum with dropout (one-hot r = 8 and the
    group loop r = 64), delta = S D on every shipped tile set with 16- and 64-wide r steps, dx with and without
    dropout. Modelled launch as in bone.py (fp32 block, ``allow_tf32 = False``, int32 offsets)."""
    f32 = torch.float32
    cases: list[AotCase] = []
    for dtype in _DTYPES:
        for r in (8, 64):
            gs = group_sum_launch(dtype, f32, AOT_ENV, m=_AOT_SIZE, r=r, dropout=True)
            name = ("onehot" if gs.constexprs["ONEHOT"] else "groups") + ".dropout"
            cases.append(aot_case(gs, dict(x_ptr=dtype, s_ptr=f32), name, dtype, SHIPPED_ARCHS))
        shipped: dict[str, list[str]] = {}
        for arch in SHIPPED_ARCHS:
            for tile in ADAPTER_DELTA[(arch, dtype_family(dtype))]:
                shipped.setdefault(tile.name, []).append(arch)
        for tile_name, archs in shipped.items():
            tile = next(t for t in ADAPTER_DELTA[(archs[0], dtype_family(dtype))] if t.name == tile_name)
            for r in (8, 64):
                config = AdapterForwardConfig(tile, bone_adapter_block(r), tile.name)
                delta = adapter_forward_launch(
                    config, dtype, f32, AOT_ENV, m=_AOT_SIZE, n=_AOT_SIZE, r=r, dropout=False
                ).delta
                name = f"{tile.name}.r{config.block_r}"
                cases.append(aot_case(delta, dict(s_ptr=f32, d_ptr=f32, y_ptr=dtype), name, dtype, tuple(archs)))
        dx_archs: dict[str, list[str]] = {}
        for arch in SHIPPED_ARCHS:
            dx_archs.setdefault(ADAPTER_DX[arch].name, []).append(arch)
        for tile_name, archs in dx_archs.items():
            problem = OpProblem("adapter_backward", _AOT_SIZE, _AOT_SIZE, _AOT_SIZE, 64, 64, dtype, f32, _CPU)
            config = adapter_backward_candidates(problem, archs[0])[0]
            for dropout in (False, True):
                dx = adapter_backward_launch(
                    config, dtype, f32, AOT_ENV, m=_AOT_SIZE, n=_AOT_SIZE, k=_AOT_SIZE, r=64, c=64, dropout=dropout
                ).dx
                name = tile_name + (".dropout" if dropout else "")
                cases.append(aot_case(dx, dict(t_ptr=f32, dx_ptr=dtype), name, dtype, tuple(archs)))
    return cases
