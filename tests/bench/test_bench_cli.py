"""``python -m bench`` end to end on a tiny shape: the table, --json, --csv, --plot, --compare."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import subprocess
import sys

import pytest

from autotune import argtypes
from bench import cli
from bench.compare import compare
from tests.support import ROOT

TINY = ["--shape", "128x64+bias", "--tokens", "16", "--r", "16", "--budget", "0.001", "--min-repeats", "2"]
SHAPE_ID = "custom.128x64"


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(argv)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run of every variant and the default implementations, with every output file."""
    pytest.importorskip("peft", reason="peft is not installed")
    d = tmp_path_factory.mktemp("bench")
    paths = {"json": d / "r.json", "csv": d / "r.csv", "plot": d / "r.png"}
    status, out, err = _run(
        [*TINY, "--json", str(paths["json"]), "--csv", str(paths["csv"]), "--plot", str(paths["plot"])]
    )
    return status, out, err, paths


def test_table_header_and_rows(tiny_run):
    status, out, err, _ = tiny_run
    assert status == argtypes.EXIT_OK, err
    for field in ("device: cpu", "torch threads", "torch 2.", "triton", "cupy", "peft 0.", "bonekern 0.", "git "):
        assert field in out
    for variant in ("bone, r = 16", "bat, r = 16", "mini (mini_r 16), r = 16"):
        assert f"custom 128x64: x (16, 64), W (128, 64) + bias | {variant} | float32 | cpu" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("  ")]
    assert sum(r[0] == "torch" and r[-2] == "vs" and r[-4] == "ok" for r in rows) == 3  # checked against PEFT
    assert sum(r[0] == "peft" and r[-4:] == ["others", "checked", "vs", "this"] for r in rows) == 3
    assert sum(r[:2] == ["lora", "r=11"] for r in rows) == 2  # bone and bat: 16 * 128 / (64 + 128) = 10.7
    assert sum(r[0] == "linear" for r in rows) == 3
    for name in ("triton", "cupy"):
        assert sum(r[:3] == [name, "not", "run"] for r in rows) == 3
        assert any(line.startswith("[") and f"] {name} not run: " in line for line in out.splitlines())


