"""Hostile command lines for ``python -m autotune`` and ``python -m bench``: never a traceback, a hang or a silent
exit 0; bad arguments end with exit status 2 and one line naming the argument (issue 14).

The property tests generate argument lists from a vocabulary of options and hostile values. For the bench, the
measurement itself is replaced by a sentinel that stops the run the moment it would start, so each example
checks what matters here -- that validation happens before any work -- in milliseconds.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from autotune import argtypes
from autotune import cli as autotune_cli
from bench import cli as bench_cli
from tests.support import ROOT

CODES = {argtypes.EXIT_OK, argtypes.EXIT_REGRESSION, argtypes.EXIT_USAGE, argtypes.EXIT_FAILED}

HOSTILE = ["-5", "0", "-0", "nan", "inf", "-inf", "1e999", "", " ", "abc", "7", "1", "64x64", "0x0", "3.5", "\x00"]


@pytest.fixture
def cli_env(tmp_path, monkeypatch):
    monkeypatch.setenv("BONEKERN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("BONEKERN_AUTOTUNE", "0")
    monkeypatch.delenv("BONEKERN_AUTOTUNE_PROFILE", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    (tmp_path / "a-file").write_text("not a directory")
    (tmp_path / "not-json.json").write_text("{nope")
    return tmp_path


def _paths(tmp) -> list[str]:
    return [
        str(tmp / "a-file"),
        str(tmp / "a-file" / "x.json"),
        str(tmp / "missing.json"),
        str(tmp / "not-json.json"),
        str(tmp),
        str(tmp / "new-dir" / "out.json"),
    ]


def run_autotune(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err):  # argparse writes its errors to sys.stderr
            code = argtypes.run_guarded(lambda: autotune_cli.main(argv, out=out, err=err), err=err, prog="autotune")
    except SystemExit as exc:  # argparse: --help (0) or bad arguments (2)
        code = exc.code if isinstance(exc.code, int) else argtypes.EXIT_USAGE
    return code, out.getvalue(), err.getvalue()


class MeasurementStarted(Exception):
    """Raised by the stand-in for the bench's measurement: validation let these arguments through."""


def run_bench(argv: list[str], monkeypatch, capsys) -> tuple[int | str, str]:
    def started(*args, **kwargs):
        raise MeasurementStarted

    monkeypatch.setattr(bench_cli, "run_case", started)
    try:
        code: int | str = argtypes.run_guarded(lambda: bench_cli.main(argv), prog="bench")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else argtypes.EXIT_USAGE
    except MeasurementStarted:
        code = "measuring"
    return code, capsys.readouterr().err


def _one_line_error(err: str) -> bool:
    lines = [line for line in err.splitlines() if "error:" in line]
    return len(lines) == 1 and "Traceback" not in err


@seed(1401)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_autotune_never_tracebacks(cli_env, data):
    paths = _paths(cli_env)
    values = st.sampled_from(HOSTILE + paths)
    command = data.draw(st.sampled_from(["tune", "show", "export", "clear", "presets", "bogus"]))
    options = {
        "tune": [
            "--tokens",
            "--r",
            "--mini-r",
            "--repeats",
            "--device",
            "--backend",
            "--dtype",
            "--variant",
            "--shape",
            "--layers",
            "--model",
            "--ops",
        ],
        "show": ["--file"],
        "export": ["--out-dir", "--device"],
        "clear": ["--device"],
        "presets": [],
        "bogus": ["--x"],
    }[command]
    argv = [command]
    if command == "tune":
        argv += ["--shape", "16x16", "--r", "4", "--tokens", "2", "--repeats", "1", "--variant", "bone"]
    for _ in range(data.draw(st.integers(0, 3))):
        if options:
            argv += [data.draw(st.sampled_from(options)), data.draw(values)]
    code, _, err = run_autotune(argv)
    assert code in CODES, (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    if code == argtypes.EXIT_USAGE:
        assert _one_line_error(err), (argv, err)


@seed(1402)
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_bench_validates_everything_before_measuring(cli_env, data, monkeypatch, capsys):
    paths = _paths(cli_env)
    values = st.sampled_from(HOSTILE + paths)
    options = [
        "--tokens",
        "--r",
        "--mini-r",
        "--budget",
        "--min-repeats",
        "--threads",
        "--threshold",
        "--json",
        "--csv",
        "--compare",
        "--shape",
        "--variants",
        "--impls",
        "--dtype",
        "--device",
        "--suite",
    ]
    argv = ["--shape", "64x64", "--tokens", "4", "--quiet"]
    for _ in range(data.draw(st.integers(1, 3))):
        argv += [data.draw(st.sampled_from(options)), data.draw(values)]
    code, err = run_bench(argv, monkeypatch, capsys)
    assert code in CODES | {"measuring"}, (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    if code == argtypes.EXIT_USAGE:
        assert _one_line_error(err), (argv, err)


# --- the examples, one by one ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--shape", "64x64", "--r", "100"], "nothing valid to measure"),
        (["--shape", "64x64", "--variants", "mini", "--mini-r", "7"], "nothing valid to measure"),
        (["--budget", "nan"], "argument --budget: expected a finite number; got 'nan'"),
        (["--budget", "inf"], "argument --budget: expected a finite number; got 'inf'"),
        (["--threshold", "-1"], "argument --threshold: expected a finite number >= 0; got '-1'"),
        (["--threshold", "nan"], "argument --threshold: expected a finite number; got 'nan'"),
        (["--compare", "{tmp}/not-json.json"], "argument --compare: expected a readable JSON file;"),
        (["--json", "{tmp}"], "argument --json: expected an output file path;"),
        (["--json", "{tmp}/a-file/out.json"], "argument --json: expected an output file path;"),
    ],
)
def test_bench_examples_exit_2_before_measuring(cli_env, monkeypatch, capsys, argv, needle):
    argv = [a.replace("{tmp}", str(cli_env)) for a in argv]
    code, err = run_bench(argv, monkeypatch, capsys)
    assert code == argtypes.EXIT_USAGE, err
    assert needle in err and _one_line_error(err), err


