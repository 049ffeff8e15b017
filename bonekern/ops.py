"""The ``torch.ops.bonekern`` custom operators, their fake (meta) implementations and their autograd.

Four ops, all on 2-D x (M, K); the public functions in :mod:`bonekern.functional` flatten and validate:

- ``bone_forward(x, weight, block, bias, backend) -> (y, S)``: bone and mini (block (r, C), C | N). S (M, r) is
  returned so autograd can keep it; it is marked non-differentiable.
- ``bone_backward(dy, S, weight, block, need_dx, need_dblock, backend) -> (dx, dblock)``
- ``bat_forward(x, weight, block, bias, backend) -> y``
- ``bat_backward(dy, x, weight, block, need_dx, need_dblock, backend) -> (dx, dblock)``

Gradients that are not needed come back as empty tensors (custom ops cannot return None). ``backend`` is
resolved at run time by :mod:`bonekern.dispatch`, so ``torch.compile`` sees one opaque op per call, with no graph
break, and tuning never runs while tracing.

What autograd keeps between forward and backward (besides references to the weight, block and bias
parameters, which are alive anyway and cost no memory):

- bone/mini: S (M x r, the delta dtype). x is not kept: dx needs only dY, W, D; dD needs only S and dY.
  Exception: when the weight itself requires grad, x is kept too, for dW = dY^T x.
- bat: x (M x K). W' is never kept (backward rebuilds it from W and B), nor is any other N x K temporary.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import dispatch
from .backends import OpProblem
from .backends.pytorch import bat_weight_grad
from .profiling import nvtx_range
from .validation import delta_dtype

_EMPTY = (0,)


def _none_to_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(_EMPTY) if t is None else t


def _run(op: str, backend_name: str, m: int, weight: Tensor, block: Tensor, dtype: torch.dtype, *args):
    problem = OpProblem.from_tensors(op, m, weight, block, dtype)
    backend, config = dispatch.select(problem, backend_name, args)
    with nvtx_range(f"bonekern.{op}[{backend.name}]"):
        return getattr(backend, op)(*args, config)


# ------------------------------------------------------------------------------------------------------------
# bone / mini
# ------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("bonekern::bone_forward", mutates_args=())
def bone_forward(x: Tensor, weight: Tensor, block: Tensor, bias: Tensor | None, backend: str) -> tuple[Tensor, Tensor]:
    """y = x W^T + b + S D (M, N) in x's dtype, and S (M, r) in the delta dtype."""
    m = x.shape[0]
    if m == 0:
        n, r = weight.shape[0], block.shape[0]
        return x.new_empty(0, n), x.new_empty(0, r, dtype=delta_dtype(x.dtype, block.dtype))
    return _run("bone_forward", backend, m, weight, block, x.dtype, x, weight, block, bias)


@bone_forward.register_fake
def _(x, weight, block, bias, backend):
    m = x.shape[0]
    return (
        x.new_empty(m, weight.shape[0]),
        x.new_empty(m, block.shape[0], dtype=delta_dtype(x.dtype, block.dtype)),
    )


@torch.library.custom_op("bonekern::bone_backward", mutates_args=())
def bone_backward(
    dy: Tensor, s: Tensor, weight: Tensor, block: Tensor, need_dx: bool, need_dblock: bool, backend: str
) -> tuple[Tensor, Tensor]:
    """dx (M, K) in dy's dtype and dblock (r, C) in the block's dtype; empty tensors where not needed."""
    m = dy.shape[0]
    if m == 0:
        dx = dy.new_empty(0, weight.shape[1]) if need_dx else None
        dblock = torch.zeros_like(block) if need_dblock else None
    else:
        dx, dblock = _run(
            "bone_backward", backend, m, weight, block, dy.dtype, dy, s, weight, block, need_dx, need_dblock
        )
    return _none_to_empty(dx, dy), _none_to_empty(dblock, block)


@bone_backward.register_fake
def _(dy, s, weight, block, need_dx, need_dblock, backend):
    dx = dy.new_empty(dy.shape[0], weight.shape[1]) if need_dx else dy.new_empty(_EMPTY)
    dblock = torch.empty_like(block) if need_dblock else block.new_empty(_EMPTY)
    return dx, dblock


