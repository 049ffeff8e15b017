"""``python -m bonekern.selfcheck``: the CPU run end to end, its CUDA pieces on the CPU (the Triton interpreter and
the CUDA host shim stand in for the GPU), and its command-line errors. The full CUDA run is ``gpu``-marked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bonekern import selfcheck
from bonekern.backends import OPS, get_backend
from tests.support import ROOT, backend_or_skip


def run_selfcheck(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it
    env["PYTHONPATH"] = str(ROOT)
    env["BONEKERN_CACHE_DIR"] = str(cwd / "cache")
    return subprocess.run(
        [sys.executable, "-m", "bonekern.selfcheck", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def test_cpu_run_writes_its_report(tmp_path):
    done = run_selfcheck(["--device", "cpu", "--json", "report.json", "--markdown", "report.md"], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["schema"] == selfcheck.SCHEMA and report["passed"] and report["device"] == "cpu"
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == list(selfcheck.STEPS)
    numerics = steps["numerics"]
    assert numerics["status"] == "passed" and numerics["data"]["backends"] == ["torch"]
    assert numerics["data"]["checked"] >= 50 and numerics["data"]["failed"] == 0
    worst = numerics["data"]["worst_error_over_tolerance"]
    assert {key.split()[1] for key in worst} == set(OPS)  # the torch backend implements every op
    assert all(0 <= v <= 1 for v in worst.values())
    bench = steps["bench"]
    assert bench["status"] == "passed", bench
    rows = bench["data"]["rows"]
    assert {r["impl"] for r in rows} == {"torch", "peft", "linear"}
    assert {r["variant"] for r in rows} == {"bone", "bat", "mini"}
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["peak_mib"] is not None for r in rows)
    assert all(r["check_ok"] for r in rows if r["impl"] == "torch")
    # what could not run says why
    assert set(report["not_run"]) == {"verify", "gpu_tests", "tune"}
    assert "CUDA" in report["not_run"]["gpu_tests"] and "CUDA" in report["not_run"]["tune"]
    assert report["environment"]["torch"] == torch.__version__
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# bonekern selfcheck: passed") and "| numerics | passed |" in md and "## not run" in md
    assert "| quick | 1024x1024 | bone |" in md


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
        (["--budget", "-1"], "argument --budget: expected a finite number > 0"),
        (["--skip", "everything"], "argument --skip: invalid choice: 'everything'"),
        (["--json", "."], "argument --json"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(tmp_path, args, message):
    done = run_selfcheck(args, tmp_path, timeout=120)
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert done.returncode == 2 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert message in errors[0], errors[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where CUDA is absent")
def test_asking_for_cuda_without_one_is_a_usage_error(tmp_path):
    done = run_selfcheck(["--device", "cuda"], tmp_path, timeout=120)
    assert done.returncode == 2 and "torch sees no CUDA device" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("name", ["triton", "cupy"])
def test_the_cuda_numerics_run_every_strategy_of_the_kernels_here(name):
    """The numerics step's op checks on the interpreter-backed Triton and the shim-backed CuPy backends: every op,
    each strategy of the candidates (for one odd shape per op family), fp32 and bf16, against the reference."""
    backend = get_backend(backend_or_skip(name))
    checked = set()
    for shape in (("bone", 37, 40, 45, 16, None), ("mini", 23, 48, 45, 20, 24), ("bat", 19, 48, 32, 16, None)):
        for op in filter(backend.implements, selfcheck.ops_for(shape)):
            for dtype in (torch.float32, torch.bfloat16):
                problem = selfcheck.op_problem(op, shape, dtype, torch.device("cpu"))
                configs = selfcheck.configs_to_check(backend, problem)
                assert configs[0] == backend.default_config(problem)
                for config in configs:
                    error, ratio = selfcheck.check_op(backend, problem, config)
                    assert error is None and 0 <= ratio <= 1, (name, op, dtype, config, error)
                    checked.add(op)
    assert checked == {op for op in OPS if backend.implements(op)}


def test_strategies_tell_code_paths_apart():
    assert selfcheck._strategy({"strategy": "chunk", "block_m": 64}) == "chunk"
    bwd = {"t": {"split_n": 2, "block_m": 16}, "dblock": {"split_m": 1}}
    assert selfcheck._strategy(bwd) == "dblock=,t=split_n>1"
    problem = selfcheck.op_problem("bone_forward", ("bone", 64, 256, 256, 64, None), torch.float16, torch.device("cpu"))
    configs = selfcheck.configs_to_check(get_backend("triton"), problem)
    strategies = [selfcheck._strategy(c) for c in configs]
    assert len(set(strategies)) == len(strategies) > 1  # the default plus other strategies, each once


def test_verify_cost_step_times_fresh_and_known_verdicts():
    for name in ("triton", "cupy"):
        backend_or_skip(name)
    shapes = (("bone", 2048, 48, 64, 16, None), ("bat", 2048, 48, 64, 16, None))  # M > 48: M + 16 has M's small M
    step = selfcheck.verify_cost(torch.device("cpu"), ("triton", "cupy"), shapes)
    assert step.status == "passed", step
    rows = step.data["checks"]
    assert {(r["backend"], r["op"]) for r in rows} == {(b, op) for b in ("triton", "cupy") for op in OPS}
    assert all(r["ok"] and r["known_s"] < r["first_s"] for r in rows)


def test_junit_counts_and_markdown_of_a_failed_step(tmp_path):
    junit = tmp_path / "j.xml"
    junit.write_text('<testsuites><testsuite tests="5" failures="1" errors="0" skipped="2"/></testsuites>')
    assert selfcheck._junit_counts(junit) == {"tests": 5, "failures": 1, "errors": 0, "skipped": 2}
    assert selfcheck._junit_counts(tmp_path / "missing.xml") == {}
    steps = [selfcheck.Step("numerics", "failed", "1/2 checks", 1.0, ["FAILED triton bone_forward: off"])]
    rep = selfcheck.report(torch.device("cpu"), steps, 0.0)
    assert rep["failed"] == ["numerics"] and not rep["passed"]
    md = selfcheck.markdown(rep)
    assert md.startswith("# bonekern selfcheck: FAILED") and "FAILED triton bone_forward: off" in md


@pytest.mark.gpu
def test_cuda_run_within_eight_minutes(tmp_path):
    done = run_selfcheck(["--json", "report.json", "--markdown", "report.md"], tmp_path, timeout=600)
    report = json.loads((tmp_path / "report.json").read_text())
    assert done.returncode == 0 and report["passed"], (report["failed"], done.stdout[-3000:])
    assert report["seconds"] <= 480
    assert (tmp_path / "profiles").is_dir() and any((tmp_path / "profiles").glob("*.json"))


def test_numerics_out_of_time_is_incomplete_not_passed():
    step = selfcheck.numerics(torch.device("cpu"), selfcheck.Budget(0.0))
    assert step.status == "incomplete" and "out of time" in step.summary
    rep = selfcheck.report(torch.device("cpu"), [step], 0.0)
    assert rep["passed"] and rep["incomplete"] == {"numerics": step.summary}
    assert "## incomplete" in selfcheck.markdown(rep)
