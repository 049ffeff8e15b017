"""The bench's quantised-base cases (the ``quant`` suite): both implementations run over one bitsandbytes base,
bonekern's output and gradients are checked against PEFT's; for bat bonekern keeps x alone where PEFT keeps W',
for bone (base forward + adapter term) S alone where PEFT with dropout keeps the mask and the dropped x."""

from __future__ import annotations

import pytest
import torch

from bench import suites, timing
from bench.runner import Settings, run_case

CPU = torch.device("cpu")


@pytest.mark.parametrize("quant", list(suites.QUANT_BASES))
def test_quant_case_runs_checks_and_keeps_x_only(quant):
    pytest.importorskip("bitsandbytes")
    n, k, tokens = 256, 128, 16
    shape = suites.LayerShape("test", ("layer",), n, k, True)
    case = suites.Case(shape, "bat", 16, None, tokens, torch.float32, CPU, quant=quant)
    assert case.case_id.endswith(f"/{quant}")
    torch_rec, peft_rec = run_case(case, ["torch", "peft"], Settings(0.001, 2), timing.Timer(CPU))
    assert peft_rec["status"] == "ok" and torch_rec["status"] == "ok", (torch_rec, peft_rec)
    assert torch_rec["check_ok"], torch_rec["check_max_rel_err"]
    assert torch_rec["kept_bytes"] == tokens * k * 4  # x alone
    assert peft_rec["kept_bytes"] >= n * k * 4  # PEFT keeps W' (N x K) for backward
    assert torch_rec["quant"] == quant


@pytest.mark.parametrize("quant", list(suites.QUANT_BASES))
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_quant_bone_case_runs_base_plus_term(quant, dropout):
    pytest.importorskip("bitsandbytes")
    n, k, tokens, r = 256, 128, 16, 16
    shape = suites.LayerShape("test", ("layer",), n, k, False)
    case = suites.Case(shape, "bone", r, None, tokens, torch.float32, CPU, dropout=dropout, quant=quant)
    torch_rec, peft_rec = run_case(case, ["torch", "peft"], Settings(0.001, 2), timing.Timer(CPU))
    assert peft_rec["status"] == "ok" and torch_rec["status"] == "ok", (torch_rec, peft_rec)
    assert torch_rec["label"] == "torch base+term"
    if dropout:  # masks differ from PEFT's: not output-checked (tests/integrations fix the mask)
        assert torch_rec.get("check_ok") is None
        assert peft_rec["kept_bytes"] >= tokens * k * 4  # PEFT keeps the dropped x (and its mask)
    else:
        assert torch_rec["check_ok"], torch_rec["check_max_rel_err"]
    # bonekern keeps S (M x r) for the term and whatever the base layer keeps for its own backward
    assert torch_rec["kept_bytes"] <= peft_rec["kept_bytes"]


def test_quant_suite_is_bat_and_bone_over_every_quant_base():
    suite = suites.SUITES["quant"]
    assert suite.variants == ("bat", "bone") and set(suite.quant) == set(suites.QUANT_BASES)
    assert suite.dropout == 0.1  # bone's rows train with dropout; bat ignores it as PEFT does
