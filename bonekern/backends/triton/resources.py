"""Ahead-of-time compile of every Triton kernel x shipped config x dtype for sm_80 and sm_90, with no GPU.

For each :class:`~bonekern.backends.triton.common.AotCase` that a kernel module's ``aot_cases()`` returns, and each
architecture the case is shipped for, ``triton.compile`` builds the cubin for ``GPUTarget("cuda", 80|90, 32)``;
shared memory comes from the compiled metadata, registers and spills from the log of Triton's bundled ptxas (the
one Triton itself runs; the system ptxas is too old for Triton's PTX). Every launch is modelled as the aligned,
contiguous one the kernels see in training: 16-byte-aligned pointers, unit inner strides (Triton specialises a
stride of 1 to a constant), every other integer argument divisible by 16.

Compiles run in worker processes without ``TRITON_INTERPRET`` (so the kernels are real ``JITFunction`` objects even
when the caller, e.g. the test suite, interprets), with Triton's cache off so ptxas always runs and logs.

Usage::

    python -m bonekern.backends.triton.resources            # compile, print, compare (exit 1 on a regression)
    python -m bonekern.backends.triton.resources --write    # regenerate profiles/resources/triton_sm{80,90}.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import multiprocessing
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .common import AotCase

KERNEL_MODULES: tuple[str, ...] = ("bone",)
"""Modules of this package whose ``aot_cases()`` are compiled (each returns a list of AotCase)."""

ARCHS: dict[str, int] = {"sm80": 80, "sm90": 90}
"""Architecture name -> compute capability passed to ``GPUTarget``."""

SHARED_LIMIT: dict[str, int] = {"sm80": 163 * 1024, "sm90": 227 * 1024}
"""Largest dynamic shared memory one block may opt in to (A100: 163 KiB; H100/H200: 227 KiB)."""

MAX_REGISTERS = 255
"""Per-thread register limit of the architecture; a kernel at the limit is likely to spill elsewhere."""

BASELINE_DIR = Path(__file__).resolve().parents[3] / "profiles" / "resources"
"""Where the baseline lives: ``triton_<arch>.json``."""

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


def _as_jit(fn: Any) -> Any:
    """A ``JITFunction`` for ``fn``: itself, or one rebuilt from the Python function an interpreted kernel wraps
    (only for kernels without nested @triton.jit helpers; the workers below never interpret)."""
    from triton.runtime.jit import JITFunction

    return fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)


def compile_case(case: AotCase, arch: str) -> dict[str, int]:
    """Compile one case for ``arch`` and return its resources: registers, spill_stores, spill_loads, shared,
    num_warps, num_stages. Must run with TRITON_ALWAYS_COMPILE=1 and TRITON_DUMP_PTXAS_LOG=1 (see
    :func:`measure`), else ptxas may not run and the registers are unknown (RuntimeError)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _as_jit(case.fn)
    attrs = {
        (fn.arg_names.index(name),): [["tt.divisibility", 16]]
        for name, kind in case.signature.items()
        if kind != "constexpr"
    }
    src = ASTSource(fn=fn, signature=case.signature, constexprs=case.constexprs, attrs=attrs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(
            src,
            target=GPUTarget("cuda", ARCHS[arch], 32),
            options={"num_warps": case.num_warps, "num_stages": case.num_stages},
        )
    text = log.getvalue()
    registers = _PTXAS_REGISTERS.findall(text)
    spills = _PTXAS_SPILLS.findall(text)
    if not registers or not spills:
        raise RuntimeError(f"no ptxas -v log for {case_key(case)} on {arch}; got:\n{text[-2000:]}")
    return {
        "registers": int(registers[-1]),
        "spill_stores": int(spills[-1][0]),
        "spill_loads": int(spills[-1][1]),
        "shared": int(compiled.metadata.shared),
        "num_warps": case.num_warps,
        "num_stages": case.num_stages,
    }


def _worker(job: tuple[int, str]) -> tuple[str, str, dict[str, int] | str]:
    index, arch = job
    case = all_cases()[index]
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
) -> dict[str, dict[str, dict[str, int] | str]]:
    """Compile every case (whose key contains ``only``, if given) for each arch it is shipped for.

    Returns ``{arch: {case_key: resources or an error string}}``. Runs in ``processes`` spawned workers
    (default: one per CPU).
    """
    cases = all_cases()
    jobs = [
        (i, arch)
        for i, case in enumerate(cases)
        for arch in archs
        if arch in case.archs and (only is None or only in case_key(case))
    ]
    out: dict[str, dict[str, dict[str, int] | str]] = {arch: {} for arch in archs}
    processes = max(1, min(processes or os.cpu_count() or 1, len(jobs) or 1))
    with _compile_environment():
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(processes) as pool:
            for arch, key, result in pool.imap_unordered(_worker, jobs):
                out[arch][key] = result
    return {arch: dict(sorted(results.items())) for arch, results in out.items()}