def test_json_csv_and_plot(tiny_run):
    _, _, _, paths = tiny_run
    data = json.loads(paths["json"].read_text())
    assert {"device", "cpu", "torch_threads", "torch", "triton", "cupy", "peft", "bonekern", "git_commit"} <= set(
        data["environment"]
    )
    results = data["results"]
    assert len(results) == 3 * 6  # 3 variants x (torch, triton, cupy, peft, lora, linear)
    ok = [r for r in results if r["status"] == "ok"]
    assert {r["impl"] for r in ok} == {"torch", "peft", "lora", "linear"}
    for r in ok:
        for key in ("fwd", "fwdbwd"):
            assert 0 < r[f"{key}_p20_ms"] <= r[f"{key}_median_ms"] <= r[f"{key}_p80_ms"]
            assert r[f"{key}_tflops"] > 0 and r[f"{key}_gbps"] > 0
        assert r["peak_bytes"] > 0
        assert r["time_vs_linear"] > 0 and r["peak_vs_peft"] > 0
    torch_bat = next(r for r in ok if r["impl"] == "torch" and r["variant"] == "bat")
    peft_bat = next(r for r in ok if r["impl"] == "peft" and r["variant"] == "bat")
    assert torch_bat["kept_bytes"] == 16 * 64 * 4  # x alone
    assert peft_bat["kept_bytes"] == 16 * 64 * 4 + 2 * 128 * 64 * 4  # x, W' and PEFT's copy of W
    assert torch_bat["check_ok"] and torch_bat["check_vs"] == "peft"
    assert {r["reason"] for r in results if r["impl"] == "triton"} != {None}

    with open(paths["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(results)
    assert [row["impl"] for row in rows] == [r["impl"] for r in results]
    assert float(rows[0]["fwdbwd_median_ms"]) == pytest.approx(results[0]["fwdbwd_median_ms"])

    png = paths["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def _baseline(tiny_run, tmp_path, edit) -> str:
    data = json.loads(tiny_run[3]["json"].read_text())
    for r in data["results"]:
        edit(r)
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_compare_exits_nonzero_on_an_injected_regression(tiny_run, tmp_path):
    def inject(r):
        if r["impl"] == "torch" and r["variant"] == "bat":
            r["peak_bytes"] //= 2  # memory is deterministic: now the current run uses 2x the baseline's
            # a time no machine reaches: the current run regresses however loaded this machine was for either run
            r["fwdbwd_median_ms"] = 1e-9

    baseline = _baseline(tiny_run, tmp_path, inject)
    status, out, err = _run([*TINY, "--variants", "bat", "--impls", "torch,linear", "--compare", baseline])
    assert status == argtypes.EXIT_REGRESSION
    case = f"{SHAPE_ID}/bat/r16/float32/M16"
    assert f"REGRESSION {case} [torch]: peak memory" in err and "(+100.0%, threshold 10%)" in err
    assert f"REGRESSION {case} [torch]: forward+backward median" in err
    assert "[linear]: peak memory" not in err  # untouched in the baseline (its times may vary on a busy machine)
    assert "regression(s) past 10%" in out


def test_compare_exits_zero_without_a_regression(tiny_run, tmp_path):
    def roomier(r):
        # times get all the room a loaded machine can need; memory stays as measured (it is deterministic)
        for key in ("fwd_median_ms", "fwdbwd_median_ms"):
            if key in r:
                r[key] *= 1e6

    baseline = _baseline(tiny_run, tmp_path, roomier)
    status, out, err = _run([*TINY, "--variants", "bat", "--impls", "torch,linear", "--compare", baseline])
    assert status == argtypes.EXIT_OK, err
    assert "no regression past 10%" in out and "REGRESSION" not in err


def test_compare_rules():
    base = {"case_id": "c", "impl": "torch", "status": "ok", "fwd_median_ms": 10.0, "fwdbwd_median_ms": 20.0}
    base |= {"peak_bytes": 0, "kept_bytes": 100}
    same = dict(base)
    assert compare([same], [base], 10) == ([], [])
    slower = base | {"fwdbwd_median_ms": 22.5}  # +12.5%
    regs, _ = compare([slower], [base], 10)
    assert [(r.metric, round(r.percent, 1)) for r in regs] == [("forward+backward median", 12.5)]
    assert compare([slower], [base], 15)[0] == []
    regs, _ = compare([base | {"peak_bytes": 1}], [base], 10)  # from nothing to something: no finite percent
    assert "+inf%" in regs[0].message(10)
    regs, _ = compare([base | {"status": "failed", "reason": "boom"}], [base], 10)
    assert "failed (boom)" in regs[0].message(10)
    regs, notes = compare([base | {"case_id": "new"}], [base], 10)
    assert regs == [] and notes == [
        "new: new [torch] is not in the baseline",
        "missing: c [torch] is in the baseline only",
    ]
    with pytest.raises(ValueError, match="--threshold"):
        compare([base], [base], -1)


def test_list_prints_every_suite(capsys):
    assert cli.main(["--list"]) == argtypes.EXIT_OK
    out = capsys.readouterr().out
    assert "llama3-8b.k_proj/v_proj: in 4096, out 1024" in out and "qwen2.5-7b.q_proj: in 3584, out 3584, bias" in out
    assert "acceptance.square: in 4096, out 4096" in out


def test_bad_arguments_name_what_is_allowed(capsys, tmp_path):
    (tmp_path / "a-file").write_text("x")
    cases = (
        (["--impls", "torch,fast"], "--impls must be"),
        (["--dtype", "fp8"], "--dtype must be"),
        (["--compare", "/nonexistent/baseline.json"], "argument --compare: expected a readable JSON file; "),
        (["--csv", str(tmp_path / "a-file" / "out.csv")], "argument --csv: expected an output file path; "),
        (["--shape", "64"], "argument --shape: --shape takes NxK = out_features x in_features"),
        (["--shape", "128x64+b"], "argument --shape: --shape takes NxK or NxK+bias; got '128x64+b'"),
    )
    for argv, needle in cases:
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == argtypes.EXIT_USAGE
        assert needle in capsys.readouterr().err


def test_python_m_bench_runs_without_triton_interpret():
    # `python -m bench` (run_module is what -m does), started without TRITON_INTERPRET, must not set it: Triton on a
    # CPU is reported as not run, never timed through the interpreter.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    argv = [*TINY, "--variants", "bone", "--impls", "torch,triton,linear", "--threads", "1", "--quiet"]
    script = (
        "import os, runpy, sys\n"
        f"sys.argv = ['bench', *{argv!r}]\n"
        "try:\n    runpy.run_module('bench', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as e:\n    code = e.code\n"
        "assert 'TRITON_INTERPRET' not in os.environ, 'the bench set TRITON_INTERPRET'\n"
        "sys.exit(code)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "triton  not run [1]" in proc.stdout and "[1] triton not run: " in proc.stdout
    assert proc.stderr == ""  # no profiler chatter, no progress lines under --quiet


def test_dropout_cases_report_what_each_keeps(tmp_path):
    """--dropout: bone/mini cases with miss_dropout; bonekern keeps S (M x r) where PEFT keeps its M x K mask."""
    pytest.importorskip("peft", reason="peft is not installed")
    path = tmp_path / "d.json"
    argv = [*TINY, "--variants", "bone,mini,bat", "--impls", "torch,peft", "--dropout", "0.1", "--json", str(path)]
    status, out, err = _run(argv)
    assert status == argtypes.EXIT_OK, err
    assert "| bone, dropout 0.1, r = 16 |" in out and "| bat, r = 16 |" in out  # bat ignores dropout, as PEFT
    results = {(r["variant"], r["impl"]): r for r in json.loads(path.read_text())["results"]}
    assert all(r["status"] == "ok" for r in results.values())
    for variant in ("bone", "mini"):
        ours, peft = results[(variant, "torch")], results[(variant, "peft")]
        assert ours["dropout"] == peft["dropout"] == 0.1
        assert "/dropout0.1/" in ours["case_id"]
        assert ours["kept_bytes"] == 16 * 16 * 4  # S (M x r) in float32, nothing of M x K
        assert any(k["shape"] == [16, 64] for k in peft["kept_tensors"])  # PEFT's mask
        assert "check_vs" not in ours  # different masks: no output check (the integration tests fix them)
    assert results[("bat", "torch")]["dropout"] == 0.0


def test_dropout_argument_is_checked():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        cli.main([*TINY, "--dropout", "1.0"])
    assert e.value.code == argtypes.EXIT_USAGE
    assert "argument --dropout: must be in [0, 1); got '1.0'" in err.getvalue()
