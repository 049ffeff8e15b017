"""``python -m bonekern.selfcheck``: check bonekern on this machine's GPU (or CPU) and write one report.

The one command to run on a new GPU (see the README)::

    python -m bonekern.selfcheck --json selfcheck.json --markdown selfcheck.md

Steps, each reported as passed, failed or not run (with the reason):

``numerics``
    every op of :data:`bonekern.backends.OPS` on every backend that runs on the device (CUDA: triton, cupy,
    torch; CPU: torch) x each distinct strategy among the backend's candidate configs x dtype, on odd shapes
    (K % r != 0, r = 1, M and N off every tile) against the float64 einsum reference backend within
    :data:`bonekern.tolerances.VS_REFERENCE`; on CUDA also on Llama-size shapes, within
    :data:`bonekern.tolerances.AGREEMENT` (two roundings apart over K = 4096, the bound the tuner uses for full
    layers). Then ``bone_linear`` with each backend by name, forward and every gradient through autograd, on
    a strided 3-D x with a bias.
``verify``
    (a kernel backend available) the cost of verify-before-trust (:mod:`bonekern.verify`) on this device: each
    kernel backend's default config for Llama-size problems checked from scratch, then a new problem whose
    verdict is known.
``gpu_tests``
    (CUDA, in a source checkout) the test suite's ``gpu``-marked tests, through pytest.
``bench``
    ``python -m bench``: on CUDA the Llama-2-7B and Llama-3-8B layer shapes, bonekern against cuBLAS's linear
    layer and PEFT (forward, forward+backward, peak and kept memory); on the CPU the small "quick" suite.
``tune``
    (CUDA) ``python -m autotune tune`` of those shapes and ``export`` of ``<profiles-dir>/<device>.json``.

Everything runs offline. Steps that run other commands (pytest, bench, autotune) run them as subprocesses with a
time limit from the remaining budget (``--budget``, 480 s by default on CUDA, 110 s on the CPU), so one hung
step cannot stop the report. Exit status: 0 when every step that ran passed, 1 when one failed, 2 for bad
arguments (one line on stderr).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from autotune.argtypes import EXIT_OK, EXIT_USAGE, output_dir, output_file, positive_float, run_guarded

from . import dispatch, reference, verify
from .backends import OPS, Backend, OpProblem, get_backend, unavailable_reason
from .tolerances import AGREEMENT, TRITON_INTERPRETER_BF16_FACTOR, VS_REFERENCE

SCHEMA = "bonekern-selfcheck/1"
PROG = "python -m bonekern.selfcheck"
ROOT = Path(__file__).resolve().parent.parent
"""The source checkout's root when bonekern runs from one (tests/ and bench/ beside the package)."""

STEPS: tuple[str, ...] = ("numerics", "verify", "gpu_tests", "bench", "tune")
DEFAULT_BUDGET_S = {"cuda": 480.0, "cpu": 110.0}
"""Whole-run time limits: 8 minutes on one H100-class GPU, under 2 minutes on the CPU."""

RESERVE_S: dict[str, dict[str, float]] = {
    "cuda": {"verify": 20.0, "gpu_tests": 100.0, "bench": 120.0, "tune": 80.0},
    "cpu": {"bench": 60.0},
}
"""Seconds each step keeps from the steps before it (the numerics step gets the rest, then stops where it is)."""

KERNEL_BACKENDS: dict[str, tuple[str, ...]] = {"cuda": ("triton", "cupy", "torch"), "cpu": ("torch",)}
"""Backends the numerics step checks per device type (on the CPU the Triton interpreter and the CUDA host shim
are test tools, not something a user runs)."""

DTYPES: dict[str, tuple[torch.dtype, ...]] = {
    "cuda": (torch.float32, torch.bfloat16, torch.float16),
    "cpu": (torch.float64, torch.float32, torch.bfloat16, torch.float16),
}