@pytest.mark.parametrize(
    "baseline",
    [
        '{"results": 5}',
        '{"results": [5]}',
        '{"results": [{"case_id": 1, "impl": "torch"}]}',
        '{"results": [{"case_id": "a", "impl": "torch", "fwd_median_ms": "fast"}]}',
        '{"results": [{"case_id": "a", "impl": "torch", "peak_bytes": -1}]}',
        '{"results": [], "environment": 3}',
        "[" * 100_000,
    ],
)
def test_bench_compare_with_a_malformed_baseline_exits_2_before_measuring(cli_env, monkeypatch, capsys, baseline):
    path = cli_env / "baseline.json"
    path.write_text(baseline)
    code, err = run_bench(["--compare", str(path)], monkeypatch, capsys)
    assert code == argtypes.EXIT_USAGE and _one_line_error(err), err


def test_bench_compare_with_a_fifo_does_not_block(cli_env, monkeypatch, capsys):
    fifo = cli_env / "fifo.json"
    os.mkfifo(fifo)
    code, err = run_bench(["--compare", str(fifo)], monkeypatch, capsys)
    assert code == argtypes.EXIT_USAGE and "not a regular file" in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["tune", "--shape", "16x16", "--tokens", "-5"], "argument --tokens: expected a positive integer; got '-5'"),
        (["tune", "--shape", "16x16", "--r", "0"], "argument --r: expected a positive integer; got '0'"),
        (["tune", "--shape", "16x16", "--mini-r", "0"], "argument --mini-r: expected a positive integer; got '0'"),
        (["tune", "--shape", "16x16", "--repeats", "-3"], "argument --repeats: expected a positive integer"),
        (["tune", "--shape", "16x16", "--device", "tpu"], "argument --device: expected cpu, cuda or cuda:N"),
        (["tune", "--shape", "16x16", "--backend", "fast"], "argument --backend: expected a backend"),
        (["tune", "--shape", "16x16", "--r", "32"], "nothing to tune"),
        (["show", "--file", "{tmp}/missing.json"], "argument --file: expected an existing file"),
        (["show", "--file", "{tmp}/not-json.json"], "argument --file:"),
        (["export", "--out-dir", "{tmp}/a-file"], "argument --out-dir: expected an output directory"),
        (["export", "--out-dir", "{tmp}/a-file/sub"], "argument --out-dir: expected an output directory"),
    ],
)
def test_autotune_examples_exit_2(cli_env, argv, needle):
    argv = [a.replace("{tmp}", str(cli_env)) for a in argv]
    code, _, err = run_autotune(argv)
    assert code == argtypes.EXIT_USAGE, err
    assert needle in err and _one_line_error(err), err


def test_autotune_device_cuda_without_cuda_exits_2(cli_env):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA (the check is that an absent device is refused)")
    code, _, err = run_autotune(["tune", "--shape", "16x16", "--device", "cuda"])
    assert code == argtypes.EXIT_USAGE and "torch sees no CUDA device" in err


@pytest.mark.parametrize("backend", ["triton", "cupy"])
def test_autotune_backend_that_cannot_run_exits_2(cli_env, backend):
    from bonekern.backends import unavailable_reason

    argv = ["tune", "--shape", "16x16", "--r", "4", "--tokens", "2", "--repeats", "1", "--backend", backend]
    code, _, err = run_autotune([*argv, "--device", "cpu"])
    if unavailable_reason(backend, "cpu") is None:  # a test module registered a CPU stand-in (shim, interpreter)
        assert code == argtypes.EXIT_OK, err
    else:
        assert code == argtypes.EXIT_USAGE and f"argument --backend: backend {backend!r} cannot run on cpu" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "autotune", "tune", "--tokens", "-5"],
        ["-m", "autotune", "tune", "--device", "tpu", "--shape", "16x16"],
        ["-m", "autotune", "show", "--file", "/nonexistent.json"],
        ["-m", "bench", "--budget", "nan"],
        ["-m", "bench", "--shape", "64x64", "--r", "100"],
    ],
)
def test_python_m_prints_one_line_and_exit_2(argv, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BONEKERN_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == argtypes.EXIT_USAGE, proc.stderr
    assert "Traceback" not in proc.stderr and _one_line_error(proc.stderr), proc.stderr


def test_run_guarded_turns_an_unexpected_error_into_one_line_and_exit_3():
    err = io.StringIO()

    def broken() -> int:
        raise KeyError("boom")

    assert argtypes.run_guarded(broken, err=err, prog="x") == argtypes.EXIT_FAILED
    assert err.getvalue() == "x: error: KeyError: 'boom'\n"
