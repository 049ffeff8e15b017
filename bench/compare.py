"""``--compare baseline.json --threshold PCT``: find regressions against an earlier ``--json`` result.

A (case, implementation) pair regressed when one of its metrics grew by more than PCT percent over the
baseline: forward or forward+backward median time, peak memory, or bytes kept for backward. Pairs present on one
side only are listed, never counted as regressions; an implementation measured in the baseline but failing
now is a regression.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def load(path: str) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "results" not in data:
        raise ValueError("not a `python -m bench --json` result (no 'results' list)")
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
