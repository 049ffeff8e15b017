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
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from autotune import argtypes
from autotune import cli as autotune_cli
from bench import cli as bench_cli
from tests.support import ROOT

CODES = {argtypes.EXIT_OK, argtypes.EXIT_REGRESSION, argtypes.EXIT_USAGE, argtypes.EXIT_FAILED}

HOSTILE = [
    "-5",
    "0",
    "-0",
    "+5",
    "nan",
    "inf",
    "-inf",
    "1e999",
    "",
    " ",
    "abc",
    "7",
    "1",
    "64x64",
    "0x0",
    "3.5",
    "\x00",
    "2147483648",
    "99999999999999999999999",
    "\u0663",  # ARABIC-INDIC DIGIT THREE: str.isdigit() says yes
    "100000",
    "99999999999x4",
    "cuda:-1",
    ".provider",
]


@pytest.fixture
def cli_env(tmp_path, monkeypatch):
    monkeypatch.setenv("BONEKERN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("BONEKERN_AUTOTUNE", "0")
    monkeypatch.delenv("BONEKERN_AUTOTUNE_PROFILE", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # Hostile values double as relative paths (`export --out-dir abc` creates ./abc): run where they may land.
    monkeypatch.chdir(tmp_path)
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


class MeasurementStarted(BaseException):
    """Raised by the stand-in for the bench's measurement: validation let these arguments through. A
    BaseException, so the CLI's guard (which turns an Exception into exit 3) lets it through too."""


def run_bench(argv: list[str], monkeypatch, capsys) -> tuple[int | str, str]:
    def started(*args, **kwargs):
        raise MeasurementStarted

    monkeypatch.setattr(bench_cli, "run_case", started)
    threads = torch.get_num_threads()  # --threads changes this process's torch: put it back
    try:
        code: int | str = argtypes.run_guarded(lambda: bench_cli.main(argv), prog="bench")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else argtypes.EXIT_USAGE
    except MeasurementStarted:
        code = "measuring"
    finally:
        torch.set_num_threads(threads)
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
        "show": ["--file", "--provider"],
        "export": ["--out-dir", "--device"],
        "clear": ["--device", "--provider"],
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
    # nothing is measured here, so exit 3 could only be an unexpected error caught by the guard
    assert code in {argtypes.EXIT_USAGE, "measuring"}, (argv, code, err)
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
        (["--json", "{tmp}/r.out", "--csv", "{tmp}/../{name}/r.out"], "argument --csv: expected a file other than"),
        (["--threads", "100000"], "argument --threads: expected a positive integer <= "),
        (["--tokens", "99999999999999999999999"], "argument --tokens: expected a positive integer <= 2147483647"),
        (["--r", "\u0663"], "argument --r: expected a positive integer; got"),
        (["--shape", "99999999999x4096"], "argument --shape: --shape takes N and K of at most 2147483647 each"),
        (["--impls", "cupy,triton"], "nothing valid to measure: no implementation in --impls can run on cpu"),
    ],
)
def test_bench_examples_exit_2_before_measuring(cli_env, monkeypatch, capsys, argv, needle):
    argv = [a.replace("{tmp}", str(cli_env)).replace("{name}", cli_env.name) for a in argv]
    code, err = run_bench(argv, monkeypatch, capsys)
    assert code == argtypes.EXIT_USAGE, err
    assert needle in err and _one_line_error(err), err


def test_bench_refuses_an_unknown_autotune_mode_before_measuring(cli_env, monkeypatch, capsys):
    monkeypatch.setenv("BONEKERN_AUTOTUNE", "maybe")
    code, err = run_bench(["--shape", "64x64", "--r", "4"], monkeypatch, capsys)
    assert code == argtypes.EXIT_USAGE and "BONEKERN_AUTOTUNE must be one of" in err and _one_line_error(err), err
    code, _ = run_bench(["--shape", "64x64", "--r", "4", "--autotune", "off"], monkeypatch, capsys)
    assert code == "measuring"  # --autotune replaces the variable


