"""``backend="cupy"``: CUDA C++ kernels (``kernels/*.cu``) launched through CuPy on torch's stream, around cuBLAS.

Modules: :mod:`.backend` (the :class:`CupyBackend` operations), :mod:`.host` (one host function per kernel:
checks, instantiation choice, launch geometry), :mod:`.launcher` (CuPy launches; the launcher registry the test
suite's CPU host shim plugs into), :mod:`.sources` (the .cu files and kernel names), :mod:`.nvrtc` (the run-time
NVRTC compile). The development tool :mod:`.compile` (``python -m bonekern.backends.cupy.compile``: NVRTC/nvcc
ahead-of-time compiles and ptxas resource figures, for checks without a GPU) is never imported at run time.

Importing this package never imports CuPy; that happens on the first launch.
"""

from __future__ import annotations

from .backend import CupyBackend

__all__ = ["CupyBackend"]
