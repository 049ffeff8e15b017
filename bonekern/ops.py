"""The ``torch.ops.bonekern`` custom operators, their fake (meta) implementations, their autograd, and the
eager fast path that computes exactly the same thing with less Python overhead.

Four ops, all on 2-D x (M, K); the public functions in :mod:`bonekern.functional` flatten and validate:

- ``bone_forward(x, weight, block, bias, backend) -> (y, S)``: bone and mini (block (r, C), C | N). S (M, r) is
  returned so autograd can keep it; it is marked non-differentiable.
- ``bone_backward(dy, S, weight, block, need_dx, need_dblock, backend) -> (dx, dblock)``
- ``bat_forward(x, weight, block, bias, backend) -> y``
- ``bat_backward(dy, x, weight, block, need_dx, need_dblock, backend) -> (dx, dblock)``
- ``adapter_forward(x, block, out_features, p, seed, offset, backend) -> (delta, S)``: the bone/mini adapter term
  S D alone (no weight), for base layers that run their own forward; dropout on x when ``p > 0`` (the
  :class:`~bonekern.dropout.DropoutSpec` travels as its three numbers, ``p = 0`` meaning none).
- ``adapter_backward(dy, S, block, in_features, p, seed, offset, need_dx, need_dblock, backend) -> (dx, dblock)``

Gradients that are not needed come back as empty tensors (custom ops cannot return None). ``backend`` is
resolved at run time by :mod:`bonekern.dispatch`, so ``torch.compile`` sees one opaque op per call, with no graph
break, and tuning never runs while tracing.

Two entry paths, one implementation. :func:`bone_linear_2d` and :func:`bat_linear_2d` call the custom ops
whenever anything may be tracing: under ``torch.compile``/export, and for fake, meta or other tensor subclasses.
A plain eager call with ordinary tensors instead goes through :class:`BoneFunction` / :class:`BatFunction`,
``torch.autograd.Function`` s that run the very same ``*_impl`` functions, save the same tensors and apply the
same gradient code below: the custom-op dispatch and ``register_autograd`` machinery cost about 55 us per
forward+backward on one CPU core (bone, x 16 x 64, W 64 x 64, r 16: 160 us vs 105 us, medians of interleaved
runs of ``python -m bench.overhead``), which a training step pays once per adapted layer. Tests check that both
paths give bitwise-identical outputs and gradients.

What autograd keeps between forward and backward (besides references to the weight, block and bias
parameters, which are alive anyway and cost no memory):

- bone/mini: S (M x r, the delta dtype). x is not kept: dx needs only dY, W, D; dD needs only S and dY.
  Exception: when the weight itself requires grad, x is kept too, for dW = dY^T x.
- bat: x (M x K). W' is never kept (backward rebuilds it from W and B), nor is any other N x K temporary.
- adapter term: S (M x r) and the dropout spec's three numbers; the mask is regenerated in backward, so nothing
  of M x K is kept (PEFT keeps the mask and the dropped x).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import dispatch
from .backends import OpProblem
from .blockmath import bat_weight_grad
from .dropout import DropoutSpec
from .profiling import nvtx_range
from .validation import delta_dtype

EAGER_FAST_PATH = True
"""Run plain eager calls through the autograd Functions (see the module docstring). Set False to send every
call through the custom ops (for debugging; the results are identical)."""

_EMPTY = (0,)
GradFn = Callable[..., tuple[Tensor | None, Tensor | None]]


def _use_eager_path(x: Tensor) -> bool:
    return EAGER_FAST_PATH and type(x) is Tensor and x.device.type != "meta" and not torch.compiler.is_compiling()


def _none_to_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(_EMPTY) if t is None else t


def _backward_fake(dy: Tensor, weight: Tensor, block: Tensor, need_dx: bool, need_dblock: bool):
    """Shapes of a backward op's (dx, dblock): (M, K) and block's shape, or empty where not needed."""
    dx = dy.new_empty(dy.shape[0], weight.shape[1]) if need_dx else dy.new_empty(_EMPTY)
    dblock = torch.empty_like(block) if need_dblock else block.new_empty(_EMPTY)
    return dx, dblock


def _grads_or_none(backward_op) -> GradFn:
    """Wrap a backward custom op (which returns empty tensors for grads not asked for) to return None instead."""

    def call(dy, saved, weight, block, need_dx, need_dblock, backend):
        dx, dblock = backward_op(dy, saved, weight, block, need_dx, need_dblock, backend)
        return (dx if need_dx else None), (dblock if need_dblock else None)

    return call


def _run(op: str, backend_name: str, m: int, weight: Tensor, block: Tensor, dtype: torch.dtype, *args):
    problem = OpProblem.from_tensors(op, m, weight, block, dtype)
    backend, config = dispatch.select(problem, backend_name, args)
    with nvtx_range(f"bonekern.{op}[{backend.name}]"):
        return getattr(backend, op)(*args, config)


def _bias_grad(dy: Tensor, bias_dtype: torch.dtype) -> Tensor:
    return dy.sum(0, dtype=delta_dtype(dy.dtype, torch.float32)).to(bias_dtype)


# ------------------------------------------------------------------------------------------------------------
# The implementations: what both paths run.
# ------------------------------------------------------------------------------------------------------------


def bone_forward_impl(x: Tensor, weight: Tensor, block: Tensor, bias: Tensor | None, backend: str):
    """y (M, N) in x's dtype and S (M, r) in the delta dtype, from the dispatched backend."""
    m = x.shape[0]
    if m == 0:
        n, r = weight.shape[0], block.shape[0]
        return x.new_empty(0, n), x.new_empty(0, r, dtype=delta_dtype(x.dtype, block.dtype))
    return _run("bone_forward", backend, m, weight, block, x.dtype, x, weight, block, bias)


