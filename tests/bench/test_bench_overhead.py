"""bench.overhead: the script behind the README's per-call dispatch figure runs both paths and restores the switch."""

from __future__ import annotations

import math

import torch

from bench import overhead
from bonekern import ops


def test_measure_times_both_paths_and_the_floor(monkeypatch):
    seen = []
    real = overhead._step_fn

    def spy(path, *args):
        step = real(path, *args)

        def wrapped():
            seen.append((path, ops.EAGER_FAST_PATH))
            step()

        return wrapped

    monkeypatch.setattr(overhead, "_step_fn", spy)
    result = overhead.measure("bat", 4, 16, 16, 4, rounds=2, calls=1)
    assert set(result) == {"eager", "custom_ops", "linear"}
    assert all(math.isfinite(us) and us > 0 for us in result.values()), result
    assert ("eager", True) in seen and ("custom_ops", False) in seen, "each path must run with its switch setting"
    assert ops.EAGER_FAST_PATH is True


def test_main_prints_the_difference(capsys):
    threads = str(torch.get_num_threads())  # main sets torch's thread count; keep the suite's
    assert overhead.main(["--rounds", "2", "--calls", "1", "--shape", "4x16x16", "--r", "4", "--threads", threads]) == 0
    out = capsys.readouterr().out
    assert "custom-op dispatch costs" in out and "eager" in out
