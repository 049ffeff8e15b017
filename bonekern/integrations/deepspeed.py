"""DeepSpeed ZeRO-3 for the PEFT integration: bonekern serves MiSS calls whose base layer ZeRO-3 partitioned.

Under ZeRO-3 every parameter is split across the ranks: its ``.data`` is an empty (0,) tensor between uses, the
real shape is ``ds_shape``, and DeepSpeed gathers it through hooks it registers on the module that owns it (a
forward pre-hook fetches, a forward hook releases; two more hooks fetch again for backward and release after it).
Those hooks must see the base layer's call, and bonekern does not call the base layer: it runs one fused op on
the base weight. So for a partitioned base layer bonekern does the hooks' work itself, in
:class:`ZeroGatheredLinear`: it gathers the base weight and bias (``deepspeed.zero.GatheredParameters``) inside
forward, runs the op, lets them go, and gathers the weight again inside backward. DeepSpeed's four hooks on the
base layer are then known and harmless (:func:`is_known_hook`); any other hook still makes the call fall back.

The adapter block is the MiSS layer's own parameter and is handled as PEFT's forward has it handled: reading
``miss_block[adapter]`` inside the DeepSpeed engine's forward gathers it and registers it with the MiSS layer,
whose own (still firing) hooks fetch it again for backward and reduce its gradient.

deepspeed is never imported here at import time: a model that DeepSpeed touched has imported it already, and the
checks below only read attributes (``ds_id``, ``ds_shape``, ``ds_status``) that DeepSpeed puts on parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from ..ops import bat_backward_impl, bat_forward_impl, bone_backward_impl, bone_forward_impl
from ..validation import check_linear_args

__all__ = [
    "KNOWN_HOOKS",
    "ZeroGatheredLinear",
    "base_parameters",
    "hook_name",
    "is_known_hook",
    "is_partitioned",
    "shape_of",
    "zero_call_reason",
    "zero_linear",
]

_OFFLOAD = "deepspeed.runtime.zero.parameter_offload"
_REGISTER = "DeepSpeedZeRoOffload._register_deepspeed_module.<locals>."
KNOWN_HOOKS = frozenset(
    (_OFFLOAD, _REGISTER + hook)
    for hook in (
        "_pre_forward_module_hook",  # fetches the module's parameters (all-gather)
        "_post_forward_module_hook",  # releases them (re-partitions)
        "_pre_backward_module_hook",  # wraps the outputs: fetch again before the module's backward
        "_post_backward_module_hook",  # wraps the inputs: release after the module's backward
    )
)
"""(module, qualname) of the hooks DeepSpeed ZeRO-3 (0.19) registers on every module. On a base layer bonekern does
their work itself (gathers in forward and backward), so they are no reason to fall back."""

_NVTX_WRAPPER = ("deepspeed.utils.nvtx", "instrument_w_nvtx.<locals>.wrapped_fn")
"""DeepSpeed's ``instrument_w_nvtx`` wraps a function without ``functools.wraps``; the wrapped one is its ``func``."""


def is_partitioned(t: object) -> bool:
    """True for a parameter ZeRO-3 manages (it carries ``ds_id`` and ``ds_shape``), gathered or not."""
    return isinstance(t, Tensor) and hasattr(t, "ds_id") and hasattr(t, "ds_shape")


def shape_of(t: Tensor) -> tuple[int, ...]:
    """The real shape of a tensor: ``ds_shape`` for a ZeRO-3 parameter (whose ``.shape`` is (0,) between uses)."""
    return tuple(t.ds_shape) if is_partitioned(t) else tuple(t.shape)


def _unwrap(fn: Callable) -> Callable:
    for _ in range(8):  # torch.compiler.disable sets __wrapped__; instrument_w_nvtx keeps the function in a cell
        inner = getattr(fn, "__wrapped__", None)
        if inner is None and (getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)) == _NVTX_WRAPPER:
            cells = dict(zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=False))
            inner = cells["func"].cell_contents if "func" in cells else None
        if not callable(inner):
            return fn
        fn = inner
    return fn


def hook_name(fn: Callable) -> tuple[str | None, str | None]:
    """(module, qualname) of a hook function, through DeepSpeed's and torch.compiler's wrappers."""
    fn = _unwrap(fn)
    return getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)


def is_known_hook(fn: Callable) -> bool:
    """True for one of the ZeRO-3 hooks in :data:`KNOWN_HOOKS`."""
    return hook_name(fn) in KNOWN_HOOKS


