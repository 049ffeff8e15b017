"""Which backend and config run one call.

``backend="auto"`` takes the first available backend in :data:`AUTO_ORDER` for the device type; a named backend
must be available or the call fails with :class:`BackendUnavailableError` saying why. The config is the
backend's default for the problem.
"""

from __future__ import annotations

import torch

from .backends import Backend, Config, OpProblem, check_backend_name, get_backend
from .errors import BackendUnavailableError

AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "cupy", "torch"),
}
"""Preference of ``backend="auto"`` per device type; any other device type uses the torch backend.
On the CPU the Triton interpreter and the CuPy host shim are test tools, never picked automatically."""


def require_available(name: str, device: torch.device) -> Backend:
    """The backend called ``name`` if it can run on ``device``; else BackendUnavailableError with the reason."""
    backend = get_backend(check_backend_name(name))
    reason = backend.unavailable_reason(device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run on {device}: {reason}")
    return backend


def auto_candidates(device: torch.device) -> list[Backend]:
    """The backends ``backend="auto"`` may choose from on ``device``, most preferred first."""
    order = AUTO_ORDER.get(device.type, ("torch",))
    return [b for b in map(get_backend, order) if b.unavailable_reason(device) is None]


def select(problem: OpProblem, requested: str) -> tuple[Backend, Config]:
    """The backend and config for ``problem``; ``requested`` is "auto" or a backend name."""
    if requested == "auto":
        backend = auto_candidates(problem.device)[0]
    else:
        backend = require_available(requested, problem.device)
    return backend, backend.default_config(problem)
