"""The Triton kernels under every Triton minor version of the support matrix, not only the main venv's.

The main venv runs Triton 3.7.x (torch 2.12 / 2.13 pin 3.7.0 / 3.7.1). Triton 3.6.0 (what torch 2.10 and 2.11 pin)
lives in the side venv ``.venv-triton36`` that tests/install_extras.sh creates (torch 2.13.0 CPU, numpy 2.3.5: see
the reason there). This file runs, in that venv and through a subprocess, the interpreter suite of tests/triton
(every kernel, strategy and gradient against the float64 reference) and the AOT resource check (every shipped
config compiled for sm_80, sm_90 and sm_100 by that Triton and its bundled ptxas, held to the absolute rules and to
``profiles/resources/triton-3.6/``). The venv is part of the README's test command, so a missing venv fails here
instead of being skipped.

Where Triton 3.6 cannot compile a shipped config, the tables replace it under 3.6 (``tiles.sm90_half_strategies``:
no bone "chunk" on sm_90; the fp32 r16 bat dB tile set, changed for every version); the tests below pin those
replacements.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bonekern.backends.triton import tiles

ROOT = Path(__file__).resolve().parents[2]
SIDE_VENVS = {"3.6": ROOT / ".venv-triton36"}
"""Triton minor version -> the side venv that runs it (created by tests/install_extras.sh)."""


def _python(version: str) -> Path:
    python = SIDE_VENVS[version] / "bin" / "python"
    assert python.exists(), f"{python} is missing: run bash tests/install_extras.sh inside the test venv"
    return python


def _env() -> dict[str, str]:
    """The caller's environment less what points at the main venv (the side venv must import its own packages)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["TRITON_INTERPRET"] = "1"
    return env


@pytest.mark.parametrize("version", sorted(SIDE_VENVS))
def test_side_venv_runs_that_triton(version):
    out = subprocess.run(
        [str(_python(version)), "-c", "import triton, torch; print(triton.__version__, torch.__version__)"],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0].startswith(f"{version}."), out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("version", sorted(SIDE_VENVS))
def test_interpreter_suite_passes_under(version):
    """tests/triton (without this file, the slow AOT compile and the baseline-file check) passes under Triton
    ``version``; about 130 s on 2 cores."""
    cmd = [
        str(_python(version)),
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        "not slow",
        f"--ignore={Path(__file__).relative_to(ROOT)}",
        "tests/triton",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=1200)
    tail = (out.stdout + out.stderr)[-4000:]
    assert out.returncode == 0, tail
    summary = tail.strip().splitlines()[-1]  # pytest's closing line: "118 passed, 10 skipped, ... in 150s"
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed[1]) > 0, tail
    assert not re.search(r"\d+ (failed|errors?)\b", summary), tail


def test_this_runs_in_the_main_venv():
    """The side venv is driven from the main venv, whose Triton is 3.7.x."""
    import triton

    assert triton.__version__.startswith("3.7."), triton.__version__
    assert Path(sys.prefix) not in {p.resolve() for p in SIDE_VENVS.values()}


@pytest.mark.slow
@pytest.mark.parametrize("version", sorted(SIDE_VENVS))
def test_aot_compile_passes_under(version):
    """``python -m bonekern.backends.triton.resources`` under Triton ``version``: every shipped config and checked
    specialisation compiles for sm_80 / sm_90 / sm_100 without spills, within registers and shared memory, and no
    worse than that version's baseline (exit 0); about 100 s on 2 cores."""
    env = {k: v for k, v in _env().items() if k != "TRITON_INTERPRET"}
    cmd = [str(_python(version)), "-m", "bonekern.backends.triton.resources", "--processes", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    tail = (out.stdout + out.stderr)[-4000:]
    assert (ROOT / "profiles" / "resources" / f"triton-{version}").is_dir(), "that version's baselines are missing"
    assert out.returncode == 0 and "PROBLEM" not in out.stdout + out.stderr, tail
    compiled = re.findall(r"^sm(?:80|90|100): \S+/\S+/\S+ ", out.stdout, flags=re.MULTILINE)
    assert len(compiled) > 300, tail  # every case was compiled and printed (about 420 per version)


def test_the_version_tables_replace_what_triton_36_cannot_compile():
    """Under 3.6 the Hopper half-precision tile sets offer no "chunk" (its pipeliner fails on it, see
    tiles.sm90_half_strategies); from 3.7 all three strategies. The installed version is read without importing
    triton, and a version string that is not major.minor is refused."""
    assert "chunk" not in tiles.sm90_half_strategies((3, 6))
    assert set(tiles.sm90_half_strategies((3, 6))) == {"group", "two_pass"}
    assert tiles.sm90_half_strategies((3, 7)) == tiles.BONE_FORWARD_STRATEGIES
    assert tiles.sm90_half_strategies((4, 0)) == tiles.BONE_FORWARD_STRATEGIES
    assert tiles.triton_version("3.6.0") == (3, 6) and tiles.triton_version("3.7.1+git123") == (3, 7)
    with pytest.raises(ValueError, match="triton version"):
        tiles.triton_version("nightly")
    offered = {s for _, strategies in tiles.BONE_GEMM[("sm90", "half")] for s in strategies}
    assert offered == set(tiles.sm90_half_strategies(tiles.TRITON_VERSION))
