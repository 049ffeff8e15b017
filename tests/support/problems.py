"""Helpers shared by the tests: the per-dtype tolerance table, random problems, and comparisons against the
float64 reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bonekern import reference
from bonekern.backends import BACKEND_NAMES, unavailable_reason
from bonekern.tolerances import TRITON_INTERPRETER_BF16_FACTOR, VS_REFERENCE

TOLERANCE = VS_REFERENCE
"""Largest allowed |actual - reference| as a fraction of max |reference|, per compute dtype (bonekern.tolerances
says why each value, and why the tuner and the bench allow more)."""


def tolerance(dtype: torch.dtype, backend: str = "torch") -> float:
    """The tolerance for ``dtype``; bf16 from the Triton interpreter gets one more ulp (it truncates fp32 -> bf16)."""
    tol = TOLERANCE[dtype]
    if backend == "triton" and dtype == torch.bfloat16:
        tol *= TRITON_INTERPRETER_BF16_FACTOR
    return tol


def assert_close_to_reference(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, backend: str = "torch"
) -> None:
    """Compare against a float64 reference: same shape, NaN/Inf where the reference has them, and the finite
    entries within ``tolerance(dtype) * max|reference|``."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    finite = torch.isfinite(e)
    assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{what}: NaN positions differ from the reference"
    assert torch.equal(a[~finite & ~torch.isnan(e)], e[~finite & ~torch.isnan(e)]), f"{what}: Inf entries differ"
    if not finite.any():
        return
    scale = e[finite].abs().max().item()
    err = (a[finite] - e[finite]).abs().max().item()
    tol = tolerance(dtype, backend) * max(scale, 1e-30)
    assert err <= tol, f"{what}: max error {err:.3e} > {tol:.3e} (scale {scale:.3e}, dtype {dtype}, {backend})"


def backend_or_skip(name: str, device: str = "cpu") -> str:
    """Return ``name`` if the backend runs here; otherwise skip, naming the reason (a missing GPU or package)."""
    import pytest

    reason = unavailable_reason(name, device)
    if reason is not None:
        pytest.skip(f"backend {name!r} unavailable on {device}: {reason}")
    return name


@dataclass
class Problem:
    """One random Bone problem: inputs in the test dtype plus everything needed to rebuild them in float64."""

    variant: str
    x: torch.Tensor
    weight: torch.Tensor
    block: torch.Tensor
    bias: torch.Tensor | None
    dy: torch.Tensor
    mini_r: int | None = None

    @property
    def ref_variant(self) -> str:
        return "bat" if self.variant == "bat" else "bone"


def block_shape(variant: str, n: int, k: int, r: int, mini_r: int | None) -> tuple[int, ...]:
    from bonekern.variants import make_spec

    return make_spec(variant, n, k, r, mini_r).block_shape


def make_problem(
    variant: str,
    lead: tuple[int, ...],
    n: int,
    k: int,
    r: int,
    *,
    mini_r: int | None = None,
    dtype: torch.dtype = torch.float32,
    block_dtype: torch.dtype = torch.float32,
    bias: bool = True,
    strided_x: bool = False,
    seed: int = 0,
    device: str = "cpu",
) -> Problem:
    """Random inputs scaled so outputs are O(1). ``strided_x`` makes x a non-contiguous view of a larger tensor."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    x = rand(*lead, 2 * k if strided_x else k).to(dtype)
    x = x[..., ::2] if strided_x else x  # slice after the cast: .to() of a strided view returns a contiguous copy
    weight = rand(n, k, scale=k**-0.5).to(dtype)
    shape = block_shape(variant, n, k, r, mini_r)
    block_scale = r**-0.5 if variant == "bat" else (k / r) ** -0.5 * 0.5
    block = rand(*shape, scale=block_scale).to(block_dtype)
    b = rand(n).to(dtype) if bias else None
    dy = rand(*lead, n).to(dtype)
    to = lambda t: None if t is None else t.to(device)
    return Problem(variant, to(x), to(weight), to(block), to(b), to(dy), mini_r if variant == "mini" else None)


def reference_outputs(p: Problem, need_weight_grad: bool = False) -> dict[str, torch.Tensor]:
    """Output and gradients of the float64 reference for problem ``p`` (inputs taken exactly as given)."""
    x = p.x.detach().double().requires_grad_()
    w = p.weight.detach().double().requires_grad_(need_weight_grad)
    blk = p.block.detach().double().requires_grad_()
    b = None if p.bias is None else p.bias.detach().double().requires_grad_()
    y = reference.linear(x, w, blk, b, p.ref_variant)
    inputs = [x, blk] + ([w] if need_weight_grad else []) + ([b] if b is not None else [])
    grads = torch.autograd.grad(y, inputs, p.dy.double())
    names = ["x", "block"] + (["weight"] if need_weight_grad else []) + (["bias"] if b is not None else [])
    return {"y": y.detach(), **{f"d{name}": gr for name, gr in zip(names, grads, strict=True)}}


def backend_outputs(p: Problem, backend: str, need_weight_grad: bool = False) -> dict[str, torch.Tensor]:
    """Output and gradients of ``bonekern.bone_linear`` with ``backend`` on problem ``p``."""
    from bonekern import bone_linear

    x = p.x.detach().requires_grad_()
    w = p.weight.detach().requires_grad_(need_weight_grad)
    blk = p.block.detach().requires_grad_()
    b = None if p.bias is None else p.bias.detach().requires_grad_()
    if p.x.stride() != x.stride():
        raise AssertionError("detach() changed x's strides")
    y = bone_linear(x, w, blk, b, variant=p.variant, mini_r=p.mini_r, backend=backend)
    inputs = [x, blk] + ([w] if need_weight_grad else []) + ([b] if b is not None else [])
    grads = torch.autograd.grad(y, inputs, p.dy)
    names = ["x", "block"] + (["weight"] if need_weight_grad else []) + (["bias"] if b is not None else [])
    return {"y": y.detach(), **{f"d{name}": gr for name, gr in zip(names, grads, strict=True)}}


def check_against_reference(p: Problem, backend: str, need_weight_grad: bool = False) -> None:
    """Every output and gradient of ``backend`` against the float64 reference, with dtypes checked too."""
    got = backend_outputs(p, backend, need_weight_grad)
    want = reference_outputs(p, need_weight_grad)
    assert got.keys() == want.keys()
    expected_dtype = {
        "y": p.x.dtype,
        "dx": p.x.dtype,
        "dblock": p.block.dtype,
        "dweight": p.weight.dtype,
        "dbias": None if p.bias is None else p.bias.dtype,
    }
    for name in want:
        assert got[name].dtype == expected_dtype[name], f"{name}: dtype {got[name].dtype} != {expected_dtype[name]}"
        # Tolerance follows the coarser of the input dtype and the tensor's own dtype.
        dt = p.x.dtype if p.x.dtype in (torch.float16, torch.bfloat16) else got[name].dtype
        if got[name].dtype in (torch.float16, torch.bfloat16):
            dt = got[name].dtype
        assert_close_to_reference(got[name], want[name], dt, f"{backend}/{p.variant}/{name}", backend)


ALL_BACKENDS = BACKEND_NAMES

__all__ = [
    "ALL_BACKENDS",
    "TOLERANCE",
    "Problem",
    "assert_close_to_reference",
    "backend_or_skip",
    "backend_outputs",
    "block_shape",
    "check_against_reference",
    "make_problem",
    "reference_outputs",
    "tolerance",
]
