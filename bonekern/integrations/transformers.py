"""``BonekernCallback``: a ``transformers.TrainerCallback`` that runs the Trainer's PEFT MiSS model on bonekern.

    trainer = Trainer(model=peft_model, ..., callbacks=[BonekernCallback()])   # or SFTTrainer(..., peft_config=...)

In ``on_train_begin`` it calls :func:`bonekern.integrations.peft.accelerate` on the model the Trainer hands its
callbacks (the unwrapped model, a PeftModel when the Trainer or TRL built one from ``peft_config``) and logs the
:class:`AccelerateReport` once, on the ``bonekern.integrations.transformers`` logger at INFO (also printed when
``verbose=True``). A model without MiSS layers is left alone (with one warning). Layers already switched, e.g. by
:func:`bonekern.integrations.peft.patch`, are kept and get this callback's backend.
"""

from __future__ import annotations

import logging
import warnings

from torch import nn
from transformers import TrainerCallback

from ..backends import check_backend_name
from .peft import AccelerateReport, _miss_layers, accelerate

logger = logging.getLogger(__name__)

__all__ = ["BonekernCallback"]


class BonekernCallback(TrainerCallback):
    """Accelerates the Trainer's model with bonekern when training begins.

    Args:
        backend: the bonekern backend ("auto", "torch", "triton", "cupy", "reference").
        verbose: also print the report (it is always logged at INFO).

    Attributes:
        report: the :class:`AccelerateReport` of the first ``on_train_begin`` (None before, or when the model had no
            MiSS layers).
    """

    def __init__(self, backend: str = "auto", *, verbose: bool = False) -> None:
        self.backend = check_backend_name(backend)
        self.verbose = verbose
        self.report: AccelerateReport | None = None
        self._done = False

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if self._done:  # trainer.train() again (or resumed): the layers are still switched
            return
        self._done = True
        if model is None or not _miss_layers(model):
            warnings.warn(
                f"bonekern: BonekernCallback found no PEFT MiSS layers in the Trainer's model "
                f"({type(model).__name__}); nothing to accelerate",
                stacklevel=2,
            )
            return
        self.report = accelerate(model, backend=self.backend)
        logger.info("%s", self.report)
        if self.verbose:
            print(self.report)
