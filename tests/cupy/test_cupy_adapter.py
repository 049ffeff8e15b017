"""The CuPy backend's adapter term (kernels/adapter.cu, bone.cu's write-only S D) on the CPU through the host shim,
against the float64 reference: the backend methods over hypothesis shapes (K % r != 0, r = 1, M off the tiles,
strided x and dY, mini C < N, every dtype, with and without dropout), masks bit for bit against
:func:`bonekern.dropout.keep_mask`, and the public ``bonekern.adapter_output`` through autograd. Each test also
checks which kernels ran, so a torch fallback cannot pass for the CUDA code."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bonekern
from bonekern import reference
from bonekern.backends import OpProblem, get_backend
from bonekern.dropout import DropoutSpec, keep_mask
from tests.cupy import cuda_shim
from tests.support import assert_close_to_reference

BACKEND = get_backend("cupy")


@pytest.fixture(scope="module")
def shim() -> cuda_shim.ShimLauncher:
    return cuda_shim.install()


def ran(shim: cuda_shim.ShimLauncher, since: int) -> set[str]:
    """The kernel families launched since history entry ``since``."""
    return {name.split("_f")[0].split("_bf")[0] for name in list(shim.history)[since:]}


def config(op, m, n, k, block, dtype, spec):
    problem = OpProblem.for_adapter(op, m, n, k, block, dtype, spec)
    return BACKEND.prepare_config(problem, BACKEND.default_config(problem))


def make(m, k, r, c, n, dtype, strided, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(k, m, generator=gen, dtype=torch.float64).to(dtype).t() if strided else None
    if x is None:
        x = torch.randn(m, k, generator=gen, dtype=torch.float64).to(dtype)
    block_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    block = (torch.randn(r, c, generator=gen, dtype=torch.float64) * 0.5).to(block_dtype)
    dy = torch.randn(m, n, generator=gen, dtype=torch.float64).to(dtype)
    return x, block, (dy.t().contiguous().t() if strided else dy)


@settings(max_examples=30, deadline=None)
@given(
    data=st.data(),
    m=st.integers(1, 40),
    k=st.integers(1, 50),
    r=st.sampled_from([1, 2, 3, 5, 8, 16, 20]),
    variant=st.sampled_from(["bone", "mini"]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    p=st.sampled_from([None, 0.1, 0.5]),
    strided=st.booleans(),
)
def test_matches_reference(shim, data, m, k, r, variant, dtype, p, strided):
    if variant == "mini":
        c = data.draw(st.integers(1, 20), label="C")
        n = c * data.draw(st.integers(1, 4), label="repeats")
    else:
        n = c = data.draw(st.integers(1, 40), label="N")
    x, block, dy = make(m, k, r, c, n, dtype, strided, seed=m * 31 + k)
    spec = DropoutSpec(p, (m * 7919 + k) % 2**32, k * 104729) if p else None
    start = len(shim.history)
    delta, s = BACKEND.adapter_forward(x, block, n, spec, config("adapter_forward", m, n, k, block, dtype, spec))
    cb = config("adapter_backward", m, n, k, block, dtype, spec)
    dx, dblock = BACKEND.adapter_backward(dy, s, block, k, spec, True, True, cb)
    families = ran(shim, start)
    assert "bk_bone_write_adapter" in families and "bk_adapter_spread" in families
    assert ("bk_adapter_group_sum" in families) == (spec is not None)
    want, s_ref = reference.adapter_forward(x.double(), block.double(), n, spec)
    dx_ref, db_ref = reference.adapter_backward(dy.double(), s_ref, block.double(), k, spec)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert delta.dtype == dtype and s.dtype == acc and dx.dtype == dtype and dblock.dtype == block.dtype
    what = f"m={m} k={k} r={r} C={c} n={n} {dtype} p={p} strided={strided}"
    assert_close_to_reference(s, s_ref, acc, f"S {what}", "cupy")
    assert_close_to_reference(delta, want, dtype, f"delta {what}", "cupy")
    assert_close_to_reference(dx, dx_ref, dtype, f"dx {what}", "cupy")
    assert_close_to_reference(dblock, db_ref, dtype, f"dblock {what}", "cupy")
    if spec is not None:
        assert not dx[~keep_mask(spec, m, k)].any(), f"dx mask {what}"


@pytest.mark.parametrize(
    ("seed", "offset"), [(0, 0), (2**32 - 1, 2**32 - 200), (2**31 + 5, 2**62 + 12345), (1, 1), (0x9E3779B9, 2**40)]
)
def test_masks_are_keep_mask_bit_for_bit(shim, seed, offset):
    """S with r = K (one group: S = keep / (1 - p) for x = 1) and dx with T = 1 are the mask itself."""
    m, k = 23, 40
    spec = DropoutSpec(0.37, seed, offset)
    want = keep_mask(spec, m, k)
    block = torch.ones(k, 1)
    _, s = BACKEND.adapter_forward(
        torch.ones(m, k), block, 1, spec, config("adapter_forward", m, 1, k, block, torch.float32, spec)
    )
    assert torch.equal(s != 0, want)
    assert torch.equal(s[want], torch.full_like(s[want], spec.scale))
    block1 = torch.ones(1, 1)
    cb = config("adapter_backward", m, 1, k, block1, torch.float32, spec)
    dx, dblock = BACKEND.adapter_backward(torch.ones(m, 1), s[:, :1], block1, k, spec, True, False, cb)
    assert dblock is None
    assert torch.equal(dx != 0, want)
    assert torch.equal(dx[want], torch.full_like(dx[want], spec.scale))


def test_adapter_output_through_autograd(shim):
    """The public function with backend="cupy": 3-D x, mini, dropout, gradients through the custom op."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, 26, generator=gen).requires_grad_()
    block = (torch.randn(6, 4, generator=gen) * 0.5).requires_grad_()
    dy = torch.randn(2, 7, 12, generator=gen)
    start = len(shim.history)
    torch.manual_seed(11)
    out = bonekern.adapter_output(x, block, variant="mini", out_features=12, mini_r=4, dropout_p=0.2, backend="cupy")
    out.backward(dy)
    assert {"bk_adapter_group_sum", "bk_bone_write_adapter", "bk_adapter_spread"} <= ran(shim, start)
    torch.manual_seed(11)
    spec = bonekern.dropout.draw(0.2)
    want, s = reference.adapter_forward(x.detach().reshape(-1, 26).double(), block.detach().double(), 12, spec)
    dx, db = reference.adapter_backward(dy.reshape(-1, 12).double(), s, block.detach().double(), 26, spec)
    assert_close_to_reference(out, want.reshape(2, 7, 12), torch.float32, "delta", "cupy")
    assert_close_to_reference(x.grad, dx.reshape(2, 7, 26), torch.float32, "dx", "cupy")
    assert_close_to_reference(block.grad, db, torch.float32, "dblock", "cupy")


def test_every_config_candidate_runs(shim):
    x, block, dy = make(13, 30, 5, 10, 20, torch.bfloat16, True, 3)
    spec = DropoutSpec(0.2, 9, 0)
    for op in ("adapter_forward", "adapter_backward"):
        problem = OpProblem.for_adapter(op, 13, 20, 30, block, torch.bfloat16, spec)
        for cfg in BACKEND.configs(problem):
            prepared = BACKEND.prepare_config(problem, cfg)
            if op == "adapter_forward":
                delta, s = BACKEND.adapter_forward(x, block, 20, spec, prepared)
                want, s_ref = reference.adapter_forward(x.double(), block.double(), 20, spec)
                assert_close_to_reference(delta, want, torch.bfloat16, f"delta {cfg}", "cupy")
            else:
                dx, db = BACKEND.adapter_backward(dy, s, block, 30, spec, True, True, prepared)
                dx_ref, db_ref = reference.adapter_backward(dy.double(), s_ref, block.double(), 30, spec)
                assert_close_to_reference(dx, dx_ref, torch.bfloat16, f"dx {cfg}", "cupy")
                assert_close_to_reference(db, db_ref, torch.bfloat16, f"dblock {cfg}", "cupy")
