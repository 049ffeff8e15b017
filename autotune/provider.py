"""The provider hook: how ``python -m autotune`` finds the ops to tune without importing any kernel library.

A provider is an object with the attributes of :class:`Provider`. Packages register one under the entry-point
group ``autotune.providers`` (bonekern: ``bonekern = "bonekern.autotune_provider:autotune_provider"``), or a
module may be named directly with ``--provider some.module``; the module must define ``autotune_provider()``
returning it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .keys import TuningKey
from .presets import LayerShape
from .tuner import Runner, SearchSpace, Tuner

ENTRY_POINT_GROUP = "autotune.providers"
DEFAULT_PROVIDER = "bonekern"
"""Entry-point name used when ``--provider`` is not given."""
FALLBACK_MODULES: dict[str, str] = {"bonekern": "bonekern.autotune_provider"}
"""Where a provider lives when its entry point is not registered (a source checkout that was never installed)."""


@dataclass
class Job:
    """One problem for ``tune``: its search space, and a factory for a runner on synthetic inputs (built only
    when the job is actually timed)."""

    space: SearchSpace
    make_runner: Callable[[], Runner]


class Provider(Protocol):
    """What a kernel library gives the CLI."""

    name: str
    """Names the user cache directory."""
    env_prefix: str
    """Prefix of the environment switches (``<prefix>_AUTOTUNE`` ...)."""

    def tuner(self) -> Tuner:
        """The tuner the library's own dispatch uses (same cache, same profiles)."""
        ...

    def add_tune_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add the library's own ``tune`` options (variant, r, backend, ...)."""
        ...

    def jobs(
        self, shapes: list[LayerShape], tokens: list[int], dtypes: list[str], device: str, args: argparse.Namespace
    ) -> tuple[list[Job], list[str]]:
        """The problems to tune, and notes on combinations skipped (e.g. a shape a variant cannot take)."""
        ...

    def current_provenance(self, key: TuningKey) -> tuple[dict[str, str], str] | None:
        """The library versions and source hash ``key`` would get today (None if unknown): marks stale entries."""
        ...

    def devices(self) -> list[tuple[str, str]]:
        """(device_type, device name) of every device present, for ``export``."""
        ...

    def default_device(self) -> str:
        """The device ``tune`` uses when ``--device`` is not given ("cuda" when present, else "cpu")."""
        ...

    def device_problem(self, device: str) -> str | None:
        """Why ``tune`` cannot run on ``device`` (unknown name, absent device), as one sentence; None if it can."""
        ...


def load_provider(name: str | None = None) -> Provider:
    """The provider registered as entry point ``name`` (default :data:`DEFAULT_PROVIDER`), else the module
    called ``name`` (``autotune_provider()`` in it). ValueError listing what is installed if neither works."""
    name = name or DEFAULT_PROVIDER
    points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    for point in points:
        if point.name == name:
            return point.load()()
    module_name = FALLBACK_MODULES.get(name, name)
    if not all(part.isidentifier() for part in module_name.split(".")):
        registered = sorted(p.name for p in points)
        raise ValueError(
            f"--provider must be an entry point in group {ENTRY_POINT_GROUP!r} (registered: {registered}) or a "
            f"dotted module name; got {name!r}"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            registered = sorted(p.name for p in points)
            raise ValueError(
                f"--provider {name!r} is neither an entry point in group {ENTRY_POINT_GROUP!r} "
                f"(registered: {registered}) nor an importable module"
            ) from exc
        raise
    factory = getattr(module, "autotune_provider", None)
    if factory is None:
        raise ValueError(f"provider module {module_name!r} has no autotune_provider() function")
    return factory()
