"""bonekern.integrations.axolotl.BonekernPlugin, driven through axolotl's own PluginManager on a tiny Llama."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.support import assert_close_to_reference
from tests.support.models import TARGETS, lm_loss, tiny_llama, token_batch

pytest.importorskip("peft", reason="needs the peft package (pip install 'bonekern[peft]')")
pytest.importorskip("axolotl.integrations.base", reason="needs axolotl (tests/install_extras.sh)")

from axolotl.integrations.base import PluginManager
from axolotl.utils.dict import DictDefault
from peft import get_peft_model
from peft.tuners.miss.layer import MissLayer

from bonekern.integrations.axolotl import BonekernArgs, miss_config
from bonekern.integrations.peft import FallbackWarning

NAME = "bonekern.integrations.axolotl.BonekernPlugin"


@pytest.fixture
def manager():
    manager = PluginManager.get_instance()
    manager.register(NAME)
    assert NAME in manager.plugins, "axolotl could not load the plugin (it logs the ImportError)"
    yield manager
    manager.plugins.pop(NAME, None)


def kinds(model) -> set[str]:
    return {type(m).__name__ for m in model.modules() if isinstance(m, MissLayer)}


def config(**overrides) -> DictDefault:
    return DictDefault(
        {"adapter": "miss", "miss_r": 8, "miss_init_weights": "bat", "lora_target_modules": TARGETS, **overrides}
    )


def test_plugin_registers_the_miss_adapter(manager):
    assert manager.supports_adapter("miss")
    assert not manager.adapter_supports_relora("miss")
    assert "bonekern.integrations.axolotl.BonekernArgs" in manager.get_input_args()
    assert BonekernArgs(miss_r=4).bonekern_backend == "auto"


@pytest.mark.parametrize(("init", "extra"), [(True, {}), ("bat", {}), ("mini", {"miss_mini_r": 8})])
def test_load_adapter_then_post_hooks_run_the_model_on_bonekern(manager, init, extra):
    cfg = config(miss_init_weights=init, miss_r=8 if init == "bat" else 7, **extra)
    base = tiny_llama()
    expected_model = get_peft_model(tiny_llama(), miss_config(cfg))
    model, peft_config = manager.load_adapter(base, cfg)
    assert peft_config.init_weights == init and peft_config.r == cfg.miss_r
    assert kinds(model) == {"MissLinear"}
    manager.post_lora_load(cfg, model)
    assert kinds(model) == {"BonekernMissLinear"}
    manager.post_model_load(cfg, model)  # a second hook: still switched, nothing else changes
    assert kinds(model) == {"BonekernMissLinear"}
    plugin = manager.plugins[NAME]
    assert len(plugin.report.switched) == 14
    with torch.no_grad():  # PEFT's init of the blocks is zero for bone/bat: give them values that matter
        for (_, p), (_, q) in zip(model.named_parameters(), expected_model.named_parameters(), strict=True):
            if p.requires_grad:
                p.normal_(0, 0.05)
                q.copy_(p)
    ids = token_batch(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        loss = lm_loss(model, ids)
    assert_close_to_reference(loss, lm_loss(expected_model, ids), torch.float32, "loss")


def test_plugin_leaves_other_adapters_and_plain_models_alone(manager):
    model = tiny_llama()
    assert manager.load_adapter(model, config(adapter="lora")) is None
    manager.post_model_load(config(adapter=None), model)  # no MiSS layers: nothing to do, no error
    assert manager.plugins[NAME].report is None


def test_config_only_and_bad_configs(manager):
    loaded, peft_config = manager.load_adapter(tiny_llama(), config(), config_only=True)
    assert loaded is None and peft_config.r == 8
    with pytest.raises(ValueError, match="miss_r"):
        manager.load_adapter(tiny_llama(), config(miss_r=None))
    with pytest.raises(ValueError, match="lora_target_modules"):
        manager.load_adapter(tiny_llama(), config(lora_target_modules=None))
    with pytest.raises(ValueError, match="miss_init_weights"):
        manager.load_adapter(tiny_llama(), config(miss_init_weights="lora"))
