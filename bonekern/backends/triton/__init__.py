"""``backend="triton"``: hand-written Triton kernels for forward and backward of bone, mini and bat.

Layout of this package (importing it never imports triton; kernels load on first use):

- ``common.py``: what every kernel module shares, without importing triton: interpreter detection, the int64-offset
  decision (``needs_int64``), the ``input_precision`` of fp32 dots (``fp32_dot_precision``), Triton's dtype names,
  and ``AotCase``, the one description of a kernel specialisation to compile ahead of time;
- ``configs.py``: the config families (``arch_of``: "sm80" / "sm90" / "interpreter"; ``dtype_family``: "half" /
  "fp32") and every tunable config and default of bone/mini and bat, in one place;
- ``bone.py``: bone/mini kernels, their host functions and ``aot_cases()``; ``bat.py``: the same for bat
  (``aot_cases()`` also returns the specialisations outside the shipped inputs, checked but not stored);
- ``resources.py``: compiles every module's ``aot_cases()`` for sm_80 / sm_90 / sm_100 without a GPU, checks registers,
  spills and shared memory, and keeps the baseline ``profiles/resources/triton_sm{80,90,100}.json``
  (``python -m bonekern.backends.triton.resources [--write]``).

Runs on CUDA tensors, or on CPU tensors through the Triton interpreter when ``TRITON_INTERPRET=1`` is set
before triton is first imported (that is how the test suite proves the kernels without a GPU).
"""

from __future__ import annotations

import importlib.util

import torch

from ..base import Backend, Config, OpProblem
from . import configs
from .common import interpreting


class TritonBackend(Backend):
    name = "triton"

    def unavailable_reason(self, device: torch.device) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install 'bonekern[triton]')"
        if device.type == "cuda":
            major, _ = torch.cuda.get_device_capability(device)
            if major < 8:
                return f"the Triton kernels need compute capability 8.0 or newer; this GPU has {major}.x"
            return None
        if device.type == "cpu" and interpreting():
            return None
        return (
            f"Triton kernels run on CUDA GPUs, not on {device.type} "
            "(set TRITON_INTERPRET=1 before importing triton to run them on CPU tensors through the interpreter)"
        )

    def default_config(self, problem: OpProblem) -> Config:
        return configs.default_config(problem)

    def configs(self, problem: OpProblem) -> list[Config]:
        return configs.candidate_configs(problem)

    def bone_forward(self, x, weight, block, bias, config):
        from . import bone

        return bone.bone_forward(x, weight, block, bias, config)

    def bone_backward(self, dy, s, weight, block, need_dx, need_dblock, config):
        from . import bone

        return bone.bone_backward(dy, s, weight, block, need_dx, need_dblock, config)

    def bat_forward(self, x, weight, block, bias, config):
        from . import bat

        return bat.bat_forward(x, weight, block, bias, config)

    def bat_backward(self, dy, x, weight, block, need_dx, need_dblock, config):
        from . import bat

        return bat.bat_backward(dy, x, weight, block, need_dx, need_dblock, config)
