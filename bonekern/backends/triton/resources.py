"""Ahead-of-time compile of every Triton kernel x shipped config x dtype for sm_80, sm_90 and sm_100, with no GPU.

For each :class:`~bonekern.backends.triton.common.AotCase` that a kernel module's ``aot_cases()`` returns (bone.py,
bat.py and adapter.py, :data:`KERNEL_MODULES`), and each target whose config family (:data:`FAMILY`) ships the case,
``triton.compile`` builds the cubin for ``GPUTarget("cuda", 80|90|100, 32)``; shared memory comes from the compiled
metadata, registers and spills from the log of the ptxas Triton itself runs (its bundled ``ptxas``, CUDA 12.8, below
sm_100; its ``ptxas-blackwell``, CUDA 13.1, from sm_100 on; the system ptxas is too old for Triton's PTX). For sm_90
the same PTX of every case near the register limit also goes through ``ptxas-blackwell``, held to the same rules.
Every launch is modelled as the aligned, contiguous one the kernels see in training: 16-byte-aligned pointers, unit
inner strides (Triton specialises a stride of 1 to a constant), every other integer argument divisible by 16
(``tt.divisibility=16``, as Triton's launcher marks them).

Rules (:func:`problems`): every case compiles, does not spill (fp64 on sm_100 excepted: :data:`SPILLS_TOLERATED`),
fits 255 registers and the architecture's shared memory; a baseline case (``in_baseline``) uses no more spills or
shared memory than the running Triton's ``profiles/resources/triton-<major.minor>/triton_<arch>.json`` stores.
Cases with ``in_baseline=False`` (specialisations outside the shipped inputs: fp64, int64 offsets, ...) are held to
the absolute rules only and are not stored.

Compiles run in worker processes without ``TRITON_INTERPRET`` (so the kernels and the ``@triton.jit`` helpers they
call are real ``JITFunction`` objects even when the caller, e.g. the test suite, interprets), with Triton's cache
off so ptxas always runs and logs.

Usage::

    python -m bonekern.backends.triton.resources            # compile, print, compare (exit 1 on a problem)
    python -m bonekern.backends.triton.resources --write    # regenerate the running Triton's baselines
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

from autotune.argtypes import run_guarded, up_to_cpus

from .common import AotCase

KERNEL_MODULES: tuple[str, ...] = ("bone", "bat", "adapter", "bat_packed")
"""Modules of this package whose ``aot_cases()`` are compiled (each returns a list of AotCase)."""

ARCHS: dict[str, int] = {"sm80": 80, "sm90": 90, "sm100": 100}
"""Compile target -> compute capability passed to ``GPUTarget``; each has its own baseline file."""

FAMILY: dict[str, str] = {"sm80": "sm80", "sm90": "sm90", "sm100": "sm90"}
"""Compile target -> the config family (``tiles.arch_of``) whose tables a GPU of that target launches: datacenter
Blackwell (B200, sm_100) runs Hopper's tables, so they are compiled for both."""

SHARED_LIMIT: dict[str, int] = {"sm80": 99 * 1024, "sm90": 227 * 1024, "sm100": 227 * 1024}
"""Largest dynamic shared memory one block may opt in to on the smallest GPU of each target: "sm80" configs also
run on sm_86 / sm_89 (99 KiB; A100 has 163 KiB); H100 / H200 and B200 allow 227 KiB."""

SPILLS_TOLERATED: dict[str, frozenset[str]] = {"sm100": frozenset({"fp64"})}
"""Per target, x dtypes whose spills are printed but not failed (only in checked-only cases: the baseline has no
fp64). fp64 is the validation dtype (the tests' float64 comparisons); on sm_100, ptxas-blackwell spills the fp64 bat
kernels that fit sm_80 and sm_90 (the r = 8 forward, at 32 registers, by 21 KB; every tile set tried spills at some
r). That costs fp64 speed on B200, not correctness; a table of fp64 tiles for sm_100 would remove it."""

MAX_REGISTERS = 255
"""Per-thread register limit of the architecture; a kernel at the limit is likely to spill elsewhere."""

RESOURCES_DIR = Path(__file__).resolve().parents[3] / "profiles" / "resources"
"""Where the baselines live: one folder per Triton minor version, ``triton-<major.minor>/triton_<arch>.json``
(each Triton release compiles the same kernels to different registers and shared memory)."""

SECOND_PTXAS: dict[str, str] = {"sm90": "ptxas-blackwell"}
"""Per architecture, a second bundled ptxas that compiles the same PTX (``--gpu-name=sm_90a``) and is held to the
same spill and register rules: the ptxas of a newer CUDA, which a newer Triton or ``TRITON_PTXAS_PATH`` may run."""

