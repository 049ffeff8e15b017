"""Property tests: every available backend against the float64 einsum reference, output and every gradient.

Shapes are drawn at random (hypothesis) and always include the odd cases: K not a multiple of r, r = 1,
leading batch dims, zero or several of them, non-contiguous x, no bias. Each backend gets its own example budget:
the Triton interpreter and the CUDA host shim are much slower than plain torch.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import (
    ALL_BACKENDS,
    assert_close_to_reference,
    backend_or_skip,
    check_against_reference,
    make_problem,
    reference_outputs,
)

EXAMPLES = {"torch": 60, "reference": 25, "triton": 12, "cupy": 15}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@st.composite
def problems(draw, variant: str, max_dim: int = 48):
    lead = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=2)))
    if variant == "bat":
        r = draw(st.sampled_from([1, 2, 3, 4, 8, 16]))
        n = r * draw(st.integers(1, max(1, max_dim // r)))
        k = r * draw(st.integers(1, max(1, max_dim // r)))
        mini_r = None
    else:
        k = draw(st.integers(1, max_dim))
        r = draw(st.one_of(st.just(1), st.just(k), st.integers(1, k)))
        n = draw(st.integers(1, max_dim))
        mini_r = None
        if variant == "mini":
            divisors = [d for d in range(1, n + 1) if n % d == 0]
            mini_r = draw(st.sampled_from(divisors))
    return dict(
        variant=variant,
        lead=lead,
        n=n,
        k=k,
        r=r,
        mini_r=mini_r,
        bias=draw(st.booleans()),
        strided_x=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _property_test(backend: str, variant: str, dtype: torch.dtype):
    @settings(max_examples=EXAMPLES[backend])
    @given(spec=problems(variant))
    def run(spec):
        check_against_reference(make_problem(dtype=dtype, **spec), backend)

    run()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("variant", ["bone", "mini", "bat"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_backend_matches_reference(backend, variant, dtype):
    backend_or_skip(backend)
    _property_test(backend, variant, dtype)


@pytest.mark.parametrize("variant", ["bone", "mini", "bat"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    "case",
    [
        dict(lead=(3, 5), n=24, k=20, r=8),  # K % r != 0 (bone/mini); batch dims
        dict(lead=(7,), n=16, k=16, r=1),  # r = 1
        dict(lead=(65,), n=33 * 2, k=18, r=3),  # M, N not multiples of any tile
        dict(lead=(2, 1, 3), n=32, k=32, r=32),  # r = K: a single group
    ],
    ids=["k_mod_r", "r1", "odd_m_n", "r_eq_k"],
)
def test_odd_shapes(backend, variant, case):
    backend_or_skip(backend)
    case = dict(case)
    if variant == "bat" and (case["k"] % case["r"] or case["n"] % case["r"]):
        case["k"] = case["r"] * max(1, case["k"] // case["r"])
    mini_r = (case["n"] // 2 if case["n"] % 2 == 0 else case["n"]) if variant == "mini" else None
    for strided in (False, True):
        p = make_problem(variant, mini_r=mini_r, strided_x=strided, **case)
        check_against_reference(p, backend)


@pytest.mark.parametrize("variant", ["bone", "mini", "bat"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_block_in_input_dtype(backend, variant):
    """PEFT keeps blocks in float32, but a block in x's dtype must work too."""
    backend_or_skip(backend)
    for dtype in (torch.float16, torch.bfloat16):
        p = make_problem(
            variant, (9,), 16, 16, 4, mini_r=8 if variant == "mini" else None, dtype=dtype, block_dtype=dtype
        )
        check_against_reference(p, backend)


@pytest.mark.parametrize("variant", ["bone", "mini", "bat"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_weight_gradient(backend, variant):
    """A trainable weight gets dW through every backend (bone: dY^T x; bat: G_ij (I + B_i)^T)."""
    backend_or_skip(backend)
    p = make_problem(variant, (5, 3), 16, 24 if variant == "bat" else 22, 8, mini_r=4 if variant == "mini" else None)
    check_against_reference(p, backend, need_weight_grad=True)


@pytest.mark.parametrize("variant", ["bone", "mini", "bat"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("layout", ["expanded", "transposed"])
def test_gradient_layouts(backend, variant, layout):
    """Backward must accept whatever layout autograd hands over: y.sum() gives a zero-stride expanded dy, and
    a transposed consumer gives a column-major dy."""
    from bonekern import bone_linear

    backend_or_skip(backend)
    p = make_problem(
        variant,
        (6, 3),
        16,
        16,
        4,
        mini_r=8 if variant == "mini" else None,
        dtype=torch.float64,
        block_dtype=torch.float64,
    )
    x = p.x.detach().requires_grad_()
    block = p.block.detach().requires_grad_()
    y = bone_linear(x, p.weight, block, p.bias, variant=variant, mini_r=p.mini_r, backend=backend)
    if layout == "expanded":
        dy = torch.ones((), dtype=torch.float64).expand(6, 3, 16)  # what y.sum().backward() passes
        y.sum().backward()
    else:
        dy = torch.randn(16, 18, dtype=torch.float64).t().reshape(6, 3, 16)
        assert not dy.is_contiguous()
        y.backward(dy)
    p.dy = dy
    want = reference_outputs(p)
    assert_close_to_reference(x.grad, want["dx"], torch.float64, f"{backend}/{layout}/dx", backend)
    assert_close_to_reference(block.grad, want["dblock"], torch.float64, f"{backend}/{layout}/dblock", backend)


def test_every_installed_backend_runs_in_this_suite():
    """Guard against a silently green suite: when a backend's package is installed, the suite must really run it
    on the CPU (Triton through the interpreter, CuPy through the host shim), not skip every test that uses it."""
    import importlib.util

    from bonekern.backends import unavailable_reason

    packages = {"torch": "torch", "reference": "torch", "triton": "triton", "cupy": "cupy"}
    for name in ALL_BACKENDS:
        if importlib.util.find_spec(packages[name]) is not None:
            assert unavailable_reason(name, "cpu") is None, f"{name} is installed but would be skipped here"
