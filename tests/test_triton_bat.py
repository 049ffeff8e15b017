"""The Triton bat kernels (bonekern/backends/triton/bat.py).

- Numerics, under the Triton interpreter (conftest sets TRITON_INTERPRET=1): every kernel and strategy against the
  float64 reference, forward and every gradient, with shapes picked so each tiling of bat.py runs: r = 1 and
  r = 3 (broadcast formation, padded lanes), r = 16 (batched 3-D dot), r = 32 / 64 / 128 (sub-block tiles with
  one or several s-chunks), r = 48 (padded sub-blocks); M and N not multiples of the tile, strided and 3-D x.
- Configs: every candidate of configs.py is accepted and runs; bad ones raise ValueError naming the entry.
- Ahead-of-time compile of every ``bat.aot_cases()`` entry for sm_80 / sm_90 with the ptxas Triton bundles: no
  spills, <= 255 registers, shared memory within the architecture.
- GPU only (``@pytest.mark.gpu``): full-size numerics, and timings against cuBLAS and the torch backend.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re

import pytest
import torch
from support import (
    assert_close_to_reference,
    backend_or_skip,
    check_against_reference,
    make_problem,
    reference_outputs,
)

pytest.importorskip("triton", reason="the triton package is not installed")

from bonekern.backends.base import OpProblem
from bonekern.backends.triton import bat, configs


def tiles(name: str) -> dict:
    return configs.bat_tiles(name)


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
    y = bat.bat_forward(x2, p.weight, p.block, p.bias, fwd)
    dx, dblock = bat.bat_backward(dy2, x2, p.weight, p.block, True, True, bwd)
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
        m.setattr(bat, "block_gradient", forbidden)
        dx, db = bat.bat_backward(p.dy, p.x, p.weight, p.block, True, False, cfg)
    assert db is None
    assert_close_to_reference(dx, want["dx"], torch.float32, "dx only", "triton")
    for strategy in ("fused", "materialize"):
        with monkeypatch.context() as m:
            m.setattr(bat, "_launch_gemm", forbidden)
            m.setattr(bat, "materialize_weight", forbidden)
            dx, db = bat.bat_backward(p.dy, p.x, p.weight, p.block, False, True, {**cfg, "strategy": strategy})
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
    t = bat.Tiles(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=1)
    one = bat.block_gradient(dy, x, w, b, t, split_k=1)
    parts = [bat.block_gradient(dy, x, w, b, t, split_k=4, reduce="partials") for _ in range(2)]
    atomic = bat.block_gradient(dy, x, w, b, t, split_k=4, reduce="atomic")
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
    for arch in ARCHS:
        for r in (1, 3, 8, 16, 32, 48, 64, 128, 256, 512):
            for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                for m in (1, 4096):
                    for op, plan in (("bat_forward", bat.ForwardPlan), ("bat_backward", bat.BackwardPlan)):
                        candidates = configs.candidate_configs_for(_problem(op, m, r, dtype), arch)
                        assert candidates, (arch, r, dtype, op)
                        assert {c["strategy"] for c in candidates} == {"fused", "materialize"}
                        for cfg in candidates:
                            plan.parse(cfg, cfg)


def test_shipped_tile_names_say_what_runs():
    """No shipped tile set is clamped by the kernels' fitting to its r class: its name is the tile that runs."""
    tables = [(key[2], e) for key, e in configs.BAT_TABLE.items()] + list(configs.BAT_TABLE_FP32.items())
    for r_class, entry in tables:
        r = {"small": 8, "r16": 16, "r32": 32, "r64": 64, "r128+": 128}[r_class]
        for name in (*entry["fwd"], *entry["dx"], entry["dblock"], entry["build"]):
            t = configs.bat_tiles(name)
            assert bat._tiling(r, t["block_n"], t["block_k"])[1:] == (t["block_n"], t["block_k"]), (r_class, name)


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
        fwd = configs.candidate_configs_for(OpProblem.from_tensors("bat_forward", m, p.weight, p.block, dtype), arch)
        bwd = configs.candidate_configs_for(OpProblem.from_tensors("bat_backward", m, p.weight, p.block, dtype), arch)
        seen = set()
        for f, b in zip(fwd, bwd, strict=False):
            key = repr((f, b))
            if key not in seen:
                seen.add(key)
                check_kernels(p, f, b, f"{arch}/r{r}/{f['tiles']}/{f['strategy']}")


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
    p = make_problem("bat", (4,), 32, 32, 16)
    if op == "fwd":
        with pytest.raises(ValueError, match=match):
            bat.bat_forward(p.x, p.weight, p.block, p.bias, bad)
    else:
        with pytest.raises(ValueError, match=match):
            bat.bat_backward(p.dy, p.x, p.weight, p.block, True, True, bad)


