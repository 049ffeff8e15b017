"""bonekern.integrations.transformers.BonekernCallback's hook, called as the Trainer calls it (the Trainer runs
with it in tests/integrations/test_convergence.py)."""

from __future__ import annotations

import pytest

from tests.support.models import miss_model, tiny_llama

pytest.importorskip("peft", reason="needs the peft package (pip install 'bonekern[peft]')")
pytest.importorskip("transformers", reason="needs the transformers package (pip install 'bonekern[peft]')")

from peft.tuners.miss.layer import MissLayer
from transformers import TrainerControl, TrainerState, TrainingArguments

from bonekern.integrations.transformers import BonekernCallback


def hook(callback, tmp_path, model):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    return callback.on_train_begin(args, TrainerState(), TrainerControl(), model=model)


def test_callback_accelerates_once_and_logs_the_report(tmp_path, caplog):
    model = miss_model("bat", tiny_llama(layers=1))
    callback = BonekernCallback(backend="torch")
    with caplog.at_level("INFO", logger="bonekern.integrations.transformers"):
        hook(callback, tmp_path, model)
        hook(callback, tmp_path, model)  # a second train(): nothing more
    assert {type(m).__name__ for m in model.modules() if isinstance(m, MissLayer)} == {"BonekernMissLinear"}
    assert len(callback.report.switched) == 7 and callback.report.backend == "torch"
    assert sum("7 of 7 MiSS layers switched" in r.getMessage() for r in caplog.records) == 1


def test_callback_leaves_a_model_without_miss_layers_alone(tmp_path):
    callback = BonekernCallback()
    with pytest.warns(UserWarning, match="no PEFT MiSS layers"):
        hook(callback, tmp_path, tiny_llama(layers=1))
    assert callback.report is None


def test_callback_rejects_bad_backends():
    with pytest.raises(ValueError, match="backend"):
        BonekernCallback(backend="nope")