def _bone_setup_context(ctx, inputs, output) -> None:
    x, weight, block, bias, backend = inputs
    _, s = output
    ctx.mark_non_differentiable(s)
    ctx.backend = backend
    ctx.bias_dtype = None if bias is None else bias.dtype
    need_dweight = ctx.needs_input_grad[1]
    # Kept for backward: S (M x r). x only when the weight is trainable (dW = dY^T x).
    ctx.save_for_backward(s, weight, block, x if need_dweight else None)


def _bone_backward(ctx, dy: Tensor, _ds: Tensor | None):
    s, weight, block, x = ctx.saved_tensors
    need_dx, need_dweight, need_dblock, need_dbias = ctx.needs_input_grad[:4]
    dx = dblock = dweight = dbias = None
    if need_dx or need_dblock:
        dx_, dblock_ = torch.ops.bonekern.bone_backward(dy, s, weight, block, need_dx, need_dblock, ctx.backend)
        dx = dx_ if need_dx else None
        dblock = dblock_ if need_dblock else None
    if need_dweight:
        dweight = torch.mm(dy.t(), x)
    if need_dbias:
        dbias = dy.sum(0, dtype=delta_dtype(dy.dtype, torch.float32)).to(ctx.bias_dtype)
    return dx, dweight, dblock, dbias, None


torch.library.register_autograd("bonekern::bone_forward", _bone_backward, setup_context=_bone_setup_context)


# ------------------------------------------------------------------------------------------------------------
# bat
# ------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("bonekern::bat_forward", mutates_args=())
def bat_forward(x: Tensor, weight: Tensor, block: Tensor, bias: Tensor | None, backend: str) -> Tensor:
    """y = x W'^T + b (M, N) in x's dtype, W'_ij = W_ij (I + B_i) + B_i formed in the delta dtype."""
    m = x.shape[0]
    if m == 0:
        return x.new_empty(0, weight.shape[0])
    return _run("bat_forward", backend, m, weight, block, x.dtype, x, weight, block, bias)


@bat_forward.register_fake
def _(x, weight, block, bias, backend):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("bonekern::bat_backward", mutates_args=())
def bat_backward(
    dy: Tensor, x: Tensor, weight: Tensor, block: Tensor, need_dx: bool, need_dblock: bool, backend: str
) -> tuple[Tensor, Tensor]:
    """dx (M, K) in dy's dtype and dB (N // r, r, r) in the block's dtype; empty tensors where not needed."""
    m = dy.shape[0]
    if m == 0:
        dx = dy.new_empty(0, weight.shape[1]) if need_dx else None
        dblock = torch.zeros_like(block) if need_dblock else None
    else:
        dx, dblock = _run(
            "bat_backward", backend, m, weight, block, dy.dtype, dy, x, weight, block, need_dx, need_dblock
        )
    return _none_to_empty(dx, dy), _none_to_empty(dblock, block)


@bat_backward.register_fake
def _(dy, x, weight, block, need_dx, need_dblock, backend):
    dx = dy.new_empty(dy.shape[0], weight.shape[1]) if need_dx else dy.new_empty(_EMPTY)
    dblock = torch.empty_like(block) if need_dblock else block.new_empty(_EMPTY)
    return dx, dblock


def _bat_setup_context(ctx, inputs, output) -> None:
    x, weight, block, bias, backend = inputs
    ctx.backend = backend
    ctx.bias_dtype = None if bias is None else bias.dtype
    # Kept for backward: x (M x K) only. W' is rebuilt from W and B in backward, never kept.
    ctx.save_for_backward(x, weight, block)


def _bat_backward(ctx, dy: Tensor):
    x, weight, block = ctx.saved_tensors
    need_dx, need_dweight, need_dblock, need_dbias = ctx.needs_input_grad[:4]
    dx = dblock = dweight = dbias = None
    if need_dx or need_dblock:
        dx_, dblock_ = torch.ops.bonekern.bat_backward(dy, x, weight, block, need_dx, need_dblock, ctx.backend)
        dx = dx_ if need_dx else None
        dblock = dblock_ if need_dblock else None
    if need_dweight:
        dweight = bat_weight_grad(dy, x, block, weight.dtype)
    if need_dbias:
        dbias = dy.sum(0, dtype=delta_dtype(dy.dtype, torch.float32)).to(ctx.bias_dtype)
    return dx, dweight, dblock, dbias, None


torch.library.register_autograd("bonekern::bat_forward", _bat_backward, setup_context=_bat_setup_context)