# ------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile for sm_80 / sm_90 (no GPU needed)
# ------------------------------------------------------------------------------------------------------------

SHARED_LIMIT = {80: 99 * 1024, 90: 227 * 1024}
"""Shared memory a block may use (bytes) on the smallest GPU of each config family: "sm80" configs also run on
sm_86 / sm_89 (99 KiB; A100 has 163 KiB), "sm90" on H100 / H200 (227 KiB)."""


def _ptxas_figures(log: str, what: str) -> tuple[int, int]:
    regs = re.search(r"Used (\d+) registers", log)
    assert regs, f"no ptxas report for {what}:\n{log}"
    return int(regs.group(1)), sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))


def compile_and_measure(case, arch: int) -> dict:
    """Compile ``case`` for sm_<arch> as Triton's launcher would (pointers and ints marked divisible by 16, as for
    aligned tensors whose sizes are multiples of 16) and read registers, spills and shared memory.

    Registers and spills: ``ptxas -v`` as Triton runs it to build the cubin it would launch (its bundled ptxas);
    for sm_90a also the bundled ``ptxas-blackwell`` on the same PTX; the worse figures count. Shared memory:
    Triton's metadata (ptxas only sees the static part). Needs the kernels defined with the interpreter off
    (see :func:`compile_all`)."""
    import pathlib
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    what = f"{case.kernel} {case.config_name} {case.dtype} sm_{arch}"
    names = case.fn.arg_names
    attrs = {
        (names.index(a),): [["tt.divisibility", 16]]
        for a, t in case.signature.items()
        if t.startswith("*") or t == "i32"
    }
    src = ASTSource(fn=case.fn, signature=case.signature, constexprs=case.constexprs, attrs=attrs)
    log = io.StringIO()
    with triton.knobs.nvidia.scope(), triton.knobs.compilation.scope(), contextlib.redirect_stdout(log):
        triton.knobs.nvidia.dump_ptxas_log = True
        triton.knobs.compilation.always_compile = True
        compiled = triton.compile(
            src,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": case.num_warps, "num_stages": case.num_stages},
        )
    regs, spills = _ptxas_figures(log.getvalue(), what)
    if arch == 90:
        tool = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"
        with tempfile.TemporaryDirectory() as tmp:
            ptx = pathlib.Path(tmp) / "kernel.ptx"
            ptx.write_text(compiled.asm["ptx"])
            cmd = [str(tool), "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", str(ptx), "-o", str(ptx) + ".o"]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        regs2, spills2 = _ptxas_figures(out.stdout + out.stderr, what + " (ptxas-blackwell)")
        regs, spills = max(regs, regs2), max(spills, spills2)
    return {"regs": regs, "spills": spills, "shared": compiled.metadata.shared}


@functools.cache
def _aot_cases() -> list:
    return bat.aot_cases()


