"""The CuPy backend's CUDA sources compile for sm_80, sm_90 and sm_100 without a GPU, within the hardware's resources.

- NVRTC (CuPy's compiler, the exact source text and options used at run time plus ``-arch``): every kernel
  builds, and its ptxas figures (registers, spills, shared memory) are checked against the limits and against the
  baseline in profiles/resources/cuda_sm{80,90,100}.json (regenerate with :data:`compile.REGENERATE`).
- nvcc (``nvcc -cubin -arch=sm_XY -Xptxas -v``) where the CUDA toolkit is installed: the same checks.
- The vectorised kernels really issue 16-byte global memory accesses (PTX).

All compiles run once per session, concurrently (NVRTC in threads, nvcc as subprocesses).
"""

from __future__ import annotations

import functools
import re
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from bonekern.backends.cupy import compile as cc
from bonekern.backends.cupy.sources import kernel_names, load_source
from tests.support import ROOT

pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="CuPy is not installed (pip install 'bonekern[cupy]')")

BASELINES = ROOT / "profiles" / "resources"


@functools.cache
def _compiles() -> dict[tuple[str, int], Future]:
    """Start every compile at once: NVRTC per arch (each compiles the files in threads), nvcc per arch."""
    pool = ThreadPoolExecutor(4)
    jobs = {("nvrtc", arch): pool.submit(cc.resource_table, arch, "nvrtc") for arch in cc.ARCHS}
    nvcc = cc.find_nvcc()
    if nvcc is not None:
        jobs.update({("nvcc", arch): pool.submit(cc.resource_table, arch, "nvcc", nvcc) for arch in cc.ARCHS})
    pool.shutdown(wait=False)
    return jobs


def table(compiler: str, arch: int) -> dict[str, cc.KernelResources]:
    job = _compiles().get((compiler, arch))
    if job is None:
        pytest.skip("nvcc is not installed (the CUDA toolkit); the NVRTC checks cover the same sources")
    return job.result()


@pytest.mark.parametrize("compiler", ["nvrtc", "nvcc"])
@pytest.mark.parametrize("arch", cc.ARCHS)
def test_every_kernel_compiles_within_limits(compiler, arch):
    figures = table(compiler, arch)
    assert sorted(figures) == sorted(kernel_names()), "kernels in the .cu files differ from sources.FAMILIES"
    baseline = cc.read_baseline(BASELINES, arch)
    assert not cc.check_resources(figures, arch, baseline)
    for name, res in figures.items():
        assert 0 < res.registers <= cc.REGISTER_LIMIT, name


@pytest.mark.parametrize("arch", cc.ARCHS)
def test_baseline_is_current(arch):
    """The stored figures are for exactly today's kernels; registers may move, spills may not appear."""
    baseline = cc.read_baseline(BASELINES, arch)
    figures = table("nvrtc", arch)
    assert sorted(baseline) == sorted(figures), f"kernels changed: regenerate with `{cc.REGENERATE}`"
    assert all(res.spill_stores == res.spill_loads == 0 for res in baseline.values()), "the baseline has spills"


def test_check_resources_reports_each_problem():
    ok = cc.KernelResources(registers=64, spill_stores=0, spill_loads=0, stack_bytes=0, shared_bytes=8192)
    assert cc.check_resources({"k": ok}, 90) == []
    bad = {
        "regs": cc.KernelResources(256, 0, 0, 0, 0),
        "spill": cc.KernelResources(255, 8, 8, 8, 0),
        "smem": cc.KernelResources(32, 0, 0, 0, 164 * 1024),
    }
    assert len(cc.check_resources(bad, 80)) == 3
    assert len(cc.check_resources(bad, 90)) == 2  # 164 KiB fits sm_90's 227 KiB
    assert cc.check_resources({"spill": bad["spill"]}, 90, baseline={"spill": bad["spill"]}) == []


def test_parse_ptxas_log():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'bk_a' for 'sm_90'
ptxas info    : Function properties for bk_a
ptxas         .     16 bytes stack frame, 12 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 16 bytes cumulative stack size, 18560 bytes smem
ptxas info    : Compiling entry function 'bk_b' for 'sm_90'
ptxas info    : Function properties for bk_b
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 28 registers, used 0 barriers, 380 bytes cmem[0]
"""
    assert cc.parse_ptxas(log) == {
        "bk_a": cc.KernelResources(64, 12, 12, 16, 18560),
        "bk_b": cc.KernelResources(28, 0, 0, 0, 0),
    }


def test_vector_kernels_issue_16_byte_accesses():
    """PTX (NVRTC, compute_90) of the vec16 kernels loads x / dx with 128-bit instructions; the scalar ones don't."""
    from cupy_backends.cuda.libs import nvrtc

    wide = re.compile(r"\b(ld|st)\.global(\.nc)?\.(v4\.(u32|f32|b32)|v2\.(f64|u64|b64))\b")
    for source, family in (("group_sum.cu", "group_sum"), ("bone.cu", "bone_add_grouped")):
        program = nvrtc.createProgram(load_source(source), source, [], [])
        try:
            nvrtc.compileProgram(program, ["-std=c++17", "-arch=compute_90"])
            ptx = nvrtc.getPTX(program).decode()
        finally:
            nvrtc.destroyProgram(program)
        entries = dict(re.findall(r"\.entry (\w+)\((.*?)\n\}", ptx, flags=re.S))
        names = [n for n in kernel_names(source) if n.startswith(f"bk_{family}_")]
        assert names and set(names) <= set(entries)
        for name in names:
            assert bool(wide.search(entries[name])) == name.endswith("_vec16"), name