# (variant, M, N, K, r, C): C is mini's block columns (None: N for bone, r for bat).
ODD_SHAPES: tuple[tuple[str, int, int, int, int, int | None], ...] = (
    ("bone", 37, 40, 45, 16, None),
    ("bone", 5, 33, 19, 1, None),
    ("bone", 70, 96, 200, 64, None),
    ("mini", 23, 48, 45, 20, 24),
    ("mini", 9, 36, 30, 4, 12),
    ("bat", 19, 48, 32, 16, None),
    ("bat", 13, 24, 24, 1, None),
    ("bat", 33, 128, 192, 64, None),
)
FULL_SHAPES: tuple[tuple[str, int, int, int, int, int | None], ...] = (
    ("bone", 2048, 4096, 4096, 64, None),
    ("mini", 2048, 11008, 4096, 64, 64),
    ("bat", 2048, 4096, 4096, 64, None),
)
"""Llama-7B projections (q/o: 4096 x 4096, up: 11008 x 4096) at 2048 tokens."""

MAX_CONFIGS_PER_PROBLEM = 6
"""At most this many configs per (backend, op, shape, dtype): the default and one per distinct strategy."""


@dataclass
class Step:
    """One step's outcome: ``status`` is "passed", "failed", "incomplete" (nothing failed, but the time ran out
    before everything was checked) or "not run"; ``summary`` one line; ``details`` the failures (or what was
    skipped); ``data`` the numbers."""

    name: str
    status: str = "not run"
    summary: str = ""
    seconds: float = 0.0
    details: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


class Budget:
    """The time left of the whole run."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())


# ------------------------------------------------------------------------------------------------------------
# Numerics: op level (every config strategy) and the public API.
# ------------------------------------------------------------------------------------------------------------


def op_problem(op: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> OpProblem:
    """The problem of ``op`` for one of :data:`ODD_SHAPES` / :data:`FULL_SHAPES` (block in float32, as PEFT)."""
    variant, m, n, k, r, cols = shape
    block_cols = n if variant == "bone" else (r if variant == "bat" else cols)
    return OpProblem(op, m, n, k, r, block_cols, dtype, torch.float32, device)


def ops_for(shape: tuple) -> list[str]:
    """The ops of :data:`OPS` that a shape's variant runs: bat's for bat, every other op for bone and mini."""
    bat = shape[0] == "bat"
    return [op for op in OPS if op.startswith("bat") == bat]


def dropout_choices(op: str) -> tuple[bool, ...]:
    """(False, True) for an op that takes a dropout draw (checked without and with one), else (False,)."""
    return (False, True) if "dropout" in verify.op_parameters(op) else (False,)


def _strategy(config: Any) -> str:
    """What tells two configs' code paths apart: every string value, and which split factors exceed 1."""
    if isinstance(config, dict):
        return ",".join(
            f"{k}={_strategy(v)}" if isinstance(v, dict) else (f"{k}>1" if k.startswith("split") and v > 1 else str(v))
            for k, v in sorted(config.items())
            if isinstance(v, (dict, str)) or (k.startswith("split") and isinstance(v, int) and v > 1)
        )
    return ""


def configs_to_check(backend: Backend, problem: OpProblem) -> list[dict]:
    """The backend's default for ``problem`` and one candidate per other strategy (at most
    :data:`MAX_CONFIGS_PER_PROBLEM`)."""
    out, seen = [backend.default_config(problem)], set()
    seen.add(_strategy(out[0]))
    for config in backend.configs(problem):
        if len(out) >= MAX_CONFIGS_PER_PROBLEM:
            break
        if _strategy(config) not in seen:
            seen.add(_strategy(config))
            out.append(config)
    return out


