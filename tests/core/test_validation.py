"""Every malformed call fails with a clear ValueError/TypeError that names the argument, what was expected
and what was given; unknown or unavailable backends fail with a reason."""

from __future__ import annotations

import pytest
import torch

import bonekern
from bonekern import BackendUnavailableError, BoneLinear, bone_linear, delta_weight, merge, unmerge
from bonekern.backends import BACKEND_NAMES
from tests.support import backend_or_skip

N, K, R = 16, 12, 4


def args(variant="bone", **over):
    x = torch.randn(3, K)
    w = torch.randn(N, K)
    block = {"bone": torch.zeros(R, N), "mini": torch.zeros(R, 8), "bat": torch.zeros(N // R, R, R)}[variant]
    out = dict(x=x, weight=w, block=block, bias=torch.zeros(N), variant=variant)
    out.update(over)
    return out


def call(**kw):
    kw = dict(kw)
    return bone_linear(kw.pop("x"), kw.pop("weight"), kw.pop("block"), kw.pop("bias"), **kw)


@pytest.mark.parametrize(
    "over, exc, words",
    [
        # shape mismatches, naming the dimension
        (dict(x=torch.randn(3, K + 1)), ValueError, ["x.shape[-1]", f"{K}", f"{K + 1}"]),
        (dict(weight=torch.randn(N, K, 1)), ValueError, ["weight", "2-D", "(16, 12, 1)"]),
        (dict(x=torch.tensor(1.0)), ValueError, ["x", "0-d"]),
        (dict(bias=torch.zeros(N + 1)), ValueError, ["bias", f"({N},)", f"({N + 1},)"]),
        # block shapes that do not fit the variant
        (dict(block=torch.zeros(R, N + 1)), ValueError, ["block", "bone", "block.shape[1]", f"{N + 1}"]),
        (dict(block=torch.zeros(R, N, 1)), ValueError, ["block", "2-D", "(4, 16, 1)"]),
        (dict(variant="bat", block=torch.zeros(N // R, R, R + 1)), ValueError, ["block", "bat", "(4, 4, 5)"]),
        (
            dict(variant="bat", block=torch.zeros(N // R + 1, R, R)),
            ValueError,
            ["block.shape[0]", "5", "(4, 4, 4)"],
        ),
        (dict(variant="bat", block=torch.zeros(R, N)), ValueError, ["block", "bat", "3-D"]),
        # bat needs N and K multiples of r
        (
            dict(variant="bat", block=torch.zeros(N // 8, 8, 8)),
            ValueError,
            ["bat", "in_features", "K = 12", "r = 8"],
        ),
        (
            dict(variant="bat", weight=torch.randn(18, K), bias=None, block=torch.zeros(4, 4, 4)),
            ValueError,
            ["bat", "out_features", "N = 18", "r = 4"],
        ),
        # mini_r must divide N and match the block
        (dict(variant="mini", block=torch.zeros(R, 5)), ValueError, ["mini_r", "divide", "N = 16", "5"]),
        (dict(variant="mini", mini_r=4), ValueError, ["mini_r", "block.shape[1]", "mini_r = 4"]),
        (dict(mini_r=4), ValueError, ["mini_r", "only used by variant 'mini'"]),
        # r out of range
        (dict(block=torch.zeros(K + 1, N)), ValueError, ["r", f"<= in_features (K = {K})", f"r = {K + 1}"]),
        (dict(block=torch.zeros(0, N)), ValueError, ["r", ">= 1", "0"]),
        # dtypes
        (dict(x=torch.ones(3, K, dtype=torch.int64)), TypeError, ["x", "floating", "torch.int64"]),
        (dict(x=torch.ones(3, K, dtype=torch.complex64)), TypeError, ["x", "floating", "torch.complex64"]),
        (dict(block=torch.zeros(R, N, dtype=torch.int32)), TypeError, ["block", "floating", "torch.int32"]),
        (
            dict(weight=torch.randn(N, K, dtype=torch.float64)),
            TypeError,
            ["weight", "x's dtype", "torch.float64"],
        ),
        (dict(bias=torch.zeros(N, dtype=torch.float16)), TypeError, ["bias", "x's dtype", "torch.float16"]),
        (dict(x=[[1.0] * K]), TypeError, ["x", "torch.Tensor", "list"]),
        # devices
        (dict(x=torch.randn(3, K, device="meta")), ValueError, ["x", "same device", "meta"]),
        (dict(block=torch.zeros(R, N, device="meta")), ValueError, ["block", "same device", "meta"]),
        (dict(bias=torch.zeros(N, device="meta")), ValueError, ["bias", "same device", "meta"]),
        # unknown variant / backend
        (dict(variant="lora"), ValueError, ["variant", "'lora'", "bone"]),
        (dict(variant=None), TypeError, ["variant", "NoneType"]),
        (dict(backend="cuda"), ValueError, ["backend", "'cuda'", "auto"]),
        (dict(backend=3), TypeError, ["backend", "int"]),
    ],
)
def test_bad_input(over, exc, words):
    over = dict(over)
    variant = over.pop("variant", "bone")
    kw = args(variant if variant in ("bone", "mini", "bat") else "bone", **over)
    kw["variant"] = variant
    with pytest.raises(exc) as info:
        call(**kw)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"


@pytest.mark.parametrize("backend", ["triton", "cupy"])
def test_unavailable_backend_says_why(backend, monkeypatch):
    """On the CPU, Triton runs only through the interpreter and CuPy only through the test suite's host shim;
    without them a named backend must fail with the reason, not fall back silently."""
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        reason = bonekern.backends.unavailable_reason(backend, "cpu")
        assert reason is not None and "CUDA" in reason
        with pytest.raises(BackendUnavailableError, match=r"backend 'triton' cannot run on cpu: .*CUDA"):
            call(**args(backend=backend))
        return
    from bonekern.backends.cupy.launcher import install_launcher

    previous = install_launcher("cpu", None)
    try:
        with pytest.raises(BackendUnavailableError, match=r"backend 'cupy' cannot run on cpu: .+"):
            call(**args(backend=backend))
    finally:
        install_launcher("cpu", previous)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_zero_tokens_is_valid(backend):
    backend_or_skip(backend)
    for variant in ("bone", "mini", "bat"):
        kw = args(variant, x=torch.randn(0, 2, K, requires_grad=True), backend=backend)
        kw["block"].requires_grad_()
        y = call(**kw)
        assert y.shape == (0, 2, N)
        y.sum().backward()
        assert kw["x"].grad.shape == (0, 2, K)
        assert torch.equal(kw["block"].grad, torch.zeros_like(kw["block"]))


@pytest.mark.parametrize("variant", ["bone", "mini", "bat"])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_nan_and_inf_propagate(variant, backend):
    backend_or_skip(backend)
    kw = args(variant, backend=backend)
    kw["x"][1, 3] = float("nan")
    kw["x"][2, 0] = float("inf")
    kw["block"].normal_()
    y = call(**kw)
    assert torch.isfinite(y[0]).all()
    assert torch.isnan(y[1]).all(), "a NaN in x must reach every output of its row"
    assert not torch.isfinite(y[2]).all()


def test_merge_functions_validate():
    w = torch.randn(N, K)
    with pytest.raises(ValueError, match=r"bat.*in_features"):
        delta_weight(w, torch.zeros(2, 8, 8), variant="bat")
    with pytest.raises(TypeError, match=r"block must be a torch\.Tensor"):
        merge(w, None)
    with pytest.raises(ValueError, match=r"variant must be one of"):
        unmerge(w, torch.zeros(R, N), variant="Bone")


def test_module_validates():
    with pytest.raises(ValueError, match="r must be <= in_features"):
        BoneLinear(8, 8, 9)
    with pytest.raises(TypeError, match=r"linear must be a torch\.nn\.Linear"):
        BoneLinear.from_linear(torch.nn.Conv1d(2, 2, 1), 2)
    with pytest.raises(ValueError, match="mini_r is required"):
        BoneLinear(8, 8, 2, variant="mini")
