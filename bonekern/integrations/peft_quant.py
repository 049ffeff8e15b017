"""PEFT MiSS bat layers over quantised base layers, served by :func:`bonekern.bat_linear_quantized`.

Kept apart from :mod:`bonekern.integrations.peft`, which calls the two functions here: one when
:func:`~bonekern.integrations.peft.accelerate` classifies a layer, one at each forward of a switched layer whose
base is quantised. Which bases qualify is :mod:`bonekern.quant`'s knowledge (bitsandbytes 4-bit and 8-bit,
torchao, hqq); forward-only quantisations stay on PEFT's forward, which raises PEFT's own error for bat.

Semantics match PEFT's bat forward (``F.linear(x, W + delta_weight, b)`` over the dequantised W): W' from the
dequantised rows in float32 (float64 with a float64 block), the output in x's dtype. PEFT runs the GEMM in the
dequantised weight's dtype promoted with the block's (float32 for a float32 block); bonekern runs it in x's
dtype (equal for float32 models, within half-precision tolerance otherwise). ``miss_dropout`` is ignored on the
bat path, as PEFT does. Several active adapters arrive as one chained block (the caller's ``_bat_chain``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..quant import weight_source
from ..quant_ops import bat_linear_quantized
from ..validation import FLOAT_DTYPES
from ..variants import spec_from_block


def _backend_name(quantization: object) -> str:
    return getattr(quantization, "backend_name", "") or type(quantization).__name__


def quantised_layer_reason(layer: nn.Module, variant: str | None) -> str | None:
    """Why a MissLinear over a quantised base cannot be switched (None when bonekern serves it)."""
    quantization = layer.quantization_backend
    prefix = f"bat over a quantised base layer ({_backend_name(quantization)})"
    if variant != "bat":  # bone/mini over a quantised base: the base forward + adapter-term path serves them
        return None
    if not getattr(quantization, "supports_merge", False):  # forward-only: PEFT's own forward raises its error
        return prefix
    base = layer.get_base_layer()
    try:
        source = weight_source(base)
    except (ValueError, NotImplementedError) as error:
        return f"{prefix}: {error}"
    if source is None:
        return f"{prefix}: bonekern cannot read a {type(base).__name__}'s weight"
    for adapter, block in layer.miss_block.items():
        try:
            spec_from_block("bat", source.shape, tuple(block.shape), None)
        except (TypeError, ValueError) as error:
            return f"adapter {adapter!r} does not fit variant 'bat': {error}"
        if block.dtype not in FLOAT_DTYPES:
            return f"adapter {adapter!r} has dtype {block.dtype}"
    return None


def _call_reason(layer: nn.Module, block: Tensor, x: Tensor, args: tuple, kwargs: dict) -> str | None:
    if args or kwargs:
        return "extra forward arguments for the base layer"
    if not isinstance(x, Tensor) or x.dtype not in FLOAT_DTYPES:
        return f"x is {getattr(x, 'dtype', type(x).__name__)}, not a float tensor"
    if x.device != block.device:
        return f"x is on {x.device}, the adapter on {block.device}"
    if torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type):
        return "torch.autocast over a quantised base"
    return None


def quantised_forward(
    layer: nn.Module,
    block: Tensor,
    x: Tensor,
    args: tuple,
    kwargs: dict,
    fallback: Callable[[str], Tensor],
) -> Tensor:
    """bat over the quantised base with ``block`` (the active adapters' chained block), or ``fallback(reason)``
    (PEFT's forward)."""
    reason = _call_reason(layer, block, x, args, kwargs)
    if reason is not None:
        return fallback(reason)
    base = layer.get_base_layer()
    y = bat_linear_quantized(x, base, block, getattr(base, "bias", None))
    return y.to(x.dtype)