def _coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return a if torch.finfo(a).eps >= torch.finfo(b).eps else b


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (in float64)."""
    a, e = actual.detach().double(), expected.detach().double()
    scale = e.abs().max().item() if e.numel() else 0.0
    return (a - e).abs().max().item() / max(scale, 1e-30) if e.numel() else 0.0


def tolerance_for(dtype: torch.dtype, backend: str, full_size: bool) -> float:
    table = AGREEMENT if full_size else VS_REFERENCE
    tol = table[dtype]
    if backend == "triton" and dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        tol *= TRITON_INTERPRETER_BF16_FACTOR
    return tol


def check_op(backend: Backend, problem: OpProblem, config: dict, full_size: bool = False) -> tuple[str | None, float]:
    """Run ``problem.op`` on ``backend`` with ``config`` and on the float64 reference backend (same inputs, from
    :func:`bonekern.verify.build_args`); None and the worst relative error when every output is within
    tolerance, else what was wrong."""
    args = verify.build_args(problem, None, seed=1)
    ref_args = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    ref = get_backend("reference")
    try:
        expected = getattr(ref, problem.op)(*ref_args, None)
    except NotImplementedError:
        return None, 0.0
    try:
        got = getattr(backend, problem.op)(*args, backend.prepare_config(problem, config))
        if problem.device.type == "cuda":
            torch.cuda.synchronize(problem.device)
    except Exception as exc:
        return f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}", float("nan")
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = got if isinstance(got, tuple) else (got,)
    worst = 0.0
    for i, (a, e) in enumerate(zip(got, expected, strict=True)):
        if a is None or e is None:
            if (a is None) != (e is None):
                return f"output {i} is {'missing' if a is None else 'unexpected'}", float("nan")
            continue
        if a.shape != e.shape:
            return f"output {i} has shape {tuple(a.shape)}, expected {tuple(e.shape)}", float("nan")
        err = relative_error(a, e)
        tol = tolerance_for(_coarser(problem.dtype, a.dtype), backend.name, full_size)
        worst = max(worst, err / tol)
        if not err <= tol:
            return f"output {i} off by {err:.3g} relative (tolerance {tol:.3g})", err
    return None, worst


def check_api(backend: str, variant: str, dtype: torch.dtype, device: torch.device) -> str | None:
    """``bone_linear`` with ``backend`` on a strided (2, 7, K) x with a bias: y and the gradients of x, block and
    bias against the float64 reference through autograd; None when all agree."""
    import bonekern

    n, k, r = 48, 37, 8
    cols = {"bone": n, "mini": 12, "bat": r}[variant]
    k = 40 if variant == "bat" else k
    g = torch.Generator(device=device).manual_seed(3)

    def rand(*shape, scale=1.0):
        return torch.randn(shape, generator=g, device=device) * scale

    base = rand(2, 7, 2 * k)
    x = base[..., ::2].to(dtype).requires_grad_()  # strided last dimension
    weight = (rand(n, k) / k**0.5).to(dtype)
    bias = rand(n).to(dtype).requires_grad_()
    block = rand(*((n // r, r, r) if variant == "bat" else (r, cols)), scale=0.1).requires_grad_()
    mini_r = cols if variant == "mini" else None
    dy = rand(2, 7, n).to(dtype)
    y = bonekern.bone_linear(x, weight, block, bias, variant=variant, mini_r=mini_r, backend=backend)
    y.backward(dy)
    x64, b64, bias64 = (t.detach().double().requires_grad_() for t in (x, block, bias))
    ref_block = reference.expand_block(b64, n) if variant == "mini" else b64
    want = reference.linear(x64, weight.double(), ref_block, bias64, "bat" if variant == "bat" else "bone")
    want.backward(dy.double())
    for name, a, e in (("y", y, want), ("dx", x.grad, x64.grad), ("dblock", block.grad, b64.grad),
                       ("dbias", bias.grad, bias64.grad)):  # fmt: skip
        err = relative_error(a, e)
        tol = tolerance_for(_coarser(dtype, a.dtype), backend, False)
        if not err <= tol:
            return f"{name} off by {err:.3g} relative (tolerance {tol:.3g})"
    return None


def numerics(device: torch.device, budget: Budget, backends: Sequence[str] | None = None) -> Step:
    """The numerics step (see the module docstring); ``backends`` overrides :data:`KERNEL_BACKENDS`."""
    step = Step("numerics")
    names = list(backends or KERNEL_BACKENDS.get(device.type, ("torch",)))
    runnable = []
    for name in names:
        reason = unavailable_reason(name, device)
        if reason is None:
            runnable.append(name)
        else:
            step.details.append(f"not run: backend {name}: {reason}")
    shapes = [(s, False) for s in ODD_SHAPES] + ([(s, True) for s in FULL_SHAPES] if device.type == "cuda" else [])
    counts = {"checked": 0, "failed": 0}
    worst: dict[str, float] = {}
    for name in runnable:
        backend = get_backend(name)
        for shape, full in shapes:
            for dtype in DTYPES.get(device.type, (torch.float32,)):
                for op in ops_for(shape):
                    if not backend.implements(op):
                        continue
                    for dropout in dropout_choices(op):
                        problem = dataclasses.replace(op_problem(op, shape, dtype, device), dropout=dropout)
                        for config in configs_to_check(backend, problem):
                            if budget.left() <= 0:
                                step.details.append("stopped: out of time")
                                return _finish_numerics(step, counts, worst, runnable)
                            error, ratio = check_op(backend, problem, config, full)
                            counts["checked"] += 1
                            label = f"{name} {op} {dtype_name(dtype)} {_shape_text(shape)} {json.dumps(config)}"
                            if error is not None:
                                counts["failed"] += 1
                                step.details.append(f"FAILED {label}{' dropout' if dropout else ''}: {error}")
                            elif ratio == ratio:
                                key = f"{name} {op} {dtype_name(dtype)}"
                                worst[key] = max(worst.get(key, 0.0), ratio)
        for variant in ("bone", "mini", "bat"):
            for dtype in DTYPES.get(device.type, (torch.float32,)):
                counts["checked"] += 1
                try:
                    error = check_api(name, variant, dtype, device)
                except Exception as exc:
                    error = f"raised {type(exc).__name__}: {exc}"
                if error is not None:
                    counts["failed"] += 1
                    step.details.append(f"FAILED bone_linear backend={name} {variant} {dtype_name(dtype)}: {error}")
    return _finish_numerics(step, counts, worst, runnable)


def _finish_numerics(step: Step, counts: dict[str, int], worst: dict[str, float], runnable: list[str]) -> Step:
    stopped = any(d.startswith("stopped") for d in step.details)
    if counts["failed"]:
        step.status = "failed"
    elif stopped:
        step.status = "incomplete"
    else:
        step.status = "passed" if counts["checked"] else "failed"
    step.summary = f"{counts['checked'] - counts['failed']}/{counts['checked']} checks within tolerance on {runnable}"
    if stopped:
        step.summary += " (out of time before the rest: raise --budget to check everything)"
    step.data = {**counts, "backends": runnable, "worst_error_over_tolerance": worst}
    return step


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shape_text(shape: tuple) -> str:
    variant, m, n, k, r, cols = shape
    return f"{variant} M={m} N={n} K={k} r={r}" + (f" C={cols}" if cols else "")


# ------------------------------------------------------------------------------------------------------------
# The cost of verify-before-trust.
# ------------------------------------------------------------------------------------------------------------


def verify_cost(
    device: torch.device, backends: Sequence[str] | None = None, shapes: Sequence[tuple] = FULL_SHAPES
) -> Step:
    """Time :func:`bonekern.verify.check` from scratch (a temporary verdict file) for each kernel backend's
    default config of ``shapes`` (bf16 on CUDA, fp32 elsewhere), then for a new problem whose verdict is known
    (M + 16: the same small problem when M > :data:`bonekern.verify.SMALL_CAP`)."""
    step = Step("verify")
    names = [n for n in (backends or ("triton", "cupy")) if get_backend(n).verify_before_use]
    names = [n for n in names if unavailable_reason(n, device) is None]
    if not names:
        step.summary = f"no kernel backend runs on {device.type}; nothing to verify"
        return step
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    with tempfile.TemporaryDirectory(prefix="bonekern-selfcheck-") as tmp:
        verify.forget()
        for name in names:
            backend = get_backend(name)
            for shape in shapes:
                for op in ops_for(shape):
                    if not backend.implements(op):
                        continue
                    problem = op_problem(op, shape, dtype, device)
                    config = backend.default_config(problem)
                    times = []
                    for p in (problem, dataclasses.replace(problem, m=problem.m + 16)):
                        start = time.perf_counter()
                        verdict = dispatch.verify_config(p, backend, config, None, Path(tmp))
                        times.append(time.perf_counter() - start)
                    ok = verdict is not None and verdict.ok
                    rows.append({"backend": name, "op": op, "shape": _shape_text(shape), "ok": ok,
                                 "first_s": times[0], "known_s": times[1]})  # fmt: skip
                    if not ok:
                        step.details.append(f"FAILED {name} {op} {_shape_text(shape)}: {verdict and verdict.error}")
        verify.forget()
    first = sorted(r["first_s"] for r in rows)
    known = sorted(r["known_s"] for r in rows)
    step.data = {"dtype": dtype_name(dtype), "checks": rows}
    step.status = "failed" if any(not r["ok"] for r in rows) else "passed"
    step.summary = (
        f"{len(rows)} checks; first check per config {first[len(first) // 2] * 1e3:.1f} ms median "
        f"(max {first[-1] * 1e3:.1f} ms, compile included); a new problem with a known verdict "
        f"{known[len(known) // 2] * 1e6:.0f} us median"
    )
    return step


# ------------------------------------------------------------------------------------------------------------
# Steps that run another command.
# ------------------------------------------------------------------------------------------------------------


def run_command(argv: list[str], budget_s: float, cwd: Path | None = None) -> tuple[int | None, str]:
    """Run ``argv`` with a time limit; (exit status or None on timeout, the last lines of its output)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run(
            argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=max(1.0, budget_s), check=False
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"") if isinstance(exc.stdout, bytes) else (exc.stdout or "").encode()
        return None, out.decode(errors="replace")[-2000:]
    return done.returncode, (done.stdout + done.stderr)[-2000:]