@pytest.mark.parametrize(
    "baseline",
    [
        '{"results": 5}',
        '{"results": [5]}',
        '{"results": [{"case_id": 1, "impl": "torch"}]}',
        '{"results": [{"case_id": "a", "impl": "torch", "fwd_median_ms": "fast"}]}',
        '{"results": [{"case_id": "a", "impl": "torch", "peak_bytes": -1}]}',
        '{"results": [], "environment": 3}',
        '{"results": [{"case_id": "a", "impl": "torch", "peak_bytes": 1' + "0" * 400 + "}]}",  # float() overflows
        '{"results": [{"case_id": "a", "impl": "torch", "peak_bytes": 1' + "0" * 5000 + "}]}",  # past int's limit
        '{"results": [], "environment": {"device": ' + "[" * 5000 + "]" * 5000 + "}}",
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
        (["tune", "--shape", "16x16", "--dtype", "int32"], "argument --dtype: expected one of bfloat16, float16"),
        (["tune", "--shape", "16x16", "--device", ""], "argument --device: expected cpu, cuda or cuda:N; got ''"),
        (["tune", "--shape", "16x16", "--device", "cuda:-1"], "argument --device: expected cpu, cuda or cuda:N"),
        (["tune", "--shape", "16x16", "--tokens", "4096000000"], "argument --tokens: expected a positive integer <="),
        (["tune", "--shape", "1\u00b2x16"], "argument --shape: --shape takes NxK"),
        (["tune", "--provider", ".relative", "--shape", "16x16"], "--provider must be an entry point in group"),
        (["show", "--provider", "os"], "provider module 'os' has no autotune_provider() function"),
    ],
)
def test_autotune_examples_exit_2(cli_env, argv, needle):
    argv = [a.replace("{tmp}", str(cli_env)) for a in argv]
    code, _, err = run_autotune(argv)
    assert code == argtypes.EXIT_USAGE, err
    assert needle in err and _one_line_error(err), err


def test_autotune_device_cuda_without_cuda_exits_2(cli_env):
    import torch

    # An absent device is refused: CUDA itself where torch sees none, else an index past the last device.
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device, needle = ("cuda", "torch sees no CUDA device") if count == 0 else (f"cuda:{count}", "CUDA device(s)")
    code, _, err = run_autotune(["tune", "--shape", "16x16", "--device", device])
    assert code == argtypes.EXIT_USAGE and needle in err


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


def test_run_guarded_keeps_only_the_first_line_of_a_native_error():
    err = io.StringIO()

    def native() -> int:  # torch's C++ errors carry a whole backtrace in their message
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] can't allocate\nframe #0: c10::..." + "x" * 1000)

    assert argtypes.run_guarded(native, err=err, prog="x") == argtypes.EXIT_FAILED
    line = err.getvalue()
    assert line.count("\n") == 1 and "frame #0" not in line
    assert line.startswith("x: error: RuntimeError: [enforce fail at alloc_cpu.cpp:127]")
    assert len(line) <= len("x: error: \n") + argtypes.MAX_ERROR_CHARS


# --- a tune job that fails is exit 3, not a silent 0 -------------------------------------------------------------
# A provider plugged in through --provider (the documented extension point), whose problems cannot run: either
# every candidate raises, or building the synthetic inputs does (as a shape too large for memory does).