@functools.cache
def _other_cases() -> list:
    """Specialisations the shipped bf16/fp32 AOT cases do not reach: fp64 and fp16 inputs, an fp64 block with fp32
    x, int64 offsets, atomic dB, explicit "ieee" / TF32 precisions, r = 1, 3 and 48 (padded lanes), no bias."""
    f16, f32, f64 = torch.float16, torch.float32, torch.float64
    t = bat.Tiles(block_m=64, block_n=32, block_k=32, num_warps=4, num_stages=2)
    t64 = bat.Tiles(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=2)
    out = []
    # (x dtype, block dtype, r, tiles, fused, forward, bias, form precision, main precision, int64)
    gemm_specs = [
        (f64, f32, 64, t, True, True, True, "matched", "ieee", False),
        (f64, f32, 8, t, True, False, False, "matched", "ieee", False),
        (f32, f64, 16, t, True, True, True, "matched", "ieee", False),
        (f16, f32, 64, t64, True, True, True, "matched", "tf32", True),
        (f16, f32, 48, t64, True, False, False, "matched", "tf32", True),
        (f32, f32, 64, t, True, True, False, "ieee", "tf32", False),
        (f32, f32, 3, t, True, True, True, "tf32x3", "tf32", False),
        (f16, f32, 1, t, True, False, False, "matched", "tf32", False),
        (f16, f32, 1, t64, False, True, True, "matched", "tf32", True),
    ]
    for x_dt, b_dt, r, tiles, fused, forward, bias, form_choice, main, int64 in gemm_specs:
        fd = bat.delta_dtype(x_dt, b_dt)
        form = bat._form_mode(form_choice, x_dt, fd, main)
        meta = bat._gemm_constexprs(
            forward=forward, fused=fused, has_bias=bias, r=r, tiles=tiles, fd=fd, form=form, main_precision=main,
            int64=int64,
        )  # fmt: skip
        ptrs = {"A_PTR": x_dt, "W": x_dt, "BLK": b_dt, "BIAS": x_dt, "C": x_dt}
        out.append(bat._aot_case("bat_gemm", bat._bat_gemm_kernel, ptrs, meta, tiles, f"r{r}/{form_choice}", x_dt))
    for x_dt, b_dt, r, tiles, atomic, int64 in [
        (f64, f32, 64, t, False, False),
        (f32, f64, 16, t, True, True),
        (f16, f32, 3, t, True, False),
        (f16, f32, 48, t64, False, True),
    ]:
        fd = bat.delta_dtype(x_dt, b_dt)
        main = "ieee" if fd == f64 else "tf32"
        meta = bat._dblock_constexprs(
            r=r, tiles=tiles, fd=fd, main_precision=main, epi_precision=main, atomic=atomic, int64=int64
        )
        ptrs = {"DY": x_dt, "X": x_dt, "W": x_dt, "OUT": fd}
        out.append(bat._aot_case("bat_dblock", bat._bat_dblock_kernel, ptrs, meta, tiles, f"r{r}", x_dt))
    for x_dt, r, int64 in [(f64, 64, False), (f16, 1, True), (f16, 48, True)]:
        fd = bat.delta_dtype(x_dt, f32)
        form = bat._form_mode("tf32x3", x_dt, fd, "ieee")
        meta = bat._build_constexprs(r=r, tiles=t, fd=fd, form=form, int64=int64)
        ptrs = {"W": x_dt, "BLK": f32, "OUT": x_dt}
        out.append(bat._aot_case("bat_build", bat._bat_build_kernel, ptrs, meta, t, f"r{r}", x_dt))
    return out


def _compile_job(args):
    source, index, arch = args
    cases = _aot_cases() if source == "aot" else _other_cases()
    return index, arch, compile_and_measure(cases[index], arch)


def compile_all(jobs: list[tuple[str, int, int]]):
    """Yield (case index, arch, figures) for each job ("aot" or "other" case list, index, arch), compiled in fresh
    worker processes with the interpreter off: under TRITON_INTERPRET=1 the kernels' @triton.jit helpers are
    interpreter objects that the compiler cannot take (rebuilding only the kernel as a JITFunction is not enough
    for kernels that call helpers)."""
    import concurrent.futures
    import multiprocessing

    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"  # inherited by the spawned workers only
    try:
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=min(2, os.cpu_count() or 1), mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            yield from pool.map(_compile_job, jobs)
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