def gpu_tests(device: torch.device, budget: Budget) -> Step:
    step = Step("gpu_tests")
    tests = ROOT / "tests"
    if device.type != "cuda":
        step.summary = "the gpu-marked tests need a CUDA device"
        return step
    if not (tests / "conftest.py").is_file():
        step.summary = f"no test suite at {tests} (an installed package); run from a source checkout to include it"
        return step
    try:
        import pytest  # noqa: F401
    except ImportError:
        step.summary = "pytest is not installed (pip install 'bonekern[test]')"
        return step
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        limit = budget.left()
        code, tail = run_command(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-m",
                "gpu",
                "-p",
                "no:cacheprovider",
                f"--junitxml={junit}",
                "tests",
            ],
            limit,
            cwd=ROOT,
        )
        counts = _junit_counts(junit)
    step.data = {"exit_status": code, **counts}
    if code is None:
        step.status, step.summary = "failed", f"timed out after {limit:.0f} s"
    else:
        bad = counts.get("failures", 0) + counts.get("errors", 0)
        step.status = "passed" if code == 0 and bad == 0 else "failed"
        ran = counts.get("tests", 0) - counts.get("skipped", 0)
        step.summary = f"{ran} gpu tests ran, {bad} failed, {counts.get('skipped', 0)} skipped (pytest exit {code})"
    if step.status == "failed":
        step.details.append(tail)
    return step


