"""Switches read from the environment, under a prefix chosen by the provider (bonekern: ``BONEKERN``).

=================================  ===========================================================================
``<P>_AUTOTUNE``                   ``1`` (default): look up, tune on a miss; ``0``: heuristic defaults only,
                                   never time, never read a cache; ``lookup``: use cache and profiles, never
                                   time; ``force``: retune every problem once per process, ignoring hits.
``<P>_AUTOTUNE_LOG``               ``1``: log every choice and the layer it came from to stderr.
``<P>_CACHE_DIR``                  directory of the user cache (``autotune.json``); default: the user cache
                                   directory from platformdirs (``$XDG_CACHE_HOME/<app>`` when that is an
                                   absolute path, else ``~/.cache/<app>`` on Linux).
``<P>_AUTOTUNE_PROFILE``           a profile file consulted before the user cache (e.g. one made by
                                   ``python -m autotune export`` on another machine).
``TRITON_INTERPRET``               ``1``: kernels run in the Triton interpreter; timing is meaningless, so the
                                   tuner behaves as if ``<P>_AUTOTUNE=0``.
=================================  ===========================================================================

Settings are read on every decision (a handful of ``os.environ`` lookups) so tests and users may change them
while a process runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

MODES: dict[str, str] = {
    "0": "off",
    "off": "off",
    "false": "off",
    "no": "off",
    "1": "on",
    "on": "on",
    "true": "on",
    "yes": "on",
    "lookup": "lookup",
    "force": "force",
}
"""Accepted values of ``<P>_AUTOTUNE`` (case-insensitive) and the mode each means."""

CACHE_FILE_NAME = "autotune.json"


def user_cache_dir(app: str) -> Path:
    """The per-user cache directory for ``app``, by each platform's convention (platformdirs; XDG on Linux)."""
    return Path(platformdirs.user_cache_dir(app, appauthor=False))


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    """The tuner's switches; see the module docstring for the variables.

    Attributes:
        mode: "off", "lookup", "on" or "force" (already forced to "off" under the Triton interpreter).
        why_off: when ``mode`` is "off", which variable turned it off.
        log: log each choice.
        cache_path: the user cache file.
        profile_path: the file named by ``<P>_AUTOTUNE_PROFILE``, or None.
        interpreter: TRITON_INTERPRET is set.
    """

    mode: str
    why_off: str
    log: bool
    cache_path: Path
    profile_path: Path | None
    interpreter: bool

    @staticmethod
    def from_env(prefix: str, app: str) -> Settings:
        """Read the settings; an unknown ``<P>_AUTOTUNE`` value raises ValueError naming the variable."""
        var = f"{prefix}_AUTOTUNE"
        raw = os.environ.get(var, "1").strip().lower() or "1"
        if raw not in MODES:
            raise ValueError(f"{var} must be one of {sorted(set(MODES))}; got {os.environ[var]!r}")
        mode, why_off = MODES[raw], (f"{var}={os.environ.get(var)}" if MODES[raw] == "off" else "")
        interpreter = _flag(os.environ.get("TRITON_INTERPRET"))
        if interpreter and mode != "off":
            mode, why_off = "off", "TRITON_INTERPRET=1 (the Triton interpreter: timings mean nothing)"
        cache_dir = os.environ.get(f"{prefix}_CACHE_DIR")
        profile = os.environ.get(f"{prefix}_AUTOTUNE_PROFILE")
        return Settings(
            mode=mode,
            why_off=why_off,
            log=_flag(os.environ.get(f"{prefix}_AUTOTUNE_LOG")),
            cache_path=(Path(cache_dir).expanduser() if cache_dir else user_cache_dir(app)) / CACHE_FILE_NAME,
            profile_path=Path(profile).expanduser() if profile else None,
            interpreter=interpreter,
        )

    @property
    def may_look_up(self) -> bool:
        return self.mode in ("on", "lookup")

    @property
    def may_time(self) -> bool:
        return self.mode in ("on", "force")
