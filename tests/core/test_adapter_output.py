"""bonekern.adapter_output: the bone/mini adapter term alone (with optional counter-based dropout), against the
float64 reference for output and both gradients, its custom ops, and what autograd keeps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import bonekern
from bonekern import reference
from bonekern.backends import BACKEND_NAMES, get_backend
from bonekern.blockmath import group_sum_dropped, keep_band, spread_dropped
from bonekern.dropout import DropoutSpec, keep_mask
from tests.support import assert_close_to_reference, backend_or_skip

ADAPTER_BACKENDS = [n for n in BACKEND_NAMES if get_backend(n).implements("adapter_forward")]
"""Every backend that implements the adapter ops (the GPU backends join when they do)."""

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _inputs(m_shape, n, k, r, cols, dtype, strided, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if strided:  # a transposed view: x's rows are not contiguous
        x = torch.randn(k, *m_shape, generator=gen).to(dtype).movedim(0, -1)
    else:
        x = torch.randn(*m_shape, k, generator=gen).to(dtype)
    block = (torch.randn(r, cols, generator=gen) * 0.5).to(torch.float32 if dtype != torch.float64 else dtype)
    dy = torch.randn(*m_shape, n, generator=gen).to(dtype)
    return x, block, dy


def _check(backend, variant, m_shape, n, k, r, cols, dtype, p, strided, seed=0):
    x, block, dy = _inputs(m_shape, n, k, r, cols, dtype, strided, seed)
    mini_r = cols if variant == "mini" else None
    xg = x.detach().requires_grad_()
    bg = block.detach().requires_grad_()
    torch.manual_seed(seed)
    out = bonekern.adapter_output(xg, bg, variant=variant, out_features=n, mini_r=mini_r, dropout_p=p, backend=backend)
    out.backward(dy)
    torch.manual_seed(seed)
    spec = bonekern.dropout.draw(p) if p > 0 else None  # the spec bonekern drew
    x2 = x.reshape(-1, k).to(torch.float64)
    want, s = reference.adapter_forward(x2, block.to(torch.float64), n, spec)
    dx, dblock = reference.adapter_backward(dy.reshape(-1, n).to(torch.float64), s, block.to(torch.float64), k, spec)
    assert out.dtype == dtype and out.shape == (*m_shape, n)
    assert_close_to_reference(out, want.reshape(*m_shape, n), dtype, "delta", backend)
    assert_close_to_reference(xg.grad, dx.reshape(*m_shape, k), dtype, "dx", backend)
    assert_close_to_reference(bg.grad, dblock, dtype, "dblock", backend)


@pytest.mark.parametrize("backend", ADAPTER_BACKENDS)
@settings(max_examples=25, deadline=None)
@given(
    data=st.data(),
    m_shape=st.sampled_from([(1,), (7,), (2, 5), (3, 1, 4)]),
    k=st.integers(1, 40),
    r=st.integers(1, 9),
    variant=st.sampled_from(["bone", "mini"]),
    dtype=st.sampled_from(DTYPES),
    p=st.sampled_from([0.0, 0.1, 0.5]),
    strided=st.booleans(),
)
def test_matches_reference(backend, data, m_shape, k, r, variant, dtype, p, strided):
    backend_or_skip(backend)
    r = min(r, k)
    cols = data.draw(st.integers(1, 6)) if variant == "mini" else None
    n = cols * data.draw(st.integers(1, 4)) if variant == "mini" else data.draw(st.integers(1, 20))
    _check(backend, variant, m_shape, n, k, r, cols or n, dtype, p, strided)


def test_reference_is_the_peft_formula():
    """The reference itself against PEFT's forward written out (pad, dropout, reshape, sum, repeat, matmul)."""
    x = torch.randn(5, 11, dtype=torch.float64)
    block = torch.randn(4, 3, dtype=torch.float64)
    spec = DropoutSpec(0.25, 99, 5)
    keep = keep_mask(spec, 5, 11).to(torch.float64)
    xd = F.pad(x * keep / (1 - spec.p), (0, 1))  # K = 11 -> 12, a multiple of r = 4
    want = torch.sum(xd.reshape(5, 3, 4), dim=-2) @ block.repeat(1, 12 // 3)
    got, _ = reference.adapter_forward(x, block, 12, spec)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_adapter_plus_base_equals_bone_linear():
    x = torch.randn(3, 4, 18)
    weight = torch.randn(12, 18)
    block = torch.randn(5, 12) * 0.1
    fused = bonekern.bone_linear(x, weight, block)
    split = F.linear(x, weight) + bonekern.adapter_output(x, block, variant="bone", out_features=12)
    torch.testing.assert_close(split, fused, rtol=2e-5, atol=2e-5)


def test_banded_masks_equal_the_whole_mask():
    spec = DropoutSpec(0.3, 123, 2**32 - 50)  # the counters cross a 2**32 boundary
    x = torch.randn(37, 29, dtype=torch.float64)
    whole = reference.group_sum(reference.dropped_input(x, spec), 6)
    # the same mask band by band (summation order may differ from the reference's by an ulp)
    torch.testing.assert_close(
        group_sum_dropped(x, 6, torch.float64, spec, band_elements=64), whole, rtol=1e-13, atol=1e-13
    )
    t = torch.randn(37, 6, dtype=torch.float64)
    want = reference.dropped_input(t[:, torch.arange(29) % 6], spec)
    torch.testing.assert_close(spread_dropped(t, 29, torch.float64, spec, band_elements=50), want, rtol=1e-15, atol=0)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_bit_masked_bands_zero_dropped_and_keep_nan_inf(x_dtype):
    """group_sum_dropped / spread_dropped zero dropped elements through their bit pattern in every width (the
    cast path for half x, int16 / int64 masks): equal to the float64 reference on the same mask; a NaN or Inf
    that the mask keeps propagates into S and dx, one it drops does not."""
    spec = DropoutSpec(0.4, 77, 5)
    m, k, r = 9, 29, 6
    x = torch.randn(m, k, dtype=torch.float64).to(x_dtype)
    keep = keep_mask(spec, m, k)
    kept, dropped = keep.nonzero()[0].tolist(), (~keep).nonzero()[0].tolist()
    x[kept[0], kept[1]] = float("nan")
    x[dropped[0], dropped[1]] = float("inf")
    dtype = torch.float64 if x_dtype == torch.float64 else torch.float32
    s = group_sum_dropped(x, r, dtype, spec, band_elements=40)
    want = reference.group_sum(reference.dropped_input(x.to(torch.float64).nan_to_num(posinf=0.0), spec), r)
    nan_group = kept[1] % r
    assert s[kept[0], nan_group].isnan() and not s[dropped[0]].isinf().any()
    s[kept[0], nan_group] = want[kept[0], nan_group] = 0.0
    torch.testing.assert_close(s.to(torch.float64), want, rtol=1e-5, atol=1e-5)
    t = torch.randn(m, r, dtype=dtype)
    dx = spread_dropped(t, k, x_dtype, spec, band_elements=40)
    want_dx = reference.dropped_input(t.to(torch.float64)[:, torch.arange(k) % r], spec).to(x_dtype)
    assert dx.dtype == x_dtype and torch.equal(dx == 0, want_dx == 0)
    torch.testing.assert_close(dx, want_dx)  # one rounding of t * scale (want: two)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    offset=st.one_of(st.integers(0, 2**40), st.integers(2**32 - 300, 2**32 + 300)),
    m=st.integers(1, 9),
    k=st.integers(1, 70),
    p=st.floats(0.01, 0.99),
    data=st.data(),
)
def test_fast_band_mask_is_the_oracle(seed, offset, m, k, p, data):
    """The torch backend's int32 mask equals bonekern.dropout.keep_mask bit for bit (bands crossing 2**32 too)."""
    spec = DropoutSpec(p, seed, offset)
    i0 = data.draw(st.integers(0, m - 1))
    i1 = data.draw(st.integers(i0, m))
    assert torch.equal(keep_band(spec, k, (i0, i1), torch.device("cpu")), keep_mask(spec, m, k, rows=(i0, i1)))


