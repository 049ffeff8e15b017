"""accelerate() over tiny Llamas with quantised bases (bitsandbytes 4-bit and 8-bit and torchao int8 weight-only
through transformers; hqq 4-bit layers put in by hand) under MiSS bat: every layer switched, no FallbackWarning
while training, and the loss and adapter gradients equal PEFT's own forward on the same model."""

from __future__ import annotations

import warnings

import pytest
import torch

from bonekern.integrations.peft import FallbackWarning, accelerate, restore
from tests.support.models import TARGETS, VOCAB, adapter_params, lm_loss, token_batch

warnings.filterwarnings("ignore", message=".*kernels.*")


def _config(name: str):
    import transformers

    if name == "bnb-nf4":
        pytest.importorskip("bitsandbytes")
        return transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    if name == "bnb-int8":
        pytest.importorskip("bitsandbytes")
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    if name == "torchao-int8":
        pytest.importorskip("torchao")
        from torchao.quantization import Int8WeightOnlyConfig

        return transformers.TorchAoConfig(Int8WeightOnlyConfig())
    return None  # hqq: transformers 5 refuses HqqConfig ("not available yet"); layers are replaced by hand


def _hqq_replace(model) -> None:
    """Replace every targeted nn.Linear with an hqq HQQLinear (4-bit, groups of 32), as hqq's own docs do."""
    pytest.importorskip("hqq")
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    for name, module in list(model.named_modules()):
        if name.split(".")[-1] in TARGETS:
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            quantised = HQQLinear(
                module, BaseQuantizeConfig(nbits=4, group_size=32), compute_dtype=torch.float32, device="cpu"
            )
            setattr(parent, name.rsplit(".", 1)[1], quantised)


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    """A tiny Llama (hidden 64, MLP 128: K a multiple of bnb's 64 and hqq's 32, so rows slice) saved to disk."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_bias=True,
        mlp_bias=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path


def _peft_bat(path, quant: str):
    from peft import MissConfig, get_peft_model
    from transformers import LlamaForCausalLM

    config = _config(quant)
    base = LlamaForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu", dtype=torch.float32)
    if config is None:
        _hqq_replace(base)
    model = get_peft_model(base, MissConfig(target_modules=TARGETS, r=8, init_weights="bat"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "miss_block" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = lm_loss(model, ids)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in adapter_params(model).items()}


@pytest.mark.parametrize("quant", ["bnb-nf4", "bnb-int8", "torchao-int8", "hqq-4bit"])
def test_accelerate_switches_and_matches_peft(saved_llama, quant):
    model = _peft_bat(saved_llama, quant)
    model.train()
    ids = token_batch(3)
    peft_loss, peft_grads = _loss_and_grads(model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        report = accelerate(model)
        assert not report.kept and not report.will_fall_back, str(report)
        assert len(report.switched) == len(TARGETS)
        loss, grads = _loss_and_grads(model, ids)
    assert torch.allclose(loss, peft_loss, rtol=1e-5, atol=1e-6), (loss, peft_loss)
    assert grads.keys() == peft_grads.keys()
    for name, g in grads.items():
        ref = peft_grads[name]
        err = ((g - ref).norm() / ref.norm()).item()
        assert err < 1e-4, f"{quant} {name}: relative gradient error {err:.2e}"
    restore(model)


def test_two_active_bat_adapters_over_nf4_chain_as_peft(saved_llama):
    from peft import MissConfig

    model = _peft_bat(saved_llama, "bnb-nf4")
    model.add_adapter("second", MissConfig(target_modules=TARGETS, r=8, init_weights="bat"))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "miss_block.second" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    model.base_model.set_adapter(["default", "second"])
    model.train()
    ids = token_batch(4)
    peft_loss, peft_grads = _loss_and_grads(model, ids)
    assert any("second" in n for n in peft_grads)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        report = accelerate(model)
        assert not report.kept, str(report)
        loss, grads = _loss_and_grads(model, ids)
    assert torch.allclose(loss, peft_loss, rtol=1e-5, atol=1e-6), (loss, peft_loss)
    for name, g in grads.items():
        err = ((g - peft_grads[name]).norm() / peft_grads[name].norm()).item()
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"
