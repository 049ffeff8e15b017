"""``--compare baseline.json --threshold PCT``: find regressions against an earlier ``--json`` result.

A (case, implementation) pair regressed when one of its metrics grew by more than PCT percent over the
baseline: forward or forward+backward median time, peak memory, or bytes kept for backward. Pairs present on one
side only are listed, never counted as regressions; an implementation measured in the baseline but failing
now is a regression.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autotune.argtypes import read_json_file

METRICS: tuple[tuple[str, str, str], ...] = (
    ("fwd_median_ms", "forward median", "ms"),
    ("fwdbwd_median_ms", "forward+backward median", "ms"),
    ("peak_bytes", "peak memory", "bytes"),
    ("kept_bytes", "bytes kept for backward", "bytes"),
)


@dataclass(frozen=True)
class Regression:
    case_id: str
    impl: str
    metric: str
    baseline: float | None
    current: float | None
    percent: float | None

    def message(self, threshold: float) -> str:
        if self.current is None:
            return f"REGRESSION {self.case_id} [{self.impl}]: measured in the baseline, {self.metric} now"
        unit = next(u for key, name, u in METRICS if name == self.metric)
        pct = "+inf%" if self.percent is None else f"+{self.percent:.1f}%"
        return (
            f"REGRESSION {self.case_id} [{self.impl}]: {self.metric} {_fmt(self.current, unit)} vs baseline "
            f"{_fmt(self.baseline, unit)} ({pct}, threshold {threshold:g}%)"
        )


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    return f"{v:.3f} ms" if unit == "ms" else f"{v / (1 << 20):.2f} MiB"


def _is_metric(value: object) -> bool:
    """A finite number >= 0 that survives float arithmetic (an int of 400 digits does not: OverflowError)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        as_float = float(value)
    except OverflowError:
        return False
    return math.isfinite(as_float) and as_float >= 0


def _short(value: object, limit: int = 60) -> str:
    """A bounded description of a bad value (the repr of an int past 4300 digits raises)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load(path: str | Path) -> dict[str, Any]:
    """Read and check a ``--json`` result; ValueError with one line saying what is wrong with it.

    Checked here, before anything is measured: the file is a regular JSON file, its ``results`` a list of records
    with string ``case_id`` and ``impl``, and every metric a finite number >= 0 or null.
    """
    data = read_json_file(Path(path))
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ValueError(f"{path}: not a `python -m bench --json` result (no 'results' list)")
    if not isinstance(data.get("environment", {}), dict):
        raise ValueError(f"{path}: its 'environment' is not an object")
    for i, record in enumerate(data["results"]):
        where = f"{path}: results[{i}]"
        if not isinstance(record, dict):
            raise ValueError(f"{where} is not an object")
        for field in ("case_id", "impl"):
            if not isinstance(record.get(field), str):
                raise ValueError(f"{where}: {field!r} must be a string; got {type(record.get(field)).__name__}")
        for field, _, _ in METRICS:
            value = record.get(field)
            if value is None:
                continue
            if not _is_metric(value):
                raise ValueError(f"{where}: {field!r} must be a finite number >= 0 or null; got {_short(value)}")
    return data


def compare(
    current: list[dict[str, Any]], baseline: list[dict[str, Any]], threshold_pct: float
) -> tuple[list[Regression], list[str]]:
    """Regressions of ``current`` against ``baseline`` records, and notes (pairs on one side only)."""
    if threshold_pct < 0:
        raise ValueError(f"--threshold must be >= 0 percent; got {threshold_pct}")
    base = {(r["case_id"], r["impl"]): r for r in baseline}
    cur = {(r["case_id"], r["impl"]): r for r in current}
    regressions: list[Regression] = []
    notes: list[str] = []
    for key, now in cur.items():
        before = base.get(key)
        if before is None:
            notes.append(f"new: {key[0]} [{key[1]}] is not in the baseline")
            continue
        if before.get("status") != "ok":
            continue
        if now.get("status") != "ok":
            regressions.append(Regression(*key, f"{now.get('status')} ({now.get('reason')})", None, None, None))
            continue
        for field, name, _ in METRICS:
            b, c = before.get(field), now.get(field)
            if b is None or c is None:
                continue
            limit = b * (1 + threshold_pct / 100)
            if c > limit:
                regressions.append(Regression(*key, name, b, c, (c / b - 1) * 100 if b > 0 else None))
    notes += [f"missing: {k[0]} [{k[1]}] is in the baseline only" for k in base if k not in cur]
    return regressions, notes


def environment_notes(current: dict[str, Any], baseline: dict[str, Any]) -> list[str]:
    """Warnings when the two runs did not measure on the same kind of machine."""
    out = []
    for key in ("device", "gpu", "cpu", "torch_threads", "torch"):
        if current.get(key) != baseline.get(key):
            out.append(f"warning: {key} differs from the baseline's ({current.get(key)!r} vs {baseline.get(key)!r})")
    return out
