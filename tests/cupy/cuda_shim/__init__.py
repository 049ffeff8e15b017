"""The CUDA host shim's launcher: runs the CuPy backend's .cu kernels on CPU tensors (test infrastructure only).

Each kernel file is compiled by g++ -fopenmp together with ``cuda_shim.h`` (see its header comment for the execution
model) into a small shared library, in a temporary directory, once per test session and on first use. The library
lists every ``extern "C"`` kernel with its parameter signature; :class:`ShimLauncher` checks each launch's arguments
against it (tensor vs integer, and the tensor dtype against the pointer type) before running the grid, and turns a
failed launch-geometry check or ``BK_CHECK`` inside a kernel into an exception.

``install()`` registers the launcher for "cpu" tensors in :mod:`bonekern.backends.cupy.launcher`, which makes
``backend="cupy"`` available on the CPU for the whole session (tests/conftest.py does this).
"""

from __future__ import annotations

import atexit
import collections
import ctypes
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from bonekern.backends.cupy import launcher as launcher_module
from bonekern.backends.cupy.sources import KERNEL_FILES, kernel_names, kernels_dir

SHIM_DIR = Path(__file__).resolve().parent

CXX = "g++"
CXXFLAGS = ("-std=c++17", "-O1", "-fopenmp", "-fPIC", "-shared", "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas")
"""No -ffast-math: the software fp16 rounding relies on IEEE float addition."""

_POINTER_CODES = {torch.float16: "H", torch.bfloat16: "B", torch.float32: "F", torch.float64: "D"}

_ERRORS = {
    1: "a grid or block dimension is zero",
    2: "the block has more than 1024 threads (or blockDim.z > 64)",
    3: "the grid exceeds CUDA's limits (x < 2^31, y and z <= 65535)",
    4: "OpenMP did not provide one thread per CUDA thread of the block",
}


def _registration_unit(source: str) -> str:
    """C++ that includes one .cu file under the shim and lists its kernels for ctypes."""
    names = kernel_names(source)
    entries = ",\n".join(f'    {{"{n}", bk_shim::signature(&{n}), &launch_one<&{n}>}}' for n in names)
    return f"""#include "cuda_shim.h"
#include "{source}"

#define BK_SHIM_API extern "C" __attribute__((visibility("default")))

namespace {{
struct Entry {{
    const char* name;
    const char* signature;
    int (*launch)(const unsigned*, const unsigned*, void**);
}};
template <auto Kernel>
int launch_one(const unsigned* grid, const unsigned* block, void** args) {{
    return bk_shim::launch(Kernel, grid, block, args);
}}
const Entry entries[] = {{
{entries}
}};
}}  // namespace

BK_SHIM_API int bk_shim_count() {{ return {len(names)}; }}
BK_SHIM_API const char* bk_shim_name(int i) {{ return entries[i].name; }}
BK_SHIM_API const char* bk_shim_signature(int i) {{ return entries[i].signature; }}
BK_SHIM_API int bk_shim_launch(int i, const unsigned* grid, const unsigned* block, void** args) {{
    return entries[i].launch(grid, block, args);
}}
BK_SHIM_API const char* bk_shim_failure() {{ return bk_shim::first_failure.c_str(); }}
"""


class ShimBuildError(RuntimeError):
    """g++ could not build the host shim: the message holds the compiler's output."""


class _Library:
    """One compiled kernel file: kernel name -> (index, signature)."""

    def __init__(self, path: Path) -> None:
        self.lib = ctypes.CDLL(str(path))
        self.lib.bk_shim_name.restype = ctypes.c_char_p
        self.lib.bk_shim_signature.restype = ctypes.c_char_p
        self.lib.bk_shim_failure.restype = ctypes.c_char_p
        self.lib.bk_shim_launch.argtypes = [
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_uint),
            ctypes.POINTER(ctypes.c_uint),
            ctypes.POINTER(ctypes.c_void_p),
        ]
        self.kernels = {
            self.lib.bk_shim_name(i).decode(): (i, self.lib.bk_shim_signature(i).decode())
            for i in range(self.lib.bk_shim_count())
        }


