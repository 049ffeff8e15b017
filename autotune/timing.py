"""How a candidate is timed: wall clock on the CPU, CUDA events (or triton's ``do_bench``) on a GPU.

A timer is any object with ``measure(candidate, fn, best_ms) -> list[float]`` (milliseconds per call of
``fn``) plus ``synchronize()`` and ``describe()``; tests inject their own to decide the winner.
``best_ms`` is the best median so far (None for the first candidate): a timer may stop early on a candidate
that is clearly slower.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Protocol

from .entries import Candidate


class Timer(Protocol):
    def measure(self, candidate: Candidate, fn: Callable[[], object], best_ms: float | None) -> list[float]: ...

    def synchronize(self) -> None: ...

    def describe(self) -> str: ...


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples)


class CpuTimer:
    """``time.perf_counter`` around each call. Per measurement: untimed warm-up calls (at least one, and for at
    least ``warmup_s``), then at least ``min_repeats`` and at most ``max_repeats`` timed ones, stopping once
    ``budget_s`` has passed. The tuner measures every candidate once per round for ``rounds`` rounds,
    interleaved (a CPU shared with other work drifts), and takes the median of all of a candidate's samples.

    A candidate whose first two timed calls are both over ``give_up_factor`` times the best median so far is not
    timed further in that round (one slow call may be noise; two in a row on a clearly slower candidate save its
    budget).
    """

    def __init__(
        self,
        warmup_s: float = 0.02,
        min_repeats: int = 1,
        max_repeats: int = 4,
        budget_s: float = 0.1,
        give_up_factor: float = 3.0,
        rounds: int = 3,
    ):
        self.warmup_s = warmup_s
        self.min_repeats = min_repeats
        self.max_repeats = max_repeats
        self.budget_s = budget_s
        self.give_up_factor = give_up_factor
        self.rounds = rounds

    def measure(self, candidate: Candidate, fn: Callable[[], object], best_ms: float | None) -> list[float]:
        warm_until = time.perf_counter() + self.warmup_s
        fn()
        while time.perf_counter() < warm_until:
            fn()
        samples: list[float] = []
        start = time.perf_counter()
        while len(samples) < self.max_repeats:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
            if best_ms is not None and len(samples) == 2 and min(samples) > self.give_up_factor * best_ms:
                break
            if len(samples) >= self.min_repeats and time.perf_counter() - start > self.budget_s:
                break
        return samples

    def synchronize(self) -> None:
        pass

    def describe(self) -> str:
        return (
            f"perf_counter, candidates interleaved over {self.rounds} rounds, each: warm-up >= {self.warmup_s:g} s, "
            f"{self.min_repeats}-{self.max_repeats} timed runs (budget {self.budget_s:g} s); median of all runs"
        )


class CudaTimer:
    """GPU timing on ``device``: triton's ``do_bench`` (L2 flushed between runs) when triton is importable,
    else CUDA events around each of ``repeats`` calls after ``warmup`` calls."""

    def __init__(
        self, device: object = None, warmup_ms: int = 25, rep_ms: int = 100, warmup: int = 3, repeats: int = 20
    ):
        import torch

        self._torch = torch
        self.device = torch.device(device if device is not None else "cuda")
        self.warmup_ms = warmup_ms
        self.rep_ms = rep_ms
        self.warmup = warmup
        self.repeats = repeats
        try:
            import triton.testing

            self._do_bench = triton.testing.do_bench
        except ImportError:
            self._do_bench = None

    def measure(self, candidate: Candidate, fn: Callable[[], object], best_ms: float | None) -> list[float]:
        torch = self._torch
        with torch.cuda.device(self.device):
            if self._do_bench is not None:
                samples = self._do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="all")
                return [float(s) for s in samples]
            for _ in range(self.warmup):
                fn()
            events = [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                for _ in range(self.repeats)
            ]
            for start, end in events:
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize(self.device)
            return [start.elapsed_time(end) for start, end in events]

    def synchronize(self) -> None:
        self._torch.cuda.synchronize(self.device)

    def cleanup(self) -> None:
        """Return memory freed by a candidate that failed (e.g. out of memory) to the device."""
        self._torch.cuda.empty_cache()

    def describe(self) -> str:
        if self._do_bench is not None:
            return f"triton.testing.do_bench (warm-up {self.warmup_ms} ms, {self.rep_ms} ms of runs), median"
        return f"CUDA events, {self.warmup} warm-up, median of {self.repeats} runs"


def timer_for(device_type: str, device: object = None) -> Timer:
    """The default timer for a device type: :class:`CudaTimer` for "cuda", :class:`CpuTimer` otherwise."""
    if device_type == "cuda":
        return CudaTimer(device)
    return CpuTimer()
