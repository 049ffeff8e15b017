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
    """One kernel specialisation to compile ahead of time (no GPU needed); ``resources.py`` compiles every case
    of every kernel module's ``aot_cases()`` and checks its registers, spills and shared memory.

    Attributes:
        kernel: stable kernel name, e.g. "bone_fwd", "bat_dx_fused".
        fn: the ``@triton.jit`` function.
        signature: ``ASTSource`` signature: argument name -> Triton type ("*fp16", "*fp32", "i32", "i64",
            "constexpr").
        constexprs: values of the constexpr arguments for this specialisation.
        num_warps, num_stages: launch options.
        config_name: what selects this specialisation besides ``kernel`` and ``dtype``, as dot-separated parts
            (never a "/", never the architecture: that is ``archs``): the strategy where it picks another code
            path, the tile set as ``configs.py`` names it, compile-time adapter sizes ("r64", "c16"), and for
            cases outside the shipped inputs what differs ("int64", "atomic"). Examples:
            "group.m128n128k64w8s3.r64", "r16.c16.onehot", "m128n64k64w8s3.r64", "m64n64k64w4s2.r48.int64".
            ``(kernel, config_name, dtype)`` is unique; the baseline key is ``"<kernel>/<config_name>/<dtype>"``.
        dtype: the input (x) dtype this specialisation is for ("bf16", "fp16", "fp32", "fp64").
        archs: the architecture families ("sm80", "sm90": ``configs.SHIPPED_ARCHS``) whose configs launch this
            specialisation; ``resources.py`` compiles it for each of them.
        in_baseline: stored in ``profiles/resources/triton_<arch>.json`` and held to it (no more spills or shared
            memory than stored). False for specialisations outside the shipped inputs (fp64, int64 offsets, ...):
            compiled and held to the absolute rules only (compiles, no spills, registers, shared memory).
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
    in_baseline: bool = True


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
