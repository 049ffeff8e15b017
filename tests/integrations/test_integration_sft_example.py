"""examples/sft_trl_patch.py runs briefly: TRL builds the model, patch() puts it on bonekern, the loss goes down."""

from __future__ import annotations

import importlib.util

import pytest

from tests.support import ROOT

pytest.importorskip("peft", reason="needs the peft package (pip install 'bonekern[peft]')")
pytest.importorskip("trl", reason="needs the trl package (pip install 'bonekern[trainers]')")

EXAMPLE = ROOT / "examples" / "sft_trl_patch.py"


def load_example():
    spec = importlib.util.spec_from_file_location("sft_trl_patch", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sft_example_runs_on_bonekern_and_learns(capsys):
    from bonekern.integrations.peft import is_patched

    example = load_example()
    results = example.main(["--steps", "20", "--batch", "4", "--hidden", "48", "--layers", "1", "--compare-peft"])
    run, peft = results["bonekern"], results["peft"]
    assert run["switched"] == run["layers"] == 7 and peft["switched"] == 0
    assert len(run["losses"]) == 20
    assert run["last_loss"] < run["first_loss"] - 0.05, run["losses"]
    assert run["losses"] == pytest.approx(peft["losses"], rel=1e-4)  # logged losses, rounded by the Trainer
    assert not is_patched()  # the example unpatches after building its trainer
    out = capsys.readouterr().out
    assert "bonekern: 7 of 7 MiSS layers switched to bonekern" in out
    assert "largest per-step loss difference" in out