SECOND_PTXAS_FROM_REGISTERS = 160
"""The second ptxas runs on a case only when Triton's ptxas gives it at least this many registers. Below, spilling
under the other would take 96 more registers; over the 105 sm_90 cases of the baseline, compiled with both when
this was written, the two differed by at most 24 (and never in spills)."""

_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_COMPILE_ENV = {"TRITON_INTERPRET": "0", "TRITON_ALWAYS_COMPILE": "1", "TRITON_DUMP_PTXAS_LOG": "1"}


def case_key(case: AotCase) -> str:
    """The baseline key of a case: ``kernel/config_name/dtype``."""
    return f"{case.kernel}/{case.config_name}/{case.dtype}"


def all_cases() -> list[AotCase]:
    """Every case of every module in :data:`KERNEL_MODULES`, in a stable order; keys must be unique."""
    cases = []
    for name in KERNEL_MODULES:
        cases.extend(importlib.import_module(f"{__package__}.{name}").aot_cases())
    keys = [case_key(c) for c in cases]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"AOT case keys must be unique; duplicated: {duplicates}")
    return cases


def checked_only_keys(cases: Iterable[AotCase] | None = None) -> set[str]:
    """Keys of the cases held to the absolute rules only (``in_baseline=False``), of ``cases`` or all cases."""
    return {case_key(c) for c in (all_cases() if cases is None else cases) if not c.in_baseline}


def _ptxas_figures(log: str) -> tuple[int, int, int] | None:
    """(registers, spill store bytes, spill load bytes) from the last kernel of a ``ptxas -v`` log."""
    registers = _PTXAS_REGISTERS.findall(log)
    spills = _PTXAS_SPILLS.findall(log)
    if not registers or not spills:
        return None
    return int(registers[-1]), int(spills[-1][0]), int(spills[-1][1])


def _second_ptxas(arch: str, ptx: str) -> dict[str, int]:
    """Registers and spill bytes of :data:`SECOND_PTXAS` on ``ptx``, with the flags Triton passes its own ptxas."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / SECOND_PTXAS[arch]
    if not tool.exists():
        raise FileNotFoundError(f"{tool} is missing: this triton package ships without {tool.name}")
    with tempfile.TemporaryDirectory(prefix="bonekern-ptxas-") as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [str(tool), "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{ARCHS[arch]}a", str(src), "-o", f"{src}.o"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    figures = _ptxas_figures(out.stdout + out.stderr)
    if figures is None:
        raise RuntimeError(f"no -v report from {tool.name}; got:\n{(out.stdout + out.stderr)[-2000:]}")
    return {"registers": figures[0], "spills": figures[1] + figures[2]}


def compile_case(case: AotCase, arch: str) -> dict[str, Any]:
    """Compile one case for ``arch`` and return its resources: registers, spill_stores, spill_loads, shared,
    num_warps, num_stages, and for an arch in :data:`SECOND_PTXAS` the second ptxas's registers and spills (from
    :data:`SECOND_PTXAS_FROM_REGISTERS` registers on).

    Needs real ``@triton.jit`` kernels (their modules imported without TRITON_INTERPRET) and TRITON_ALWAYS_COMPILE=1
    with TRITON_DUMP_PTXAS_LOG=1, else ptxas may not run and the registers are unknown; :func:`measure` sets all of
    that up in its workers."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    if not isinstance(case.fn, JITFunction):
        raise TypeError(
            f"{case_key(case)}: {type(case.fn).__name__} is not a JITFunction; import the kernels with "
            "TRITON_INTERPRET unset (measure() compiles in such worker processes)"
        )
    attrs = {
        (case.fn.arg_names.index(name),): [["tt.divisibility", 16]]
        for name, kind in case.signature.items()
        if kind != "constexpr"
    }
    src = ASTSource(fn=case.fn, signature=case.signature, constexprs=case.constexprs, attrs=attrs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(
            src,
            target=GPUTarget("cuda", ARCHS[arch], 32),
            options={"num_warps": case.num_warps, "num_stages": case.num_stages},
        )
    figures = _ptxas_figures(log.getvalue())
    if figures is None:
        raise RuntimeError(f"no ptxas -v log for {case_key(case)} on {arch}; got:\n{log.getvalue()[-2000:]}")
    out: dict[str, Any] = {
        "registers": figures[0],
        "spill_stores": figures[1],
        "spill_loads": figures[2],
        "shared": int(compiled.metadata.shared),
        "num_warps": case.num_warps,
        "num_stages": case.num_stages,
    }
    if arch in SECOND_PTXAS and figures[0] >= SECOND_PTXAS_FROM_REGISTERS:
        out[SECOND_PTXAS[arch]] = _second_ptxas(arch, compiled.asm["ptx"])
    return out


@functools.cache
def _cases_in_worker() -> list[AotCase]:
    return all_cases()


def _worker(job: tuple[int, str]) -> tuple[str, str, dict[str, Any] | str]:
    index, arch = job
    case = _cases_in_worker()[index]
    try:
        return arch, case_key(case), compile_case(case, arch)
    except Exception as e:  # reported by the caller: a case that does not compile is a failure, not a crash
        return arch, case_key(case), f"{type(e).__name__}: {str(e)[-1500:]}"


@contextlib.contextmanager
def _compile_environment() -> Iterator[None]:
    """Environment the spawned workers inherit: real kernels (no interpreter), no cache, ptxas log printed."""
    saved = {k: os.environ.get(k) for k in (*_COMPILE_ENV, "TRITON_CACHE_DIR")}
    with tempfile.TemporaryDirectory(prefix="bonekern-aot-") as cache:
        os.environ.update(_COMPILE_ENV, TRITON_CACHE_DIR=cache)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def measure(
    archs: Iterable[str] = tuple(ARCHS), only: str | None = None, processes: int | None = None
) -> dict[str, dict[str, dict[str, Any] | str]]:
    """Compile every case (whose key contains ``only``, if given) for each arch it is shipped for.

    Returns ``{arch: {case_key: resources or an error string}}``. Runs in ``processes`` spawned workers
    (default: one per CPU).
    """
    cases = all_cases()
    jobs = [
        (i, arch)
        for i, case in enumerate(cases)
        for arch in archs
        if FAMILY[arch] in case.archs and (only is None or only in case_key(case))
    ]
    out: dict[str, dict[str, dict[str, Any] | str]] = {arch: {} for arch in archs}
    processes = max(1, min(processes or os.cpu_count() or 1, len(jobs) or 1))
    with _compile_environment():
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(processes) as pool:
            for arch, key, result in pool.imap_unordered(_worker, jobs):
                out[arch][key] = result
    return {arch: dict(sorted(results.items())) for arch, results in out.items()}


def triton_minor(version: str | None = None) -> str:
    """``"3.7"`` for Triton ``3.7.1`` (``version`` or the installed one): the baselines are kept per minor version."""
    if version is None:
        import triton

        version = triton.__version__
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"version: expected a Triton version such as '3.7.1', got {version!r}")
    return f"{match[1]}.{match[2]}"


