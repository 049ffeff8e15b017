"""Shared by the Triton kernel modules. Importing this module does not import triton."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any


def interpreting() -> bool:
    """True when Triton kernels run through the interpreter (``TRITON_INTERPRET=1``), i.e. on CPU tensors.

    Under the interpreter a bf16 ``tl.dot`` multiplies raw bits (wrong), so kernels take a constexpr flag from
    here and cast dot operands to fp32 when it is set (DESIGN.md section 4).
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class AotCase:
    """One kernel specialisation to compile ahead of time (no GPU needed) for the resource baseline.

    Attributes:
        kernel: stable kernel name, e.g. "bone_fwd"; the baseline's key together with ``config_name``/``dtype``.
        fn: the ``@triton.jit`` function.
        signature: ``ASTSource`` signature: argument name -> Triton type ("*fp16", "*fp32", "i32", "i64",
            "constexpr").
        constexprs: values of the constexpr arguments for this specialisation.
        num_warps, num_stages: launch options.
        config_name: which shipped config this is (as named in ``configs.py``).
        dtype: the input dtype this specialisation is for ("bf16", "fp16", "fp32").
        archs: the architectures this config ships for ("sm80", "sm90"); resources.py compiles it for those.
    """

    kernel: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    config_name: str = "default"
    dtype: str = "bf16"
    archs: tuple[str, ...] = ("sm80", "sm90")


# ----------------------------------------------------------------------------------------------------------
# Host-side helpers for launching kernels (no triton import needed).
# ----------------------------------------------------------------------------------------------------------

INT32_LIMIT = 2**31 - 1
"""Largest element offset a kernel may compute in int32; beyond it the kernel is specialised for int64 offsets."""

TRITON_TYPE_NAMES = {
    "torch.float16": "fp16",
    "torch.bfloat16": "bf16",
    "torch.float32": "fp32",
    "torch.float64": "fp64",
}
"""torch dtype (as ``str(dtype)``) -> Triton's short name, used in AOT signatures ("*bf16") and baseline keys."""


def needs_int64(*tensors: Any) -> bool:
    """True when some element of some tensor lies at an offset (in elements) past ``INT32_LIMIT``.

    Kernels compute ``row * stride_row + col * stride_col`` per element; that fits in int32 exactly when the
    largest in-bounds offset ``sum((size - 1) * |stride|)`` does (masked-off lanes never dereference theirs).
    ``None`` entries are ignored.
    """
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        if sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True)) > INT32_LIMIT:
            return True
    return False


def fp32_dot_precision(device: Any, acc_dtype: Any = None) -> str:
    """``input_precision`` for a ``tl.dot`` on fp32 operands: "tf32" exactly when torch would use TF32 for an fp32
    matmul on ``device`` (``torch.backends.cuda.matmul.allow_tf32``), else "ieee": always on the CPU interpreter,
    and always when the dot accumulates in float64 (``acc_dtype=torch.float64``: fp64 inputs keep fp64 accuracy)."""
    import torch

    if acc_dtype == torch.float64:
        return "ieee"
    if getattr(device, "type", device) == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"
