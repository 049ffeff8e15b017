"""Shared by the Triton kernel modules: the launch description (:class:`LaunchSpec`) that both the launchers and the
ahead-of-time cases use, the environment a launch depends on, the int64-offset decision. Importing this module
does not import triton."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def interpreting() -> bool:
    """True when Triton kernels run through the interpreter (``TRITON_INTERPRET=1``), i.e. on CPU tensors.

    Under the interpreter a bf16 ``tl.dot`` multiplies raw bits (wrong), so kernels take a constexpr flag from
    here and cast dot operands to fp32 when it is set (docs/testing-without-gpu.md).
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class KernelEnv:
    """What a launch's generated code depends on besides its config, dtypes and sizes.

    Attributes:
        gpu: the kernels run on a CUDA GPU (else on CPU tensors through the interpreter).
        tf32: torch allows TF32 for fp32 matmuls there (``torch.backends.cuda.matmul.allow_tf32``, read per call).
        interpret: ``TRITON_INTERPRET=1`` (bf16 dot operands are then cast to fp32: the interpreter's bf16 dot
            multiplies raw bits).
        sm_count: streaming multiprocessors (1 off the GPU); split counts aim at about two programs per SM.
    """

    gpu: bool
    tf32: bool
    interpret: bool
    sm_count: int = 1

    @staticmethod
    def of(device: Any) -> KernelEnv:
        """The environment of a launch on ``device`` now."""
        return KernelEnv(device.type == "cuda", fp32_dot_precision(device) == "tf32", interpreting(), sm_count(device))


AOT_ENV = KernelEnv(gpu=True, tf32=False, interpret=False)
"""The environment the ahead-of-time cases model: a GPU with torch's default ``allow_tf32 = False`` (grids and
split counts are not compiled, so ``sm_count`` does not matter there)."""


@dataclass(frozen=True)
class LaunchSpec:
    """Everything one kernel launch needs besides its tensors, problem sizes and strides.

    Each op's one launch function (``bone.bone_forward_launch``, ``bat.bat_backward_launch``, ...) builds these from
    a typed config, the dtypes, the sizes and a :class:`KernelEnv`; the launchers call them, and ``aot_cases()``
    compiles the same specs ahead of time (:func:`aot_case`), so what is compiled is what runs.

    Attributes:
        kernel: stable kernel name ("bone_fwd", "bat_dx_fused", ...): the AOT case's ``kernel``.
        fn: the ``@triton.jit`` function.
        grid: the launch grid.
        constexprs: the constexpr arguments, except ``INDEX_64``: whether offsets need int64 is a property of the
            tensors (:func:`needs_int64`), given at the call.
        scalars: the integer arguments this plan decides (split sizes, block counts); the launcher adds the
            tensors, the problem sizes and the strides.
        num_warps, num_stages: launch options.
    """

    kernel: str
    fn: Any
    grid: tuple[int, ...]
    constexprs: Mapping[str, Any]
    num_warps: int
    num_stages: int
    scalars: Mapping[str, int] = field(default_factory=dict)

    def __call__(self, index_64: bool, **args: Any) -> None:
        """Launch with ``args`` (tensors, sizes, strides by the kernel's parameter names)."""
        self.fn[self.grid](
            **args,
            **self.scalars,
            **self.constexprs,
            INDEX_64=index_64,
            num_warps=self.num_warps,
            num_stages=self.num_stages,
        )


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
            path, the tile set as ``tiles.py`` names it, compile-time adapter sizes ("r64", "c16"), and for
            cases outside the shipped inputs what differs ("int64", "atomic"). Examples:
            "group.m128n128k64w8s3.r64", "r16.c16.onehot", "m128n64k64w8s3.r64", "m64n64k64w4s2.r48.int64".
            ``(kernel, config_name, dtype)`` is unique; the baseline key is ``"<kernel>/<config_name>/<dtype>"``.
        dtype: the input (x) dtype this specialisation is for ("bf16", "fp16", "fp32", "fp64").
        archs: the architecture families ("sm80", "sm90": ``tiles.SHIPPED_ARCHS``) whose configs launch this
            specialisation; ``resources.py`` compiles it for each of them.
        in_baseline: stored in ``profiles/resources/triton-<X.Y>/triton_<arch>.json`` and held to it (no more spills
            or shared memory than stored). False for specialisations outside the shipped inputs (fp64, int64 offsets,
            ...): compiled and held to the absolute rules only (compiles, no spills, registers, shared memory).
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


UNIT_STRIDES: frozenset[str] = frozenset(
    {
        *("stride_xk", "stride_wk", "stride_dc", "stride_yn", "stride_sr", "stride_dyn", "stride_tr", "stride_dxk"),
        *("stride_oc", "stride_ak", "stride_bq", "stride_cn", "stride_ok", "stride_dn", "stride_oq"),
    }
)
"""Kernel parameters that are the inner stride of a tensor argument: 1 for the contiguous tensors the AOT cases model
(Triton's launcher specialises an int argument equal to 1 into the constant 1, so :func:`aot_case` does the same)."""


def aot_case(
    spec: LaunchSpec,
    pointers: Mapping[str, Any],
    config_name: str,
    dtype: Any,
    archs: tuple[str, ...],
    *,
    index_64: bool = False,
    in_baseline: bool = True,
) -> AotCase:
    """The :class:`AotCase` of ``spec`` for contiguous tensors: pointer arguments typed by ``pointers`` (name -> torch
    dtype), :data:`UNIT_STRIDES` specialised to 1, every other non-constexpr argument i32; ``dtype`` (x's torch
    dtype) names the case; ``index_64`` the int64-offset specialisation."""
    names = list(spec.fn.arg_names)
    constexprs = {**spec.constexprs, "INDEX_64": index_64}
    missing = (set(constexprs) | set(pointers)) - set(names)
    if missing:
        raise ValueError(f"{spec.kernel}: {sorted(missing)} are not parameters of {spec.fn.__name__}")
    values = {name: 1 for name in names if name in UNIT_STRIDES}
    values.update(constexprs)
    signature = {
        name: "*" + TRITON_TYPE_NAMES[str(pointers[name])]
        if name in pointers
        else "constexpr"
        if name in values
        else "i32"
        for name in names
    }
    return AotCase(
        kernel=spec.kernel,
        fn=spec.fn,
        signature=signature,
        constexprs=values,
        num_warps=spec.num_warps,
        num_stages=spec.num_stages,
        config_name=config_name,
        dtype=TRITON_TYPE_NAMES[str(dtype)],
        archs=archs,
        in_baseline=in_baseline,
    )


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
    "torch.int8": "i8",
    "torch.uint8": "u8",
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


@functools.cache
def sm_count(device: Any) -> int:
    """Streaming multiprocessors of ``device`` (1 off the GPU): split counts aim at about two programs per SM."""
    import torch

    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
