"""bat over a packed quantised weight with W dequantised inside the Triton tiles (bonekern/backends/triton/
bat_packed.py), under the Triton interpreter (conftest sets TRITON_INTERPRET=1).

- The kernels alone: W'_c rows and the dB products ``sum_j W_ij^T G_ij`` against float64 computed on bitsandbytes'
  own dequantised weight, for nf4, fp4 and int8, padded lanes (r = 1, 3, 8, 48) and full ones (16, 64).
- The op: ``bat_linear_quantized(..., strategy="triton")``: output, dx, dB and dbias against the float64
  reference on the dequantised weight, over random shapes (M odd, batch dims, strided x, chunks); autograd keeps x
  alone; "auto" on the CPU takes the torch path; the one-time check on a device warns and falls back when the
  kernels disagree.
- AOT compiles of ``bat_packed.aot_cases()`` are in tests/triton/test_triton_resources.py (and test_versions.py).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, seed, settings
from hypothesis import strategies as st

pytest.importorskip("triton", reason="the triton package is not installed")
pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")

import bonekern
from bench.memory import kept_for_backward
from bonekern import quant_ops
from bonekern.backends.triton import bat_packed
from bonekern.quant import weight_source
from bonekern.verify import KernelVerificationWarning
from tests.quant.test_quant import _check_vs_reference, _problem, bnb4, bnb8, hqq_layer, peft_dequantised
from tests.support.problems import assert_close_to_reference

warnings.filterwarnings("ignore", message=".*kernels.*")

PACKED_LAYERS = {
    "nf4": lambda n, k: bnb4(n, k, "nf4"),
    "nf4-plain": lambda n, k: bnb4(n, k, "nf4", compress=False),
    "fp4": lambda n, k: bnb4(n, k, "fp4"),
    "int8": bnb8,
}


@pytest.mark.parametrize("name", sorted(PACKED_LAYERS))
@pytest.mark.parametrize("r", [1, 3, 8, 16, 48, 64])
def test_kernels_match_float64_on_the_dequantised_weight(name, r):
    n, k = 3 * r, 192  # K: a multiple of every r here and of bnb's blocksize 64
    layer = PACKED_LAYERS[name](n, k)
    packed = weight_source(layer).packed_weight()
    assert packed is not None and bat_packed.supports(packed, r, torch.float32)
    w64 = peft_dequantised(layer).to(torch.float64)  # [N, K]
    g = torch.Generator().manual_seed(r)
    block = 0.1 * torch.randn(n // r, r, r, generator=g)
    start, stop = r, 3 * r  # out-blocks 1 and 2: the row offset into the packed data is exercised
    want = w64[start:stop].clone()
    for i in range(2):
        b = block[1 + i].to(torch.float64)
        rows = w64[start + i * r : start + (i + 1) * r].view(r, k // r, r)  # [p, j, s]
        want[i * r : (i + 1) * r] = (torch.einsum("pjs,sq->pjq", rows, b) + rows + b[:, None, :]).reshape(r, k)
    got = bat_packed.packed_bat_rows(packed, block, start, stop, torch.float32)
    assert_close_to_reference(got, want, torch.float32, "W'")
    grad = torch.randn(stop - start, k, generator=g)  # G_c [c*r, K]
    want_db = torch.einsum(
        "ipjs,ipjq->isq", w64[start:stop].view(2, r, k // r, r), grad.to(torch.float64).view(2, r, k // r, r)
    )
    assert_close_to_reference(bat_packed.packed_block_products(packed, grad, start, r), want_db, torch.float32, "dB")


@seed(1212)
@settings(max_examples=8, deadline=None)
@given(
    name=st.sampled_from(sorted(PACKED_LAYERS)),
    r=st.sampled_from([3, 8, 16]),  # r = 1 (192 programs a row of blocks) is in the kernel test above
    nb=st.integers(1, 4),
    m=st.integers(1, 9),
    batch=st.integers(1, 3),
    chunk_blocks=st.integers(1, 4),
    strided=st.booleans(),
)
def test_op_with_the_triton_strategy_matches_the_reference(name, r, nb, m, batch, chunk_blocks, strided):
    n, k = nb * r * 4, 192
    layer = PACKED_LAYERS[name](n, k)
    x, block, bias = _problem(layer, n, k, r, m * batch)
    x = x.detach().view(batch, m, k)
    if strided:
        x = torch.cat([x, x], dim=-1)[..., ::2]  # inner stride 2
    x.requires_grad_()
    _check_vs_reference(layer, peft_dequantised(layer).float(), x, block, bias, chunk_blocks, strategy="triton")


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_match_the_reference(x_dtype):
    layer = PACKED_LAYERS["nf4"](128, 128)
    x, block, bias = _problem(layer, 128, 128, 16, 11)
    x = x.detach().to(x_dtype).requires_grad_()
    _check_vs_reference(
        layer, peft_dequantised(layer).float(), x, block, bias.detach().to(x_dtype).requires_grad_(), 2, "triton"
    )


def test_triton_strategy_keeps_x_alone():
    n, k, r, m = 96, 128, 8, 16
    layer = PACKED_LAYERS["nf4"](n, k)
    x, block, bias = _problem(layer, n, k, r, m)
    _y, kept = kept_for_backward(
        lambda: bonekern.bat_linear_quantized(x, layer, block, bias, chunk_blocks=2, strategy="triton"),
        [block, bias],
    )
    assert [(t.shape, t.dtype) for t in kept] == [((m, k), "float32")], kept


def test_strategy_choice_and_refusals():
    layer = PACKED_LAYERS["int8"](64, 128)
    x, block, _ = _problem(layer, 64, 128, 16, 4)
    source = weight_source(layer)
    assert quant_ops.choose_packed("auto", source, block, x) is None  # CPU tensors: the torch path
    assert quant_ops.choose_packed("torch", source, block, x) is None
    assert quant_ops.choose_packed("triton", source, block, x) is not None
    with pytest.raises(ValueError, match="strategy must be one of"):
        bonekern.bat_linear_quantized(x, layer, block, strategy="cuda")
    hqq = hqq_layer(64, 128, 4)
    with pytest.raises(ValueError, match=r"strategy 'triton': the base \(hqq 4bit\) has no packed form"):
        bonekern.bat_linear_quantized(x, hqq, block, strategy="triton")
    odd = bnb4(64, 80)  # K % blocksize != 0: bnb's CPU layout is not the flat one
    x80, block80, _ = _problem(odd, 64, 80, 16, 4)
    with pytest.raises(ValueError, match="has no packed form"):
        bonekern.bat_linear_quantized(x80, odd, block80, strategy="triton")
    with pytest.raises(ValueError, match="float32 delta dtype"):
        bonekern.bat_linear_quantized(x.double(), layer, block, strategy="triton")


def test_device_check_falls_back_with_one_warning_when_the_kernels_disagree(monkeypatch):
    layer = PACKED_LAYERS["nf4"](64, 128)
    source, (x, block, _) = weight_source(layer), _problem(layer, 64, 128, 16, 4)
    packed = source.packed_weight()
    monkeypatch.setenv("BONEKERN_VERIFY", "1")  # the suite turns verification off by default (tests/conftest.py)
    monkeypatch.setattr(quant_ops, "_VERIFIED", {})
    assert quant_ops._verify_packed(source, packed, block, x.dtype) is None  # the real kernels agree
    monkeypatch.setattr(quant_ops, "_VERIFIED", {})
    right = bat_packed.packed_bat_rows
    monkeypatch.setattr(bat_packed, "packed_bat_rows", lambda *a: right(*a) * 1.01)  # a wrong kernel
    with pytest.warns(KernelVerificationWarning, match="nf4|code4"):
        error = quant_ops._verify_packed(source, packed, block, x.dtype)
    assert error == "W' disagree with the torch path"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the verdict is cached: no second warning
        assert quant_ops._verify_packed(source, packed, block, x.dtype) == error
    monkeypatch.setattr(quant_ops, "_VERIFIED", {})
    monkeypatch.setenv("BONEKERN_VERIFY", "0")
    assert quant_ops._verify_packed(source, packed, block, x.dtype) is None
