"""Integrations with training stacks. Each submodule imports its framework lazily, on its own import:

- :mod:`bonekern.integrations.peft` — ``accelerate(peft_model)`` runs PEFT MiSS layers on bonekern, in place;
  ``patch()`` / ``unpatch()`` (:mod:`bonekern.integrations.patch`) do it for every MiSS layer PEFT creates.
- :mod:`bonekern.integrations.transformers` — ``BonekernCallback``, a ``TrainerCallback`` that accelerates the
  Trainer's model when training begins.
- :mod:`bonekern.integrations.axolotl` — ``BonekernPlugin``: ``adapter: miss`` for axolotl, run on bonekern.
- :mod:`bonekern.integrations.deepspeed` — used by ``peft``: MiSS calls on DeepSpeed ZeRO-3 partitioned base layers.
"""