def bone_backward_impl(
    dy: Tensor, s: Tensor, weight: Tensor, block: Tensor, need_dx: bool, need_dblock: bool, backend: str
) -> tuple[Tensor | None, Tensor | None]:
    """dx (M, K) and dblock (r, C), None where not needed."""
    if dy.shape[0] == 0:
        dx = dy.new_empty(0, weight.shape[1]) if need_dx else None
        return dx, (torch.zeros_like(block) if need_dblock else None)
    return _run(
        "bone_backward", backend, dy.shape[0], weight, block, dy.dtype, dy, s, weight, block, need_dx, need_dblock
    )


def bat_forward_impl(x: Tensor, weight: Tensor, block: Tensor, bias: Tensor | None, backend: str) -> Tensor:
    """y (M, N) in x's dtype, from the dispatched backend."""
    m = x.shape[0]
    if m == 0:
        return x.new_empty(0, weight.shape[0])
    return _run("bat_forward", backend, m, weight, block, x.dtype, x, weight, block, bias)


def bat_backward_impl(
    dy: Tensor, x: Tensor, weight: Tensor, block: Tensor, need_dx: bool, need_dblock: bool, backend: str
) -> tuple[Tensor | None, Tensor | None]:
    """dx (M, K) and dB (N // r, r, r), None where not needed."""
    if dy.shape[0] == 0:
        dx = dy.new_empty(0, weight.shape[1]) if need_dx else None
        return dx, (torch.zeros_like(block) if need_dblock else None)
    return _run(
        "bat_backward", backend, dy.shape[0], weight, block, dy.dtype, dy, x, weight, block, need_dx, need_dblock
    )


# ------------------------------------------------------------------------------------------------------------
# What is saved for backward, and the gradients: shared by both paths.
# ------------------------------------------------------------------------------------------------------------


def _bone_save(ctx, x: Tensor, weight: Tensor, block: Tensor, bias: Tensor | None, backend: str, s: Tensor) -> None:
    ctx.backend = backend
    ctx.bias_dtype = None if bias is None else bias.dtype
    # Kept for backward: S (M x r). x only when the weight is trainable (dW = dY^T x).
    ctx.save_for_backward(s, weight, block, x if ctx.needs_input_grad[1] else None)


def _bone_grads(ctx, dy: Tensor, backward: GradFn) -> tuple:
    s, weight, block, x = ctx.saved_tensors
    need_dx, need_dweight, need_dblock, need_dbias = ctx.needs_input_grad[:4]
    dx = dblock = None
    if need_dx or need_dblock:
        dx, dblock = backward(dy, s, weight, block, need_dx, need_dblock, ctx.backend)
    dweight = torch.mm(dy.t(), x) if need_dweight else None
    dbias = _bias_grad(dy, ctx.bias_dtype) if need_dbias else None
    return dx, dweight, dblock, dbias, None


