"""The Triton bone/mini kernels (bonekern/backends/triton/bone.py) against the float64 reference.

On the CPU every kernel runs through the Triton interpreter (conftest sets TRITON_INTERPRET=1): each forward strategy
("group", "chunk", "two_pass") and each backward path (T split over N, dblock split over M, the one-hot and the
repeat fold of mini) is forced through a chosen config, on tiny shapes that are not multiples of the tiles, with
K % r != 0, r in {1, 3, 16, 20, 64, 128}, several mini repeats, strided and 3-D x, in fp32/fp16/bf16 (and fp64).
Outputs and every gradient (dx, dblock, dbias) go through ``bone_linear`` and autograd, as users call it.

Tests marked ``gpu`` run full-size numerics and a timing comparison with cuBLAS where CUDA exists.
"""

from __future__ import annotations

import pytest
import torch

from bonekern import reference
from bonekern.backends import OpProblem
from bonekern.backends.triton import TritonBackend, configs, tiles
from bonekern.backends.triton.common import KernelEnv
from tests.support import assert_close_to_reference, backend_or_skip, check_against_reference, make_problem

pytest.importorskip("triton", reason="the triton package is not installed")

from bonekern.backends.triton import bone


@pytest.fixture(autouse=True)
def _triton_runs_here():
    backend_or_skip("triton")


def fwd_cfg(strategy: str, bm: int = 16, bn: int = 16, bk: int = 16, group_m: int = 2) -> dict:
    return dict(strategy=strategy, block_m=bm, block_n=bn, block_k=bk, group_m=group_m, num_warps=4, num_stages=1)


def bwd_cfg(split_n: int = 1, split_m: int = 1, block_r: int = 16, block_c: int = 16, tile: int = 16) -> dict:
    small = dict(block_m=tile, block_n=tile, num_warps=4, num_stages=1)
    return dict(
        dx=dict(block_m=tile, block_k=32, block_n=tile, group_m=2, num_warps=4, num_stages=1),
        t=dict(small, block_r=block_r, split_n=split_n),
        dblock=dict(small, block_r=block_r, block_c=block_c, split_m=split_m),
    )


def fwd_prepared(p, config: dict) -> configs.BoneForwardConfig:
    """``config`` for p's forward as the backend prepares it (validated once, typed)."""
    k = p.weight.shape[1]
    problem = OpProblem.from_tensors("bone_forward", p.x.reshape(-1, k).shape[0], p.weight, p.block, p.x.dtype)
    return TritonBackend().prepare_config(problem, config)


def bwd_prepared(p, config: dict) -> configs.BoneBackwardConfig:
    m = p.dy.reshape(-1, p.weight.shape[0]).shape[0]
    problem = OpProblem.from_tensors("bone_backward", m, p.weight, p.block, p.x.dtype)
    return TritonBackend().prepare_config(problem, config)


@pytest.fixture
def use_configs(monkeypatch):
    """Make the Triton backend run with the given forward and backward configs instead of its defaults."""

    def apply(forward: dict, backward: dict) -> None:
        chosen = {"bone_forward": forward, "bone_backward": backward}
        original = configs.default_config
        monkeypatch.setattr(configs, "default_config", lambda p: chosen.get(p.op) or original(p))

    return apply


