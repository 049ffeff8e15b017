"""``python -m bench``: forward+backward time of the frozen linear layer, PEFT's MiSS layer and bonekern.

A first version: median of timed repeats on the best device present, one shape, each variant.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

import bonekern


def _time_ms(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--in-features", type=int, default=1024)
    parser.add_argument("--out-features", type=int, default=1024)
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    import peft

    m, k, n, r = args.tokens, args.in_features, args.out_features, args.r
    print(f"device: {platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, peft {peft.__version__}, bonekern {bonekern.__version__}")
    print(f"shape: x ({m}, {k}), W ({n}, {k}), r = {r}, float32, forward+backward, median of {args.repeats}")
    x = torch.randn(m, k, requires_grad=True)
    linear = nn.Linear(k, n, bias=False).requires_grad_(False)

    def run_linear():
        linear(x).backward(torch.ones(m, n))

    print(f"{'implementation':<28}{'ms':>10}")
    print(f"{'linear (frozen)':<28}{_time_ms(run_linear, args.repeats):>10.1f}")
    for variant, init in (("bone", True), ("bat", "bat"), ("mini", "mini")):
        wrapper = nn.Sequential(nn.Linear(k, n, bias=False))
        model = peft.get_peft_model(wrapper, peft.MissConfig(r=r, init_weights=init, mini_r=r, target_modules=["0"]))
        layer = model.base_model.model[0]
        block = layer.miss_block["default"]
        with torch.no_grad():
            block.normal_(0, 0.01)

        def run_peft(layer=layer):
            layer(x).backward(torch.ones(m, n))

        weight = layer.get_base_layer().weight
        ours = block.detach().clone().requires_grad_()

        def run_bonekern(weight=weight, ours=ours, variant=variant):
            bonekern.bone_linear(x, weight, ours, variant=variant, backend="torch").backward(torch.ones(m, n))

        print(f"{'peft ' + variant:<28}{_time_ms(run_peft, args.repeats):>10.1f}")
        print(f"{'bonekern[torch] ' + variant:<28}{_time_ms(run_bonekern, args.repeats):>10.1f}")


if __name__ == "__main__":
    main()
