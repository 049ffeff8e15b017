"""``patch()`` / ``unpatch()``: every MiSS layer PEFT creates runs on bonekern, whoever builds the model.

Frameworks (transformers' Trainer, TRL's SFTTrainer, axolotl, ...) call ``get_peft_model`` themselves, so there is no
moment between building the PeftModel and the first step where a user could call :func:`accelerate`. ``patch()``
wraps the one method every way of adding MiSS adapters goes through, ``MissModel.inject_adapter``
(``get_peft_model``, ``PeftModel.add_adapter`` / ``load_adapter`` / ``from_pretrained``, transformers'
``model.add_adapter`` / ``load_adapter`` via ``inject_adapter_in_model``): after PEFT's own method has run, the MiSS
layers it created are switched with :func:`accelerate`'s machinery (same report, same :class:`FallbackWarning`).

Nothing else of PEFT changes: ``MissLinear.forward`` stays PEFT's function, so a fallback (which calls it) can never
recurse into bonekern. ``unpatch()`` puts the original ``inject_adapter`` back (the same function object, or no
attribute on ``MissModel`` when it was inherited); models built while patched keep bonekern until
:func:`restore` (``restore(model)`` / ``accelerate(model, backend=...)`` work on them as on any accelerated model).
Layers that existed before a patched ``add_adapter`` keep the state they had (switched or restored).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable

from peft.tuners.miss.layer import MissLayer
from peft.tuners.miss.model import MissModel
from torch import nn

from ..backends import check_backend_name
from .peft import _accelerate_layers

logger = logging.getLogger(__name__)

__all__ = ["is_patched", "patch", "unpatch"]

_MISSING = object()
_lock = threading.Lock()
_state: dict = {"original": None, "backend": None}
# original: MissModel.__dict__'s own inject_adapter before patch() (_MISSING when inherited), None when unpatched.
# backend: the backend patched calls switch new layers to.


def _wrap(original: Callable) -> Callable:
    @functools.wraps(original)
    def inject_adapter(self, model: nn.Module, *args, **kwargs):
        before = {id(module) for module in model.modules() if isinstance(module, MissLayer)}
        result = original(self, model, *args, **kwargs)
        backend = _state["backend"]
        if backend is None:  # unpatched while this call ran
            return result
        created = [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, MissLayer) and id(module) not in before
        ]
        if created:
            _accelerate_layers(created, backend)  # logs its report at INFO, warns about what falls back
        return result

    inject_adapter._bonekern_patch = True
    return inject_adapter


def patch(backend: str = "auto") -> None:
    """From now on, every MiSS layer PEFT creates runs on bonekern with ``backend`` (see the module docstring).

    Idempotent: a second call only changes the backend used for layers created from then on.

    Raises:
        TypeError / ValueError: ``backend`` is not a backend name ("auto", "torch", "triton", "cupy", "reference").
    """
    backend = check_backend_name(backend)
    with _lock:
        if _state["original"] is None:
            _state["original"] = MissModel.__dict__.get("inject_adapter", _MISSING)
            MissModel.inject_adapter = _wrap(MissModel.inject_adapter)
        _state["backend"] = backend
    logger.info("bonekern: PEFT MiSS layers created from now on run on bonekern (backend=%r)", backend)


def unpatch() -> None:
    """Give PEFT its own ``MissModel.inject_adapter`` back (a no-op when not patched). Models built while patched keep
    bonekern: call :func:`restore` on them for PEFT's forward."""
    with _lock:
        original = _state["original"]
        if original is None:
            return
        if original is _MISSING:
            del MissModel.inject_adapter
        else:
            MissModel.inject_adapter = original
        _state["original"] = None
        _state["backend"] = None


def is_patched() -> bool:
    """Whether :func:`patch` is in effect."""
    return _state["original"] is not None
