"""The backend registry: names, lazy loading, availability.

Rule for backend packages: importing one must never fail, even without its optional dependency (triton,
cupy) or a GPU; it reports that through :meth:`Backend.unavailable_reason` and imports the heavy modules lazily.
A backend whose availability changes while the process runs (the CuPy backend when a kernel launcher is
registered) calls :func:`availability_changed`; whoever caches decisions per backend (:mod:`bonekern.dispatch`)
compares :func:`availability_generation`. Backends never import dispatch or tuning.
"""

from __future__ import annotations

import functools
import importlib

import torch

from .base import OPS, Backend, Config, OpProblem

BACKEND_NAMES: tuple[str, ...] = ("torch", "triton", "cupy", "reference")
"""Every backend name ``bone_linear(..., backend=...)`` accepts besides "auto"."""

_LOCATIONS = {
    "torch": ("bonekern.backends.pytorch", "TorchBackend"),
    "triton": ("bonekern.backends.triton", "TritonBackend"),
    "cupy": ("bonekern.backends.cupy", "CupyBackend"),
    "reference": ("bonekern.backends.einsum", "ReferenceBackend"),
}


def check_backend_name(name: object) -> str:
    """Return ``name`` if it is "auto" or a known backend, else raise TypeError/ValueError naming it."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, one of {('auto', *BACKEND_NAMES)}; got {type(name).__name__}")
    if name != "auto" and name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {('auto', *BACKEND_NAMES)}; got {name!r}")
    return name


@functools.cache
def get_backend(name: str) -> Backend:
    """The backend object for a known name (imported on first use)."""
    module_name, class_name = _LOCATIONS[check_backend_name(name)]
    return getattr(importlib.import_module(module_name), class_name)()


_generation = 0


def availability_changed() -> None:
    """Say that some backend's availability changed (e.g. a kernel launcher was registered or removed): every
    decision remembered under an older :func:`availability_generation` is stale."""
    global _generation
    _generation += 1


def availability_generation() -> int:
    """A counter that :func:`availability_changed` increments; cheap to read on every call."""
    return _generation


def unavailable_reason(name: str, device: torch.device | str) -> str | None:
    """None if backend ``name`` can run on ``device``, else why not."""
    return get_backend(name).unavailable_reason(torch.device(device))


def available_backends(device: torch.device | str) -> list[str]:
    """The backends that can run on ``device``, in :data:`BACKEND_NAMES` order."""
    return [name for name in BACKEND_NAMES if unavailable_reason(name, device) is None]


__all__ = [
    "BACKEND_NAMES",
    "OPS",
    "Backend",
    "Config",
    "OpProblem",
    "availability_changed",
    "availability_generation",
    "available_backends",
    "check_backend_name",
    "get_backend",
    "unavailable_reason",
]
