"""An accelerated PEFT MiSS model in PyTorch training machinery: torch.compile(fullgraph=True), activation
checkpointing (reentrant and not; BoneLinear too) and CPU autocast to bf16."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.support import assert_close_to_reference
from tests.support.models import (
    VARIANTS,
    adapter_params,
    assert_as_accurate_as,
    grad_errors,
    lm_loss,
    miss_model,
    tiny_llama,
    token_batch,
)

pytest.importorskip("peft", reason="needs the peft package (pip install 'bonekern[peft]')")
pytest.importorskip("transformers", reason="needs the transformers package (pip install 'bonekern[peft]')")

import bonekern.integrations.peft as bk_peft
from bonekern.integrations.peft import accelerate

LAYERS = 14  # 2 decoder layers x 7 linear layers


@pytest.fixture
def calls(monkeypatch):
    """Counts the bonekern.bone_linear calls made by accelerated layers (in eager mode)."""
    counter = SimpleNamespace(n=0)
    real = bk_peft.bone_linear

    def counting(*args, **kwargs):
        counter.n += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(bk_peft, "bone_linear", counting)
    return counter


def loss_and_grads(model, ids):
    model.zero_grad()
    loss = lm_loss(model, ids)
    loss.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in adapter_params(model).items()}
    return loss.detach(), grads


def assert_same(actual, expected, dtype=torch.float32):
    loss, grads = actual
    ref_loss, ref_grads = expected
    assert_close_to_reference(loss, ref_loss, dtype, "loss")
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_close_to_reference(grads[name], ref_grads[name], dtype, name)


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "compiler"), [("bone", "inductor"), ("bat", "aot_eager"), ("mini", "aot_eager")])
def test_compile_fullgraph(variant, compiler):
    """One graph for the whole model (fullgraph=True), with bonekern's custom ops in it, same loss and gradients.

    Inductor once (its first compile costs ~15 s of C++ builds on 2 cores); aot_eager runs the same Dynamo trace
    and AOTAutograd joint graph, only without code generation."""
    from torch._dynamo.testing import CompileCounterWithBackend

    base = tiny_llama(layers=1)
    model = miss_model(variant, base)
    accelerate(model)
    ids = token_batch(0)
    eager = loss_and_grads(model, ids)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(compiler)
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for _ in range(2):  # the second call reuses the compiled graph
        assert_same(loss_and_grads(compiled, ids), eager)
    assert counter.frame_count == 1
    op = "bat_forward" if variant == "bat" else "bone_forward"
    targets = [str(node.target) for node in counter.graphs[0].graph.nodes if node.op == "call_function"]
    assert sum(f"bonekern.{op}" in t for t in targets) == 7, targets


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_activation_checkpointing_gives_the_same_gradients(calls, reentrant):
    base = tiny_llama()
    model = miss_model("bone", base)
    accelerate(model)
    ids = token_batch(1)
    expected = loss_and_grads(model, ids)
    assert calls.n == LAYERS

    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    checkpointed = miss_model("bone", base)  # PEFT makes the inputs require grad for reentrant checkpointing
    accelerate(checkpointed)
    assert checkpointed.base_model.model.model.gradient_checkpointing
    calls.n = 0
    assert_same(loss_and_grads(checkpointed, ids), expected)
    assert calls.n == 2 * LAYERS  # every layer ran again in backward: checkpointing really happened


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bonelinear_under_activation_checkpointing(variant, reentrant):
    """torch.utils.checkpoint around BoneLinear layers: same output and gradients (x's included), recomputed."""
    from torch.utils.checkpoint import checkpoint

    from bonekern import BoneLinear

    torch.manual_seed(0)
    mini_r = {"mini_r": 8} if variant == "mini" else {}
    first = BoneLinear(24, 32, 8 if variant == "bat" else 5, variant=variant, **mini_r)
    second = BoneLinear(32, 16, 8, variant=variant, **mini_r)
    for layer in (first, second):
        torch.nn.init.normal_(layer.block, std=0.1)
    stack = torch.nn.Sequential(first, torch.nn.GELU(), second)
    x = torch.randn(2, 3, 24, requires_grad=True)
    results = []
    for use_checkpoint in (False, True):
        stack.zero_grad()
        x.grad = None
        y = checkpoint(stack, x, use_reentrant=reentrant) if use_checkpoint else stack(x)
        y.square().sum().backward()
        results.append([y.detach(), x.grad.clone(), first.block.grad.clone(), second.block.grad.clone()])
    for actual, expected, what in zip(results[1], results[0], ["y", "dx", "dblock 1", "dblock 2"], strict=True):
        assert_close_to_reference(actual, expected, torch.float32, what)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cpu_autocast_bf16_is_as_accurate_as_peft(calls, variant):
    """Under torch.autocast("cpu", bfloat16) with an fp32 model: bonekern's error against a float64 run is compared
    with PEFT's own error under the same autocast (neither equals the other: both round to bf16)."""
    base = tiny_llama()
    peft_model, model, reference = miss_model(variant, base), miss_model(variant, base), miss_model(variant, base)
    reference.double()
    accelerate(model)
    ids = token_batch(2)
    ref_loss, ref_grads = loss_and_grads(reference, ids)
    errors = {}
    for name, m in (("peft", peft_model), ("bonekern", model)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, grads = loss_and_grads(m, ids)
        assert all(g.dtype == torch.float32 for g in grads.values())
        errors[name] = (abs(loss.item() - ref_loss.item()), grad_errors(grads, ref_grads))
    assert calls.n == LAYERS  # bonekern served every layer under autocast
    assert errors["bonekern"][0] <= 2 * errors["peft"][0] + 2e-3, errors
    assert_as_accurate_as(errors["bonekern"][1], errors["peft"][1], f"{variant} under autocast")
