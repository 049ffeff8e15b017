"""How a kernel launch reaches a device: the launcher abstraction and its CuPy implementation.

The host code (:mod:`.host`) computes a launch -- source file, kernel name, grid, block, arguments -- and hands it
to the :class:`Launcher` registered for the tensors' device type. On CUDA that is :class:`CupyLauncher`: each ``.cu``
file is compiled by :func:`.nvrtc.nvrtc_compile` for the device's ``sm_XY`` (once per process and architecture;
the cubin is also cached on disk, keyed by source, options, NVRTC version and architecture), loaded per device with
``cupy.RawModule(path=...)``, and its kernels run on torch's current stream with the tensors' own device pointers
(zero-copy; nothing is converted to CuPy arrays).

Arguments are torch tensors (passed as device pointers) and Python ints (passed as 64-bit integers); every kernel
takes exactly these two kinds. The test suite registers a launcher for ``"cpu"`` that compiles the same sources with
the host shim (tests/cupy/cuda_shim), which is how the whole backend runs, and is tested, without a GPU.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import availability_changed
from .nvrtc import NVRTC_OPTIONS, nvrtc_compile
from .sources import load_source

KernelArg = torch.Tensor | int


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
        self._cubins: dict[tuple[str, int], str] = {}
        self._streams: dict[tuple[int, int], Any] = {}

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
            major, minor = torch.cuda.get_device_capability(index)
            module = cupy.RawModule(path=self._cubin(source, 10 * major + minor))
            self._modules[(source, index)] = module
        return module.get_function(kernel)

    def _cubin(self, source: str, arch: int) -> str:
        """Path of the cubin of ``source`` for ``sm_<arch>``: from the disk cache, or compiled now and stored."""
        path = self._cubins.get((source, arch))
        if path is None:
            from cupy_backends.cuda.libs import nvrtc

            key = f"{load_source(source)}\0{NVRTC_OPTIONS}\0{nvrtc.getVersion()}\0{arch}"
            digest = hashlib.sha256(key.encode()).hexdigest()[:24]
            target = _cache_dir() / f"{Path(source).stem}.sm_{arch}.{digest}.cubin"
            if not target.is_file():
                cubin, _ = nvrtc_compile(source, arch, verbose=False)
                partial = target.with_suffix(f".{os.getpid()}.partial")
                partial.write_bytes(cubin)
                os.replace(partial, target)  # atomic: concurrent processes never read half a file
            path = self._cubins[(source, arch)] = str(target)
        return path

    def _stream(self, index: int):
        """A CuPy view of torch's current stream on device ``index`` (created once per stream)."""
        import cupy

        handle = torch.cuda.current_stream(index).cuda_stream
        stream = self._streams.get((index, handle))
        if stream is None:
            stream = cupy.cuda.Stream.from_external(_StreamHandle(handle))
            self._streams[(index, handle)] = stream
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
            # RawKernel launches on CuPy's current stream: make it torch's current stream for this launch.
            with self._stream(index):
                function(tuple(grid), tuple(block), tuple(packed))


class _StreamHandle:
    """The CUDA stream protocol for a raw ``cudaStream_t`` (what ``cupy.cuda.Stream.from_external`` accepts)."""

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.handle)


@functools.cache
def _cache_dir() -> Path:
    """Where compiled cubins are kept: $BONEKERN_CACHE_DIR, else ``cuda/`` in the user cache directory (platformdirs:
    ~/.cache/bonekern/cuda on Linux), a private temporary directory when neither is writable."""
    import platformdirs

    chosen = os.environ.get("BONEKERN_CACHE_DIR")
    directory = Path(chosen) if chosen else Path(platformdirs.user_cache_dir("bonekern", appauthor=False)) / "cuda"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError:
        directory = Path(tempfile.mkdtemp(prefix="bonekern-cuda-"))
    return directory


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
    availability_changed()  # decisions remembered per process (bonekern.dispatch) are stale now
    return previous
