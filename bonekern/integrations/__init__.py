"""Integrations with training stacks. Each submodule imports its framework lazily, on its own import:

- :mod:`bonekern.integrations.peft` — ``accelerate(peft_model)`` runs PEFT MiSS layers on bonekern, in place.
- :mod:`bonekern.integrations.deepspeed` — used by it: MiSS calls on DeepSpeed ZeRO-3 partitioned base layers.
"""