def _bat_save(ctx, x: Tensor, weight: Tensor, block: Tensor, bias: Tensor | None, backend: str) -> None:
    ctx.backend = backend
    ctx.bias_dtype = None if bias is None else bias.dtype
    # Kept for backward: x (M x K) only. W' is rebuilt from W and B in backward, never kept.
    ctx.save_for_backward(x, weight, block)


def _bat_grads(ctx, dy: Tensor, backward: GradFn) -> tuple:
    x, weight, block = ctx.saved_tensors
    need_dx, need_dweight, need_dblock, need_dbias = ctx.needs_input_grad[:4]
    dx = dblock = None
    if need_dx or need_dblock:
        dx, dblock = backward(dy, x, weight, block, need_dx, need_dblock, ctx.backend)
    dweight = bat_weight_grad(dy, x, block, weight.dtype) if need_dweight else None
    dbias = _bias_grad(dy, ctx.bias_dtype) if need_dbias else None
    return dx, dweight, dblock, dbias, None


# ------------------------------------------------------------------------------------------------------------
# The custom ops (what torch.compile, export, fake and meta tensors see).
# ------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("bonekern::bone_forward", mutates_args=())
def bone_forward(x: Tensor, weight: Tensor, block: Tensor, bias: Tensor | None, backend: str) -> tuple[Tensor, Tensor]:
    """y = x W^T + b + S D (M, N) in x's dtype, and S (M, r) in the delta dtype."""
    return bone_forward_impl(x, weight, block, bias, backend)


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
    dx, dblock = bone_backward_impl(dy, s, weight, block, need_dx, need_dblock, backend)
    return _none_to_empty(dx, dy), _none_to_empty(dblock, block)


@bone_backward.register_fake
def _(dy, s, weight, block, need_dx, need_dblock, backend):
    return _backward_fake(dy, weight, block, need_dx, need_dblock)


_bone_backward_op = _grads_or_none(torch.ops.bonekern.bone_backward)


def _bone_setup_context(ctx, inputs, output) -> None:
    x, weight, block, bias, backend = inputs
    ctx.mark_non_differentiable(output[1])
    _bone_save(ctx, x, weight, block, bias, backend, output[1])


torch.library.register_autograd(
    "bonekern::bone_forward",
    lambda ctx, dy, _ds: _bone_grads(ctx, dy, _bone_backward_op),
    setup_context=_bone_setup_context,
)


@torch.library.custom_op("bonekern::bat_forward", mutates_args=())
def bat_forward(x: Tensor, weight: Tensor, block: Tensor, bias: Tensor | None, backend: str) -> Tensor:
    """y = x W'^T + b (M, N) in x's dtype, W'_ij = W_ij (I + B_i) + B_i formed in the delta dtype."""
    return bat_forward_impl(x, weight, block, bias, backend)


@bat_forward.register_fake
def _(x, weight, block, bias, backend):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("bonekern::bat_backward", mutates_args=())
def bat_backward(
    dy: Tensor, x: Tensor, weight: Tensor, block: Tensor, need_dx: bool, need_dblock: bool, backend: str
) -> tuple[Tensor, Tensor]:
    """dx (M, K) in dy's dtype and dB (N // r, r, r) in the block's dtype; empty tensors where not needed."""
    dx, dblock = bat_backward_impl(dy, x, weight, block, need_dx, need_dblock, backend)
    return _none_to_empty(dx, dy), _none_to_empty(dblock, block)


@bat_backward.register_fake
def _(dy, x, weight, block, need_dx, need_dblock, backend):
    return _backward_fake(dy, weight, block, need_dx, need_dblock)


_bat_backward_op = _grads_or_none(torch.ops.bonekern.bat_backward)


def _bat_setup_context(ctx, inputs, output) -> None:
    _bat_save(ctx, *inputs)


torch.library.register_autograd(
    "bonekern::bat_forward",
    lambda ctx, dy: _bat_grads(ctx, dy, _bat_backward_op),
    setup_context=_bat_setup_context,
)


# ------------------------------------------------------------------------------------------------------------
# The eager fast path.
# ------------------------------------------------------------------------------------------------------------


