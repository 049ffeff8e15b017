"""bonekern.integrations.peft on tiny local Llama models: training parity with PEFT, save/load, merge, restore,
and every fallback (PEFT's own forward, with a one-time warning naming the layer and the reason)."""

from __future__ import annotations

import copy
import logging
import pickle
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tests.support import assert_close_to_reference
from tests.support.models import (
    VARIANTS,
    FixedMasks,
    adapter_params,
    assert_as_accurate_as,
    grad_errors,
    lm_loss,
    loss_and_grads,
    miss_model,
    tiny_llama,
    token_batch,
)

pytest.importorskip("peft", reason="needs the peft package (pip install 'bonekern[peft]')")
pytest.importorskip("transformers", reason="needs the transformers package (pip install 'bonekern[peft]')")

from peft import MissConfig, PeftModel, get_peft_model
from peft.tuners.miss import MissLinear

import bonekern
import bonekern.integrations.peft as bk_peft
from bonekern import BackendUnavailableError
from bonekern.backends import BACKEND_NAMES, unavailable_reason
from bonekern.integrations.peft import (
    BonekernMissLinear,
    FallbackWarning,
    accelerate,
    accelerated,
    restore,
)

LAYERS = 14  # 2 decoder layers x 7 linear layers


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture
def calls(monkeypatch):
    """Counts the bonekern.bone_linear calls made by accelerated layers."""
    counter = SimpleNamespace(n=0)
    real = bk_peft.bone_linear

    def counting(*args, **kwargs):
        counter.n += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(bk_peft, "bone_linear", counting)
    return counter


def miss_layers(model):
    return [m for m in model.modules() if isinstance(m, MissLinear)]


def sgd_run(model, steps: int, lr: float = 0.1):
    """``steps`` SGD steps on one batch: losses, every step's adapter gradients, final adapter weights."""
    params = adapter_params(model)
    opt = torch.optim.SGD(params.values(), lr=lr)
    losses, grads = [], []
    for _ in range(steps):
        loss = lm_loss(model, token_batch(0))
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in params.items()})
        opt.step()
        opt.zero_grad()
    return torch.stack(losses), grads, {n: p.detach().clone() for n, p in params.items()}


@pytest.mark.parametrize(
    ("variant", "bias"), [("bone", "none"), ("mini", "none"), ("bat", "none"), ("bone", "all"), ("bat", "all")]
)
def test_training_matches_peft(base, calls, variant, bias):
    """A few SGD steps; bias="all" also trains the base layers' biases (bonekern computes their gradients)."""
    steps = 3
    peft_model = miss_model(variant, base, bias=bias)
    losses_p, grads_p, final_p = sgd_run(peft_model, steps)
    assert any(name.endswith("proj.base_layer.bias") for name in grads_p[0]) == (bias == "all")

    model = miss_model(variant, base, bias=bias)
    report = accelerate(model)
    assert len(report.switched) == LAYERS and not report.kept and not report.will_fall_back
    assert all(type(m) is BonekernMissLinear for m in miss_layers(model))
    losses_b, grads_b, final_b = sgd_run(model, steps)
    assert calls.n == steps * LAYERS  # every MiSS layer ran bonekern on every step

    assert_close_to_reference(losses_b, losses_p, torch.float32, "losses")
    assert losses_b[-1] < losses_b[0]  # the steps trained
    for step in range(steps):
        for name in grads_p[step]:
            assert_close_to_reference(grads_b[step][name], grads_p[step][name], torch.float32, f"step {step} {name}")
    for name in final_p:
        assert_close_to_reference(final_b[name], final_p[name], torch.float32, f"final {name}")


