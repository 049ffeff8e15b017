"""Calibrated timing: median and p20/p80 over as many repeats as fit a time budget.

- CPU: ``time.perf_counter`` around each call (every CPU op is synchronous).
- CUDA: a pair of CUDA events around each call, read after a synchronize; before each call a 256 MiB buffer is
  zeroed (outside the events) so the call starts with a cold L2 cache, as it would inside a model where other
  layers run in between.

Every timed call is an NVTX range, so ``nsys profile python -m bench`` shows each one by name.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bonekern.profiling import nvtx_range

_L2_FLUSH_BYTES = 256 << 20


@dataclass(frozen=True)
class TimeStats:
    """Milliseconds per call over ``repeats`` timed calls (after one warm-up call that is not counted)."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int


def percentile(sorted_samples: list[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) of already sorted samples, linearly interpolated between neighbours."""
    if not sorted_samples:
        raise ValueError("percentile needs at least one sample")
    pos = q * (len(sorted_samples) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_samples) - 1)
    return sorted_samples[lo] + (sorted_samples[hi] - sorted_samples[lo]) * (pos - lo)


def stats(samples_ms: list[float]) -> TimeStats:
    s = sorted(samples_ms)
    return TimeStats(percentile(s, 0.5), percentile(s, 0.2), percentile(s, 0.8), len(s))


class Timer:
    """Times one call of a function on a device; see the module docstring for how."""

    def __init__(self, device: torch.device):
        self.device = device
        self._flush = None
        if device.type == "cuda":
            self._flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device)

    def once_ms(self, fn: Callable[[], object], label: str) -> float:
        if self.device.type == "cuda":
            self._flush.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            with nvtx_range(label):
                start.record()
                fn()
                end.record()
            end.synchronize()
            return start.elapsed_time(end)
        with nvtx_range(label):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3

    def repeats_for(self, estimate_ms: float, budget_s: float, min_repeats: int, max_repeats: int) -> int:
        """How many timed calls fit ``budget_s`` at ``estimate_ms`` per call, clamped to [min, max]."""
        return max(min_repeats, min(max_repeats, math.ceil(budget_s * 1e3 / max(estimate_ms, 1e-3))))

    def calibrated(
        self,
        fn: Callable[[], object],
        label: str,
        budget_s: float,
        min_repeats: int,
        max_repeats: int,
        warm_up: bool = True,
    ) -> TimeStats:
        """Warm up once (unless ``warm_up`` is False: the caller just ran the same code), estimate one call's
        time, then time ``budget_s / estimate`` calls (clamped to [min_repeats, max_repeats]); the estimate call
        counts as the first sample."""
        if warm_up:
            self.once_ms(fn, f"{label} (warm-up)")
        first = self.once_ms(fn, label)
        repeats = self.repeats_for(first, budget_s, min_repeats, max_repeats)
        samples = [first] + [self.once_ms(fn, label) for _ in range(repeats - 1)]
        return stats(samples)