def test_dropout_distribution():
    """With r = K = N and an identity block the term is dropout(x) itself: keep rate 1 - p, kept values x / (1 - p)."""
    p, k, m = 0.1, 64, 4096
    x = torch.rand(m, k) + 0.5
    out = bonekern.adapter_output(x, torch.eye(k), variant="bone", out_features=k, dropout_p=p)
    kept = out != 0
    n = m * k
    assert abs(kept.sum().item() - n * (1 - p)) < 5 * math.sqrt(n * p * (1 - p))
    torch.testing.assert_close(out[kept], x[kept] / (1 - p))
    # columns and rows are equally likely to be kept (no structure in the stream)
    per_column = kept.float().mean(0)
    assert (per_column - (1 - p)).abs().max() < 5 * math.sqrt(p * (1 - p) / m)


def test_manual_seed_repeats_and_eval_has_no_dropout():
    x = torch.randn(8, 16)
    block = torch.randn(4, 16)

    def run(**kw):
        return bonekern.adapter_output(x, block, variant="bone", out_features=16, dropout_p=0.5, **kw)

    torch.manual_seed(3)
    a = run()
    torch.manual_seed(3)
    b = run()
    c = run()
    assert torch.equal(a, b) and not torch.equal(b, c)
    plain = bonekern.adapter_output(x, block, variant="bone", out_features=16)
    assert torch.equal(run(training=False), plain)


