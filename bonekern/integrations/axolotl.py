"""``BonekernPlugin``: an axolotl plugin that adds PEFT MiSS adapters and runs them on bonekern.

axolotl (0.19) knows LoRA, QLoRA and llama-adapter; other adapters come from plugins, through two hooks this plugin
implements: ``get_adapter_capabilities`` registers the adapter name ``miss`` (so ``adapter: miss`` passes axolotl's
config validation) and ``load_adapter`` builds it (``get_peft_model`` with a ``MissConfig``, or
``PeftModel.from_pretrained`` from ``lora_model_dir``). Then ``post_lora_load`` / ``post_model_load`` switch every
MiSS layer of the model to bonekern (:func:`bonekern.integrations.peft.accelerate`, the report logged once). A MiSS
model built some other way (another plugin, a ``lora_model_dir`` holding a MiSS adapter) is accelerated too.

    plugins:
      - bonekern.integrations.axolotl.BonekernPlugin
    adapter: miss
    miss_r: 16                 # default: lora_r
    miss_init_weights: bat     # true (bone), bat or mini; default true
    miss_mini_r: 16            # mini only
    lora_target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
    bonekern_backend: auto

The ``miss_*`` and ``bonekern_backend`` keys are declared by :class:`BonekernArgs` (``get_input_args``); the target
modules and dropout are axolotl's ``lora_target_modules`` / ``lora_dropout``.
"""

from __future__ import annotations

import logging

from axolotl.integrations.base import AdapterCapabilities, BasePlugin
from pydantic import BaseModel
from torch import nn

from ..backends import check_backend_name

logger = logging.getLogger(__name__)

__all__ = ["ADAPTER", "BonekernArgs", "BonekernPlugin"]

ADAPTER = "miss"
"""The ``adapter:`` name the plugin registers with axolotl."""


class BonekernArgs(BaseModel):
    """The config keys the plugin reads (merged into axolotl's config schema)."""

    miss_r: int | None = None
    miss_init_weights: bool | str = True
    miss_mini_r: int | None = None
    bonekern_backend: str = "auto"


def _get(cfg, key: str, default=None):
    value = cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)
    return default if value is None else value


def miss_config(cfg):
    """The ``peft.MissConfig`` an axolotl ``cfg`` with ``adapter: miss`` asks for."""
    from peft import MissConfig

    r = _get(cfg, "miss_r", _get(cfg, "lora_r"))
    if r is None:
        raise ValueError("adapter: miss needs miss_r (or lora_r) in the axolotl config; got neither")
    targets = _get(cfg, "lora_target_modules")
    if not targets:
        raise ValueError("adapter: miss needs lora_target_modules in the axolotl config (the MiSS target modules)")
    init = _get(cfg, "miss_init_weights", True)
    if init not in (True, False, "bat", "mini"):
        raise ValueError(f"miss_init_weights must be true, false, 'bat' or 'mini'; got {init!r}")
    kwargs = {"mini_r": _get(cfg, "miss_mini_r")} if init == "mini" else {}
    return MissConfig(
        r=int(r),
        init_weights=init,
        target_modules=list(targets) if not isinstance(targets, str) else targets,
        miss_dropout=float(_get(cfg, "lora_dropout", 0.0)),
        task_type="CAUSAL_LM",
        **kwargs,
    )


class BonekernPlugin(BasePlugin):
    """Adds ``adapter: miss`` to axolotl and runs every PEFT MiSS layer of the loaded model on bonekern."""

    def __init__(self) -> None:
        super().__init__()
        self.report = None

    def get_input_args(self) -> str:
        return "bonekern.integrations.axolotl.BonekernArgs"

    def get_adapter_capabilities(self) -> list[AdapterCapabilities]:
        return [AdapterCapabilities(name=ADAPTER)]

    def load_adapter(self, model: nn.Module, cfg, inference: bool = False, config_only: bool = False):
        """Build the MiSS adapter for ``adapter: miss`` (None for any other adapter: axolotl's loader runs)."""
        if _get(cfg, "adapter") != ADAPTER:
            return None
        config = miss_config(cfg)
        if config_only:
            return None, config
        from peft import PeftModel, get_peft_model

        if _get(cfg, "lora_model_dir"):
            peft_model = PeftModel.from_pretrained(model, cfg.lora_model_dir, is_trainable=not inference)
        else:
            peft_model = get_peft_model(model, config)
        return peft_model, config

    def post_lora_load(self, cfg, model: nn.Module) -> None:
        self._accelerate(cfg, model)

    def post_model_load(self, cfg, model: nn.Module) -> None:
        self._accelerate(cfg, model)

    def _accelerate(self, cfg, model: nn.Module) -> None:
        from .peft import _miss_layers, accelerate

        if not isinstance(model, nn.Module) or not _miss_layers(model):
            return  # no MiSS adapter (yet): nothing to do
        backend = check_backend_name(_get(cfg, "bonekern_backend", "auto"))
        report = accelerate(model, backend=backend)
        if self.report is None or report.switched != self.report.switched:
            logger.info("%s", report)  # once per model, not once per hook
        self.report = report
