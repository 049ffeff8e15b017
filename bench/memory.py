"""Memory measurements: the peak during a call, what is still alive after it, and what autograd keeps.

Peak and live bytes count only memory allocated *during* the measured call (x, W, dY and the parameters exist
before it and are not counted), with the same meaning on both devices:

- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the bytes allocated
  before the call; live bytes likewise from ``memory_allocated()``.
- CPU: :class:`CpuAllocationTracker` reads the CPU allocator's own allocation and free reports, which the
  PyTorch profiler records when ``profile_memory=True`` (every tensor storage on the CPU is allocated through
  c10's CPU allocator, which reports pointer, size and time). Replaying them in order gives the live bytes at
  every moment and so the exact peak. The allocator sees what a ``TorchDispatchMode`` cannot: temporaries
  *inside* custom ops such as ``torch.ops.bonekern.bat_forward`` (a dispatch mode is switched off while a
  custom op's implementation runs) and inside ATen kernels.

:func:`kept_for_backward` lists what autograd saves for backward through ``saved_tensors_hooks``: each distinct
storage once, parameters excluded by storage identity (their memory is resident anyway).
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


def storage_bytes(t: torch.Tensor) -> int:
    """Bytes of the storage behind ``t`` (all of it, also when ``t`` is a view of part of it)."""
    return t.untyped_storage().nbytes()


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler backend prints a line on every start and stop)."""
    try:
        fd = os.dup(2)
    except OSError:  # no stderr to silence
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)


def _allocation_events(prof: torch.profiler.profile) -> list[tuple[int, int, int]]:
    """(time_ns, pointer, signed size) of every CPU allocation (+) and free (-) the profiler recorded, in order."""
    from torch._C._profiler import _EventType

    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    order = 0
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation:
            f = node.extra_fields
            if f.device.type == "cpu":
                events.append((node.start_time_ns, order, f.ptr, f.alloc_size))
                order += 1
    events.sort(key=lambda e: (e[0], e[1]))
    return [(t, ptr, size) for t, _, ptr, size in events]


class CpuAllocationTracker:
    """Context manager: peak and live bytes of CPU tensor storage allocated inside the ``with`` block.

    Attributes (set on exit): ``peak_bytes``, the most bytes alive at once; ``live_bytes``, the bytes still alive
    at the end; ``allocations``, how many allocations were seen. Frees of memory allocated before the block are
    ignored (that memory was never counted).
    """

    def __init__(self) -> None:
        self.peak_bytes = 0
        self.live_bytes = 0
        self.allocations = 0
        self._prof: torch.profiler.profile | None = None

    def __enter__(self) -> CpuAllocationTracker:
        self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        with _quiet_stderr():
            self._prof.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        with _quiet_stderr():
            self._prof.__exit__(*exc)
        if exc[0] is not None:
            return
        live: dict[int, int] = {}
        current = peak = count = 0
        for _, ptr, size in _allocation_events(self._prof):
            if size > 0:
                count += 1
                current += size - live.get(ptr, 0)
                live[ptr] = size
                peak = max(peak, current)
            elif ptr in live:
                current -= live.pop(ptr)
        self.peak_bytes, self.live_bytes, self.allocations = peak, current, count
        self._prof = None


@dataclass(frozen=True)
class MemoryUse:
    """Bytes allocated during a call: the peak, and what was still alive when it returned."""

    peak_bytes: int
    live_bytes: int


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Keep Python's cycle collector from freeing unrelated tensors in the middle of a measurement."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def measure(fn: Callable[[], Any], device: torch.device) -> tuple[MemoryUse, Any]:
    """Run ``fn`` once and return its :class:`MemoryUse` (see the module docstring) and its result."""
    with _no_gc():
        return _measure(fn, device)


def _measure(fn: Callable[[], Any], device: torch.device) -> tuple[MemoryUse, Any]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        use = MemoryUse(torch.cuda.max_memory_allocated(device) - before, torch.cuda.memory_allocated(device) - before)
        return use, result
    with CpuAllocationTracker() as tracker:
        result = fn()
    return MemoryUse(tracker.peak_bytes, tracker.live_bytes), result


@dataclass(frozen=True)
class KeptTensor:
    """One storage autograd keeps for backward."""

    shape: tuple[int, ...]
    dtype: str
    bytes: int


def kept_for_backward(
    forward: Callable[[], torch.Tensor], parameters: Iterable[torch.Tensor]
) -> tuple[torch.Tensor, list[KeptTensor]]:
    """Run ``forward`` and list the storages its autograd graph saves for backward, parameters excluded.

    Returns the output (keep it alive while the list matters: it owns the graph) and one :class:`KeptTensor`
    per distinct storage, in the order they were saved. A saved view counts its whole storage.
    """
    param_storages = {p.untyped_storage().data_ptr() for p in parameters}
    kept: dict[int, KeptTensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_storages and ptr not in kept:
            kept[ptr] = KeptTensor(tuple(t.shape), str(t.dtype).removeprefix("torch."), storage_bytes(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = forward()
    return y, list(kept.values())