def baseline_dir(version: str | None = None) -> Path:
    """The baseline folder of Triton ``version`` (default: the installed one): ``profiles/resources/triton-X.Y``."""
    return RESOURCES_DIR / f"triton-{triton_minor(version)}"


def baseline_path(arch: str, version: str | None = None) -> Path:
    """The baseline file of ``arch`` for Triton ``version`` (default: the installed one)."""
    return baseline_dir(version) / f"triton_{arch}.json"


def load_baseline(arch: str) -> dict[str, dict[str, Any]]:
    """The stored ``{case_key: resources}`` for ``arch`` (empty when no baseline exists)."""
    path = baseline_path(arch)
    if not path.exists():
        return {}
    return json.loads(path.read_text())["kernels"]


def write_baseline(arch: str, results: dict[str, dict[str, Any] | str]) -> Path:
    """Store ``results`` for ``arch`` (the baseline cases only: pass them without the checked-only keys); refuses
    when a case failed to compile."""
    import triton

    failed = {k: v for k, v in results.items() if isinstance(v, str)}
    if failed:
        raise RuntimeError(f"cannot write a baseline with failed compiles on {arch}: {failed}")
    path = baseline_path(arch)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "arch": arch,
        "compute_capability": ARCHS[arch],
        "triton": triton.__version__,
        "shared_limit_bytes": SHARED_LIMIT[arch],
        "regenerate": "python -m bonekern.backends.triton.resources --write",
        "launch_model": "16-byte-aligned pointers, unit inner strides, other integer arguments divisible by 16",
        "kernels": results,
    }
    head = json.dumps({k: v for k, v in doc.items() if k != "kernels"}, indent=1)[:-2]
    rows = ",\n".join(f"  {json.dumps(key)}: {json.dumps(res)}" for key, res in results.items())
    path.write_text(f'{head},\n "kernels": {{\n{rows}\n }}\n}}\n')  # one line per case: readable diffs
    json.loads(path.read_text())
    return path


