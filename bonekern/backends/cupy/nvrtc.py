"""Compiling a CUDA source for the GPU at run time: THE compile, with NVRTC.

The launcher (:mod:`.launcher`) calls :func:`nvrtc_compile` for the device's ``sm_XY`` and loads the cubin with
``cupy.RawModule``; the ahead-of-time checker (:mod:`.compile`, a development tool that the run-time path never
imports) calls the same function for sm_80 / sm_90 / sm_100 with no GPU present, so what it checks is what runs.
NVRTC comes through CuPy's low-level binding (``cupy_backends.cuda.libs.nvrtc``, in a plain
``pip install 'bonekern[cupy]'``), imported on the first compile, with exactly :data:`NVRTC_OPTIONS` (no
``-ftz``: denormals behave as in torch; CuPy's own ``RawModule(code=...)`` would add ``-ftz=true``).
"""

from __future__ import annotations

from .sources import load_source

NVRTC_OPTIONS: tuple[str, ...] = ("-std=c++17", "-lineinfo")
"""Options of every compile, besides ``-arch=sm_XY`` (and ``-Xptxas=-v`` when figures are wanted)."""


class CompileError(RuntimeError):
    """A compiler rejected a kernel file; the message holds its log."""


def nvrtc_compile(source: str, arch: int, verbose: bool = True) -> tuple[bytes, str]:
    """Compile kernels/``source`` with NVRTC for ``sm_<arch>``; returns (cubin, compiler log).

    verbose: add ``-Xptxas=-v`` so the log holds ptxas's per-kernel figures (it changes nothing in the cubin).
    """
    from cupy_backends.cuda.libs import nvrtc

    program = nvrtc.createProgram(load_source(source), source, [], [])
    try:
        try:
            options = [*NVRTC_OPTIONS, f"-arch=sm_{arch}", *(["-Xptxas=-v"] if verbose else [])]
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError as exc:
            log = nvrtc.getProgramLog(program).replace("\0", "")
            raise CompileError(f"NVRTC could not compile {source} for sm_{arch}: {exc}\n{log}") from exc
        log = nvrtc.getProgramLog(program).replace("\0", "")
        cubin = nvrtc.getCUBIN(program)
    finally:
        nvrtc.destroyProgram(program)
    return cubin, log
