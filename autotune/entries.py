"""The records the tuner writes: a candidate, one candidate's measurement, and a tuned entry."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .keys import TuningKey


@dataclass(frozen=True)
class Candidate:
    """One thing the tuner can run: a backend and a JSON-serialisable config (strategy, tile sizes, ...)."""

    backend: str
    config: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"backend": self.backend, "config": dict(self.config)}

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Candidate:
        if not isinstance(data["backend"], str) or not isinstance(data["config"], dict):
            raise TypeError(f"a candidate needs a backend string and a config object; got {data!r}")
        return Candidate(data["backend"], data["config"])

    def same_as(self, other: Candidate) -> bool:
        return self.backend == other.backend and dict(self.config) == dict(other.config)

    def describe(self) -> str:
        """Compact text: ``torch rowchunk chunk_blocks=8`` (string values first, then name=value)."""
        words = [self.backend]
        words += [str(v) for v in self.config.values() if isinstance(v, str)]
        words += [f"{k}={v}" for k, v in self.config.items() if not isinstance(v, str)]
        return " ".join(words)


@dataclass(frozen=True)
class Timing:
    """The outcome of one candidate in a tuning run: a median time, or why it was dropped."""

    candidate: Candidate
    ms: float | None = None
    samples: int = 0
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = self.candidate.to_json()
        if self.error is None:
            out.update(ms=round(self.ms, 6), samples=self.samples)
        else:
            out["error"] = self.error
        return out

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Timing:
        ms = data.get("ms")
        if ms is not None and (
            isinstance(ms, bool) or not isinstance(ms, (int, float)) or not math.isfinite(ms) or ms < 0
        ):
            raise TypeError(f"ms must be a finite number >= 0; got {ms!r}")
        samples = data.get("samples", 0)
        error = data.get("error")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
            raise TypeError(f"samples must be an int >= 0; got {samples!r}")
        if error is not None and not isinstance(error, str):
            raise TypeError(f"error must be a string; got {error!r}")
        if (ms is None) == (error is None):  # to_json writes exactly one of them
            raise TypeError(f"a timing has either ms or error; got ms={ms!r}, error={error!r}")
        return Timing(Candidate.from_json(data), ms, samples, error)


@dataclass(frozen=True)
class Entry:
    """A tuned result: the winner for ``key``, every candidate's timing, and how it was measured.

    ``m_tuned`` is the real M that was timed (the key holds its bucket); ``default`` is the candidate that runs
    when nothing is tuned, so tables can show the speed-up over it.
    """

    key: TuningKey
    choice: Candidate
    default: Candidate
    timings: tuple[Timing, ...]
    m_tuned: int
    timer: str
    tuned_at: str

    @property
    def best_ms(self) -> float | None:
        return next((t.ms for t in self.timings if t.candidate.same_as(self.choice) and t.ms is not None), None)

    @property
    def default_ms(self) -> float | None:
        return next((t.ms for t in self.timings if t.candidate.same_as(self.default) and t.ms is not None), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key.to_json(),
            "choice": self.choice.to_json(),
            "default": self.default.to_json(),
            "timings": [t.to_json() for t in self.timings],
            "m_tuned": self.m_tuned,
            "timer": self.timer,
            "tuned_at": self.tuned_at,
        }

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Entry:
        """Inverse of :meth:`to_json`; raises KeyError/TypeError/ValueError on a malformed object."""
        m_tuned, timer, tuned_at = data["m_tuned"], data["timer"], data["tuned_at"]
        if isinstance(m_tuned, bool) or not isinstance(m_tuned, int) or m_tuned < 1:
            raise TypeError(f"m_tuned must be an int >= 1; got {m_tuned!r}")
        if not isinstance(timer, str) or not isinstance(tuned_at, str):
            raise TypeError(f"timer and tuned_at must be strings; got {timer!r}, {tuned_at!r}")
        if not isinstance(data["timings"], list):
            raise TypeError(f"timings must be a list; got {type(data['timings']).__name__}")
        return Entry(
            TuningKey.from_json(data["key"]),
            Candidate.from_json(data["choice"]),
            Candidate.from_json(data["default"]),
            tuple(Timing.from_json(t) for t in data["timings"]),
            m_tuned,
            timer,
            tuned_at,
        )


def is_json_config(config: Mapping[str, Any]) -> bool:
    """True when ``config`` survives a JSON round trip unchanged (what every stored config must do)."""
    try:
        return json.loads(json.dumps(dict(config))) == dict(config)
    except (TypeError, ValueError):
        return False