def base_parameters(base: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight, bias) of a linear layer, read without DeepSpeed's external-parameter detection.

    Inside the DeepSpeed engine's forward, reading a partitioned parameter through ``module.weight`` gathers it and
    ties it to the module that runs (the MiSS layer) for the rest of training. bonekern gathers the base weight
    only for the length of its own call, so it reads the entry of ``_parameters`` directly.
    """
    params = base.__dict__.get("_parameters")
    if type(params).__name__ == "ZeROOrderedDict" and "weight" in params:
        return dict.__getitem__(params, "weight"), dict.get(params, "bias")
    return base.weight, base.bias


def _status(t: Tensor) -> str:
    return getattr(getattr(t, "ds_status", None), "name", "AVAILABLE")


def zero_call_reason(weight: Tensor, bias: Tensor | None, block: Tensor) -> str | None:
    """Why a call on a ZeRO-3 base layer cannot run on bonekern (None when it can)."""
    if torch.compiler.is_compiling():
        return "torch.compile over a ZeRO-3 partitioned base layer (bonekern gathers it eagerly)"
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return "the ZeRO-3 partitioned base layer is trainable (bonekern gathers frozen base weights only)"
    for name, t in (("base weight", weight), ("base bias", bias)):
        if t is not None and _status(t) == "INFLIGHT":
            return f"the {name} is being fetched by DeepSpeed"
    if block.numel() == 0 and is_partitioned(block):
        return "the adapter block is partitioned and not gathered (call the model through the DeepSpeed engine)"
    return None


@contextlib.contextmanager
def _gathered(*params: Tensor | None) -> Iterator[None]:
    """Gather the partitioned ones of ``params`` for the block, then partition them again (their data freed).
    Parameters already available (persistent ones, or gathered by someone else) are used and left as they are."""
    todo = [p for p in params if p is not None and is_partitioned(p) and _status(p) == "NOT_AVAILABLE"]
    if not todo:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(todo, modifier_rank=None):
        yield


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


class ZeroGatheredLinear(torch.autograd.Function):
    """bone/mini/bat on x (M, K) with a ZeRO-3 partitioned base weight (N, K) and bias (N,) -> y (M, N).

    Forward gathers weight and bias, runs bonekern's forward, and partitions them again before returning; backward
    gathers the weight again for dx (and bat's dB), then partitions it. Kept for backward: S (M x r) for bone/mini,
    x (M x K) for bat, and the block; the weight and bias are referenced as the partitioned parameters (no data of
    their own outside a call), never a gathered copy, never an N x K temporary.
    """

    @staticmethod
    def forward(ctx, x, block, weight, bias, variant, mini_r, backend):
        dtype = x.dtype
        with _gathered(weight, bias):
            w, b = _cast(weight, dtype), _cast(bias, dtype)  # [N, K], [N]: this call's only
            check_linear_args(x, w, block, b, variant, mini_r)
            if variant == "bat":
                y = bat_forward_impl(x, w, block, b, backend)
                saved = x
            else:
                y, saved = bone_forward_impl(x, w, block, b, backend)  # saved: S [M, r]
        ctx.save_for_backward(saved, block)
        ctx.weight, ctx.dtype, ctx.variant, ctx.backend = weight, dtype, variant, backend
        return y

    @staticmethod
    def backward(ctx, dy):
        saved, block = ctx.saved_tensors
        need_dx, need_dblock = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx = dblock = None
        if need_dx or need_dblock:
            backward = bat_backward_impl if ctx.variant == "bat" else bone_backward_impl
            with _gathered(ctx.weight):
                w = _cast(ctx.weight, ctx.dtype)
                dx, dblock = backward(dy.contiguous(), saved, w, block, need_dx, need_dblock, ctx.backend)
        return dx, dblock, None, None, None, None, None


def zero_linear(
    x: Tensor,
    weight: Tensor,
    block: Tensor,
    bias: Tensor | None,
    *,
    variant: str,
    mini_r: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """:func:`bonekern.bone_linear` for a ZeRO-3 partitioned base weight (see :class:`ZeroGatheredLinear`).

    x (..., K) -> (..., N) in x's dtype (the autocast dtype under ``torch.autocast``, as bone_linear). weight and
    bias are frozen ZeRO-3 parameters (shape (0,) between uses); block is the gathered adapter block.
    """
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        x = _cast(x, torch.get_autocast_dtype(device))
    n, k = shape_of(weight)
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must have shape (..., in_features) with in_features = {k}; got {tuple(x.shape)}")
    lead = x.shape[:-1]
    y = ZeroGatheredLinear.apply(x.reshape(-1, k), block, weight, bias, variant, mini_r, backend)
    return y.reshape(*lead, n)