class BoneFunction(torch.autograd.Function):
    """bone/mini in eager mode: :func:`bone_forward_impl` and the shared gradient code, without the custom-op
    machinery. Keeps S (M x r) for backward, plus x when the weight is trainable (see :func:`_bone_save`)."""

    @staticmethod
    def forward(ctx, x, weight, block, bias, backend):
        y, s = bone_forward_impl(x, weight, block, bias, backend)
        _bone_save(ctx, x, weight, block, bias, backend, s)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _bone_grads(ctx, dy, bone_backward_impl)


class BatFunction(torch.autograd.Function):
    """bat in eager mode: :func:`bat_forward_impl` and the shared gradient code, without the custom-op
    machinery. Keeps x (M x K) alone for backward; W' is rebuilt there (see :func:`_bat_save`)."""

    @staticmethod
    def forward(ctx, x, weight, block, bias, backend):
        y = bat_forward_impl(x, weight, block, bias, backend)
        _bat_save(ctx, x, weight, block, bias, backend)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _bat_grads(ctx, dy, bat_backward_impl)


def bone_linear_2d(x: Tensor, weight: Tensor, block: Tensor, bias: Tensor | None, backend: str) -> Tensor:
    """bone/mini on x (M, K) -> y (M, N): the custom op when tracing is possible, else :class:`BoneFunction`."""
    if _use_eager_path(x):
        return BoneFunction.apply(x, weight, block, bias, backend)
    return torch.ops.bonekern.bone_forward(x, weight, block, bias, backend)[0]


def _spec(p: float, seed: int, offset: int) -> DropoutSpec | None:
    return None if p == 0.0 else DropoutSpec(p, seed, offset)


def adapter_forward_impl(x: Tensor, block: Tensor, out_features: int, p: float, seed: int, offset: int, backend: str):
    """delta (M, N) in x's dtype and S (M, r) in the delta dtype, from the dispatched backend."""
    m = x.shape[0]
    if m == 0:
        return x.new_empty(0, out_features), x.new_empty(0, block.shape[0], dtype=delta_dtype(x.dtype, block.dtype))
    dropout = _spec(p, seed, offset)
    problem = OpProblem.for_adapter("adapter_forward", m, out_features, x.shape[1], block, x.dtype, dropout)
    args = (x, block, out_features, dropout)
    chosen, config = dispatch.select(problem, backend, args)
    with nvtx_range(f"bonekern.adapter_forward[{chosen.name}]"):
        return chosen.adapter_forward(*args, config)


def adapter_backward_impl(
    dy: Tensor,
    s: Tensor,
    block: Tensor,
    in_features: int,
    p: float,
    seed: int,
    offset: int,
    need_dx: bool,
    need_dblock: bool,
    backend: str,
) -> tuple[Tensor | None, Tensor | None]:
    """dx (M, K) and dblock (r, C), None where not needed."""
    m = dy.shape[0]
    if m == 0:
        return (dy.new_empty(0, in_features) if need_dx else None), (torch.zeros_like(block) if need_dblock else None)
    dropout = _spec(p, seed, offset)
    problem = OpProblem.for_adapter("adapter_backward", m, dy.shape[1], in_features, block, dy.dtype, dropout)
    args = (dy, s, block, in_features, dropout, need_dx, need_dblock)
    chosen, config = dispatch.select(problem, backend, args)
    with nvtx_range(f"bonekern.adapter_backward[{chosen.name}]"):
        return chosen.adapter_backward(*args, config)


def _adapter_save(ctx, block: Tensor, in_features: int, p: float, seed: int, offset: int, backend: str, s) -> None:
    # Kept for backward: S (M x r) and the dropout spec's numbers; x and the mask are not kept.
    ctx.adapter_args = (in_features, p, seed, offset)
    ctx.backend = backend
    ctx.save_for_backward(s, block)


def _adapter_grads(ctx, dy: Tensor, backward) -> tuple:
    s, block = ctx.saved_tensors
    need_dx, need_dblock = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx = dblock = None
    if need_dx or need_dblock:
        dx, dblock = backward(dy, s, block, *ctx.adapter_args, need_dx, need_dblock, ctx.backend)
    return dx, dblock, None, None, None, None, None


