"""``python -m bench.overhead``: the per-call cost of the custom-op path that plain eager calls skip.

bonekern runs a plain eager call through ``torch.autograd.Function`` s and everything that may trace through the
``torch.ops.bonekern`` custom ops (:mod:`bonekern.ops`); both run the same code. This script times one
forward+backward of a layer so small that the arithmetic is negligible, with each path
(``bonekern.ops.EAGER_FAST_PATH`` True / False) and a plain ``nn.functional.linear`` as the floor, interleaved
(every path once per round, so drift hits all of them alike), and prints the median per call over the rounds.
The difference between the two paths is the dispatch overhead the README and :mod:`bonekern.ops` quote.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from autotune.argtypes import positive_int, run_guarded, up_to_cpus
from bonekern.variants import make_spec


def _step_fn(path: str, variant: str, m: int, n: int, k: int, r: int) -> Callable[[], None]:
    import bonekern

    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g, requires_grad=True)
    weight = torch.randn(n, k, generator=g) * k**-0.5
    bias = torch.zeros(n)
    shape = (n // r, r, r) if variant == "bat" else (r, n)
    block = torch.zeros(shape, requires_grad=True)
    if path == "linear":
        w = weight.clone().requires_grad_()

        def step() -> None:
            torch.nn.functional.linear(x, w, bias).sum().backward()

        return step

    def step() -> None:
        bonekern.bone_linear(x, weight, block, bias, variant=variant).sum().backward()

    return step


def measure(
    variant: str = "bone", m: int = 16, n: int = 64, k: int = 64, r: int = 16, rounds: int = 200, calls: int = 20
) -> dict[str, float]:
    """Median microseconds per forward+backward for each path: "eager" (autograd Functions), "custom_ops" and
    "linear" (plain F.linear, the floor). Sets nothing global except ``bonekern.ops.EAGER_FAST_PATH`` (restored)."""
    from bonekern import ops

    paths = ("eager", "custom_ops", "linear")
    steps = {p: _step_fn(p, variant, m, n, k, r) for p in paths}
    samples: dict[str, list[float]] = {p: [] for p in paths}
    saved = ops.EAGER_FAST_PATH
    try:
        for path in paths:  # warm-up: first-call costs (dispatch memo, op registration, allocator)
            ops.EAGER_FAST_PATH = path != "custom_ops"
            for _ in range(calls):
                steps[path]()
        for _ in range(rounds):
            for path in paths:
                ops.EAGER_FAST_PATH = path != "custom_ops"
                step = steps[path]
                t0 = time.perf_counter()
                for _ in range(calls):
                    step()
                samples[path].append((time.perf_counter() - t0) / calls * 1e6)
    finally:
        ops.EAGER_FAST_PATH = saved
    return {p: statistics.median(v) for p, v in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=("bone", "bat"), default="bone")
    parser.add_argument("--shape", default="16x64x64", help="MxNxK: tokens x out_features x in_features")
    parser.add_argument("--r", type=positive_int, default=16)
    parser.add_argument("--rounds", type=positive_int, default=200)
    parser.add_argument("--calls", type=positive_int, default=20, help="calls per timed sample")
    parser.add_argument("--threads", type=up_to_cpus, default=1, help="torch threads (default 1: the cost on one core)")
    args = parser.parse_args(argv)
    try:
        m, n, k = (positive_int(v) for v in args.shape.lower().split("x"))
    except (ValueError, argparse.ArgumentTypeError):
        parser.error(f"argument --shape: expected MxNxK of positive integers, e.g. 16x64x64; got {args.shape!r}")
    try:
        make_spec(args.variant, n, k, args.r)
    except ValueError as exc:
        parser.error(f"argument --r: {exc}")
    os.environ.setdefault("BONEKERN_AUTOTUNE", "0")
    torch.set_num_threads(args.threads)
    result = measure(args.variant, m, n, k, args.r, args.rounds, args.calls)
    print(
        f"{args.variant} x ({m}, {k}), W ({n}, {k}), r {args.r}, forward+backward, {args.threads} thread(s), "
        f"median of {args.rounds} interleaved rounds of {args.calls} calls; torch {torch.__version__}, "
        f"python {platform.python_version()}"
    )
    for path, us in result.items():
        print(f"  {path:<11} {us:8.1f} us")
    print(f"  custom-op dispatch costs {result['custom_ops'] - result['eager']:.1f} us per call more than eager")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_guarded(main, prog="python -m bench.overhead"))