def _junit_counts(path: Path) -> dict[str, int]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {}
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


BENCH_SUITES = {"cuda": ("llama2-7b", "llama3-8b"), "cpu": ("quick",)}
BENCH_ARGS = {
    "cuda": ["--budget", "0.1", "--min-repeats", "5", "--impls", "auto,triton,cupy,torch,peft,linear"],
    "cpu": [
        "--budget",
        "0.05",
        "--min-repeats",
        "3",
        "--impls",
        "torch,peft,linear",
        "--tokens",
        "128",
        "--shape",
        "1024x1024",
    ],
}


def bench(device: torch.device, budget: Budget) -> Step:
    """``python -m bench`` for :data:`BENCH_SUITES` of the device; the records summarised."""
    step = Step("bench")
    if not (ROOT / "bench" / "__init__.py").is_file():
        step.summary = f"the bench package is not at {ROOT / 'bench'}"
        return step
    suites = BENCH_SUITES.get(device.type, ())
    rows: list[dict[str, Any]] = []
    failed = []
    for i, suite in enumerate(suites):
        limit = budget.left() / (len(suites) - i)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "bench.json"
            argv = [sys.executable, "-m", "bench", "--suite", suite, "--device", device.type, "--json", str(out)]
            code, tail = run_command([*argv, *BENCH_ARGS.get(device.type, []), "--quiet"], limit)
            if code is None:
                failed.append(f"{suite}: timed out after {limit:.0f} s")
                continue
            if code != 0:
                failed.append(f"{suite}: exit {code}: {tail}")
            try:
                records = json.loads(out.read_text())["results"]
            except (OSError, ValueError, KeyError, TypeError):
                failed.append(f"{suite}: no readable result ({tail[-300:]})")
                continue
            rows += [_bench_row(suite, r) for r in records]
            failed += [f"{suite}: {r['impl']} {r['variant']} {r['layers']}: {r['check_ok']=}" for r in rows
                       if r["suite"] == suite and r["check_ok"] is False]  # fmt: skip
    step.data = {"rows": rows}
    step.details += failed
    step.status = "failed" if failed or not rows else "passed"
    step.summary = f"{len(rows)} measurements over suites {', '.join(suites)}" + (
        f"; {len(failed)} failed" if failed else ""
    )
    return step


