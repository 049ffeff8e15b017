"""The bench's measuring parts: the CPU memory tracker, the bytes kept for backward, the implementations compared
(LoRA rank matching, not-run reasons), the suites' layer shapes, the cost model and the statistics."""

from __future__ import annotations

import pytest
import torch

import bonekern
from bench import impls, memory, suites, timing
from bench.costs import cost
from bench.runner import Settings, run_case
from bonekern.backends import get_backend, unavailable_reason
from bonekern.variants import make_spec

MIB = 1 << 20
CPU = torch.device("cpu")


def _case(variant: str, k: int = 128, n: int = 256, r: int = 16, tokens: int = 32, bias: bool = False):
    shape = suites.LayerShape("test", ("layer",), n, k, bias)
    mini_r = r if variant == "mini" else None
    case = suites.Case(shape, variant, r, mini_r, tokens, torch.float32, CPU)
    spec = make_spec(variant, n, k, r, mini_r)
    return case, spec, impls.CaseTensors.make(case, spec)


# -- memory ------------------------------------------------------------------------------------------------


def test_tracker_measures_known_allocations():
    with memory.CpuAllocationTracker() as t:
        kept = torch.empty(MIB // 4)  # 1 MiB, alive at the end
        temporary = torch.empty(2 * MIB)  # 8 MiB, freed before the end
        del temporary
        also_kept = torch.empty(MIB)  # 4 MiB
    assert t.peak_bytes == 9 * MIB  # 1 + 8 alive together; 1 + 4 later is less
    assert t.live_bytes == 5 * MIB
    assert t.allocations == 3
    del kept, also_kept


def test_tracker_ignores_memory_allocated_before_it():
    before = torch.empty(MIB)
    with memory.CpuAllocationTracker() as t:
        del before  # a free of memory it never counted
        x = torch.empty(MIB // 4)
    assert (t.peak_bytes, t.live_bytes) == (MIB, MIB)
    del x


def test_tracker_sees_temporaries_inside_custom_ops():
    # bonekern's bat forward builds W' (N x K) inside torch.ops.bonekern.bat_forward and drops it; a dispatch mode
    # would not see that allocation, the allocator does.
    case, _, t = _case("bat", k=256, n=512)
    block = t.block_init.clone().requires_grad_()
    use, _ = memory.measure(lambda: bonekern.bone_linear(t.x, t.weight, block, variant="bat", backend="torch"), CPU)
    y_bytes = case.tokens * 512 * 4
    assert use.live_bytes == y_bytes  # only y survives; x is kept for backward but was allocated before
    assert use.peak_bytes >= y_bytes + 512 * 256 * 4


def test_kept_for_backward_excludes_parameters_by_storage():
    case, spec, t = _case("bone")
    linear = impls.build("linear", case, spec, t)
    _, kept = memory.kept_for_backward(lambda: linear.forward(t.x), linear.parameters)
    assert kept == []  # F.linear saves W for dx, and W is a parameter
    _, kept_all = memory.kept_for_backward(lambda: linear.forward(t.x), [])
    assert [k.bytes for k in kept_all] == [memory.storage_bytes(t.weight)]  # the hook did see W (as W^T)


def test_kept_for_backward_finds_peft_bat_weight_sized_tensors():
    pytest.importorskip("peft", reason="peft is not installed")
    case, spec, t = _case("bat", k=128, n=256)
    peft_bat = impls.build("peft", case, spec, t)
    _, kept = memory.kept_for_backward(lambda: peft_bat.forward(t.x), peft_bat.parameters)
    weight_sized = [k for k in kept if k.shape == (256, 128) or k.bytes == 256 * 128 * 4]
    assert len(weight_sized) >= 2, kept  # W' and PEFT's copy of W, both float32 N x K
    x_bytes = case.tokens * 128 * 4
    assert sum(k.bytes for k in kept) == x_bytes + 2 * 256 * 128 * 4

    ours = impls.build("torch", case, spec, t)
    _, kept = memory.kept_for_backward(lambda: ours.forward(t.x), ours.parameters)
    assert [(k.shape, k.bytes) for k in kept] == [((case.tokens, 128), x_bytes)]  # bat keeps x alone


def test_bone_keeps_only_s():
    case, spec, t = _case("bone", r=16)
    ours = impls.build("torch", case, spec, t)
    _, kept = memory.kept_for_backward(lambda: ours.forward(t.x), ours.parameters)
    assert [(k.shape, k.dtype) for k in kept] == [((case.tokens, 16), "float32")]


# -- implementations ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "n", "k", "r", "mini_r", "expected"),
    [
        ("bone", 4096, 4096, 64, None, 32),  # square: r / 2, PEFT's benchmark pairing (MiSS r=64, LoRA r=32)
        ("bat", 4096, 4096, 64, None, 32),  # bat trains N * r too
        ("bone", 1024, 4096, 64, None, 13),  # 65536 / 5120 = 12.8
        ("bone", 14336, 4096, 64, None, 50),  # 917504 / 18432 = 49.8
        ("mini", 4096, 4096, 64, 64, 1),  # 4096 / 8192 rounds to 0: at least 1
    ],
)
def test_lora_rank_matches_trainable_parameters(variant, n, k, r, mini_r, expected):
    spec = make_spec(variant, n, k, r, mini_r)
    q = impls.lora_rank_for(spec)
    assert q == expected
    # no other rank comes nearer to the bone variant's parameter count
    assert all(
        abs(q * (k + n) - spec.trainable_params) <= abs(o * (k + n) - spec.trainable_params)
        for o in (q - 1, q + 1)
        if o >= 1
    )


def test_lora_impl_trains_the_matched_rank():
    pytest.importorskip("peft", reason="peft is not installed")
    case, spec, t = _case("bone", k=128, n=256, r=32)
    lora = impls.build("lora", case, spec, t)
    q = round(32 * 256 / (128 + 256))
    assert (lora.lora_rank, lora.label, lora.trainable_params) == (q, f"lora r={q}", q * (128 + 256))
    assert [p.shape for p in lora.trainable] == [(q, 128), (256, q)]


def test_peft_adapter_dtype_is_what_bonekern_gets():
    pytest.importorskip("peft", reason="peft is not installed")
    for dtype in (torch.bfloat16, torch.float64):
        shape = suites.LayerShape("test", ("layer",), 128, 64, True)
        case = suites.Case(shape, "bone", 16, None, 8, dtype, CPU)
        spec = make_spec("bone", 128, 64, 16)
        t = impls.CaseTensors.make(case, spec)
        assert impls.build("peft", case, spec, t).trainable[0].dtype == impls.adapter_dtype(dtype)
        assert impls.build("torch", case, spec, t).trainable[0].dtype == impls.adapter_dtype(dtype)


def test_unavailable_backends_are_not_run_with_their_reason():
    for name in ("triton", "cupy"):
        reason = impls.not_run_reason(name, CPU)
        assert reason
        own = unavailable_reason(name, CPU)
        assert reason == own if own else "test tool" in reason


def test_gpu_backends_are_never_timed_on_a_cpu_even_when_they_could_run(monkeypatch):
    # e.g. the Triton backend under TRITON_INTERPRET=1 reports itself available on the CPU
    for name in ("triton", "cupy"):
        monkeypatch.setattr(type(get_backend(name)), "unavailable_reason", lambda self, device: None)
        reason = impls.not_run_reason(name, CPU)
        assert reason and "test tool" in reason and name in reason


def test_missing_peft_is_reported(monkeypatch):
    real = impls.importlib.util.find_spec
    monkeypatch.setattr(impls.importlib.util, "find_spec", lambda n, *a: None if n == "peft" else real(n, *a))
    for name in ("peft", "lora"):
        assert impls.not_run_reason(name, CPU) == "peft is not installed (pip install 'bonekern[bench]')"
    assert impls.not_run_reason("linear", CPU) is None


def test_run_case_reports_not_run_and_invalid_cases():
    case, _, _ = _case("bone")
    records = run_case(case, ["triton", "linear"], Settings(0.001, 2), timing.Timer(CPU))
    assert records[0]["status"] == "not run" and records[0]["reason"] == impls.not_run_reason("triton", CPU)
    assert records[1]["status"] == "ok" and records[1]["fwdbwd_repeats"] >= 2
    odd = suites.Case(suites.LayerShape("test", ("odd",), 256, 100, False), "bat", 16, None, 8, torch.float32, CPU)
    records = run_case(odd, ["torch"], Settings(0.001, 2), timing.Timer(CPU))
    assert records[0]["status"] == "not run" and "in_features" in records[0]["reason"]


# -- suites ------------------------------------------------------------------------------------------------


def _shapes(model: str) -> dict[str, tuple[int, int, bool]]:
    return {layer: (s.k, s.n, s.bias) for s in suites.projections(model) for layer in s.layers}


def test_model_layer_shapes():
    assert _shapes("llama2-7b") == {
        **dict.fromkeys(("q_proj", "k_proj", "v_proj", "o_proj"), (4096, 4096, False)),
        **dict.fromkeys(("gate_proj", "up_proj"), (4096, 11008, False)),
        "down_proj": (11008, 4096, False),
    }
    assert _shapes("llama3-8b") == {
        **dict.fromkeys(("q_proj", "o_proj"), (4096, 4096, False)),
        **dict.fromkeys(("k_proj", "v_proj"), (4096, 1024, False)),
        **dict.fromkeys(("gate_proj", "up_proj"), (4096, 14336, False)),
        "down_proj": (14336, 4096, False),
    }
    assert _shapes("qwen2.5-7b") == {
        "q_proj": (3584, 3584, True),
        **dict.fromkeys(("k_proj", "v_proj"), (3584, 512, True)),
        "o_proj": (3584, 3584, False),
        **dict.fromkeys(("gate_proj", "up_proj"), (3584, 18944, False)),
        "down_proj": (18944, 3584, False),
    }
    assert [s.name for s in suites.projections("qwen2.5-7b")] == [
        "qwen2.5-7b.q_proj",
        "qwen2.5-7b.k_proj/v_proj",
        "qwen2.5-7b.o_proj",
        "qwen2.5-7b.gate_proj/up_proj",
        "qwen2.5-7b.down_proj",
    ]


def test_acceptance_suite_is_the_foundation_problem():
    s = suites.SUITES["acceptance"]
    assert [(x.k, x.n, x.bias) for x in s.shapes] == [(4096, 4096, False)]
    assert (s.tokens["cpu"], s.device, s.dtype, s.r, s.variants) == (2048, "cpu", torch.float32, 64, ("bone", "bat"))
    assert set(s.impls) == {"torch", "peft", "linear"}


def test_parse_shape():
    # NxK = out_features x in_features, as nn.Linear.weight.shape; "," works too
    assert suites.parse_shape("128x64+bias") == suites.LayerShape("custom", ("128x64",), 128, 64, True)
    assert suites.parse_shape("128,64") == suites.LayerShape("custom", ("128x64",), 128, 64, False)
    for bad in ("64", "64x0", "64x128+b", "ax2", "1x2x3", "-1x4"):
        with pytest.raises(ValueError, match="--shape"):
            suites.parse_shape(bad)


# -- costs and statistics ----------------------------------------------------------------------------------


def test_cost_model():
    m, n, k, r = 8, 32, 16, 4
    kw = {"bias": False, "act_bytes": 4, "adapter_bytes": 4}
    lin = cost("linear", m, n, k, **kw)
    assert (lin.fwd_flops, lin.bwd_flops) == (2 * m * n * k, 2 * m * n * k)
    assert lin.fwd_bytes == 4 * (m * k + n * k + m * n)
    bone = cost("bone", m, n, k, r=r, cols=n, **kw)
    assert bone.fwd_flops == 2 * m * n * k + m * k + 2 * m * r * n + m * n
    bat = cost("bat", m, n, k, r=r, **kw)
    assert bat.fwdbwd_flops == 6 * m * n * k + 4 * n * k * r + 2 * n * k
    lora = cost("lora", m, n, k, lora_rank=2, **kw)
    assert lora.bwd_flops == 2 * m * n * k + 4 * m * n * 2 + 4 * m * 2 * k + m * k
    with pytest.raises(ValueError, match="method"):
        cost("dora", m, n, k, **kw)


def test_percentiles():
    s = timing.stats([5.0, 1.0, 2.0, 4.0, 3.0])
    assert (s.median_ms, s.p20_ms, s.p80_ms, s.repeats) == pytest.approx((3.0, 1.8, 4.2, 5))
    assert timing.stats([7.0]).p80_ms == 7.0
