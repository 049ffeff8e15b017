"""Convergence, Liger-Kernel style: the same tiny Llama trained 20 AdamW steps on PEFT's MiSS forward and on
bonekern, through transformers' Trainer (bonekern via BonekernCallback) and TRL's SFTTrainer (TRL builds the
PeftModel; bonekern via patch()), gradient checkpointing on, bone / bat / mini, fp32 and bf16 autocast. Per-step
losses and final adapters agree within bonekern.tolerances.CONVERGENCE; under bf16 each run's distance from the fp32
run is printed (``pytest -rP``; docs/measurements.md)."""

from __future__ import annotations

import functools
import tempfile
from types import SimpleNamespace

import pytest
import torch

from tests.support.models import VARIANTS
from tests.support.training import LAYERS, STEPS, loss_error, train, weight_error

pytest.importorskip("peft", reason="needs the peft package (pip install 'bonekern[peft]')")
pytest.importorskip("trl", reason="needs the trl package (pip install 'bonekern[trainers]')")

import bonekern.integrations.peft as bk_peft
from bonekern.tolerances import CONVERGENCE, VS_REFERENCE

MISS_LAYERS = 7 * LAYERS
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


@functools.cache
def run(stack: str, variant: str, precision: str, mode: str):
    with tempfile.TemporaryDirectory() as output_dir:
        return train(stack, variant, mode, bf16=precision == "bf16", output_dir=output_dir)


def test_convergence_tolerances_are_ordered():
    """The loss is a float32 mean over tokens (cross-entropy runs in fp32 under autocast too), so its bound may sit
    below one bf16 rounding; the adapters carry the compounded updates and get the looser bound; bf16 > fp32."""
    for t in CONVERGENCE.values():
        assert 0 < t.loss <= t.weights, t
    assert CONVERGENCE[torch.bfloat16].loss > CONVERGENCE[torch.float32].loss >= VS_REFERENCE[torch.float32] / 2


def assert_converges_like_peft(stack: str, variant: str, precision: str) -> None:
    peft, ours = run(stack, variant, precision, "peft"), run(stack, variant, precision, "bonekern")
    assert peft.layer_kinds == {"MissLinear"} and ours.layer_kinds == {"BonekernMissLinear"}
    assert ours.fallbacks == [], ours.fallbacks[:3]
    assert len(ours.losses) == len(peft.losses) == STEPS
    assert sum(peft.losses[-5:]) < sum(peft.losses[:5]), peft.losses  # the run learns something
    assert max(p.abs().max().item() for p in peft.adapters.values()) > 0  # and the adapters moved off their init
    tolerance = CONVERGENCE[PRECISIONS[precision]]
    losses, weights = loss_error(ours.losses, peft.losses), weight_error(ours.adapters, peft.adapters)
    print(f"{stack} {variant} {precision}: bonekern vs PEFT: loss {losses:.2e}, adapters {weights:.2e}")
    assert losses <= tolerance.loss, (ours.losses, peft.losses)
    assert weights <= tolerance.weights


@pytest.mark.slow
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("stack", ["trainer", "sft"])
def test_converges_like_peft(stack, variant, precision):
    assert_converges_like_peft(stack, variant, precision)


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("stack", ["trainer", "sft"])
def test_bf16_distance_from_fp32(stack, variant):
    """Under bf16 autocast, how far PEFT and bonekern each end up from the fp32 run (reported; the bound is the
    bonekern-vs-PEFT one above). bonekern is not much further from fp32 than PEFT is."""
    fp32 = run(stack, variant, "fp32", "peft")
    far = {}
    for mode in ("peft", "bonekern"):
        bf16 = run(stack, variant, "bf16", mode)
        far[mode] = (loss_error(bf16.losses, fp32.losses), weight_error(bf16.adapters, fp32.adapters))
    print(
        f"{stack} {variant} bf16 vs fp32: PEFT loss {far['peft'][0]:.2e} adapters {far['peft'][1]:.2e}; "
        f"bonekern loss {far['bonekern'][0]:.2e} adapters {far['bonekern'][1]:.2e}"
    )
    assert far["bonekern"][0] <= 3 * far["peft"][0] and far["bonekern"][1] <= 3 * far["peft"][1], far


def test_sft_trainer_model_built_by_trl_runs_bonekern_after_patch(monkeypatch):
    """TRL's SFTTrainer builds the PeftModel from peft_config under patch(): every MiSS call of the run (forward and
    the checkpointed recompute) is a bonekern call, none falls back, and the losses and adapters are PEFT's."""
    calls = SimpleNamespace(n=0)
    real = bk_peft.bone_linear

    def counting(*args, **kwargs):
        calls.n += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(bk_peft, "bone_linear", counting)
    peft = run("sft", "bone", "fp32", "peft")
    with tempfile.TemporaryDirectory() as output_dir:
        ours = train("sft", "bone", "bonekern", bf16=False, output_dir=output_dir)
    assert not bk_peft.is_patched()
    assert ours.layer_kinds == {"BonekernMissLinear"} and ours.fallbacks == []
    assert calls.n == 2 * MISS_LAYERS * STEPS  # gradient checkpointing: each layer runs again in backward
    tolerance = CONVERGENCE[torch.float32]
    assert loss_error(ours.losses, peft.losses) <= tolerance.loss
    assert weight_error(ours.adapters, peft.adapters) <= tolerance.weights
