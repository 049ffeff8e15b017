"""The Triton bat kernels (bonekern/backends/triton/bat.py).

- Numerics, under the Triton interpreter (conftest sets TRITON_INTERPRET=1): every kernel and strategy against the
  float64 reference, forward and every gradient, with shapes picked so each tiling of bat.py runs: r = 1 and
  r = 3 (broadcast formation, padded lanes), r = 16 (batched 3-D dot), r = 32 / 64 / 128 (sub-block tiles with
  one or several s-chunks), r = 48 (padded sub-blocks); M and N not multiples of the tile, strided and 3-D x.
- Configs: every candidate of configs.py round-trips through its JSON form, is accepted and runs; bad ones raise
  ValueError naming the entry (from prepare_config, once per decision).
- Ahead-of-time compiles of ``bat.aot_cases()`` for sm_80 / sm_90 / sm_100 (every shipped config, and the
  specialisations this file runs but the shipped inputs never reach) are in tests/triton/test_triton_resources.py.
- GPU only (``@pytest.mark.gpu``): full-size numerics, and timings against cuBLAS and the torch backend.
"""

from __future__ import annotations

import pytest
import torch

from tests.support import (
    assert_close_to_reference,
    backend_or_skip,
    check_against_reference,
    make_problem,
    reference_outputs,
)

pytest.importorskip("triton", reason="the triton package is not installed")

from bonekern.backends.base import OpProblem
from bonekern.backends.triton import TritonBackend, bat, configs
from bonekern.backends.triton.tiles import BAT_FP32, BAT_HALF, GemmTile, Tile


def tiles(name: str) -> dict:
    """The dict entries of a tile set: "m32n32k32w4s1" -> block_m .. num_stages and group_m 8 (no group_m without
    block_m: the W' build kernel)."""
    tile = Tile.parse(name)
    return (tile if tile.block_m is None else GemmTile.of(tile)).to_dict()


def prepared(op: str, p, config):
    """``config`` (a dict, possibly partial) as the backend prepares it for p's ``op``; typed configs pass as is."""
    if not isinstance(config, dict):
        return config
    k = p.weight.shape[1]
    problem = OpProblem.from_tensors(op, p.x.reshape(-1, k).shape[0], p.weight, p.block, p.x.dtype)
    return TritonBackend().prepare_config(problem, config)


def fwd_config(strategy: str, gemm_tiles: str, *, gemm: str = "cublas", build: str = "n32k32w4s1", **extra) -> dict:
    return {"strategy": strategy, "gemm": gemm, **tiles(gemm_tiles), "build": tiles(build), **extra}


def bwd_config(strategy: str, dx: str, dblock: str, *, gemm: str = "cublas", build: str = "n32k32w4s1", **db) -> dict:
    return {
        "strategy": strategy,
        "gemm": gemm,
        "dx": tiles(dx),
        "build": tiles(build),
        "dblock": {**tiles(dblock), **db},
    }


def run_kernels(p, fwd: dict, bwd: dict) -> dict[str, torch.Tensor]:
    """y, dx, dblock straight from the bat host functions (2-D x, as the backend sees it)."""
    n, k = p.weight.shape
    x2 = p.x.reshape(-1, k)
    dy2 = p.dy.reshape(-1, n)
    y = bat.bat_forward(x2, p.weight, p.block, p.bias, prepared("bat_forward", p, fwd))
    dx, dblock = bat.bat_backward(dy2, x2, p.weight, p.block, True, True, prepared("bat_backward", p, bwd))
    return {"y": y.reshape(p.dy.shape), "dx": dx.reshape(p.x.shape), "dblock": dblock}


def check_kernels(p, fwd: dict, bwd: dict, what: str) -> None:
    got = run_kernels(p, fwd, bwd)
    want = reference_outputs(p)
    half = p.x.dtype in (torch.float16, torch.bfloat16)
    for name in ("y", "dx", "dblock"):
        expected_dtype = p.block.dtype if name == "dblock" else p.x.dtype
        assert got[name].dtype == expected_dtype, f"{what}/{name}: dtype {got[name].dtype} != {expected_dtype}"
        dt = p.x.dtype if half else got[name].dtype
        assert_close_to_reference(got[name], want[name], dt, f"{what}/{name}", "triton")