def test_aot_cases_cover_every_kernel_and_shipped_config():
    """Each shipped config's kernels are among the AOT cases, under each GPU family that ships the config."""
    cases = bat.aot_cases()
    assert {c.kernel for c in cases} == {
        "bat_fwd_fused",
        "bat_fwd_gemm",
        "bat_build",
        "bat_dx_fused",
        "bat_dx_gemm",
        "bat_dblock",
    }
    covered = set()
    for c in cases:
        archs, r_name, tile_set = c.config_name.split("/")
        for arch in archs.split("+"):
            covered.add((arch, int(r_name.removeprefix("r")), tile_set, c.dtype, c.kernel))
    for arch in bat.AOT_ARCHS:
        for r, dtype, default_only in bat.AOT_SPECS:
            short = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
            for op, prefix in (("bat_forward", "fwd"), ("bat_backward", "dx")):
                candidates = configs.candidate_configs_for(_problem(op, 4096, r, dtype), arch)
                if default_only:
                    candidates = [
                        c for c in candidates if c["tiles"] == candidates[0]["tiles"] or c["gemm"] == "triton"
                    ]
                for cfg in candidates:
                    if cfg["strategy"] == "fused":
                        assert (arch, r, cfg["tiles"], short, f"bat_{prefix}_fused") in covered, (arch, r, cfg)
                    else:
                        assert any(k[:2] == (arch, r) and k[3:] == (short, "bat_build") for k in covered), (arch, r)
                    if cfg["gemm"] == "triton" and cfg["strategy"] == "materialize":
                        gemm = f"bat_{prefix}_gemm"
                        assert any(k[0] == arch and k[2:] == (cfg["tiles"], short, gemm) for k in covered), cfg
                if op == "bat_backward":
                    assert any(k[:2] == (arch, r) and k[3:] == (short, "bat_dblock") for k in covered), (arch, r)


def test_aot_compile_resources():
    """Every AOT case compiles for each GPU family that ships it, without spills, within 255 registers and the
    family's shared memory; the figures are printed (pytest -s) for the resource baseline."""
    pytest.importorskip("triton.backends.nvidia", reason="triton's NVIDIA backend is not installed")
    cases = _aot_cases()
    jobs = [
        ("aot", i, int(a.removeprefix("sm")))
        for i, c in enumerate(cases)
        for a in c.config_name.split("/")[0].split("+")
    ]
    failures = []
    for index, arch, res in compile_all(jobs):
        case = cases[index]
        line = (
            f"sm_{arch} {case.kernel:13s} {case.config_name:36s} {case.dtype} "
            f"w{case.num_warps}s{case.num_stages}: {res['regs']} regs, {res['spills']} B spilled, "
            f"{res['shared'] // 1024} KiB shared"
        )
        print(line)
        if res["spills"] or res["regs"] > 255 or res["shared"] > SHARED_LIMIT[arch]:
            failures.append(line)
    assert len(jobs) > 0
    assert not failures, "kernels over budget:\n" + "\n".join(failures)


def test_aot_compile_other_specialisations():
    """The specialisations of :func:`_other_cases` (fp64, fp16, int64 offsets, atomic dB, ...) compile for
    sm_80 and sm_90: the interpreter runs them, but only a compile shows that Triton's code generator accepts
    them."""
    pytest.importorskip("triton.backends.nvidia", reason="triton's NVIDIA backend is not installed")
    cases = _other_cases()
    jobs = [("other", i, arch) for i in range(len(cases)) for arch in (80, 90)]
    done = 0
    for index, arch, res in compile_all(jobs):
        case = cases[index]
        print(f"sm_{arch} {case.kernel:10s} {case.config_name:14s} {case.dtype}: {res}")
        assert res["regs"] <= 255
        done += 1
    assert done == len(jobs)


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
    from bonekern.backends.pytorch import bat_block_grad, bat_weight, group_sum

    m, n, k, r = 2048, 4096, 4096, 64
    x, w, block, bias, dy = _gpu_problem(m, n, k, r, torch.bfloat16)
    fwd = {**configs.default_config(OpProblem.from_tensors("bat_forward", m, w, block, x.dtype)), "strategy": strategy}
    bwd = {**configs.default_config(OpProblem.from_tensors("bat_backward", m, w, block, x.dtype)), "strategy": strategy}
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
        torch_backend.bat_forward(x, w, block, bias, torch_backend.default_config(pf))
        torch_backend.bat_backward(dy, x, w, block, True, True, torch_backend.default_config(pb))

    def triton_bat(strategy=None):
        f, b = configs.default_config(pf), configs.default_config(pb)
        if strategy:
            f, b = {**f, "strategy": strategy}, {**b, "strategy": strategy}
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