def _bench_row(suite: str, record: dict[str, Any]) -> dict[str, Any]:
    """One bench record, cut to what the report shows (times in ms, memory in MiB)."""
    row: dict[str, Any] = {"suite": suite}
    for key in ("impl", "layers", "variant", "tokens", "out_features", "in_features", "r", "dtype", "status", "reason"):
        row[key] = record.get(key)
    row["fwd_ms"] = record.get("fwd_median_ms")
    row["fwd_bwd_ms"] = record.get("fwdbwd_median_ms")
    for key in ("peak", "kept"):
        value = record.get(f"{key}_bytes")
        row[f"{key}_mib"] = None if value is None else value / 2**20
    row["check_ok"] = record.get("check_ok")
    return row


def tune(device: torch.device, budget: Budget, profiles_dir: Path) -> Step:
    """``python -m autotune tune`` of the Llama-7B/8B shapes, then ``export`` into ``profiles_dir``."""
    step = Step("tune")
    if device.type != "cuda":
        step.summary = "tuning and exporting a profile is for CUDA devices"
        return step
    limit = budget.left()
    start = time.monotonic()
    tune_argv = [sys.executable, "-m", "autotune", "tune", "--model", "llama2-7b", "llama3-8b", "--device", "cuda"]
    code, tail = run_command(tune_argv, limit * 0.9)
    if code is None or code != 0:
        step.status = "failed"
        step.summary = f"tune {'timed out' if code is None else f'exited {code}'}"
        step.details.append(tail)
        return step
    left = max(5.0, limit - (time.monotonic() - start))
    code, tail = run_command([sys.executable, "-m", "autotune", "export", "--out-dir", str(profiles_dir)], left)
    step.status = "passed" if code == 0 else "failed"
    step.summary = f"tuned llama2-7b and llama3-8b; export to {profiles_dir}: exit {code}"
    step.data = {"profiles_dir": str(profiles_dir), "export_output": tail[-500:]}
    if code != 0:
        step.details.append(tail)
    return step


# ------------------------------------------------------------------------------------------------------------
# The report.
# ------------------------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    """Where it ran: the bench's environment record (versions, device, commit), plus the verify switch."""
    try:
        from bench.report import environment as bench_environment

        env = bench_environment(device)
    except Exception as exc:  # the bench package missing or broken must not lose the report
        env = {"device": str(device), "torch": torch.__version__, "python": sys.version.split()[0],
               "environment_error": f"{type(exc).__name__}: {exc}"}  # fmt: skip
    env["verify"] = os.environ.get(verify.ENV, "1")
    return env


def report(device: torch.device, steps: list[Step], started: float) -> dict[str, Any]:
    failed = [s.name for s in steps if s.status == "failed"]
    return {
        "schema": SCHEMA,
        "device": str(device),
        "environment": environment(device),
        "passed": not failed,
        "failed": failed,
        "not_run": {s.name: s.summary for s in steps if s.status == "not run"},
        "incomplete": {s.name: s.summary for s in steps if s.status == "incomplete"},
        "seconds": round(time.monotonic() - started, 2),
        "steps": [dataclasses.asdict(s) for s in steps],
    }


BENCH_COLUMNS = {
    "suite": "suite",
    "layers": "layers",
    "variant": "variant",
    "tokens": "tokens",
    "dtype": "dtype",
    "impl": "impl",
    "fwd_ms": "fwd ms",
    "fwd_bwd_ms": "fwd+bwd ms",
    "peak_mib": "peak MiB",
    "kept_mib": "kept MiB",
}
"""The bench table's columns in the Markdown report: row key -> header."""