@pytest.mark.parametrize("backend", ADAPTER_BACKENDS)
def test_zero_tokens(backend):
    x = torch.randn(0, 3, 10, requires_grad=True)
    block = torch.randn(4, 6, requires_grad=True)
    out = bonekern.adapter_output(x, block, variant="mini", out_features=12, dropout_p=0.2, backend=backend)
    assert out.shape == (0, 3, 12)
    out.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(block.grad, torch.zeros_like(block))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"variant": "bat"}, ValueError, "variant must be 'bone' or 'mini'"),
        ({"out_features": 0}, ValueError, "out_features must be a positive int"),
        ({"out_features": 10}, ValueError, "block for variant 'bone'"),
        ({"dropout_p": 1.0}, ValueError, r"dropout_p must be in \[0, 1\)"),
        ({"dropout_p": "0.1"}, TypeError, "dropout_p must be a float"),
        ({"training": 1}, TypeError, "training must be a bool"),
        ({"backend": "nope"}, ValueError, "backend must be one of"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = {"variant": "bone", "out_features": 12, **kwargs}
    with pytest.raises(error, match=match):
        bonekern.adapter_output(torch.randn(2, 8), torch.randn(4, 12), **args)


def test_bad_tensors():
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        bonekern.adapter_output([1.0], torch.randn(4, 12), variant="bone", out_features=12)
    with pytest.raises(TypeError, match="block must have a floating dtype"):
        bonekern.adapter_output(torch.randn(2, 8), torch.ones(4, 12, dtype=torch.int32), variant="bone", out_features=1)


# ------------------------------------------------------------------------------------------------------------
# The custom ops and what autograd keeps.
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("backend", ADAPTER_BACKENDS)
def test_opcheck(backend, p):
    backend_or_skip(backend)
    x = torch.randn(6, 10, requires_grad=True)
    block = torch.randn(4, 6, requires_grad=True)
    torch.library.opcheck(torch.ops.bonekern.adapter_forward, (x, block, 12, p, 7, 3, backend))
    s = torch.randn(6, 4)
    dy = torch.randn(6, 12)
    torch.library.opcheck(
        torch.ops.bonekern.adapter_backward, (dy, s, block.detach(), 10, p, 7, 3, True, True, backend)
    )


def _run(p, monkeypatch, eager):
    monkeypatch.setattr(bonekern.ops, "EAGER_FAST_PATH", eager)
    x = torch.randn(2, 6, 10, generator=torch.Generator().manual_seed(1)).requires_grad_()
    block = torch.randn(4, 6, generator=torch.Generator().manual_seed(2)).requires_grad_()
    torch.manual_seed(5)
    out = bonekern.adapter_output(x, block, variant="mini", out_features=12, dropout_p=p)
    out.backward(torch.ones_like(out))
    return out, x.grad, block.grad


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_eager_path_equals_custom_op_path(p, monkeypatch):
    for a, b in zip(_run(p, monkeypatch, True), _run(p, monkeypatch, False), strict=True):
        assert torch.equal(a, b)


def test_compile_fullgraph():
    x = torch.randn(3, 10)
    block = torch.randn(4, 12, requires_grad=True)

    def f(x, block):
        return bonekern.adapter_output(x, block, variant="bone", out_features=12).square().sum()

    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(x, block), f(x, block))


@pytest.mark.parametrize("path", ["eager", "custom_op"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_keeps_only_s(p, path, monkeypatch):
    """With or without dropout autograd keeps S (M x r) alone: no mask, no dropped x, nothing of M x K."""
    monkeypatch.setattr(bonekern.ops, "EAGER_FAST_PATH", path == "eager")
    m, k, r, n = 64, 96, 16, 48
    x = torch.randn(m, k, requires_grad=True)
    block = torch.randn(r, n, requires_grad=True)
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() != block.untyped_storage().data_ptr():
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = bonekern.adapter_output(x, block, variant="bone", out_features=n, dropout_p=p)
    assert saved == [(m, r)], f"kept {saved}"
    out.sum().backward()
    assert x.grad is not None


def test_saved_tensor_check_detects_peft_dropout():
    """The check above can fail: PEFT's bone with miss_dropout keeps the dropout mask (M x K)."""
    peft = pytest.importorskip("peft", reason="needs the peft package (pip install 'bonekern[peft]')")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(96, 48)

        def forward(self, x):
            return self.lin(x)

    model = peft.get_peft_model(Net(), peft.MissConfig(r=16, miss_dropout=0.1, target_modules=["lin"]))
    x = torch.randn(64, 96, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        model(x)
    assert (64, 96) in saved, saved


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_recomputes_the_same_mask(reentrant):
    """checkpoint restores the CPU RNG state before recomputing, so the recomputed forward draws the same spec."""
    x = torch.randn(6, 20, requires_grad=True)
    block = torch.randn(4, 8, requires_grad=True)

    def f(x):
        return bonekern.adapter_output(x, block, variant="mini", out_features=16, dropout_p=0.5).tanh()

    torch.manual_seed(9)
    f(x).square().sum().backward()
    want = (x.grad.clone(), block.grad.clone())
    x.grad = block.grad = None
    torch.manual_seed(9)
    out = torch.utils.checkpoint.checkpoint(f, x, use_reentrant=reentrant)
    out.square().sum().backward()
    assert torch.equal(x.grad, want[0]) and torch.equal(block.grad, want[1])
