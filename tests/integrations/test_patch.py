"""bonekern.integrations.peft.patch() / unpatch(): every MiSS layer PEFT creates runs on bonekern; PEFT restored
exactly; compatible with accelerate() / restore(); fallbacks run PEFT's own forward."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from tests.support import assert_close_to_reference
from tests.support.models import TARGETS, VARIANTS, lm_loss, miss_model, tiny_llama, token_batch

pytest.importorskip("peft", reason="needs the peft package (pip install 'bonekern[peft]')")
pytest.importorskip("transformers", reason="needs the transformers package (pip install 'bonekern[peft]')")

from peft import MissConfig, PeftModel, get_peft_model
from peft.tuners.miss.layer import MissLayer, MissLinear
from peft.tuners.miss.model import MissModel

from bonekern.integrations.peft import (
    BonekernMissLinear,
    FallbackWarning,
    accelerate,
    is_patched,
    patch,
    restore,
    unpatch,
)

LAYERS = 14


@pytest.fixture(autouse=True)
def unpatched():
    unpatch()
    yield
    unpatch()


def kinds(model) -> list[str]:
    return [type(m).__name__ for m in model.modules() if isinstance(m, MissLayer)]


def all_bonekern(model, count=LAYERS) -> bool:
    return kinds(model) == ["BonekernMissLinear"] * count


def test_unpatch_gives_peft_back_exactly():
    own = dict(MissModel.__dict__)
    inherited = MissModel.inject_adapter
    forward = MissLinear.forward
    patch()
    patch(backend="torch")  # idempotent: wraps once
    assert is_patched()
    assert MissModel.inject_adapter is not inherited
    assert MissModel.inject_adapter.__wrapped__ is inherited
    assert MissLinear.forward is forward  # the forward a fallback calls is never patched
    unpatch()
    unpatch()  # a no-op when not patched
    assert not is_patched()
    assert dict(MissModel.__dict__) == own
    assert MissModel.inject_adapter is inherited
    assert kinds(miss_model("bone")) == ["MissLinear"] * LAYERS


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_get_peft_model_after_patch_runs_on_bonekern(variant):
    base = tiny_llama()
    ids = token_batch(0)
    expected = lm_loss(miss_model(variant, base), ids)
    patch()
    model = miss_model(variant, base)
    assert all_bonekern(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        assert_close_to_reference(lm_loss(model, ids), expected, torch.float32, "loss")


def test_patch_backend_is_used_and_can_change():
    patch(backend="torch")
    model = miss_model("bone")
    assert {m._bonekern_backend for m in model.modules() if isinstance(m, BonekernMissLinear)} == {"torch"}
    patch(backend="reference")
    other = miss_model("bat")
    assert {m._bonekern_backend for m in other.modules() if isinstance(m, BonekernMissLinear)} == {"reference"}
    assert {m._bonekern_backend for m in model.modules() if isinstance(m, BonekernMissLinear)} == {"torch"}


def test_add_adapter_switches_new_layers_and_keeps_existing_ones():
    model = get_peft_model(tiny_llama(), MissConfig(target_modules=["q_proj"], r=8))
    assert kinds(model) == ["MissLinear"] * 2  # built before patch(): untouched
    patch()
    model.add_adapter("second", MissConfig(target_modules=["q_proj", "v_proj"], r=8))
    by_name = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, MissLayer)}
    assert {n.rsplit(".", 1)[1]: k for n, k in by_name.items()} == {
        "q_proj": "MissLinear",
        "v_proj": "BonekernMissLinear",
    }
    assert sorted(by_name.values()) == ["BonekernMissLinear"] * 2 + ["MissLinear"] * 2


def test_from_pretrained_and_load_adapter(tmp_path):
    base = tiny_llama()
    saved = miss_model("bone", base)
    saved.save_pretrained(tmp_path / "bone")
    miss_model("bat", base).save_pretrained(tmp_path / "bat")
    ids = token_batch(1)
    expected = lm_loss(saved, ids)
    patch()
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "bone")
    assert all_bonekern(loaded)
    assert_close_to_reference(lm_loss(loaded, ids), expected, torch.float32, "loss")
    unpatch()
    plain = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "bone")
    patch()
    plain.load_adapter(tmp_path / "bat", adapter_name="bat")  # existing layers get a second adapter: kept as they were
    assert kinds(plain) == ["MissLinear"] * LAYERS
    assert all_bonekern(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "bat"))


def test_inject_adapter_in_model_after_patch():
    """peft.inject_adapter_in_model: what transformers' model.add_adapter / load_adapter call (transformers 5.24
    needs peft >= 0.22 for those, newer than the peft here)."""
    from peft import inject_adapter_in_model

    patch()
    model = inject_adapter_in_model(MissConfig(target_modules=TARGETS, r=8, init_weights="bat"), tiny_llama())
    assert all_bonekern(model)


def test_accelerate_and_restore_on_a_patched_model():
    patch()
    model = miss_model("mini")
    assert restore(model) == LAYERS
    assert kinds(model) == ["MissLinear"] * LAYERS
    report = accelerate(model, backend="torch")
    assert len(report.switched) == LAYERS and all_bonekern(model)
    unpatch()
    assert all_bonekern(model)  # unpatch leaves built models alone; restore() gives them PEFT's forward
    restore(model)
    assert kinds(model) == ["MissLinear"] * LAYERS


def test_a_fallback_runs_peft_forward_without_recursion():
    base = tiny_llama()
    ids = token_batch(2)
    reference = miss_model("bat", base)
    patch()
    model = miss_model("bat", base)
    assert all_bonekern(model)
    # bat runs on the base weight, so a hook on the base layer that must see its own call makes each call fall
    # back to PEFT's forward -- which must not land in the patched layer's forward again.
    layer = next(m for m in model.modules() if hasattr(m, "base_layer") and hasattr(m, "miss_block"))
    layer.base_layer.register_forward_hook(lambda module, args, out: None)
    with pytest.warns(FallbackWarning, match="hooks that must see its own call"):
        loss = lm_loss(model, ids)  # a fallback that re-entered the patched forward would never return
    assert torch.allclose(loss, lm_loss(reference, ids), rtol=1e-5, atol=1e-6)


def test_patch_rejects_bad_backends():
    with pytest.raises(ValueError, match="backend"):
        patch(backend="nope")
    with pytest.raises(TypeError, match="backend"):
        patch(backend=3)
    assert not is_patched()