# Each case: (id, problem kwargs, forward config, backward config). Tiles are small so that several tiles (and a
# partial last one) cover M and N. Comments say which tiling of bat.py the case runs.
CASES = [
    (
        "r1-fp32-fused",  # R = 1: elementwise formation; 32-lane tiles over N = 40 (a partial tile), M = 37
        dict(lead=(37,), n=40, k=24, r=1),
        fwd_config("fused", "m32n32k32w4s1"),
        bwd_config("fused", "m32n32k32w4s1", "m32n32k32w4s1", split_k=2),
    ),
    (
        "r3-fp16-fused-strided3d",  # R = 4 padded lanes, broadcast formation; 3-D strided x; atomic dB
        dict(lead=(5, 7), n=36, k=30, r=3, strided_x=True, dtype=torch.float16),
        fwd_config("fused", "m16n16k16w4s1"),
        bwd_config("fused", "m16n16k16w4s1", "m16n16k16w4s1", split_k=2, reduce="atomic"),
    ),
    (
        "r16-bf16-fused",  # arranged tiles: 2 x 2 blocks per tile, batched 3-D tl.dot; N = 48: partial tile
        dict(lead=(37,), n=48, k=64, r=16, dtype=torch.bfloat16),
        fwd_config("fused", "m32n32k32w4s1"),
        bwd_config("fused", "m32n32k32w4s1", "m32n32k32w4s1", split_k=2),
    ),
    (
        "r32-fp32-fused",  # sub-block tiles, BK == R: one s-chunk (the forward preloads B)
        dict(lead=(19,), n=64, k=96, r=32),
        fwd_config("fused", "m16n32k32w4s1"),
        bwd_config("fused", "m16n32k32w4s1", "m16n32k32w4s1", split_k=3),
    ),
    (
        "r64-fp32-fused-chunked",  # sub-block tiles, BN = BK = 32 < R: two s-chunks, two p-chunks in dB
        dict(lead=(9,), n=128, k=64, r=64),
        fwd_config("fused", "m16n32k32w4s1"),
        bwd_config("fused", "m16n32k32w4s1", "m16n32k32w4s1", split_k=1),
    ),
    (
        "r48-fp16-fused-padded",  # R = 64 for r = 48: padded sub-blocks, chunked; strided x
        dict(lead=(5,), n=96, k=96, r=48, strided_x=True, dtype=torch.float16),
        fwd_config("fused", "m16n64k32w4s1"),
        bwd_config("fused", "m16n32k64w4s1", "m16n32k64w4s1", split_k=2, reduce="atomic"),
    ),
    (
        "r128-bf16-fused",  # r = 128: BN = 64 < R = BK, one s-chunk; dx with BK = 64 < R: two s-chunks
        dict(lead=(3,), n=256, k=128, r=128, dtype=torch.bfloat16),
        fwd_config("fused", "m16n64k128w4s1"),
        bwd_config("fused", "m16n128k64w4s1", "m16n64k128w4s1"),
    ),
    (
        "r16-fp64-fused",  # fp64 end to end (delta dtype fp64, ieee dots)
        dict(lead=(6,), n=32, k=48, r=16, dtype=torch.float64),
        fwd_config("fused", "m16n32k32w4s1"),
        bwd_config("fused", "m16n32k32w4s1", "m16n32k32w4s1", split_k=2),
    ),
    (
        "r16-fp16-block-fp16-fused",  # block in x's dtype
        dict(lead=(6,), n=32, k=48, r=16, dtype=torch.float16, block_dtype=torch.float16),
        fwd_config("fused", "m16n32k32w4s1"),
        bwd_config("fused", "m16n32k32w4s1", "m16n32k32w4s1"),
    ),
    (
        "r16-fp32-block-fp64-fused",  # fp64 block: delta terms and dB in fp64, outputs fp32
        dict(lead=(6,), n=32, k=48, r=16, block_dtype=torch.float64),
        fwd_config("fused", "m16n32k32w4s1"),
        bwd_config("fused", "m16n32k32w4s1", "m16n32k32w4s1", split_k=2),
    ),
    (
        "r3-fp32-materialize-triton",  # W' build kernel + the Triton GEMM; 3-D strided x
        dict(lead=(4, 5), n=24, k=21, r=3, strided_x=True),
        fwd_config("materialize", "m16n16k16w4s1", gemm="triton", build="n16k16w4s1"),
        bwd_config("materialize", "m16n16k16w4s1", "m16n16k16w4s1", gemm="triton", build="n16k16w4s1"),
    ),
    (
        "r64-bf16-materialize-triton",  # build with sub-block chunks, Triton GEMM on bf16 W'
        dict(lead=(21,), n=128, k=64, r=64, dtype=torch.bfloat16),
        fwd_config("materialize", "m32n32k32w4s1", gemm="triton", build="n32k32w4s1"),
        bwd_config("materialize", "m32n32k32w4s1", "m32n64k64w4s1", gemm="triton", build="n32k32w4s1"),
    ),
    (
        "r2-bf16-fused-one-token",  # M = 1; R = 2 broadcast formation in bf16
        dict(lead=(1,), n=8, k=10, r=2, dtype=torch.bfloat16),
        fwd_config("fused", "m16n16k16w4s1"),
        bwd_config("fused", "m16n16k16w4s1", "m16n16k16w4s1"),
    ),
    (
        "r128-fp16-materialize-cublas",  # sub-block build with two s-chunks
        dict(lead=(3,), n=128, k=256, r=128, dtype=torch.float16),
        fwd_config("materialize", "m16n64k64w4s1", build="n64k64w4s1"),
        bwd_config("materialize", "m16n64k64w4s1", "m16n64k128w4s1", build="n64k64w4s1", split_k=2),
    ),
    (
        "r16-fp16-materialize-cublas",  # W' build kernel + torch.mm (cuBLAS on a GPU)
        dict(lead=(2, 9), n=48, k=32, r=16, dtype=torch.float16),
        fwd_config("materialize", "m32n32k32w4s1", build="n32k32w4s1"),
        bwd_config("materialize", "m32n32k32w4s1", "m32n32k32w4s1", build="n32k32w4s1", split_k=2),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernels_match_reference(case):
    backend_or_skip("triton")
    name, shape, fwd, bwd = case
    shape = dict(shape)
    p = make_problem("bat", shape.pop("lead"), seed=len(name), **shape)
    check_kernels(p, fwd, bwd, name)


@pytest.mark.parametrize("strategy", ["fused", "materialize"])
def test_column_major_x(strategy):
    """x stored transposed (strides (1, M)): the kernels read it through its strides."""
    backend_or_skip("triton")
    p = make_problem("bat", (19,), 32, 48, 8, seed=3)
    p.x = p.x.t().contiguous().t()
    assert p.x.stride() == (1, 19)
    fwd = fwd_config(strategy, "m16n16k16w4s1", gemm="triton", build="n16k16w4s1")
    bwd = bwd_config(strategy, "m16n16k16w4s1", "m16n16k16w4s1", gemm="triton", build="n16k16w4s1", split_k=2)
    check_kernels(p, fwd, bwd, f"column-major/{strategy}")


@pytest.mark.parametrize(
    "spec",
    [
        dict(lead=(7,), n=16, k=16, r=1),
        dict(lead=(2, 5), n=12, k=9, r=3, strided_x=True, bias=False),
        dict(lead=(37,), n=48, k=32, r=16, dtype=torch.float16),
        dict(lead=(4,), n=128, k=64, r=64, strided_x=True),
        dict(lead=(3,), n=128, k=128, r=128, dtype=torch.bfloat16),
    ],
    ids=["r1", "r3-3d-strided-nobias", "r16-fp16", "r64-strided", "r128-bf16"],
)
def test_autograd_with_default_configs(spec):
    """bone_linear(backend="triton") end to end (custom op, autograd, dbias) with the interpreter's defaults."""
    backend_or_skip("triton")
    spec = dict(spec)
    check_against_reference(make_problem("bat", spec.pop("lead"), **spec), "triton")


def test_only_requested_gradients_are_computed(monkeypatch):
    backend_or_skip("triton")
    p = make_problem("bat", (9,), 32, 32, 16)
    cfg = configs.default_config(OpProblem.from_tensors("bat_backward", 9, p.weight, p.block, p.x.dtype))
    want = reference_outputs(p)

    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel ran for a gradient that was not asked for")

    with monkeypatch.context() as m:
        m.setattr(bat, "_block_gradient", forbidden)
        dx, db = bat.bat_backward(p.dy, p.x, p.weight, p.block, True, False, prepared("bat_backward", p, cfg))
    assert db is None
    assert_close_to_reference(dx, want["dx"], torch.float32, "dx only", "triton")
    for strategy in ("fused", "materialize"):
        only_db = prepared("bat_backward", p, {**cfg, "strategy": strategy})
        with monkeypatch.context() as m:
            m.setattr(bat, "_run_gemm", forbidden)
            m.setattr(bat, "_build_weight", forbidden)
            dx, db = bat.bat_backward(p.dy, p.x, p.weight, p.block, False, True, only_db)
        assert dx is None
        assert_close_to_reference(db, want["dblock"], torch.float32, "dblock only", "triton")


def test_int64_offsets_path(monkeypatch):
    """The INT64 specialisation (taken when an offset passes 2^31 - 1) computes the same results."""
    backend_or_skip("triton")
    monkeypatch.setattr(bat, "needs_int64", lambda *tensors: True)
    p = make_problem("bat", (9,), 64, 64, 32, strided_x=True)
    for strategy in ("fused", "materialize"):
        fwd = fwd_config(strategy, "m16n32k32w4s1", gemm="triton")
        bwd = bwd_config(strategy, "m16n32k32w4s1", "m16n32k32w4s1", gemm="triton", split_k=2)
        check_kernels(p, fwd, bwd, f"int64/{strategy}")
    p = make_problem("bat", (9,), 24, 24, 4)  # arranged tiles
    check_kernels(
        p, fwd_config("fused", "m16n16k16w4s1"), bwd_config("fused", "m16n16k16w4s1", "m16n16k16w4s1"), "int64/arranged"
    )


def test_dblock_reductions_agree_and_partials_are_deterministic():
    backend_or_skip("triton")
    p = make_problem("bat", (21,), 32, 128, 16)
    dy, x, w, b = p.dy, p.x, p.weight, p.block

    def dblock(**db):
        cfg = prepared("bat_backward", p, bwd_config("fused", "m16n32k32w4s1", "m16n32k32w4s1", **db))
        return bat.bat_backward(dy, x, w, b, False, True, cfg)[1]

    one = dblock(split_k=1)
    parts = [dblock(split_k=4, reduce="partials") for _ in range(2)]
    atomic = dblock(split_k=4, reduce="atomic")
    assert torch.equal(parts[0], parts[1])
    want = reference_outputs(p)["dblock"]
    for got in (one, parts[0], atomic):
        assert_close_to_reference(got, want, torch.float32, "dblock", "triton")


# ------------------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------------------

ARCHS = ("sm80", "sm90", "interpreter")


def _problem(op: str, m: int, r: int, dtype: torch.dtype) -> OpProblem:
    n = k = 4 * r if r >= 16 else 48 * r
    return OpProblem(op, m, n, k, r, r, dtype, torch.float32, torch.device("cpu"))


def test_every_candidate_config_parses():
    """Every shipped candidate's JSON form round-trips and passes prepare_config for its problem."""
    for arch in ARCHS:
        for r in (1, 3, 8, 16, 32, 48, 64, 128, 256, 512):
            for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                for m in (1, 4096):
                    for op in ("bat_forward", "bat_backward"):
                        problem = _problem(op, m, r, dtype)
                        candidates = configs.candidates(problem, arch)
                        assert candidates, (arch, r, dtype, op)
                        assert {c.strategy for c in candidates} == {"fused", "materialize"}
                        for cfg in candidates:
                            assert configs.prepare(problem, cfg.to_dict()) == cfg


def test_shipped_tile_names_say_what_runs():
    """No shipped tile set is clamped by the kernels' fitting to its r class: its name is the tile that runs."""
    tables = [(key[1], e) for key, e in BAT_HALF.items()] + list(BAT_FP32.items())
    for r_class, entry in tables:
        r = {"small": 8, "r16": 16, "r32": 32, "r64": 64, "r128+": 128}[r_class]
        for t in (*entry.fwd, *entry.dx, entry.dblock, entry.build):
            assert bat._tiling(r, t.block_n, t.block_k)[1:] == (t.block_n, t.block_k), (r_class, t.name)


def test_default_strategy_follows_m():
    small = configs.default_config(_problem("bat_forward", 16, 64, torch.bfloat16))
    large = configs.default_config(_problem("bat_forward", 1 << 16, 64, torch.bfloat16))
    assert (small["strategy"], large["strategy"]) == ("fused", "materialize")


@pytest.mark.parametrize("arch", ["sm80", "sm90"])
def test_gpu_candidates_run_under_the_interpreter(arch):
    """Each distinct GPU candidate (its tiles as shipped) computes the right answer; tiny problems, so the
    interpreter runs only a few programs."""
    backend_or_skip("triton")
    for r, dtype in ((64, torch.bfloat16), (8, torch.float32)):
        p = make_problem("bat", (5,), 2 * max(r, 16), 2 * max(r, 16), r, dtype=dtype, seed=r)
        m = 5
        fwd = configs.candidates(OpProblem.from_tensors("bat_forward", m, p.weight, p.block, dtype), arch)
        bwd = configs.candidates(OpProblem.from_tensors("bat_backward", m, p.weight, p.block, dtype), arch)
        for f, b in dict.fromkeys(zip(fwd, bwd, strict=False)):  # each distinct pair once
            check_kernels(p, f, b, f"{arch}/r{r}/{f.label}/{f.strategy}")


@pytest.mark.parametrize(
    "op, bad, match",
    [
        ("fwd", {"strategy": "magic"}, "strategy"),
        ("fwd", {"form_precision": "bf16"}, "form_precision"),
        ("fwd", {"block_n": 48}, "block_n"),
        ("fwd", {"block_k": 8}, "block_k"),
        ("fwd", {"num_stages": 0}, "num_stages"),
        ("fwd", {"tile": 3}, "unknown keys"),
        ("bwd", {"dblock": {"split_k": -1}}, "split_k"),
        ("bwd", {"dblock": {"reduce": "sum"}}, "reduce"),
        ("bwd", {"dx": {"warps": 4}}, "unknown keys"),
        ("bwd", {"gemm": "cutlass"}, "gemm"),
    ],
)
def test_bad_configs_are_rejected(op, bad, match):
    """prepare_config fills the missing entries from the default and rejects a bad one, naming it."""
    p = make_problem("bat", (4,), 32, 32, 16)
    with pytest.raises(ValueError, match=match):
        prepared("bat_forward" if op == "fwd" else "bat_backward", p, bad)


# ------------------------------------------------------------------------------------------------------------
# GPU only
# ------------------------------------------------------------------------------------------------------------


def _gpu_problem(m: int, n: int, k: int, r: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=g) * k**-0.5).to(dtype)
    block = torch.randn(n // r, r, r, device="cuda", generator=g) * 0.05
    bias = torch.randn(n, device="cuda", generator=g).to(dtype)
    dy = torch.randn(m, n, device="cuda", generator=g).to(dtype)
    return x, w, block, bias, dy


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["fused", "materialize"])
def test_gpu_full_size_numerics(strategy):
    """W 4096 x 4096, M 2048, bf16, r 64: forward, dx and dB against float64 on the GPU."""
    from bonekern.blockmath import bat_block_grad, bat_weight, group_sum

    m, n, k, r = 2048, 4096, 4096, 64
    x, w, block, bias, dy = _gpu_problem(m, n, k, r, torch.bfloat16)
    pf = OpProblem.from_tensors("bat_forward", m, w, block, x.dtype)
    pb = OpProblem.from_tensors("bat_backward", m, w, block, x.dtype)
    fwd = configs.prepare(pf, {**configs.default_config(pf), "strategy": strategy})
    bwd = configs.prepare(pb, {**configs.default_config(pb), "strategy": strategy})
    y = bat.bat_forward(x, w, block, bias, fwd)
    dx, db = bat.bat_backward(dy, x, w, block, True, True, bwd)
    torch.cuda.synchronize()
    f64 = torch.float64
    w_prime = bat_weight(w.to(f64), block.to(f64), f64)
    x64 = x.to(f64)
    assert_close_to_reference(y, x64 @ w_prime.t() + bias.to(f64), torch.bfloat16, "y", "triton")
    assert_close_to_reference(dx, dy.to(f64) @ w_prime, torch.bfloat16, "dx", "triton")
    db_ref = bat_block_grad(dy.to(f64), x64, group_sum(x64, r, f64), w.to(f64), r, f64)
    assert_close_to_reference(db, db_ref, torch.bfloat16, "dblock", "triton")


@pytest.mark.gpu
def test_gpu_timing_against_cublas_and_torch_backend():
    """bf16, M 2048, W 4096 x 4096, r 64, forward + backward: prints the times of plain cuBLAS (no adapter, the
    floor), the torch backend, and each Triton strategy; asserts the default Triton config is no slower than the
    torch backend (10% slack for noise)."""
    import triton

    from bonekern.backends.pytorch import TorchBackend

    m, n, k, r = 2048, 4096, 4096, 64
    x, w, block, bias, dy = _gpu_problem(m, n, k, r, torch.bfloat16)
    torch_backend = TorchBackend()
    pf = OpProblem.from_tensors("bat_forward", m, w, block, x.dtype)
    pb = OpProblem.from_tensors("bat_backward", m, w, block, x.dtype)

    def cublas():
        torch.nn.functional.linear(x, w, bias)
        torch.mm(dy, w)
        torch.mm(dy.t(), x)

    def torch_bat():
        torch_backend.bat_forward(x, w, block, bias, torch_backend.prepare_config(pf, torch_backend.default_config(pf)))
        db_config = torch_backend.prepare_config(pb, torch_backend.default_config(pb))
        torch_backend.bat_backward(dy, x, w, block, True, True, db_config)

    def triton_bat(strategy=None):
        f, b = configs.default_config(pf), configs.default_config(pb)
        if strategy:
            f, b = {**f, "strategy": strategy}, {**b, "strategy": strategy}
        f, b = configs.prepare(pf, f), configs.prepare(pb, b)
        return lambda: (bat.bat_forward(x, w, block, bias, f), bat.bat_backward(dy, x, w, block, True, True, b))

    times = {
        "cublas (no adapter)": triton.testing.do_bench(cublas),
        "torch backend": triton.testing.do_bench(torch_bat),
        "triton default": triton.testing.do_bench(triton_bat()),
        "triton fused": triton.testing.do_bench(triton_bat("fused")),
        "triton materialize": triton.testing.do_bench(triton_bat("materialize")),
    }
    print(f"\n{torch.cuda.get_device_name()} bf16 M={m} N={n} K={k} r={r}, forward + backward (ms):")
    for name, ms in times.items():
        print(f"  {name:22s} {ms:8.3f}  ({ms / times['cublas (no adapter)']:.2f}x cuBLAS)")
    assert times["triton default"] <= 1.1 * times["torch backend"]
