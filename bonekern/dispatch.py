"""Which backend and config run one call.

``backend="auto"`` may use every available backend in :data:`AUTO_ORDER` for the device type; a named backend
must be available or the call fails with :class:`BackendUnavailableError` saying why. Among those, the
autotuner (:mod:`bonekern.tuning`) picks the backend and config: from a profile, the user cache, a shipped
profile, by timing the candidates on the call's real tensors, or -- when nothing is tuned or
``BONEKERN_AUTOTUNE=0`` -- the first backend's ``default_config(problem)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from . import tuning
from .backends import Backend, OpProblem, check_backend_name, get_backend
from .errors import BackendUnavailableError

AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "cupy", "torch"),
}
"""Backends ``backend="auto"`` may use per device type, the default first."""

DEFAULT_ORDER: tuple[str, ...] = ("torch",)
"""Any other device type (the CPU included) uses the torch backend: on the CPU the Triton interpreter and the
CuPy host shim are test tools, never picked automatically."""


def require_available(name: str, device: torch.device) -> Backend:
    """The backend called ``name`` if it can run on ``device``; else BackendUnavailableError with the reason."""
    backend = get_backend(check_backend_name(name))
    reason = backend.unavailable_reason(device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run on {device}: {reason}")
    return backend


def auto_candidates(device: torch.device) -> list[Backend]:
    """The backends ``backend="auto"`` may choose from on ``device``, the default first."""
    order = AUTO_ORDER.get(device.type, DEFAULT_ORDER)
    return [b for b in map(get_backend, order) if b.unavailable_reason(device) is None]


def select(problem: OpProblem, requested: str, args: Sequence[Any] | None = None) -> tuple[Backend, Any]:
    """The backend and its prepared config (:meth:`Backend.prepare_config`) for ``problem``; ``requested`` is
    "auto" or a backend name.

    ``args`` are the call's tensors (and flags) as the backend method takes them, without the config; with them
    the tuner can time candidates on the real inputs when nothing is tuned yet.
    """
    hit = tuning.remembered(tuning.memo_key(problem, requested, args))
    if hit is not None:  # the common case: this layer's shape was seen before in this process
        return hit
    if requested == "auto":
        backends = auto_candidates(problem.device)
    else:
        backends = [require_available(requested, problem.device)]
    return tuning.choose(problem, requested, backends, args)
