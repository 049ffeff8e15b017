"""``python -m autotune``: tune (real CPU timing of a tiny shape), show, export, clear, presets; the provider
hook; and a normal (non-editable) install that finds the shipped profiles without the source tree."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from autotune import SCHEMA, parse_table, profile_name
from autotune.cli import _parse_shape, main
from autotune.presets import MODELS, SHAPE_HELP, layer_shapes
from autotune.settings import CACHE_FILE_NAME
from bonekern import tuning
from tests.support import ROOT


@pytest.fixture
def cli_env(tmp_path, monkeypatch):
    monkeypatch.setenv("BONEKERN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("BONEKERN_AUTOTUNE", "0")  # the CLI tunes when asked even so; dispatch stays on defaults
    monkeypatch.delenv("BONEKERN_AUTOTUNE_PROFILE", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return tmp_path


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_tune_show_export_clear(cli_env):
    tune = ("tune", "--shape", "32x16", "--variant", "bat", "bone", "--r", "8", "--tokens", "4", "--repeats", "2")
    code, out, err = run(*tune)
    assert code == 0, err
    rows = {line.split("]")[0]: line for line in out.splitlines() if "[auto]" in line}
    assert set(rows) == {"bat_forward[auto", "bat_backward[auto", "bone_forward[auto", "bone_backward[auto"}
    assert " tuned " in rows["bat_forward[auto"] and " tuned " in rows["bat_backward[auto"]
    assert "only candidate" in rows["bone_forward[auto"]
    # the progress bar (tqdm; drawn at every step when not on a terminal) went through all 14 candidates
    assert "bat_backward[auto]" in err and "| 14/14 [" in err and err.rstrip().splitlines()[-1].startswith("done: 100%")

    cache = cli_env / "cache" / CACHE_FILE_NAME
    table, problem = parse_table(cache.read_text())
    assert problem is None and len(table) == 4  # bat forward/backward, scopes "auto" and "torch"
    assert all(t.ms is not None and t.ms > 0 for e in table.entries() for t in e.timings)

    code, out, _ = run(*tune)
    assert code == 0 and out.count(" cached ") == 2  # never paid twice

    code, out, _ = run("show")
    assert code == 0 and "4 entries" in out
    assert out.count("bat_forward") == 2 and out.count("bat_backward") == 2

    code, out, _ = run("export", "--out-dir", str(cli_env / "profiles"))
    assert code == 0, out
    device = tuning.device_identity(torch.device("cpu"))[0]
    exported = cli_env / "profiles" / profile_name(device)
    data = json.loads(exported.read_text())
    assert data["schema"] == SCHEMA and data["kind"] == "profile" and len(data["entries"]) == 4

    code, out, _ = run("clear")
    assert code == 0 and "removed 4 entries" in out
    assert len(parse_table(cache.read_text())[0]) == 0
    code, out, _ = run("show", "--file", str(exported))
    assert code == 0 and "4 entries" in out


def test_tune_refuses_the_interpreter_and_bad_arguments(cli_env, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    code, _, err = run("tune", "--shape", "32,16")
    assert code == 2 and "TRITON_INTERPRET" in err
    monkeypatch.delenv("TRITON_INTERPRET")
    code, _, err = run("tune", "--shape", "32,16", "--dtype", "float8")
    assert code == 2 and "argument --dtype: expected one of" in err
    code, _, err = run("show", "--provider", "no_such_provider_module")
    assert code == 2 and "neither an entry point" in err


@pytest.mark.parametrize("text", ["32-16", "32", "0x16", "32x16x2"])
def test_bad_shape_is_one_argparse_error_naming_the_option(cli_env, capsys, text):
    with pytest.raises(SystemExit) as e:
        run("tune", "--shape", text)
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"python -m autotune tune: error: argument --shape: --shape takes {SHAPE_HELP}; got {text!r}"


def test_shape_is_n_by_k_like_the_bench():
    from bench.suites import parse_shape as bench_shape

    for text in ("11008x4096", "11008,4096", "11008X4096"):
        shape = _parse_shape(text)
        assert (shape.n, shape.k, shape.name) == (11008, 4096, "shape.11008x4096")
        assert (bench_shape(text).n, bench_shape(text).k) == (11008, 4096)


def test_tune_without_tqdm_says_which_extra(cli_env, monkeypatch):
    import autotune.cli

    real = autotune.cli.importlib.util.find_spec
    monkeypatch.setattr(autotune.cli.importlib.util, "find_spec", lambda n, *a: None if n == "tqdm" else real(n, *a))
    code, _, err = run("tune", "--shape", "32x16")
    assert code == 2 and "pip install 'bonekern[autotune]'" in err


def test_presets_match_the_model_configs():
    shapes = {(m, *s.layers): (s.n, s.k) for m in MODELS for s in layer_shapes(m)}
    assert shapes["Llama-2-7B", "q"] == (4096, 4096) and shapes["Llama-2-7B", "down"] == (4096, 11008)
    assert shapes["Llama-2-13B", "gate"] == (13824, 5120) and shapes["Llama-2-13B", "k"] == (5120, 5120)
    assert shapes["Llama-3-8B", "k"] == (1024, 4096) and shapes["Llama-3-8B", "up"] == (14336, 4096)
    assert shapes["Qwen2.5-7B", "v"] == (512, 3584) and shapes["Qwen2.5-7B", "down"] == (3584, 18944)
    assert shapes["Qwen2.5-7B", "o"] == (3584, 3584)


def test_python_dash_m_entry_point_and_no_kernel_imports():
    out = subprocess.run([sys.executable, "-m", "autotune", "presets"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^Qwen2\.5-7B +k +512 +3584$", out.stdout, flags=re.M), out.stdout
    # The generic package imports neither bonekern nor torch by itself (the provider does, when asked).
    probe = "import sys, autotune, autotune.cli; print(sorted({'bonekern', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


INSTALLED_CHECK = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    target, source_hash = Path(sys.argv[1]), sys.argv[2]
    import bonekern, autotune
    from bonekern import tuning
    from autotune.provider import load_provider
    from autotune import parse_table
    assert Path(bonekern.__file__).is_relative_to(target), bonekern.__file__
    assert Path(autotune.__file__).is_relative_to(target), autotune.__file__
    profiles = tuning.profiles_dir()
    assert Path(str(profiles)).is_relative_to(target), profiles
    found = sorted(p.name for p in profiles.iterdir() if p.name.endswith(".json"))
    assert found, "no shipped profile found"
    entries = 0
    for name in found:
        table, problem = parse_table((profiles / name).read_text())
        assert problem is None and len(table), (name, problem)
        for entry in table.entries():
            assert tuning.shipped_profile(entry.key).name == name
            entries += 1
    assert tuning.backend_source_hash("torch") == source_hash  # the hash does not depend on where files live
    assert type(load_provider()).__module__ == "bonekern.autotune_provider"  # through the installed entry point
    print(json.dumps({"profiles": found, "entries": entries}))
    """
)


def test_non_editable_install_finds_the_shipped_profiles(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("autotune", "bench", "bonekern", "profiles"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--no-compile"]
    done = subprocess.run([*pip, "--quiet", "--target", str(target), str(src)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (target / "profiles").exists(), "profiles/ must install as bonekern/profiles, not top level"

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BONEKERN_AUTOTUNE_PROFILE")}
    env.update(PYTHONPATH=str(target), BONEKERN_CACHE_DIR=str(tmp_path / "cache"))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    check = subprocess.run(
        [sys.executable, "-c", INSTALLED_CHECK, str(target), tuning.backend_source_hash("torch")],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    report = json.loads(check.stdout.strip().splitlines()[-1])
    shipped = sorted(p.name for p in (ROOT / "profiles").glob("*.json"))
    assert report["profiles"] == shipped and report["entries"] > 0