@torch.library.custom_op("bonekern::adapter_forward", mutates_args=())
def adapter_forward(
    x: Tensor, block: Tensor, out_features: int, p: float, seed: int, offset: int, backend: str
) -> tuple[Tensor, Tensor]:
    """delta = S D (M, N) in x's dtype and S (M, r) in the delta dtype; dropout on x when p > 0."""
    return adapter_forward_impl(x, block, out_features, p, seed, offset, backend)


@adapter_forward.register_fake
def _(x, block, out_features, p, seed, offset, backend):
    m = x.shape[0]
    return x.new_empty(m, out_features), x.new_empty(m, block.shape[0], dtype=delta_dtype(x.dtype, block.dtype))


@torch.library.custom_op("bonekern::adapter_backward", mutates_args=())
def adapter_backward(
    dy: Tensor,
    s: Tensor,
    block: Tensor,
    in_features: int,
    p: float,
    seed: int,
    offset: int,
    need_dx: bool,
    need_dblock: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """dx (M, K) in dy's dtype and dblock (r, C) in the block's dtype; empty tensors where not needed."""
    dx, dblock = adapter_backward_impl(dy, s, block, in_features, p, seed, offset, need_dx, need_dblock, backend)
    return _none_to_empty(dx, dy), _none_to_empty(dblock, block)


@adapter_backward.register_fake
def _(dy, s, block, in_features, p, seed, offset, need_dx, need_dblock, backend):
    dx = dy.new_empty(dy.shape[0], in_features) if need_dx else dy.new_empty(_EMPTY)
    dblock = torch.empty_like(block) if need_dblock else block.new_empty(_EMPTY)
    return dx, dblock


def _adapter_backward_op(dy, s, block, in_features, p, seed, offset, need_dx, need_dblock, backend):
    dx, dblock = torch.ops.bonekern.adapter_backward(
        dy, s, block, in_features, p, seed, offset, need_dx, need_dblock, backend
    )
    return (dx if need_dx else None), (dblock if need_dblock else None)


def _adapter_setup_context(ctx, inputs, output) -> None:
    x, block, _out_features, p, seed, offset, backend = inputs
    ctx.mark_non_differentiable(output[1])
    _adapter_save(ctx, block, x.shape[1], p, seed, offset, backend, output[1])


torch.library.register_autograd(
    "bonekern::adapter_forward",
    lambda ctx, dy, _ds: _adapter_grads(ctx, dy, _adapter_backward_op),
    setup_context=_adapter_setup_context,
)


class AdapterFunction(torch.autograd.Function):
    """The adapter term in eager mode: :func:`adapter_forward_impl` and the shared gradient code, without the
    custom-op machinery. Keeps S (M x r) and the dropout spec's numbers (see :func:`_adapter_save`)."""

    @staticmethod
    def forward(ctx, x, block, out_features, p, seed, offset, backend):
        delta, s = adapter_forward_impl(x, block, out_features, p, seed, offset, backend)
        _adapter_save(ctx, block, x.shape[1], p, seed, offset, backend, s)
        return delta

    @staticmethod
    def backward(ctx, dy):
        return _adapter_grads(ctx, dy, adapter_backward_impl)


def adapter_output_2d(x: Tensor, block: Tensor, out_features: int, dropout: DropoutSpec | None, backend: str) -> Tensor:
    """The adapter term on x (M, K) -> (M, N): the custom op when tracing is possible, else :class:`AdapterFunction`."""
    p, seed, offset = (0.0, 0, 0) if dropout is None else (float(dropout.p), dropout.seed, dropout.offset)
    if _use_eager_path(x):
        return AdapterFunction.apply(x, block, out_features, p, seed, offset, backend)
    return torch.ops.bonekern.adapter_forward(x, block, out_features, p, seed, offset, backend)[0]


def bat_linear_2d(x: Tensor, weight: Tensor, block: Tensor, bias: Tensor | None, backend: str) -> Tensor:
    """bat on x (M, K) -> y (M, N): the custom op when tracing is possible, else :class:`BatFunction`."""
    if _use_eager_path(x):
        return BatFunction.apply(x, weight, block, bias, backend)
    return torch.ops.bonekern.bat_forward(x, weight, block, bias, backend)
