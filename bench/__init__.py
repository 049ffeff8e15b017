"""``python -m bench``: memory and throughput of bonekern against PEFT, LoRA and the plain linear layer.

Modules: :mod:`bench.suites` (what is measured), :mod:`bench.impls` (the implementations compared),
:mod:`bench.timing`, :mod:`bench.memory`, :mod:`bench.costs` (how), :mod:`bench.runner` (one case),
:mod:`bench.report` (tables, JSON, CSV, plot), :mod:`bench.compare` (regressions), :mod:`bench.cli`.
"""
