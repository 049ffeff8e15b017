"""``backend="triton"``: hand-written Triton kernels for forward and backward of bone, mini and bat.

Layout of this package (importing it never imports triton; kernels load on first use):

- ``tiles.py``: every shipped tile set, one encoding (``Tile``, named like "m128n64k64w8s3"), per architecture
  family (``arch_of``: "sm80" / "sm90" / "interpreter"), dtype family (``dtype_family``: "half" / "fp32") and, for
  bat, r class;
- ``configs.py``: one typed, frozen config dataclass per op with its JSON dict form (``from_dict`` / ``to_dict``),
  every candidate and default (built from ``tiles.py``), and ``prepare``, which validates a chosen config once;
- ``common.py``: what every kernel module shares, without importing triton: ``LaunchSpec`` (everything one launch
  needs besides its tensors), ``KernelEnv`` (GPU or interpreter, torch's TF32 flag, SM count), the int64-offset
  decision (``needs_int64``), ``AotCase`` and ``aot_case``, the one description of a kernel specialisation to
  compile ahead of time;
- ``bone.py``: bone/mini kernels, ``bone_forward_launch`` / ``bone_backward_launch`` (typed config, dtypes and
  sizes -> every launch of the op), the host functions that call them and ``aot_cases()`` built from the same
  launch functions; ``bat.py``: the same for bat (``aot_cases()`` also returns the specialisations outside the
  shipped inputs, checked but not stored); ``adapter.py``: the bone/mini adapter term alone (group sum with fused
  dropout, S D, and the backward's dx with the regenerated mask), reusing bone.py's group-sum, T and dblock kernels;
- ``dropout.py``: the counter-based dropout mask of :mod:`bonekern.dropout` as a ``@triton.jit`` function;
- ``resources.py``: compiles every module's ``aot_cases()`` for sm_80 / sm_90 / sm_100 without a GPU, checks registers,
  spills and shared memory, and keeps one baseline per Triton minor version,
  ``profiles/resources/triton-<X.Y>/triton_sm{80,90,100}.json``
  (``python -m bonekern.backends.triton.resources [--write]``).

A call, e.g. bone forward: ``TritonBackend.prepare_config`` (once per decision) -> ``configs.prepare`` ->
``BoneForwardConfig``; then per call ``TritonBackend.bone_forward`` -> ``bone.bone_forward`` ->
``bone.bone_forward_launch`` (its ``LaunchSpec`` s) -> ``LaunchSpec.__call__`` -> ``_bone_fwd_kernel``.

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
    verify_before_use = True

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

    def prepare_config(self, problem: OpProblem, config: Config) -> configs.TritonConfig:
        """The op's typed config (:mod:`configs`), validated once; bat's missing entries come from the default."""
        return configs.prepare(problem, config)

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

    def adapter_forward(self, x, block, out_features, dropout, config):
        from . import adapter

        return adapter.adapter_forward(x, block, out_features, dropout, config)

    def adapter_backward(self, dy, s, block, in_features, dropout, need_dx, need_dblock, config):
        from . import adapter

        return adapter.adapter_backward(dy, s, block, in_features, dropout, need_dx, need_dblock, config)
