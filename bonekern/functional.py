"""The public functions: :func:`bone_linear`, :func:`adapter_output`, :func:`delta_weight`, :func:`merge`,
:func:`unmerge`."""

from __future__ import annotations

import torch
from torch import Tensor

from .backends import check_backend_name
from .blockmath import bat_unmerge, bat_weight, merge_chunk_blocks
from .dispatch import require_available
from .dropout import draw
from .ops import adapter_output_2d, bat_linear_2d, bone_linear_2d
from .validation import FLOAT_DTYPES, check_adapter_args, check_linear_args, check_weight_and_block, delta_dtype
from .variants import AdapterSpec


def _autocast(t, dtype: torch.dtype):
    if isinstance(t, Tensor) and t.dtype in FLOAT_DTYPES and t.dtype != dtype:
        return t.to(dtype)
    return t


def bone_linear(
    x: Tensor,
    weight: Tensor,
    block: Tensor,
    bias: Tensor | None = None,
    *,
    variant: str = "bone",
    mini_r: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """A linear layer with a Bone adapter: ``F.linear(x, weight + delta_weight(weight, block), bias)``, fused.

    Args:
        x: (..., K) input; any leading dims, any strides (flattened to (M, K) as a view when the leading dims
            allow it, else copied once).
        weight: (N, K), frozen or trainable, x's dtype.
        block: the trainable block: bone (r, N); mini (r, mini_r); bat (N // r, r, r). float32 (PEFT's
            default, even for half-precision models) or any floating dtype.
        bias: (N,) or None, x's dtype.
        variant: "bone" (default), "bat" or "mini".
        mini_r: for "mini" only; defaults to ``block.shape[1]``.
        backend: "auto" (best available, tuned when the autotuner is on), "torch", "triton", "cupy" or
            "reference".

    Returns:
        (..., N) in x's dtype. Differentiable with respect to x, block, bias, and weight when it requires grad.
        Under ``torch.autocast``, x, weight and bias are cast to the autocast dtype; the block is not.

    Semantics follow PEFT's MiSS layer: bone/mini zero-pad x to a multiple of r; adapter terms are computed in
    float32 (float64 if x or block is float64) and the result is cast to x's dtype once.
    """
    if (
        isinstance(x, Tensor)
        and torch.amp.is_autocast_available(x.device.type)
        and torch.is_autocast_enabled(x.device.type)
    ):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = _autocast(x, dtype), _autocast(weight, dtype), _autocast(bias, dtype)
    spec = check_linear_args(x, weight, block, bias, variant, mini_r)
    check_backend_name(backend)
    if backend != "auto" and x.device.type != "meta" and not torch.compiler.is_compiling():
        require_available(backend, x.device)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, spec.in_features)
    if spec.variant == "bat":
        y = bat_linear_2d(x2d, weight, block, bias, backend)
    else:
        y = bone_linear_2d(x2d, weight, block, bias, backend)
    return y.reshape(*lead, spec.out_features)