def _errors(model, reference, ids) -> tuple[float, tuple[float, float]]:
    """(|loss - reference loss|, grad_errors) of one forward/backward against the float64 ``reference``."""
    loss = lm_loss(model, ids)
    loss.backward()
    reference.zero_grad()
    ref_loss = lm_loss(reference, ids)
    ref_loss.backward()
    grads = {n: p.grad for n, p in adapter_params(model).items()}
    return abs(loss.item() - ref_loss.item()), grad_errors(
        grads, {n: p.grad for n, p in adapter_params(reference).items()}
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bf16_model_with_fp32_adapters_is_as_accurate_as_peft(variant):
    """PEFT's default for a bf16 model: fp32 adapters, bf16 activations. bonekern's error against a float64 run of
    the same model is compared with PEFT's own error (both are bf16 computations, so neither equals the other)."""
    base = tiny_llama(dtype=torch.bfloat16)
    peft_model, model, reference = miss_model(variant, base), miss_model(variant, base), miss_model(variant, base)
    reference.double()
    accelerate(model)
    layer = miss_layers(model)[0]
    assert layer.miss_block["default"].dtype == torch.float32
    x = torch.randn(2, 3, layer.in_features, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    ids = token_batch(0)
    loss_err_p, grad_err_p = _errors(peft_model, reference, ids)
    loss_err_b, grad_err_b = _errors(model, reference, ids)
    assert loss_err_b <= 2 * loss_err_p + 1e-3, (loss_err_b, loss_err_p)
    assert_as_accurate_as(grad_err_b, grad_err_p, f"{variant} bf16 model")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_load_round_trip_and_state_dict(base, tmp_path, variant):
    peft_model = miss_model(variant, base)
    keys_before = list(peft_model.state_dict())
    model = miss_model(variant, base)
    accelerate(model)
    assert list(model.state_dict()) == keys_before
    sgd_run(model, 1)
    model.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert_close_to_reference(
        lm_loss(loaded, token_batch(9)).detach(), lm_loss(model, token_batch(9)).detach(), torch.float32, "loss"
    )
    accelerate(loaded)
    for name, p in adapter_params(model).items():
        torch.testing.assert_close(loaded.state_dict()[name], p.detach(), rtol=0, atol=0)
    ids = token_batch(9)
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merge_and_unload_equals_bonekern_merge(base, variant):
    model = miss_model(variant, base)
    accelerate(model)
    ids = token_batch(3)
    logits = model(input_ids=ids).logits.detach()
    expected = {}
    for name, layer in model.named_modules():
        if isinstance(layer, MissLinear):
            block = layer.miss_block["default"].detach()
            mini_r = block.shape[1] if variant == "mini" else None
            expected[name] = bonekern.merge(layer.base_layer.weight, block, variant=variant, mini_r=mini_r)
    merged = model.merge_and_unload()
    assert not miss_layers(merged)
    modules = dict(model.named_modules())
    for name, weight in expected.items():
        torch.testing.assert_close(modules[name].weight.detach(), weight, rtol=1e-5, atol=1e-6)
    assert_close_to_reference(merged(input_ids=ids).logits.detach(), logits, torch.float32, "merged logits")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merged_and_disabled_adapters_match_peft(base, calls, variant):
    peft_model, model = miss_model(variant, base), miss_model(variant, base)
    accelerate(model)
    ids = token_batch(4)
    with peft_model.disable_adapter(), model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids).logits, peft_model(input_ids=ids).logits, rtol=0, atol=0)
    assert calls.n == 0
    peft_model.merge_adapter()
    model.merge_adapter()
    torch.testing.assert_close(model(input_ids=ids).logits, peft_model(input_ids=ids).logits, rtol=0, atol=0)
    assert calls.n == 0
    with model.disable_adapter():  # PEFT unmerges a merged layer when adapters are disabled
        model(input_ids=ids)
    assert not any(layer.merged for layer in miss_layers(model))
    unmerged = model(input_ids=ids).logits
    assert calls.n == LAYERS
    assert_close_to_reference(unmerged, miss_model(variant, base)(input_ids=ids).logits, torch.float32, "unmerged")


