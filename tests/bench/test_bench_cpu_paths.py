"""pytest-benchmark suite for the CPU paths: one forward+backward of the torch backend per variant on a small shape,
beside PEFT's MiSS layer and the frozen linear layer for scale.

Track regressions with ``python -m pytest tests/bench/test_bench_cpu_paths.py --benchmark-autosave`` once, then
``--benchmark-compare --benchmark-compare-fail=median:10%`` later. Each benchmark runs a fixed, small number of
rounds (``pedantic``), so the normal suite stays fast; under ``--benchmark-disable`` each runs once. Every
benchmark also checks what it timed against the float64 reference, so it fails if the timed code is wrong.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bonekern
from bonekern.variants import VARIANTS
from tests.support import assert_close_to_reference, make_problem, reference_outputs

M, N, K, R = 128, 512, 256, 32
ROUNDS = 15


def _problem(variant: str):
    return make_problem(variant, (M,), N, K, R, mini_r=R if variant == "mini" else None, bias=False)


def _check(variant, p, y, dx, dblock):
    expected = reference_outputs(p)
    for name, got in (("y", y), ("dx", dx), ("dblock", dblock)):
        assert_close_to_reference(got, expected[name], torch.float32, f"{variant} {name}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_torch_backend_forward_backward(benchmark, variant):
    benchmark.group = f"{variant}: fwd+bwd, x ({M}, {K}), W ({N}, {K}), r {R}, float32"
    p = _problem(variant)
    x = p.x.requires_grad_()
    block = p.block.requires_grad_()

    def step():
        y = bonekern.bone_linear(x, p.weight, block, variant=variant, mini_r=p.mini_r, backend="torch")
        return (y, *torch.autograd.grad(y, [x, block], p.dy))

    y, dx, dblock = benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    _check(variant, p, y, dx, dblock)


@pytest.mark.parametrize("variant", VARIANTS)
def test_peft_forward_backward(benchmark, variant):
    peft = pytest.importorskip("peft", reason="peft is not installed")
    benchmark.group = f"{variant}: fwd+bwd, x ({M}, {K}), W ({N}, {K}), r {R}, float32"
    p = _problem(variant)
    base = torch.nn.Linear(K, N, bias=False)
    base.weight = torch.nn.Parameter(p.weight, requires_grad=False)
    init = {"bone": True, "bat": "bat", "mini": "mini"}[variant]
    model = peft.get_peft_model(
        torch.nn.Sequential(base), peft.MissConfig(r=R, init_weights=init, mini_r=R, target_modules=["0"])
    )
    layer = model.base_model.model[0]
    block = layer.miss_block["default"]
    with torch.no_grad():
        block.copy_(p.block)
    x = p.x.requires_grad_()

    def step():
        y = layer(x)
        return (y, *torch.autograd.grad(y, [x, block], p.dy))

    y, dx, dblock = benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    _check(variant, p, y, dx, dblock)


def test_frozen_linear_forward_backward(benchmark):
    benchmark.group = "linear (the floor): fwd+bwd"
    p = _problem("bone")
    x = p.x.requires_grad_()

    def step():
        y = F.linear(x, p.weight)
        return y, torch.autograd.grad(y, [x], p.dy)[0]

    _, dx = benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    torch.testing.assert_close(dx, p.dy @ p.weight)