def markdown(rep: dict[str, Any]) -> str:
    env = rep["environment"]
    lines = [
        f"# bonekern selfcheck: {'passed' if rep['passed'] else 'FAILED'}",
        "",
        f"- device: {rep['device']} ({env.get('gpu') or env.get('cpu')})",
        f"- versions: torch {env.get('torch')}, triton {env.get('triton')}, cupy {env.get('cupy')}, "
        f"peft {env.get('peft')}, bonekern {env.get('bonekern')}, python {env.get('python')}",
        f"- took {rep['seconds']} s",
        "",
        "| step | status | seconds | summary |",
        "|---|---|---|---|",
    ]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {s['summary']} |" for s in rep["steps"]]
    for s in rep["steps"]:
        if s["details"]:
            lines += ["", f"## {s['name']}", "", "```", *s["details"][:50], "```"]
        if s["name"] == "bench" and s["data"].get("rows"):
            lines += ["", "## bench", "", "| " + " | ".join(BENCH_COLUMNS.values()) + " |"]
            lines.append("|" + "---|" * len(BENCH_COLUMNS))
            for r in s["data"]["rows"]:
                cells = [r.get(c) for c in BENCH_COLUMNS]
                lines.append("| " + " | ".join(f"{c:.3g}" if isinstance(c, float) else str(c) for c in cells) + " |")
    if rep["incomplete"]:
        lines += ["", "## incomplete", ""] + [f"- {name}: {why}" for name, why in rep["incomplete"].items()]
    if rep["not_run"]:
        lines += ["", "## not run", ""] + [f"- {name}: {why}" for name, why in rep["not_run"].items()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------
# The command line.
# ------------------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0].split(": ", 1)[-1])
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when present, else cpu")
    p.add_argument("--json", metavar="PATH", type=output_file, help="write the report as JSON")
    p.add_argument("--markdown", metavar="PATH", type=output_file, help="write the report as Markdown")
    p.add_argument(
        "--skip", nargs="+", choices=STEPS, default=[], metavar="STEP", help=f"steps to leave out, from {STEPS}"
    )
    p.add_argument("--budget", type=positive_float, help="seconds for the whole run (default 480 on CUDA, 110 on CPU)")
    p.add_argument(
        "--profiles-dir", type=output_dir, default=Path("profiles"), help="where tune exports (default ./profiles)"
    )
    return p


def run(device: torch.device, skip: Sequence[str], budget_s: float, profiles_dir: Path,
        progress: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """Every step not in ``skip``, in order, within ``budget_s``; the report."""
    started = time.monotonic()
    budget = Budget(budget_s)
    reserve = RESERVE_S.get(device.type, {})

    def share(name: str) -> Budget:
        """What is left for step ``name``: the remaining time less what the later steps (not skipped) keep."""
        later = STEPS[STEPS.index(name) + 1 :]
        return Budget(max(1.0, budget.left() - sum(reserve.get(s, 0.0) for s in later if s not in skip)))

    plans: list[tuple[str, Callable[[], Step]]] = [
        ("numerics", lambda: numerics(device, share("numerics"))),
        ("verify", lambda: verify_cost(device)),
        ("gpu_tests", lambda: gpu_tests(device, share("gpu_tests"))),
        ("bench", lambda: bench(device, share("bench"))),
        ("tune", lambda: tune(device, share("tune"), profiles_dir)),
    ]
    steps = []
    for name, plan in plans:
        if name in skip:
            steps.append(Step(name, summary="left out (--skip)"))
            continue
        progress(f"{name} ...")
        t0 = time.monotonic()
        try:
            step = plan()
        except Exception as exc:  # a step's own bug must not lose the report
            step = Step(name, "failed", f"raised {type(exc).__name__}: {exc}")
        step.seconds = round(time.monotonic() - t0, 2)
        progress(f"{name}: {step.status} ({step.seconds:.0f} s) {step.summary}")
        steps.append(step)
    return report(device, steps, started)


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.exit(EXIT_USAGE, f"{PROG}: error: argument --device: cuda was asked for, but torch sees no CUDA device\n")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    budget = args.budget or DEFAULT_BUDGET_S[device.type]
    rep = run(device, args.skip, budget, args.profiles_dir, lambda msg: print(f"selfcheck: {msg}", file=sys.stderr))
    text = markdown(rep)
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=1, default=str) + "\n", encoding="utf-8")
    if args.markdown:
        Path(args.markdown).write_text(text, encoding="utf-8")
    print(text)
    return EXIT_OK if rep["passed"] else 1


if __name__ == "__main__":
    sys.exit(run_guarded(main, prog=PROG))
