"""Argument checks shared by every public entry point; each error names the argument, the expectation and
what was given. The shape rules themselves live in :mod:`bonekern.variants`."""

from __future__ import annotations

import torch

from .variants import AdapterSpec, check_variant, spec_from_block

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""Dtypes bonekern computes with: x, weight, bias and block must each have one of these."""


def _check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32 or float64); got {value.dtype}")
    return value


def check_dtype(name: str, value: object, *, optional: bool = False) -> torch.dtype | None:
    """``value`` if it is one of :data:`FLOAT_DTYPES` (or None when ``optional``), else TypeError naming ``name``."""
    if value is None and optional:
        return None
    if not isinstance(value, torch.dtype) or value not in FLOAT_DTYPES:
        what = str(value) if isinstance(value, torch.dtype) else f"{type(value).__name__} {value!r}"
        raise TypeError(f"{name} must be one of float16, bfloat16, float32, float64; got {what}")
    return value


def check_device(name: str, value: object) -> torch.device | None:
    """``value`` as a torch.device (None stays None), else ValueError/TypeError naming ``name``.

    A CUDA device must exist here: torch would otherwise fail later with an AssertionError or a RuntimeError.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, torch.device)):
        raise TypeError(f"{name} must be a torch.device, a str such as 'cuda:0', or None; got {type(value).__name__}")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{name} must name a torch device such as 'cpu' or 'cuda:0'; got {value!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{name} is {value!r}, but torch sees no CUDA device")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{name} is {value!r}, but torch sees {count} CUDA device(s)")
    return device


def _check_mini_r(mini_r: object) -> None:
    """A type check made before the memoised :func:`spec_from_block`: its cache would take ``mini_r = 4.0`` or
    ``True`` for an earlier ``4`` or ``1`` (equal and equally hashed), and an unhashable value would fail there
    without naming the argument (``variant`` gets :func:`check_variant` first for the same reason)."""
    if mini_r is not None and (isinstance(mini_r, bool) or not isinstance(mini_r, int)):
        raise TypeError(f"mini_r must be an int or None; got {type(mini_r).__name__} {mini_r!r}")


def delta_dtype(x_dtype: torch.dtype, block_dtype: torch.dtype) -> torch.dtype:
    """The dtype adapter terms (S, S @ D, W') are computed in: float32, or float64 if either input is."""
    if torch.float64 in (x_dtype, block_dtype):
        return torch.float64
    return torch.float32


def check_weight_and_block(weight: torch.Tensor, block: torch.Tensor, variant: str, mini_r: int | None) -> AdapterSpec:
    """Validate a (weight, block) pair for ``variant`` and return its spec."""
    _check_tensor("weight", weight)
    _check_tensor("block", block)
    check_variant(variant)
    _check_mini_r(mini_r)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features); got shape {tuple(weight.shape)}")
    if block.device != weight.device:
        raise ValueError(f"block must be on the same device as weight ({weight.device}); got block on {block.device}")
    # The spec is memoised for eager calls; under torch.compile the pure function is traced instead (dynamo
    # would trace through the cache wrapper anyway, and warns when it does).
    make_spec = spec_from_block.__wrapped__ if torch.compiler.is_compiling() else spec_from_block
    return make_spec(variant, tuple(weight.shape), tuple(block.shape), mini_r)


def check_linear_args(
    x: object,
    weight: object,
    block: object,
    bias: object,
    variant: str,
    mini_r: int | None,
) -> AdapterSpec:
    """Validate the arguments of :func:`bonekern.bone_linear` and return the adapter's spec.

    Rules: x is (..., K) with at least one dimension; weight is (N, K) with x's dtype; bias, if given, is
    (N,) with x's dtype; block fits the variant (see :mod:`bonekern.variants`) and may be float32 or any other
    floating dtype; all tensors live on one device. Zero tokens (x.numel() == 0 with K > 0) are valid.
    """
    x = _check_tensor("x", x)
    weight = _check_tensor("weight", weight)
    block = _check_tensor("block", block)
    spec = check_weight_and_block(weight, block, variant, mini_r)
    n, k = weight.shape
    if x.dim() < 1:
        raise ValueError(f"x must have shape (..., in_features) with in_features = {k}; got a 0-d tensor")
    if x.shape[-1] != k:
        raise ValueError(f"x.shape[-1] must equal in_features = weight.shape[1] = {k}; got x of shape {tuple(x.shape)}")
    if x.device != weight.device:
        raise ValueError(f"x must be on the same device as weight ({weight.device}); got x on {x.device}")
    if weight.dtype != x.dtype:
        raise TypeError(
            f"weight must have x's dtype ({x.dtype}); got weight of dtype {weight.dtype} "
            "(cast one of them, or run under torch.autocast)"
        )
    if bias is not None:
        bias = _check_tensor("bias", bias)
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape (out_features,) = ({n},); got {tuple(bias.shape)}")
        if bias.device != weight.device:
            raise ValueError(f"bias must be on the same device as weight ({weight.device}); got bias on {bias.device}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias must have x's dtype ({x.dtype}); got bias of dtype {bias.dtype}")
    return spec


def check_adapter_args(
    x: object,
    block: object,
    variant: object,
    out_features: object,
    mini_r: int | None,
    dropout_p: object,
    training: object,
) -> AdapterSpec:
    """Validate the arguments of :func:`bonekern.adapter_output` and return the adapter's spec.

    Rules: x is a float tensor (..., K); block fits ``variant`` ("bone" or "mini") for an (out_features, K) layer
    and lives on x's device; 0 <= dropout_p < 1; training is a bool.
    """
    x = _check_tensor("x", x)
    block = _check_tensor("block", block)
    _check_mini_r(mini_r)
    if variant not in ("bone", "mini"):
        raise ValueError(
            f"variant must be 'bone' or 'mini' for adapter_output (bat's adapter term depends on the weight: use "
            f"bone_linear); got {variant!r}"
        )
    if isinstance(out_features, bool) or not isinstance(out_features, int) or out_features <= 0:
        raise ValueError(f"out_features must be a positive int; got {out_features!r}")
    if x.dim() < 1:
        raise ValueError("x must have shape (..., in_features); got a 0-d tensor")
    if block.device != x.device:
        raise ValueError(f"block must be on x's device ({x.device}); got block on {block.device}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float in [0, 1); got {type(dropout_p).__name__}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p!r}")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool; got {type(training).__name__}")
    make_spec = spec_from_block.__wrapped__ if torch.compiler.is_compiling() else spec_from_block
    return make_spec(variant, (out_features, x.shape[-1]), tuple(block.shape), mini_r)
