"""The bench's quantised-base cases (the ``quant`` suite): both implementations run over one bitsandbytes base,
bonekern's output and gradients are checked against PEFT's, and bonekern keeps x alone where PEFT keeps W'."""

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


def test_quant_suite_is_bat_over_every_quant_base():
    suite = suites.SUITES["quant"]
    assert suite.variants == ("bat",) and set(suite.quant) == set(suites.QUANT_BASES)
