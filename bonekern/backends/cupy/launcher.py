"""How a kernel launch reaches a device: the launcher abstraction and its CuPy implementation.

The host code (:mod:`.kernels`) computes a launch -- source file, kernel name, grid, block, arguments -- and hands it
to the :class:`Launcher` registered for the tensors' device type. On CUDA that is :class:`CupyLauncher`: the ``.cu``
file is compiled once per process and device by ``cupy.RawModule`` (NVRTC, ``-arch=sm_XY`` of that device; CuPy
also caches the cubin on disk) and the kernel runs on torch's current stream with the tensors' own device
pointers (zero-copy; nothing is converted to CuPy arrays).

Arguments are torch tensors (passed as device pointers) and Python ints (passed as 64-bit integers); every kernel
takes exactly these two kinds. The test suite registers a launcher for ``"cpu"`` that compiles the same sources with
the host shim (tests/cuda_shim), which is how the whole backend runs, and is tested, without a GPU.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from .sources import load_source

KernelArg = torch.Tensor | int

NVRTC_OPTIONS: tuple[str, ...] = ("-std=c++17", "-lineinfo")
"""Options every module is compiled with; the launcher (or compile.py for a chosen GPU) adds ``-arch=sm_XY``."""


class Launcher:
    """Runs kernels of bonekern's CUDA sources on one kind of device."""

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None when this launcher can run kernels on ``device``, else one sentence that says why not."""
        raise NotImplementedError

    def launch(
        self,
        source: str,
        kernel: str,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        args: Sequence[KernelArg],
        device: torch.device,
    ) -> None:
        """Run ``kernel`` (defined in kernels/``source``) with the given geometry on ``device``, asynchronously."""
        raise NotImplementedError


class CupyLauncher(Launcher):
    """Compiles with ``cupy.RawModule`` (once per source and device) and launches on torch's current CUDA stream."""

    def __init__(self) -> None:
        self._modules: dict[tuple[str, int], Any] = {}
        self._streams: dict[int, Any] = {}

    def unavailable_reason(self, device: torch.device) -> str | None:
        if device.type != "cuda":
            return f"CuPy kernels need a CUDA GPU; the tensors are on a {device.type} device"
        if not torch.cuda.is_available():
            return "CuPy kernels need a CUDA GPU; torch sees no CUDA device"
        return _cupy_import_error()

    def _function(self, source: str, kernel: str, index: int):
        import cupy

        module = self._modules.get((source, index))
        if module is None:
            module = cupy.RawModule(code=load_source(source), options=NVRTC_OPTIONS, backend="nvrtc")
            self._modules[(source, index)] = module
        return module.get_function(kernel)

    def _stream(self, handle: int):
        """A CuPy view of the torch stream ``handle`` (created once per stream)."""
        import cupy

        stream = self._streams.get(handle)
        if stream is None:
            stream = cupy.cuda.Stream.from_external(_StreamHandle(handle))
            self._streams[handle] = stream
        return stream

    def launch(self, source, kernel, grid, block, args, device):
        import cupy
        import numpy as np

        index = device.index if device.index is not None else torch.cuda.current_device()
        packed = []
        for arg in args:
            if isinstance(arg, torch.Tensor):
                if arg.device != torch.device("cuda", index):
                    raise ValueError(f"{kernel}: argument on {arg.device}, expected cuda:{index}")
                packed.append(np.uint64(arg.data_ptr()))
            else:
                packed.append(np.int64(arg))
        with cupy.cuda.Device(index):
            function = self._function(source, kernel, index)
            stream = self._stream(torch.cuda.current_stream(index).cuda_stream)
            function(tuple(grid), tuple(block), tuple(packed), stream=stream)


class _StreamHandle:
    """The CUDA stream protocol for a raw ``cudaStream_t`` (what ``cupy.cuda.Stream.from_external`` accepts)."""

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.handle)


@functools.cache
def _cupy_import_error() -> str | None:
    try:
        import cupy  # noqa: F401
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as exc:  # ImportError, or NVRTC's shared library missing
        return f"CuPy with NVRTC is needed (pip install 'bonekern[cupy]'): {type(exc).__name__}: {exc}"
    return None


_LAUNCHERS: dict[str, Launcher] = {"cuda": CupyLauncher()}


def launcher_for(device: torch.device) -> Launcher | None:
    """The launcher registered for ``device.type`` (CuPy for "cuda"; none for the CPU unless a test installed one)."""
    return _LAUNCHERS.get(device.type)


def install_launcher(device_type: str, launcher: Launcher | None) -> Launcher | None:
    """Register ``launcher`` for a device type (None removes it); returns the one it replaces.

    The test suite installs the host-shim launcher for "cpu" so the backend's kernels run on CPU tensors.
    """
    previous = _LAUNCHERS.pop(device_type, None)
    if launcher is not None:
        _LAUNCHERS[device_type] = launcher
    return previous