def adapter_output(
    x: Tensor,
    block: Tensor,
    *,
    variant: str,
    out_features: int,
    mini_r: int | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
) -> Tensor:
    """The bone/mini adapter term alone, to add to the output of any base layer: ``base(x) + adapter_output(x, ...)``
    equals PEFT's MiSS layer for a base layer that computes ``base(x)`` (quantised, hooked, sharded or custom).

    delta = S D with S[..., j] = sum_g xd[..., g*r + j] (x zero-padded to a multiple of r) and
    D[j, n] = block[j, n % C]; xd = dropout(x) with probability ``dropout_p`` while ``training``, else x.

    Args:
        x: (..., K) input; any leading dims and strides.
        block: bone (r, N) or mini (r, mini_r), any floating dtype.
        variant: "bone" or "mini" (bat's adapter term depends on the weight: use :func:`bone_linear`).
        out_features: N.
        mini_r: for "mini" only; defaults to ``block.shape[1]``.
        dropout_p: PEFT's ``miss_dropout``, in [0, 1). The mask is bonekern's counter-based one
            (:mod:`bonekern.dropout`), seeded from torch's CPU generator (``torch.manual_seed`` repeats it) and
            regenerated in backward: nothing of M x K is kept.
        training: apply dropout (like ``nn.Dropout.training``); no dropout when False.
        backend: as for :func:`bone_linear`.

    Returns:
        (..., N) in x's dtype (computed in the delta dtype, float32 or float64, rounded once). Differentiable with
        respect to x and block; autograd keeps S (..., r) only.
    """
    spec = check_adapter_args(x, block, variant, out_features, mini_r, dropout_p, training)
    check_backend_name(backend)
    if backend != "auto" and x.device.type != "meta" and not torch.compiler.is_compiling():
        require_available(backend, x.device)
    dropout = draw(float(dropout_p)) if training and dropout_p > 0 else None
    lead = x.shape[:-1]
    delta = adapter_output_2d(x.reshape(-1, spec.in_features), block, spec.out_features, dropout, backend)
    return delta.reshape(*lead, spec.out_features)


def _delta_in_compute_dtype(weight: Tensor, block: Tensor, spec: AdapterSpec) -> Tensor:
    dtype = delta_dtype(weight.dtype, block.dtype)
    if spec.variant == "bat":
        return bat_weight(weight, block, dtype, chunk_blocks=merge_chunk_blocks(spec.r)) - weight.to(dtype)
    d_full = block.to(dtype).repeat(1, spec.out_features // spec.block_cols)  # (r, N), tiny
    return d_full.t().repeat(1, spec.groups)[:, : spec.in_features]  # dW[n, k] = D[k % r, n]


@torch.no_grad()
def delta_weight(weight: Tensor, block: Tensor, *, variant: str = "bone", mini_r: int | None = None) -> Tensor:
    """dW (N, K) in the weight's dtype such that ``bone_linear(x, W, block, b) == F.linear(x, W + dW, b)``.

    bone/mini: dW[n, k] = D[k % r, n]; bat: dW_ij = W_ij B_i + B_i. Computed in float32 (float64 for
    float64 inputs) and rounded once. Not differentiable (for merging, not training).
    """
    spec = check_weight_and_block(weight, block, variant, mini_r)
    return _delta_in_compute_dtype(weight, block, spec).to(weight.dtype)


@torch.no_grad()
def merge(weight: Tensor, block: Tensor, *, variant: str = "bone", mini_r: int | None = None) -> Tensor:
    """A new tensor W + dW (N, K) in the weight's dtype: the weight with the adapter folded in."""
    spec = check_weight_and_block(weight, block, variant, mini_r)
    dtype = delta_dtype(weight.dtype, block.dtype)
    if spec.variant == "bat":
        return bat_weight(weight, block, dtype, chunk_blocks=merge_chunk_blocks(spec.r)).to(weight.dtype)
    return (weight.to(dtype) + _delta_in_compute_dtype(weight, block, spec)).to(weight.dtype)


@torch.no_grad()
def unmerge(merged_weight: Tensor, block: Tensor, *, variant: str = "bone", mini_r: int | None = None) -> Tensor:
    """A new tensor: the base weight recovered from ``merge(weight, block)``, in the merged weight's dtype.

    bone/mini subtract dW exactly. bat computes W_ij = (W'_ij - B_i)(I + B_i)^{-1} with the inverse in float32
    (float64 for float64 inputs); it raises ValueError when some I + B_i is singular.
    """
    spec = check_weight_and_block(merged_weight, block, variant, mini_r)
    dtype = delta_dtype(merged_weight.dtype, block.dtype)
    if spec.variant != "bat":
        return (merged_weight.to(dtype) - _delta_in_compute_dtype(merged_weight, block, spec)).to(merged_weight.dtype)
    return bat_unmerge(merged_weight, block, dtype, merge_chunk_blocks(spec.r))
