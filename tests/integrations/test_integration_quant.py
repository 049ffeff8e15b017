"""bone/mini over quantised base layers (bitsandbytes 4-bit and 8-bit, torchao int8, HQQ 4-bit) on tiny Llamas:
accelerate switches every MiSS layer, the base layer runs its own (quantised) forward and bonekern adds the
adapter term; with miss_dropout=0.1 (PEFT given bonekern's masks) and with two active adapters, the loss and the
adapter gradients equal PEFT's, and no FallbackWarning is emitted while training."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from tests.support import assert_close_to_reference
from tests.support.models import TARGETS, VARIANTS, FixedMasks, loss_and_grads, tiny_llama, token_batch

pytest.importorskip("peft", reason="needs the peft package (pip install 'bonekern[peft]')")
pytest.importorskip("transformers", reason="needs the transformers package (pip install 'bonekern[peft]')")

from peft import MissConfig, get_peft_model

import bonekern.integrations.peft as bk_peft
from bonekern.integrations.peft import FallbackWarning, accelerate

LAYERS = 14


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    return path


def _from_pretrained(path, config):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu", dtype=torch.float32)


def _hqq(path):
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for module in list(model.modules()):
        for target in TARGETS:
            if isinstance(getattr(module, target, None), torch.nn.Linear):
                linear = getattr(module, target)
                config = BaseQuantizeConfig(nbits=4, group_size=32)
                setattr(module, target, HQQLinear(linear, config, compute_dtype=torch.float32, device="cpu"))
    return model


def quantised_base(kind: str, path):
    """A tiny Llama whose decoder linear layers are quantised by ``kind``, in training mode."""
    if kind.startswith("bnb"):
        pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (pip install 'bonekern[quant]')")
        from transformers import BitsAndBytesConfig

        if kind == "bnb-4bit":
            config = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
            )
        else:
            config = BitsAndBytesConfig(load_in_8bit=True)
        model = _from_pretrained(path, config)
    elif kind == "torchao-int8":
        pytest.importorskip("torchao", reason="needs torchao (pip install 'bonekern[quant]')")
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        model = _from_pretrained(path, TorchAoConfig(Int8WeightOnlyConfig()))
    else:
        pytest.importorskip("hqq", reason="needs hqq (pip install 'bonekern[quant]')")
        model = _hqq(path)
    return model.train()  # from_pretrained returns eval mode


CASES = {
    "bone dropout": ("bone", {"miss_dropout": 0.1}, None),
    "mini": ("mini", {}, None),
    "two adapters": ("bone", {}, ("other", {"r": 4}, ["q_proj", "v_proj", "down_proj"])),
    "two adapters, dropout": ("mini", {"miss_dropout": 0.1}, ("other", {}, ["q_proj"])),
}


def miss_over(kind: str, path, case: str):
    variant, overrides, extra = CASES[case]
    config = MissConfig(target_modules=TARGETS, **VARIANTS[variant], **overrides)
    model = get_peft_model(quantised_base(kind, path), config)
    if extra is not None:
        name, extra_overrides, targets = extra
        extra_config = {**VARIANTS[variant], **overrides, **extra_overrides}
        model.add_adapter(name, MissConfig(target_modules=targets, **extra_config))
        model.base_model.set_adapter(["default", name])
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "miss_block" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.train()


@pytest.fixture
def calls(monkeypatch):
    counter = SimpleNamespace(fused=0, term=0)
    real_fused, real_term = bk_peft.bone_linear, bk_peft.adapter_output

    def fused(*args, **kwargs):
        counter.fused += 1
        return real_fused(*args, **kwargs)

    def term(*args, **kwargs):
        counter.term += 1
        return real_term(*args, **kwargs)

    monkeypatch.setattr(bk_peft, "bone_linear", fused)
    monkeypatch.setattr(bk_peft, "adapter_output", term)
    return counter


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["bnb-4bit", "bnb-8bit", "torchao-int8", "hqq-4bit"])
def test_quantised_base_matches_peft(saved_llama, kind, case, calls, monkeypatch):
    peft_model = miss_over(kind, saved_llama, case)
    model = miss_over(kind, saved_llama, case)
    ids = token_batch(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        report = accelerate(model)
        assert len(report.switched) == LAYERS and not report.kept and not report.will_fall_back, str(report)
        masks = FixedMasks(monkeypatch)
        ours = loss_and_grads(model, ids)
    assert calls.fused == 0 and calls.term >= LAYERS  # the quantised base ran its own forward every time
    assert bool(masks.specs) == ("dropout" in case)  # dropout really ran (training mode)
    masks.replay(peft_model)
    theirs = loss_and_grads(peft_model, ids)
    assert not masks.specs
    assert set(ours[1]) == set(theirs[1]) and ours[1]
    assert_close_to_reference(ours[0], theirs[0], torch.float32, f"{kind} {case} loss")
    for name, grad in theirs[1].items():
        assert_close_to_reference(ours[1][name], grad, torch.float32, f"{kind} {case} {name}")