# (variant, lead, N, K, r, mini_r, forward config, backward config); every case has M, N off the tile grid.
CASES = {
    # "group": r a power of two <= block_k; r < 16 takes the w = 16 fold; K % r != 0 throughout.
    "group_r1": ("bone", (19,), 40, 37, 1, None, fwd_cfg("group"), bwd_cfg(split_n=2)),
    "group_r4_mini": ("mini", (3, 7), 48, 30, 4, 12, fwd_cfg("group", bk=32), bwd_cfg(split_m=2)),
    "group_r16": ("bone", (37,), 40, 50, 16, None, fwd_cfg("group", bk=32), bwd_cfg(split_n=3, split_m=3)),
    "group_r64_mini": ("mini", (21,), 48, 70, 64, 16, fwd_cfg("group", bk=64, bm=32), bwd_cfg(block_r=64)),
    # "chunk": any r >= 16; r = 20 leaves masked lanes in the last chunk; r = 128 spans several chunks.
    "chunk_r16": ("bone", (2, 11), 33, 40, 16, None, fwd_cfg("chunk"), bwd_cfg(split_m=2)),
    "chunk_r20_mini": ("mini", (23,), 48, 45, 20, 24, fwd_cfg("chunk"), bwd_cfg(block_r=32, block_c=32)),
    "chunk_r64": ("bone", (45,), 24, 100, 64, None, fwd_cfg("chunk", bk=32), bwd_cfg(block_r=64, split_n=2)),
    "chunk_r128_mini": ("mini", (18,), 32, 160, 128, 8, fwd_cfg("chunk", bk=64), bwd_cfg(block_r=64)),
    # "two_pass": every r; r < 16 sums x through the one-hot dot, r >= 16 loops over the groups.
    "two_pass_r1_mini": ("mini", (20,), 36, 21, 1, 1, fwd_cfg("two_pass"), bwd_cfg(split_m=3)),
    "two_pass_r3": ("bone", (4, 5), 40, 20, 3, None, fwd_cfg("two_pass"), bwd_cfg(split_n=2, split_m=2)),
    "two_pass_r20": ("bone", (33,), 24, 45, 20, None, fwd_cfg("two_pass", bk=32), bwd_cfg(block_r=32)),
    "two_pass_r128_mini": ("mini", (17,), 48, 130, 128, 16, fwd_cfg("two_pass", bk=32), bwd_cfg(block_r=64)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_every_strategy_matches_reference(case, dtype, use_configs):
    """y, dx, dblock and dbias through bone_linear with each strategy forced, strided x for half the cases."""
    variant, lead, n, k, r, mini_r, fwd, bwd = CASES[case]
    use_configs(fwd, bwd)
    strided = list(CASES).index(case) % 2 == 1 or dtype == torch.float16
    p = make_problem(variant, lead, n, k, r, mini_r=mini_r, dtype=dtype, strided_x=strided, seed=len(case))
    check_against_reference(p, "triton")


@pytest.mark.parametrize("strategy", ["group", "chunk", "two_pass"])
def test_float64_and_half_block(strategy, use_configs):
    """fp64 inputs compute in fp64 end to end; a block in x's (half) dtype is accepted and returned in it."""
    use_configs(fwd_cfg(strategy), bwd_cfg(split_n=2, split_m=2))
    check_against_reference(make_problem("bone", (21,), 24, 35, 16, dtype=torch.float64), "triton")
    p = make_problem("mini", (21,), 24, 35, 16, mini_r=12, dtype=torch.bfloat16, block_dtype=torch.bfloat16)
    check_against_reference(p, "triton")


def test_forward_writes_group_sums_every_strategy():
    """S returned for backward equals the reference group sum (zero padding included) for every strategy."""
    p = make_problem("bone", (27,), 40, 45, 16, strided_x=True)
    want = reference.group_sum(p.x.double(), 16)
    for strategy in ("group", "chunk", "two_pass"):
        _, s = bone.bone_forward(p.x, p.weight, p.block, p.bias, fwd_prepared(p, fwd_cfg(strategy)))
        assert s.dtype == torch.float32 and s.shape == (27, 16)
        assert_close_to_reference(s, want, torch.float32, f"S[{strategy}]", "triton")


def test_default_configs_run_every_r(monkeypatch):
    """The interpreter's default configs (what backend="triton" picks on CPU) for r = 1 .. 128 and odd r."""
    for r in (1, 2, 5, 16, 24, 32, 48, 64, 128):
        k = max(r, 40) + 3
        check_against_reference(make_problem("bone", (9,), 20, k, r, seed=r), "triton")


class _LaunchRecorder:
    """Stands in for a @triton.jit kernel: records each launch (grid, args) and runs the real kernel."""

    def __init__(self, kernel, name: str, log: list):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, grid, args, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.fixture
def launches(monkeypatch):
    log: list = []
    for name in ("_bone_fwd_kernel", "_group_sum_kernel", "_bone_bwd_t_kernel", "_bone_bwd_dx_kernel"):
        monkeypatch.setattr(bone, name, _LaunchRecorder(getattr(bone, name), name, log))
    for name in ("_bone_bwd_dblock_kernel", "_sum_splits_kernel"):
        monkeypatch.setattr(bone, name, _LaunchRecorder(getattr(bone, name), name, log))
    return log


def test_backward_launches_only_what_is_needed(launches):
    p = make_problem("mini", (30,), 48, 40, 8, mini_r=6)
    s = reference.group_sum(p.x, 8)
    want = reference_grads(p, s)
    cfg = bwd_cfg(split_n=2, split_m=2)
    for need_dx, need_dblock in ((True, False), (False, True), (True, True)):
        launches.clear()
        dx, dblock = bone.bone_backward(p.dy, s, p.weight, p.block, need_dx, need_dblock, bwd_prepared(p, cfg))
        names = {name for name, *_ in launches}
        assert (dx is not None) == need_dx and (dblock is not None) == need_dblock
        assert ({"_bone_bwd_t_kernel", "_bone_bwd_dx_kernel"} <= names) == need_dx
        assert ({"_bone_bwd_dblock_kernel", "_sum_splits_kernel"} <= names) == need_dblock
        assert names <= {
            "_bone_bwd_t_kernel",
            "_bone_bwd_dx_kernel",
            "_bone_bwd_dblock_kernel",
            "_sum_splits_kernel",
        }
        if need_dx:
            assert_close_to_reference(dx, want["dx"], torch.float32, "dx", "triton")
        if need_dblock:
            assert_close_to_reference(dblock, want["dblock"], torch.float32, "dblock", "triton")


def reference_grads(p, s: torch.Tensor) -> dict[str, torch.Tensor]:
    """dx = dY W + (dY D^T)[:, k % r] and dblock = S^T dY folded over the repeats, in float64."""
    dy, w, blk = p.dy.double(), p.weight.double(), p.block.double()
    r, c = blk.shape
    d = reference.expand_block(blk, w.shape[0])
    k = w.shape[1]
    dx = dy @ w + (dy @ d.T)[:, torch.arange(k) % r]
    dd = s.double().T @ dy
    return {"dx": dx, "dblock": dd.reshape(r, -1, c).sum(1)}


def test_kernels_read_x_and_dy_in_place(launches):
    """Strided x and an expanded (stride-0) dY reach the kernels as given: no hidden copies."""
    p = make_problem("bone", (25,), 24, 30, 16, strided_x=True)
    assert not p.x.is_contiguous()
    bone.bone_forward(p.x, p.weight, p.block, p.bias, fwd_prepared(p, fwd_cfg("two_pass")))
    for name, _, _, kwargs in launches:
        assert kwargs["x_ptr"] is p.x, f"{name} did not get x itself"
    launches.clear()
    dy = torch.ones(1, 1).expand(25, 24)
    s = reference.group_sum(p.x, 16)
    dx, dblock = bone.bone_backward(dy, s, p.weight, p.block, True, True, bwd_prepared(p, bwd_cfg(split_m=2)))
    assert all(kwargs["dy_ptr"] is dy for name, *_, kwargs in launches if name != "_sum_splits_kernel")
    p.dy = dy.contiguous()
    want = reference_grads(p, s)
    assert_close_to_reference(dx, want["dx"], torch.float32, "dx (expanded dY)", "triton")
    assert_close_to_reference(dblock, want["dblock"], torch.float32, "dblock (expanded dY)", "triton")


def test_transposed_weight_and_block_strides():
    """Weight and block with non-unit inner strides (views of transposes) give the same result."""
    p = make_problem("mini", (19,), 32, 40, 16, mini_r=16)
    w_t = p.weight.t().contiguous().t()
    blk_t = p.block.t().contiguous().t()
    fwd, bwd = fwd_prepared(p, fwd_cfg("group")), bwd_prepared(p, bwd_cfg())
    y, s = bone.bone_forward(p.x, w_t, blk_t, p.bias, fwd)
    y0, s0 = bone.bone_forward(p.x, p.weight, p.block, p.bias, fwd)
    torch.testing.assert_close(y, y0)
    dx, db = bone.bone_backward(p.dy, s, w_t, blk_t, True, True, bwd)
    dx0, db0 = bone.bone_backward(p.dy, s0, p.weight, p.block, True, True, bwd)
    torch.testing.assert_close(dx, dx0)
    torch.testing.assert_close(db, db0)


def test_int64_offsets_path(monkeypatch):
    """The int64-offset specialisation computes the same numbers (forced on a small problem)."""
    p = make_problem("bone", (21,), 24, 35, 16)
    bwd = bwd_prepared(p, bwd_cfg(split_m=2))
    want_y, want_s = bone.bone_forward(p.x, p.weight, p.block, p.bias, fwd_prepared(p, fwd_cfg("chunk")))
    want = bone.bone_backward(p.dy, want_s, p.weight, p.block, True, True, bwd)
    monkeypatch.setattr(bone, "needs_int64", lambda *tensors: True)
    for strategy in ("group", "chunk", "two_pass"):
        y, s = bone.bone_forward(p.x, p.weight, p.block, p.bias, fwd_prepared(p, fwd_cfg(strategy)))
        torch.testing.assert_close(y, want_y)
        torch.testing.assert_close(s, want_s)
    got = bone.bone_backward(p.dy, want_s, p.weight, p.block, True, True, bwd)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_precision_follows_torch_tf32_flag():
    """fp32 dots: "tf32" exactly when torch would use TF32 (tests/triton/test_triton_common.py); fp16/bf16 adapter dots:
    TF32 on the GPU."""
    f32, bf16 = torch.float32, torch.bfloat16
    gpu, gpu_tf32 = KernelEnv(gpu=True, tf32=False, interpret=False), KernelEnv(gpu=True, tf32=True, interpret=False)
    assert bone.kernel_dtypes(f32, f32, gpu)[2:4] == ("ieee", "ieee")
    assert bone.kernel_dtypes(f32, f32, gpu_tf32)[2:4] == ("tf32", "tf32")
    assert bone.kernel_dtypes(bf16, f32, gpu)[3] == "tf32"
    assert bone.kernel_dtypes(torch.float64, f32, gpu_tf32)[2:4] == ("ieee", "ieee")
    interp = bone.kernel_dtypes(bf16, f32, KernelEnv(gpu=False, tf32=False, interpret=True))
    assert interp.dot == bone.tl.float32 and interp.adapter_precision == "ieee"


def test_nvtx_range_around_every_launch(monkeypatch, launches):
    opened: list[str] = []
    real = bone.nvtx_range

    def record(name):
        opened.append(name)
        return real(name)

    monkeypatch.setattr(bone, "nvtx_range", record)
    p = make_problem("bone", (40,), 16, 20, 4)
    _, s = bone.bone_forward(p.x, p.weight, p.block, p.bias, fwd_prepared(p, fwd_cfg("two_pass")))
    bone.bone_backward(p.dy, s, p.weight, p.block, True, True, bwd_prepared(p, bwd_cfg(split_m=2)))
    assert len(opened) == len(launches) == 6
    assert all(name.startswith("bonekern.triton.bone_") for name in opened)


def test_bad_configs_are_rejected_with_the_reason():
    """prepare_config (once per decision) rejects what the kernels cannot run, naming the entry."""
    p = make_problem("bone", (4,), 16, 20, 3)
    with pytest.raises(ValueError, match="'group' needs r a power of two"):
        fwd_prepared(p, fwd_cfg("group"))
    with pytest.raises(ValueError, match="cannot serve r = 3"):
        fwd_prepared(p, fwd_cfg("chunk"))
    with pytest.raises(ValueError, match="strategy"):
        fwd_prepared(p, dict(fwd_cfg("two_pass"), strategy="magic"))
    with pytest.raises(ValueError, match="block_k"):
        fwd_prepared(p, dict(fwd_cfg("two_pass"), block_k=24))
    with pytest.raises(ValueError, match=r"\['t'\]\['split_n'\]"):
        bad = bwd_cfg()
        bad["t"]["split_n"] = 0
        bwd_prepared(p, bad)
    with pytest.raises(ValueError, match=r"\['dblock'\] must be a dict"):
        bwd_prepared(p, {key: value for key, value in bwd_cfg().items() if key != "dblock"})
    with pytest.raises(ValueError, match=r"\['num_warps'\] must be a power of two"):
        fwd_prepared(p, dict(fwd_cfg("two_pass"), num_warps=3))
    with pytest.raises(ValueError, match=r"missing 'group_m'"):
        fwd_prepared(p, {key: value for key, value in fwd_cfg("two_pass").items() if key != "group_m"})
    with pytest.raises(ValueError, match=r"\['dx'\]: unknown keys \['warps'\]"):
        bwd_prepared(p, dict(bwd_cfg(), dx=dict(bwd_cfg()["dx"], warps=4)))
    with pytest.raises(TypeError, match="must be a dict; got list"):
        fwd_prepared(p, [])


def _problem(op: str, m: int, n: int, k: int, r: int, c: int, dtype: torch.dtype) -> OpProblem:
    return OpProblem(op, m, n, k, r, c, dtype, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("arch", ["sm80", "sm90", "interpreter"])
def test_every_candidate_config_is_valid_and_runs(arch):
    """Every dict the autotuner may receive (any arch, any r, any dtype family) passes validation, has a strategy
    serving r, and the forward/backward host functions run it (GPU tile sizes too, under the interpreter)."""
    for r, c in ((1, 1), (3, 48), (16, 12), (32, 48), (64, 48), (96, 16), (128, 48)):
        for dtype in (torch.bfloat16, torch.float32):
            k = max(130, r)
            for op in ("bone_forward", "bone_backward"):
                problem = _problem(op, 4096, 48, k, r, c, dtype)
                shipped = configs.candidates(problem, arch)
                assert shipped
                for cfg in shipped:  # the JSON form round-trips and passes validation for this problem
                    assert configs.prepare(problem, cfg.to_dict()) == cfg
                family = tiles.BONE_GEMM[(arch, tiles.dtype_family(dtype))]
                assert shipped[0].label == family[0][0].name
    # Run each distinct candidate once on a small problem (r = 32 is served by every strategy and tile set).
    p = make_problem("mini", (20,), 48, 70, 32, mini_r=12)
    s_ref = reference.group_sum(p.x.double(), 32)
    want = reference_grads(p, s_ref)
    y_ref = reference.linear(p.x.double(), p.weight.double(), p.block.double(), p.bias.double(), "bone")
    for dtype in (torch.bfloat16, torch.float32):
        problem = _problem("bone_forward", 20, 48, 70, 32, 12, dtype)
        for cfg in configs.candidates(problem, arch):
            y, s = bone.bone_forward(p.x, p.weight, p.block, p.bias, cfg)
            assert_close_to_reference(y, y_ref, torch.float32, f"y {cfg}", "triton")
        problem = _problem("bone_backward", 20, 48, 70, 32, 12, dtype)
        for cfg in configs.candidates(problem, arch):
            dx, dblock = bone.bone_backward(p.dy, s, p.weight, p.block, True, True, cfg)
            assert_close_to_reference(dx, want["dx"], torch.float32, f"dx {cfg}", "triton")
            assert_close_to_reference(dblock, want["dblock"], torch.float32, f"dblock {cfg}", "triton")


def test_few_tokens_default_to_short_tiles():
    for arch in ("sm80", "sm90"):
        few = configs.candidates(_problem("bone_forward", 16, 4096, 4096, 64, 4096, torch.bfloat16), arch)
        many = configs.candidates(_problem("bone_forward", 4096, 4096, 4096, 64, 4096, torch.bfloat16), arch)
        assert few[0].tile.block_m == 64 and many[0].tile.block_m == 128
        assert sorted(map(str, few)) == sorted(map(str, many))  # the same candidates, another order


def test_default_strategy_per_r():
    assert configs.default_forward_strategy(64, 64) == "group"
    assert configs.default_forward_strategy(1, 64) == "group"
    assert configs.default_forward_strategy(128, 64) == "chunk"
    assert configs.default_forward_strategy(64, 32) == "chunk"
    assert configs.default_forward_strategy(48, 64) == "two_pass"
    assert configs.default_forward_strategy(3, 64) == "two_pass"


# ----------------------------------------------------------------------------------------------------------
# GPU only: full-size numerics and a timing comparison with cuBLAS (skipped, and reported so, without CUDA).
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("variant, mini_r", [("bone", None), ("mini", 64)])
def test_full_size_bf16_on_gpu(variant, mini_r):
    """Llama-size layer, bf16 inputs, fp32 block: y and every gradient against a float64 reference on the GPU."""
    p = make_problem(variant, (2048,), 4096, 4096, 64, mini_r=mini_r, dtype=torch.bfloat16, device="cuda")
    check_against_reference(p, "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("r", [1, 3, 64, 128])
def test_every_shipped_config_on_gpu(r):
    """Each shipped candidate of this GPU's family, forward and backward, on an odd-sized bf16 problem."""
    p = make_problem("mini", (1000,), 1536, 1000, r, mini_r=48, dtype=torch.bfloat16, device="cuda")
    x, w, blk = p.x.double(), p.weight.double(), p.block.double()
    y_ref = reference.linear(x, w, blk, p.bias.double(), "bone")
    s_ref = reference.group_sum(x, r)
    problem = OpProblem.from_tensors("bone_forward", 1000, p.weight, p.block, p.x.dtype)
    for cfg in configs.candidates(problem):
        y, s = bone.bone_forward(p.x, p.weight, p.block, p.bias, cfg)
        assert_close_to_reference(y, y_ref, torch.bfloat16, f"y {cfg}", "triton")
        assert_close_to_reference(s, s_ref, torch.float32, f"S {cfg}", "triton")
    problem = OpProblem.from_tensors("bone_backward", 1000, p.weight, p.block, p.x.dtype)
    dy = p.dy.double()
    d = reference.expand_block(blk, 1536)
    dx_ref = dy @ w + (dy @ d.T)[:, torch.arange(1000, device="cuda") % r]
    db_ref = (s_ref.T @ dy).reshape(r, -1, 48).sum(1)
    for cfg in configs.candidates(problem):
        dx, dblock = bone.bone_backward(p.dy, s, p.weight, p.block, True, True, cfg)
        again = bone.bone_backward(p.dy, s, p.weight, p.block, True, True, cfg)
        assert torch.equal(dx, again[0]) and torch.equal(dblock, again[1]), "split reductions must be deterministic"
        assert_close_to_reference(dx, dx_ref, torch.bfloat16, f"dx {cfg}", "triton")
        assert_close_to_reference(dblock, db_ref, torch.float32, f"dblock {cfg}", "triton")


@pytest.mark.gpu
def test_speed_against_cublas_linear():
    """bf16, M=2048, N=K=4096, r=64: forward within 1.5x and forward+backward within 1.6x of cuBLAS's plain
    linear layer (which does no adapter work at all); prints the measured times."""
    import triton.testing

    from bonekern import bone_linear

    p = make_problem("bone", (2048,), 4096, 4096, 64, dtype=torch.bfloat16, device="cuda")
    x = p.x.detach().requires_grad_()
    blk = p.block.detach().requires_grad_()
    dy = p.dy

    def base_fwd():
        return torch.nn.functional.linear(x, p.weight, p.bias)

    def bone_fwd():
        return bone_linear(x, p.weight, blk, p.bias, backend="triton")

    def base_fwd_bwd():
        torch.autograd.grad(base_fwd(), [x], dy)

    def bone_fwd_bwd():
        torch.autograd.grad(bone_fwd(), [x, blk], dy)

    runs = {"base_fwd": base_fwd, "bone_fwd": bone_fwd, "base_fwd_bwd": base_fwd_bwd, "bone_fwd_bwd": bone_fwd_bwd}
    t = {name: triton.testing.do_bench(fn, warmup=50, rep=300) for name, fn in runs.items()}
    print({name: f"{ms:.3f} ms" for name, ms in t.items()})
    assert t["bone_fwd"] <= 1.5 * t["base_fwd"], t
    assert t["bone_fwd_bwd"] <= 1.6 * t["base_fwd_bwd"], t