def baseline_path(arch: str) -> Path:
    return BASELINE_DIR / f"triton_{arch}.json"


def load_baseline(arch: str) -> dict[str, dict[str, int]]:
    """The stored ``{case_key: resources}`` for ``arch`` (empty when no baseline exists)."""
    path = baseline_path(arch)
    if not path.exists():
        return {}
    return json.loads(path.read_text())["kernels"]


def write_baseline(arch: str, results: dict[str, dict[str, int] | str]) -> Path:
    """Store ``results`` for ``arch``; refuses when a case failed to compile."""
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


def problems(arch: str, results: dict[str, dict[str, int] | str], baseline: dict[str, dict[str, int]]) -> list[str]:
    """Every reason the ``results`` of ``arch`` are not acceptable, one line each (empty list: all fine).

    Rules: compiles; no spills; registers <= 255; shared memory within the architecture's limit; no more
    spills or shared memory than the baseline stores; every case is in the baseline and every baseline entry
    still exists (regenerate with ``--write`` after adding or removing a kernel or config).
    """
    out = []
    for key, res in results.items():
        where = f"{arch} {key}"
        if isinstance(res, str):
            out.append(f"{where}: does not compile: {res}")
            continue
        spills = res["spill_stores"] + res["spill_loads"]
        if spills:
            out.append(f"{where}: spills ({res['spill_stores']} B stores, {res['spill_loads']} B loads)")
        if res["registers"] > MAX_REGISTERS:
            out.append(f"{where}: {res['registers']} registers > {MAX_REGISTERS}")
        if res["shared"] > SHARED_LIMIT[arch]:
            out.append(f"{where}: {res['shared']} B shared memory > the {SHARED_LIMIT[arch]} B limit")
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


def format_table(arch: str, results: dict[str, dict[str, int] | str]) -> str:
    lines = [f"{arch}: {'case':<64} {'regs':>5} {'spill':>6} {'shared':>8} {'warps':>5} {'stages':>6}"]
    for key, res in results.items():
        if isinstance(res, str):
            lines.append(f"{arch}: {key:<64} FAILED {res.splitlines()[0] if res else ''}")
        else:
            spill = res["spill_stores"] + res["spill_loads"]
            lines.append(
                f"{arch}: {key:<64} {res['registers']:>5} {spill:>6} {res['shared']:>8} "
                f"{res['num_warps']:>5} {res['num_stages']:>6}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="regenerate the baseline JSON files")
    parser.add_argument("--arch", choices=sorted(ARCHS), action="append", help="only this architecture")
    parser.add_argument("--only", help="only cases whose key contains this string (not with --write)")
    parser.add_argument("--processes", type=int, default=None, help="worker processes (default: CPU count)")
    args = parser.parse_args(argv)
    if args.write and args.only:
        parser.error("--write regenerates whole baselines; drop --only")
    archs = tuple(args.arch or ARCHS)
    results = measure(archs, args.only, args.processes)
    status = 0
    for arch in archs:
        print(format_table(arch, results[arch]))
        if args.write:
            print(f"wrote {write_baseline(arch, results[arch])}")
            continue
        baseline = load_baseline(arch)
        if args.only:
            baseline = {k: v for k, v in baseline.items() if args.only in k}
        found = problems(arch, results[arch], baseline)
        for line in found:
            print(f"PROBLEM {line}", file=sys.stderr)
        status |= bool(found)
    return status


if __name__ == "__main__":
    sys.exit(main())