def build(build_dir: Path) -> dict[str, Path]:
    """Compile every kernel file with the shim (in parallel); returns source -> shared library path."""
    procs = {}
    for source in KERNEL_FILES:
        stem = Path(source).stem
        unit = build_dir / f"{stem}_shim.cpp"
        unit.write_text(_registration_unit(source))
        out = build_dir / f"{stem}_shim.so"
        cmd = [CXX, *CXXFLAGS, f"-I{SHIM_DIR}", f"-I{kernels_dir()}", str(unit), "-o", str(out)]
        procs[source] = (out, cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    errors = []
    for _, cmd, proc in procs.values():
        output, _ = proc.communicate()
        if proc.returncode != 0:
            errors.append(f"{' '.join(cmd)}\n{output}")
    if errors:
        raise ShimBuildError("building the CUDA host shim failed:\n" + "\n".join(errors))
    return {source: out for source, (out, _, _) in procs.items()}


class ShimLauncher(launcher_module.Launcher):
    """Runs kernels on CPU tensors through the host shim; builds the shim on the first launch."""

    def __init__(self) -> None:
        self._libraries: dict[str, _Library] | None = None
        self._lock = threading.Lock()
        # The kernels launched, most recent last: tests use it to prove that kernels (and which variant) did the work.
        self.history: collections.deque[str] = collections.deque(maxlen=10000)

    def unavailable_reason(self, device: torch.device) -> str | None:
        if device.type != "cpu":
            return f"the CUDA host shim runs kernels on CPU tensors only; got {device}"
        return None

    def libraries(self) -> dict[str, _Library]:
        with self._lock:
            if self._libraries is None:
                build_dir = Path(tempfile.mkdtemp(prefix="bonekern-cuda-shim-"))
                atexit.register(shutil.rmtree, build_dir, ignore_errors=True)
                self._libraries = {source: _Library(path) for source, path in build(build_dir).items()}
        return self._libraries

    def signature(self, source: str, kernel: str) -> str:
        kernels = self.libraries()[source].kernels
        if kernel not in kernels:
            raise KeyError(f"{source} defines no kernel {kernel!r}")
        return kernels[kernel][1]

    def launch(self, source, kernel, grid, block, args: Sequence, device):
        library = self.libraries()[source]
        if kernel not in library.kernels:
            raise KeyError(f"{source} defines no kernel {kernel!r}")
        index, signature = library.kernels[kernel]
        if len(args) != len(signature):
            raise TypeError(f"{kernel} takes {len(signature)} arguments ({signature}); got {len(args)}")
        holders = []
        argv = (ctypes.c_void_p * len(args))()
        for i, (arg, code) in enumerate(zip(args, signature, strict=True)):
            if isinstance(arg, torch.Tensor):
                if code != _POINTER_CODES.get(arg.dtype):
                    raise TypeError(f"{kernel} argument {i}: parameter type {code!r}, got a {arg.dtype} tensor")
                if arg.device.type != "cpu":
                    raise ValueError(f"{kernel} argument {i}: the shim needs CPU tensors; got {arg.device}")
                holder = ctypes.c_void_p(arg.data_ptr())
            elif isinstance(arg, int) and not isinstance(arg, bool):
                if code != "q":
                    raise TypeError(f"{kernel} argument {i}: parameter type {code!r}, got the integer {arg}")
                if not -(2**63) <= arg < 2**63:
                    raise OverflowError(f"{kernel} argument {i}: {arg} does not fit in 64 bits")
                holder = ctypes.c_longlong(arg)
            else:
                raise TypeError(f"{kernel} argument {i}: expected a tensor or an int; got {type(arg).__name__}")
            holders.append(holder)
            argv[i] = ctypes.addressof(holder)
        grid3 = (ctypes.c_uint * 3)(*_dims(grid, kernel, "grid"))
        block3 = (ctypes.c_uint * 3)(*_dims(block, kernel, "block"))
        rc = library.lib.bk_shim_launch(index, grid3, block3, argv)
        self.history.append(kernel)
        if rc == 5:
            raise RuntimeError(f"{kernel}: check failed inside the kernel: {library.lib.bk_shim_failure().decode()}")
        if rc:
            raise RuntimeError(f"{kernel}: bad launch (grid {tuple(grid)}, block {tuple(block)}): {_ERRORS[rc]}")


def _dims(dims: Sequence[int], kernel: str, what: str) -> tuple[int, int, int]:
    if len(dims) != 3 or not all(isinstance(d, int) and 0 <= d < 2**32 for d in dims):
        raise ValueError(f"{kernel}: {what} must be three unsigned 32-bit ints; got {dims}")
    return tuple(dims)


_INSTALLED: ShimLauncher | None = None


def install() -> ShimLauncher:
    """Register the shim launcher for CPU tensors (idempotent); returns it."""
    global _INSTALLED
    if _INSTALLED is None:
        _INSTALLED = ShimLauncher()
    launcher_module.install_launcher("cpu", _INSTALLED)
    return _INSTALLED
