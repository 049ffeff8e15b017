"""Run a function on ``world`` spawned processes (the distributed tests' ranks) and load what each rank saved."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp


def run_workers(main: Callable, out_dir: Path, world: int = 2, deadline_s: float = 240) -> list[dict]:
    """``main(rank, world, str(out_dir))`` on ``world`` spawned processes; then ``out_dir/rank{r}.pt`` of each rank.
    Fails the test when they take longer than ``deadline_s`` (the processes are killed) or one of them raises."""
    context = mp.start_processes(main, args=(world, str(out_dir)), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {deadline_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(world)]
