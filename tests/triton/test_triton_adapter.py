"""The Triton adapter-term kernels (bonekern/backends/triton/adapter.py) against the float64 reference.

On the CPU every kernel runs through the Triton interpreter (conftest sets TRITON_INTERPRET=1). The backend's two
adapter methods are called with small forced tiles (16 wide, so every shape spans several tiles and the T / dblock
partial sums are split), over hypothesis shapes: K % r != 0, r = 1, r > 16 (the group loop) and r < 16 (the
one-hot sum), M not a tile multiple, strided x and dY, mini with C < N, with and without dropout; the masks the
kernels apply are compared bit for bit with :func:`bonekern.dropout.keep_mask`. The public path
(``bonekern.adapter_output`` with autograd) is covered for every adapter backend by tests/core/test_adapter_output.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bonekern
from bonekern import reference
from bonekern.backends import OpProblem
from bonekern.dropout import DropoutSpec, keep_mask
from tests.support import assert_close_to_reference, backend_or_skip

pytest.importorskip("triton", reason="the triton package is not installed")

from bonekern.backends.triton import TritonBackend, adapter, bone, configs, tiles


@pytest.fixture(autouse=True)
def _triton_runs_here():
    backend_or_skip("triton")


BACKEND = TritonBackend()


def fwd_cfg(bm: int = 16, bn: int = 16, block_r: int = 16) -> dict:
    return dict(block_m=bm, block_n=bn, block_r=block_r, num_warps=4, num_stages=1)


def bwd_cfg(split_n: int = 1, split_m: int = 1, block_r: int = 16, block_c: int = 16) -> dict:
    small = dict(block_m=16, block_n=16, num_warps=4, num_stages=1)
    return dict(
        dx=dict(block_m=16, block_k=16, num_warps=4, num_stages=1),
        t=dict(small, block_r=block_r, split_n=split_n),
        dblock=dict(small, block_r=block_r, block_c=block_c, split_m=split_m),
    )


def prepared(op: str, m: int, n: int, k: int, block: torch.Tensor, dtype, spec, config: dict):
    problem = OpProblem.for_adapter(op, m, n, k, block, dtype, spec)
    return BACKEND.prepare_config(problem, config)


def make(m, k, r, c, n, dtype, strided, seed):
    gen = torch.Generator().manual_seed(seed)
    if strided:  # a transposed view: x's rows are not contiguous
        x = torch.randn(k, m, generator=gen, dtype=torch.float64).to(dtype).t()
    else:
        x = torch.randn(m, k, generator=gen, dtype=torch.float64).to(dtype)
    block_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    block = (torch.randn(r, c, generator=gen, dtype=torch.float64) * 0.5).to(block_dtype)
    dy = torch.randn(n, m, generator=gen, dtype=torch.float64).to(dtype).t() if strided else None
    if dy is None:
        dy = torch.randn(m, n, generator=gen, dtype=torch.float64).to(dtype)
    return x, block, dy


def run_and_check(m, k, r, c, n, dtype, p, strided, seed, fwd=None, bwd=None):
    x, block, dy = make(m, k, r, c, n, dtype, strided, seed)
    spec = DropoutSpec(p, seed * 7919 % 2**32, seed * 104729) if p else None
    block_r = tiles.bone_adapter_block(r)
    cf = prepared("adapter_forward", m, n, k, block, dtype, spec, fwd or fwd_cfg(block_r=block_r))
    cb = prepared("adapter_backward", m, n, k, block, dtype, spec, bwd or bwd_cfg(2, 2, block_r, 16))
    delta, s = BACKEND.adapter_forward(x, block, n, spec, cf)
    dx, dblock = BACKEND.adapter_backward(dy, s, block, k, spec, True, True, cb)
    want, s_ref = reference.adapter_forward(x.double(), block.double(), n, spec)
    dx_ref, db_ref = reference.adapter_backward(dy.double(), s_ref, block.double(), k, spec)
    delta_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert delta.dtype == dtype and s.dtype == delta_dtype and dx.dtype == dtype and dblock.dtype == block.dtype
    what = f"m={m} k={k} r={r} C={c} n={n} {dtype} p={p} strided={strided}"
    assert_close_to_reference(s, s_ref, delta_dtype, f"S {what}", "triton")
    assert_close_to_reference(delta, want, dtype, f"delta {what}", "triton")
    assert_close_to_reference(dx, dx_ref, dtype, f"dx {what}", "triton")
    assert_close_to_reference(dblock, db_ref, dtype, f"dblock {what}", "triton")
    if spec is not None:  # every element keep_mask drops has a zero gradient
        assert not dx[~keep_mask(spec, m, k)].any(), f"dx mask {what}"


@settings(max_examples=30, deadline=None)
@given(
    data=st.data(),
    m=st.integers(1, 40),
    k=st.integers(1, 50),
    r=st.sampled_from([1, 2, 3, 5, 8, 16, 20, 33]),
    variant=st.sampled_from(["bone", "mini"]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    p=st.sampled_from([None, 0.1, 0.5]),
    strided=st.booleans(),
)
def test_matches_reference(data, m, k, r, variant, dtype, p, strided):
    if variant == "mini":
        c = data.draw(st.integers(1, 20), label="C")
        n = c * data.draw(st.integers(1, 4), label="repeats")
    else:
        n = c = data.draw(st.integers(1, 40), label="N")
    run_and_check(m, k, r, c, n, dtype, p, strided, seed=m * 31 + k)


@pytest.mark.parametrize(
    ("m", "k", "r", "c", "n", "fwd", "bwd"),
    [
        (37, 45, 20, 24, 48, fwd_cfg(bm=32, bn=16, block_r=16), bwd_cfg(split_n=3, split_m=3, block_r=16)),  # r > BR
        (21, 130, 64, 16, 48, fwd_cfg(block_r=64), bwd_cfg(block_r=64)),  # C = 16 < N: the repeat fold of dblock
        (19, 37, 1, 1, 40, fwd_cfg(), bwd_cfg(split_n=2)),  # r = 1, C = 1: the one-hot dblock fold
        (50, 33, 16, 40, 40, fwd_cfg(bm=16, bn=32), bwd_cfg(split_m=4, block_c=32)),  # bone, one r step
    ],
)
@pytest.mark.parametrize("p", [None, 0.25])
def test_forced_tilings(m, k, r, c, n, fwd, bwd, p):
    """Each tiling path forced: r wider than the r step, several dblock / T splits, the one-hot and repeat folds."""
    run_and_check(m, k, r, c, n, torch.float32, p, strided=True, seed=k, fwd=fwd, bwd=bwd)


@pytest.mark.parametrize(
    ("seed", "offset"), [(0, 0), (2**32 - 1, 2**32 - 200), (2**31 + 5, 2**62 + 12345), (1, 1), (0x9E3779B9, 2**40)]
)
@pytest.mark.parametrize("r_small", [True, False])
def test_masks_are_keep_mask_bit_for_bit(seed, offset, r_small):
    """S with r = K (one group: S = x * keep / (1 - p)) and dx with T = 1 are the mask itself; both equal keep_mask
    exactly, for seeds and offsets with the top bit set, a counter crossing 2**32 and seed/offset 1 (which Triton
    would otherwise specialise into constants)."""
    m, k = 23, 12 if r_small else 40  # r = K: one-hot group sum for K < 16, the group loop above
    spec = DropoutSpec(0.37, seed, offset)
    want = keep_mask(spec, m, k)
    x = torch.ones(m, k)
    block = torch.ones(k, 1)
    cf = prepared("adapter_forward", m, 1, k, block, torch.float32, spec, fwd_cfg(block_r=tiles.bone_adapter_block(k)))
    _, s = BACKEND.adapter_forward(x, block, 1, spec, cf)
    assert torch.equal(s != 0, want)
    assert torch.equal(s[want], torch.full_like(s[want], spec.scale))
    block1 = torch.ones(1, 1)
    cb = prepared("adapter_backward", m, 1, k, block1, torch.float32, spec, bwd_cfg())
    dx, dblock = BACKEND.adapter_backward(torch.ones(m, 1), s[:, :1], block1, k, spec, True, False, cb)
    assert dblock is None
    assert torch.equal(dx != 0, want)
    assert torch.equal(dx[want], torch.full_like(dx[want], spec.scale))


def test_mask_statistics():
    """Over 200 000 elements the kept fraction is 1 - p within five standard deviations."""
    spec = DropoutSpec(0.3, 424242, 0)
    m, k = 400, 500
    x = torch.ones(m, k)
    block = torch.ones(k, 1)
    cf = prepared("adapter_forward", m, 1, k, block, torch.float32, spec, fwd_cfg(block_r=64))
    _, s = BACKEND.adapter_forward(x, block, 1, spec, cf)
    kept = (s != 0).double().mean().item()
    sd = (0.3 * 0.7 / (m * k)) ** 0.5
    assert abs(kept - 0.7) < 5 * sd


def test_only_requested_gradients():
    x, block, dy = make(9, 20, 4, 6, 12, torch.float32, False, 0)
    spec = DropoutSpec(0.2, 3, 0)
    cf = prepared("adapter_forward", 9, 12, 20, block, torch.float32, spec, fwd_cfg())
    cb = prepared("adapter_backward", 9, 12, 20, block, torch.float32, spec, bwd_cfg())
    _, s = BACKEND.adapter_forward(x, block, 12, spec, cf)
    dx, dblock = BACKEND.adapter_backward(dy, s, block, 20, spec, False, True, cb)
    assert dx is None and dblock.shape == (4, 6)
    dx, dblock = BACKEND.adapter_backward(dy, s, block, 20, spec, True, False, cb)
    assert dblock is None and dx.shape == (9, 20)


def test_expanded_dy():
    """autograd may hand a stride-0 dY (the gradient of a sum): read through its strides, never copied."""
    x, block, _ = make(11, 30, 5, 10, 20, torch.float32, False, 1)
    dy = torch.randn(1, 20, dtype=torch.float64).float().expand(11, 20)
    cf = prepared("adapter_forward", 11, 20, 30, block, torch.float32, None, fwd_cfg())
    cb = prepared("adapter_backward", 11, 20, 30, block, torch.float32, None, bwd_cfg(split_n=2, split_m=2))
    _, s = BACKEND.adapter_forward(x, block, 20, None, cf)
    dx, dblock = BACKEND.adapter_backward(dy, s, block, 30, None, True, True, cb)
    _, s_ref = reference.adapter_forward(x.double(), block.double(), 20)
    dx_ref, db_ref = reference.adapter_backward(dy.double(), s_ref, block.double(), 30)
    assert_close_to_reference(dx, dx_ref, torch.float32, "dx", "triton")
    assert_close_to_reference(dblock, db_ref, torch.float32, "dblock", "triton")


def test_adapter_output_through_autograd():
    """The public function with backend="triton": 3-D x, mini, dropout, gradients through the custom op."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, 26, generator=gen).requires_grad_()
    block = (torch.randn(6, 4, generator=gen) * 0.5).requires_grad_()
    dy = torch.randn(2, 7, 12, generator=gen)
    torch.manual_seed(11)
    out = bonekern.adapter_output(x, block, variant="mini", out_features=12, mini_r=4, dropout_p=0.2, backend="triton")
    out.backward(dy)
    torch.manual_seed(11)
    spec = bonekern.dropout.draw(0.2)
    want, s = reference.adapter_forward(x.detach().reshape(-1, 26).double(), block.detach().double(), 12, spec)
    dx, db = reference.adapter_backward(dy.reshape(-1, 12).double(), s, block.detach().double(), 26, spec)
    assert_close_to_reference(out, want.reshape(2, 7, 12), torch.float32, "delta", "triton")
    assert_close_to_reference(x.grad, dx.reshape(2, 7, 26), torch.float32, "dx", "triton")
    assert_close_to_reference(block.grad, db, torch.float32, "dblock", "triton")