def test_restore_and_context_manager_give_peft_forward_back(base, calls):
    peft_model, model = miss_model("bone", base), miss_model("bone", base)
    ids = token_batch(5)
    expected = peft_model(input_ids=ids).logits
    accelerate(model, backend="torch")
    assert all(layer._bonekern_backend == "torch" for layer in miss_layers(model))
    assert restore(model) == LAYERS
    assert all(type(layer) is MissLinear for layer in miss_layers(model))
    assert not any(hasattr(layer, "_bonekern_backend") for layer in miss_layers(model))
    torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)  # PEFT's forward, bit for bit
    assert calls.n == 0
    assert restore(model) == 0

    with pytest.raises(RuntimeError, match="inside"), accelerated(model) as report:
        assert len(report.switched) == LAYERS
        model(input_ids=ids)
        raise RuntimeError("inside")
    assert calls.n == LAYERS
    assert all(type(layer) is MissLinear for layer in miss_layers(model))

    accelerate(model, backend="reference")
    with accelerated(model, backend="torch"):
        assert {layer._bonekern_backend for layer in miss_layers(model)} == {"torch"}
    assert {layer._bonekern_backend for layer in miss_layers(model)} == {"reference"}


def test_accelerated_model_pickles_and_deep_copies(base):
    import copy

    model = miss_model("bat", base)
    accelerate(model)
    ids = token_batch(6)
    expected = model(input_ids=ids).logits
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert all(type(layer) is BonekernMissLinear for layer in miss_layers(clone))
        torch.testing.assert_close(clone(input_ids=ids).logits, expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------------
# Fallbacks
# ------------------------------------------------------------------------------------------------------------


def fallback_messages(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, FallbackWarning)]


def assert_matches_peft(ours, theirs, what: str) -> None:
    """(loss, grads) of bonekern against PEFT's, fp32."""
    loss, grads = ours
    loss_p, grads_p = theirs
    assert set(grads) == set(grads_p) and grads, what
    assert_close_to_reference(loss, loss_p, torch.float32, f"{what} loss")
    for name in grads_p:
        assert_close_to_reference(grads[name], grads_p[name], torch.float32, f"{what} {name}")