def problems(
    arch: str,
    results: dict[str, dict[str, Any] | str],
    baseline: dict[str, dict[str, Any]],
    checked_only: Collection[str] = (),
) -> list[str]:
    """Every reason the ``results`` of ``arch`` are not acceptable, one line each (empty list: all fine).

    Rules: compiles; no spills (but for :data:`SPILLS_TOLERATED`); registers <= 255 (with every ptxas in the
    results); shared memory within the
    architecture's limit; and, for every key not in ``checked_only``: no more spills or shared memory than the
    baseline stores, every case is in the baseline and every baseline entry still exists (regenerate with
    ``--write`` after adding or removing a kernel or config).
    """
    out = []
    for key, res in results.items():
        where = f"{arch} {key}"
        if isinstance(res, str):
            out.append(f"{where}: does not compile: {res}")
            continue
        spills = res["spill_stores"] + res["spill_loads"]
        if spills and key.rsplit("/", 1)[-1] not in SPILLS_TOLERATED.get(arch, ()):
            out.append(f"{where}: spills ({res['spill_stores']} B stores, {res['spill_loads']} B loads)")
        if res["registers"] > MAX_REGISTERS:
            out.append(f"{where}: {res['registers']} registers > {MAX_REGISTERS}")
        second = SECOND_PTXAS.get(arch)
        if second in res:
            if res[second]["spills"]:
                out.append(f"{where}: spills {res[second]['spills']} B with {second}")
            if res[second]["registers"] > MAX_REGISTERS:
                out.append(f"{where}: {res[second]['registers']} registers > {MAX_REGISTERS} with {second}")
        if res["shared"] > SHARED_LIMIT[arch]:
            out.append(f"{where}: {res['shared']} B shared memory > the {SHARED_LIMIT[arch]} B limit")
        if key in checked_only:
            continue
        base = baseline.get(key)
        if base is None:
            out.append(f"{where}: not in the baseline {baseline_path(arch).name} (regenerate with --write)")
            continue
        if spills > base["spill_stores"] + base["spill_loads"]:
            out.append(f"{where}: spills grew from the baseline's {base['spill_stores'] + base['spill_loads']} B")
        if res["shared"] > base["shared"]:
            out.append(f"{where}: shared memory grew from {base['shared']} B to {res['shared']} B")
    for key in baseline.keys() - results.keys():
        out.append(f"{arch} {key}: in the baseline but no longer compiled (regenerate with --write)")
    return out


def format_table(arch: str, results: dict[str, dict[str, Any] | str], checked_only: Collection[str] = ()) -> str:
    """One line per case: registers, spill bytes, shared bytes, warps, stages; "*" marks checked-only cases."""
    lines = [f"{arch}: {'case':<66} {'regs':>5} {'spill':>6} {'shared':>8} {'warps':>5} {'stages':>6}"]
    for key, res in results.items():
        name = f"{key}{' *' if key in checked_only else ''}"
        if isinstance(res, str):
            lines.append(f"{arch}: {name:<66} FAILED {res.splitlines()[0] if res else ''}")
        else:
            spill = res["spill_stores"] + res["spill_loads"]
            lines.append(
                f"{arch}: {name:<66} {res['registers']:>5} {spill:>6} {res['shared']:>8} "
                f"{res['num_warps']:>5} {res['num_stages']:>6}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="regenerate the baseline JSON files")
    parser.add_argument("--arch", choices=sorted(ARCHS), action="append", help="only this architecture")
    parser.add_argument("--only", help="only cases whose key contains this string (not with --write)")
    parser.add_argument(
        "--processes", type=up_to_cpus, default=None, help="worker processes, at most the CPUs (default: CPU count)"
    )
    args = parser.parse_args(argv)
    if args.write and args.only:
        parser.error("--write regenerates whole baselines; drop --only")
    archs = tuple(args.arch or ARCHS)
    results = measure(archs, args.only, args.processes)
    checked_only = checked_only_keys()
    status = 0
    for arch in archs:
        print(format_table(arch, results[arch], checked_only))
        if args.write:
            stored = {k: v for k, v in results[arch].items() if k not in checked_only}
            print(f"wrote {write_baseline(arch, stored)}")
        baseline = load_baseline(arch)
        if args.only:
            baseline = {k: v for k, v in baseline.items() if args.only in k}
        found = problems(arch, results[arch], baseline, checked_only)
        for line in found:
            print(f"PROBLEM {line}", file=sys.stderr)
        status |= bool(found)
    return status


if __name__ == "__main__":
    sys.exit(run_guarded(main, prog="python -m bonekern.backends.triton.resources"))
