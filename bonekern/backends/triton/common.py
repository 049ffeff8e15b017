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
    """

    kernel: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    config_name: str = "default"
    dtype: str = "bf16"