@pytest.mark.parametrize("variant", ["bone", "mini", "bat"])
def test_dropout_is_served_and_matches_peft_with_its_masks(base, calls, variant, monkeypatch):
    """miss_dropout=0.1 while training: every layer runs bonekern (no FallbackWarning); given bonekern's masks,
    PEFT computes the same loss and adapter gradients. bat ignores miss_dropout, in both."""
    peft_model = miss_model(variant, base, miss_dropout=0.1)
    model = miss_model(variant, base, miss_dropout=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        report = accelerate(model)
        assert len(report.switched) == LAYERS and not report.kept and not report.will_fall_back
        masks = FixedMasks(monkeypatch)
        ids = token_batch(7)
        ours = loss_and_grads(model, ids)
    assert len(masks.specs) == (0 if variant == "bat" else LAYERS)
    masks.replay(peft_model)
    theirs = loss_and_grads(peft_model, ids)
    assert not masks.specs  # PEFT used every mask bonekern drew, in the same order
    assert_matches_peft(ours, theirs, f"{variant} dropout")
    assert calls.n == (LAYERS if variant == "bat" else 0)  # bone/mini with dropout: base forward + adapter term

    model.eval()
    peft_model.eval()
    assert_close_to_reference(
        model(input_ids=ids).logits, peft_model(input_ids=ids).logits, torch.float32, "eval logits"
    )
    assert not masks.specs  # eval mode draws nothing


def _several_adapters(base, variant: str, extra: list[tuple[str, dict, list[str]]]):
    model = miss_model(variant, base)
    generator = torch.Generator().manual_seed(5)
    for name, overrides, targets in extra:
        model.add_adapter(name, MissConfig(target_modules=targets, **{**VARIANTS[variant], **overrides}))
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if f"miss_block.{name}" in pname:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    model.base_model.set_adapter(["default", *(name for name, _, _ in extra)])
    return model


SEVERAL = {
    "bone same r": ("bone", [("other", {}, ["q_proj", "v_proj"])]),
    "bone mixed r": ("bone", [("other", {}, ["q_proj"]), ("third", {"r": 4}, ["q_proj", "down_proj"])]),
    "bone with dropout": ("bone", [("other", {"miss_dropout": 0.1}, ["q_proj"])]),
    "mini mixed mini_r": ("mini", [("other", {"mini_r": 4}, ["q_proj"]), ("third", {"r": 3}, ["v_proj"])]),
    "bat chain": ("bat", [("other", {}, ["q_proj", "o_proj"]), ("third", {}, ["q_proj"])]),
}


@pytest.mark.parametrize("case", list(SEVERAL))
def test_several_active_adapters_match_peft(base, case, monkeypatch):
    variant, extra = SEVERAL[case]
    peft_model = _several_adapters(base, variant, extra)
    model = _several_adapters(base, variant, extra)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        report = accelerate(model)
        assert len(report.switched) == LAYERS and not report.kept and not report.will_fall_back
        masks = FixedMasks(monkeypatch)
        ids = token_batch(8)
        ours = loss_and_grads(model, ids)
    masks.replay(peft_model)
    theirs = loss_and_grads(peft_model, ids)
    assert not masks.specs
    assert any(name.endswith(".other") for name in ours[1])
    assert_matches_peft(ours, theirs, case)


def test_bat_adapters_with_different_r_fall_back(base):
    model = _several_adapters(base, "bat", [("other", {"r": 4}, ["q_proj"])])
    accelerate(model)
    with pytest.warns(FallbackWarning, match=r"q_proj runs PEFT's own forward: bat adapters .* have different r"):
        model(input_ids=token_batch(8))


class ScaledLinear(nn.Linear):
    """An nn.Linear subclass with its own forward: bonekern must not bypass it."""

    def forward(self, x):
        return 2 * super().forward(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.plain = nn.Linear(16, 8)
        self.scaled = ScaledLinear(16, 8)
        self.other = nn.Linear(16, 8)

    def forward(self, x):
        return self.plain(x) + self.scaled(x) + self.other(x)


def test_unservable_layers_are_kept_and_reported(caplog):
    torch.manual_seed(0)
    model = get_peft_model(Net(), MissConfig(r=4, init_weights="bat", target_modules=["plain", "scaled", "other"]))
    inner = model.base_model.model
    inner.other.quantization_backend = SimpleNamespace(backend_name="bnb-8bit")  # simulated
    caplog.set_level(logging.INFO, logger="bonekern.integrations.peft")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        report = accelerate(model)
    assert report.switched == ["base_model.model.plain"]
    assert report.kept == {
        "base_model.model.scaled": "bat over a ScaledLinear, not a plain torch.nn.Linear",
        "base_model.model.other": "bat over a quantised base layer (bnb-8bit)",
    }
    messages = fallback_messages(record)
    assert any("scaled" in m and "ScaledLinear" in m for m in messages)
    assert any("other" in m and "quantised" in m for m in messages)
    assert "1 of 3 MiSS layers switched" in caplog.text
    assert type(inner.scaled) is MissLinear and type(inner.plain) is BonekernMissLinear


@pytest.mark.parametrize("variant", ["bone", "mini"])
def test_bone_runs_over_any_base_layer(variant):
    """bone/mini over a base layer with its own forward: that forward runs (as in PEFT), bonekern adds the term."""
    torch.manual_seed(0)
    config = MissConfig(target_modules=["plain", "scaled", "other"], **{**VARIANTS[variant], "r": 4, "mini_r": 4})
    peft_model = get_peft_model(Net(), config)
    with torch.no_grad():
        for p in peft_model.parameters():
            if not p.requires_grad:
                continue
            p.normal_(0, 0.1)
    model = copy.deepcopy(peft_model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        report = accelerate(model)
    assert len(report.switched) == 3 and not report.kept
    x = torch.randn(2, 3, 16)
    y, y_peft = model(x), peft_model(x)
    assert_close_to_reference(y, y_peft, torch.float32, "output")
    y.square().sum().backward()
    y_peft.square().sum().backward()
    peft_grads = dict(peft_model.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert_close_to_reference(p.grad, peft_grads[name].grad, torch.float32, name)


def test_hooked_base_layer_sees_its_call(calls):
    torch.manual_seed(0)
    peft_model = get_peft_model(Net(), MissConfig(r=4, target_modules=["plain"]))
    model = copy.deepcopy(peft_model)
    accelerate(model)
    layer = model.base_model.model.plain
    x = torch.randn(3, 16)
    seen = []
    handle = layer.base_layer.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        y = layer(x)
    assert seen == [(3, 8)] and calls.n == 0  # the base layer's own call, then bonekern's adapter term
    assert_close_to_reference(y, peft_model.base_model.model.plain(x), torch.float32, "hooked output")
    handle.remove()

    # the base layer decides about dtypes, as without bonekern: here it refuses float64 x
    with pytest.raises(RuntimeError):
        layer(x.double())

    layer(x)
    assert calls.n == 1  # no hooks any more: the fused path


def test_bat_call_time_fallbacks():
    torch.manual_seed(0)
    model = get_peft_model(Net(), MissConfig(r=4, init_weights="bat", target_modules=["plain"]))
    accelerate(model)
    layer = model.base_model.model.plain
    handle = layer.base_layer.register_forward_hook(lambda module, args, out: None)
    with pytest.warns(FallbackWarning, match="plain runs PEFT's own forward: the base layer has hooks"):
        layer(torch.randn(3, 16))
    handle.remove()


def test_cpu_autocast_output_dtype_matches_peft(base, calls):
    peft_model, model = miss_model("mini", base), miss_model("mini", base)
    accelerate(model)
    x = torch.randn(2, 5, 48)
    layer, peft_layer = miss_layers(model)[0], miss_layers(peft_model)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_peft = layer(x), peft_layer(x)
    assert calls.n == 1
    assert y.dtype == y_peft.dtype == torch.float32  # PEFT casts back to x's dtype
    assert_close_to_reference(y, y_peft.double(), torch.bfloat16, "autocast y")


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_backend_passes_through(base, monkeypatch, backend):
    """A backend that runs here serves every layer; one that does not fails in accelerate, switching nothing."""
    used = []
    real = bk_peft.bone_linear
    monkeypatch.setattr(bk_peft, "bone_linear", lambda *a, **kw: used.append(kw["backend"]) or real(*a, **kw))
    peft_model, model = miss_model("bat", base), miss_model("bat", base)
    reason = unavailable_reason(backend, "cpu")
    if reason is not None:
        with pytest.raises(BackendUnavailableError, match=backend):
            accelerate(model, backend=backend)
        assert not any(isinstance(layer, BonekernMissLinear) for layer in miss_layers(model))
        return
    accelerate(model, backend=backend)
    ids = token_batch(10)
    assert_close_to_reference(
        model(input_ids=ids).logits, peft_model(input_ids=ids).logits, torch.float32, f"logits ({backend})"
    )
    assert used == [backend] * LAYERS


def test_bad_arguments():
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        accelerate("model")
    with pytest.raises(ValueError, match="no PEFT MiSS layers"):
        accelerate(nn.Linear(4, 4))
    model = get_peft_model(Net(), MissConfig(r=4, target_modules=["plain"]))
    with pytest.raises(ValueError, match="backend must be one of"):
        accelerate(model, backend="cuda")