class _FailingProvider:
    name = "hostile-cli"
    env_prefix = "HOSTILECLI"

    def __init__(self):
        from autotune import Tuner

        self._tuner = Tuner(self.name, self.env_prefix)

    def tuner(self):
        return self._tuner

    def add_tune_arguments(self, parser):
        parser.add_argument("--fail", type=argtypes.choice("a failure", ("candidates", "inputs")), required=True)

    def jobs(self, shapes, tokens, dtypes, device, args):
        from autotune import Candidate, SearchSpace, TuningKey
        from autotune.provider import Job

        def broken_runner(candidate):
            def run():
                raise RuntimeError(f"candidate {candidate.config['i']} cannot run\nframe #0: native detail")

            return run

        def make_runner():
            if args.fail == "inputs":
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory\nframe #0: native detail")
            return broken_runner

        jobs = []
        for shape in shapes:
            key = TuningKey.make("op", "auto", {"n": shape.n, "k": shape.k}, tokens[0], "cpu", "cpu", "x", {}, "s")
            space = SearchSpace(
                key, tokens[0], Candidate("b", {"i": 0}), lambda: [Candidate("b", {"i": i}) for i in range(2)]
            )
            space.label = f"op {shape.n}x{shape.k}"
            jobs.append(Job(space, make_runner))
        return jobs, []

    def current_provenance(self, key):
        return None

    def devices(self):
        return [("cpu", "cpu")]

    def default_device(self):
        return "cpu"

    def device_problem(self, device):
        return None if device == "cpu" else f"expected cpu; got {device!r}"


def autotune_provider() -> _FailingProvider:
    """Found by ``--provider tests.autotune.test_hostile_cli``."""
    return _FailingProvider()


@pytest.mark.parametrize("fail", ["candidates", "inputs"])
def test_a_tune_job_that_fails_exits_3_and_keeps_going(cli_env, monkeypatch, fail):
    monkeypatch.setenv("HOSTILECLI_CACHE_DIR", str(cli_env / "failing-cache"))
    argv = ["tune", "--provider", __name__, "--shape", "8x8", "16x16", "--tokens", "4", "--repeats", "1"]
    with pytest.warns() if fail == "candidates" else contextlib.nullcontext():  # the tuner warns: all failed
        code, out, err = run_autotune([*argv, "--fail", fail])
    assert code == argtypes.EXIT_FAILED, err
    failed = [line for line in err.splitlines() if line.startswith("failed: ")]
    assert [line.split(":")[1].strip() for line in failed] == ["op 8x8", "op 16x16"], err  # both jobs were tried
    assert "frame #0" not in err and "Traceback" not in err
    assert ("all failed" if fail == "candidates" else "failed") in out


@pytest.mark.parametrize(
    ("module", "argv", "needle"),
    [
        ("bonekern.backends.triton.resources", ["--processes", "100000"], "argument --processes: expected a positive"),
        ("bonekern.backends.triton.resources", ["--processes", "0"], "argument --processes: expected a positive"),
        ("bonekern.backends.cupy.compile", ["--arch", "99999999999"], "argument --arch: expected a positive integer"),
        ("bench.overhead", ["--threads", "100000"], "argument --threads: expected a positive integer <= "),
        ("bench.overhead", ["--shape", "99999999999x64x64"], "argument --shape: expected MxNxK"),
    ],
)
def test_developer_clis_refuse_counts_past_the_machine(module, argv, needle, capsys):
    """100000 worker processes never finish starting; 100000 torch threads crash at exit."""
    import importlib

    with pytest.raises(SystemExit) as exc:
        importlib.import_module(module).main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == argtypes.EXIT_USAGE and needle in err and _one_line_error(err), err


def test_export_onto_a_directory_named_like_the_profile_exits_2(cli_env):
    from autotune.keys import profile_name
    from bonekern.tuning import device_identity

    tune = ["tune", "--shape", "16x16", "--r", "4", "--tokens", "2", "--repeats", "1", "--variant", "bat"]
    code, _, err = run_autotune([*tune, "--ops", "forward", "--device", "cpu"])
    assert code == argtypes.EXIT_OK, err
    out_dir = cli_env / "profiles"
    (out_dir / profile_name(device_identity(torch.device("cpu"))[0])).mkdir(parents=True)
    code, _, err = run_autotune(
        ["export", "--out-dir", str(out_dir), "--device", device_identity(torch.device("cpu"))[0]]
    )
    assert code == argtypes.EXIT_USAGE and "argument --out-dir: cannot write" in err and "Traceback" not in err, err