# ----------------------------------------------------------------------------------------------------------
# Configs and launch plans
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["adapter_forward", "adapter_backward"])
@pytest.mark.parametrize("arch", ["sm80", "sm90", "interpreter"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_candidates_round_trip(op, arch, dtype):
    problem = OpProblem(op, 4096, 4096, 4096, 64, 64, dtype, torch.float32, torch.device("cpu"), True)
    for typed in configs.candidates(problem, arch):
        assert type(typed).from_dict(typed.to_dict()) == typed
        assert configs.prepare(problem, typed.to_dict()) == typed


def test_bad_configs_name_the_entry():
    block = torch.ones(4, 4)
    problem = OpProblem.for_adapter("adapter_forward", 8, 8, 8, block, torch.float32, None)
    with pytest.raises(ValueError, match="block_r"):
        BACKEND.prepare_config(problem, {**fwd_cfg(), "block_r": 24})
    with pytest.raises(ValueError, match="unknown keys"):
        BACKEND.prepare_config(problem, {**fwd_cfg(), "block_k": 16})
    with pytest.raises(TypeError, match="must be a dict"):
        BACKEND.prepare_config(problem, [1])
    problem = OpProblem.for_adapter("adapter_backward", 8, 8, 8, block, torch.float32, None)
    bad = bwd_cfg()
    bad["dx"] = {**bad["dx"], "num_warps": 3}
    with pytest.raises(ValueError, match=r"\['dx'\]\['num_warps'\]"):
        BACKEND.prepare_config(problem, bad)


@pytest.mark.parametrize("arch", tiles.SHIPPED_ARCHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("r", "c"), [(8, 8), (8, 64), (64, 8), (64, 64)])
def test_grad_launches_are_bone_backwards(arch, dtype, r, c):
    """The adapter backward's T / dblock launches are bone backward's specialisations, which bone.aot_cases
    compiles: same kernel, constexprs, warps and stages."""
    ours = adapter.backward_grads_launch(arch, dtype, r, c)
    theirs = bone._backward_launch(arch, dtype, r, c).grads
    for a, b in ((ours.t, theirs.t), (ours.dblock, theirs.dblock)):
        assert (a.fn, dict(a.constexprs), a.num_warps, a.num_stages) == (
            b.fn,
            dict(b.constexprs),
            b.num_warps,
            b.num_stages,
        )


def test_aot_cases_are_unique_and_cover_each_kernel():
    cases = adapter.aot_cases()
    keys = [(c.kernel, c.config_name, c.dtype) for c in cases]
    assert len(keys) == len(set(keys))
    assert {c.kernel for c in cases} == {"bone_group_sum", "adapter_delta", "adapter_dx"}
    assert {c.config_name for c in cases if c.kernel == "bone_group_sum"} == {"onehot.dropout", "groups.dropout"}
    dropout_cases = [c for c in cases if c.kernel != "adapter_delta"]
    assert all(c.signature[name] == "i32" for c in dropout_cases for name in ("SEED", "OFFSET_LO", "THRESHOLD"))
