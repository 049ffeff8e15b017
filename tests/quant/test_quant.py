"""bonekern.quant (weight sources) and bonekern.quant_ops (bat over a source) against float64 references.

Every source's ``rows`` must equal the rows of the library's own whole dequantisation (what PEFT's
``get_base_weight`` returns) exactly; the sourced bat op must match ``bonekern.reference`` evaluated in float64
on that dequantised weight, for the output and every gradient; autograd must keep x alone; the peak memory must
follow the chunk, not N x K.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bonekern
from bench.memory import kept_for_backward, measure
from bonekern import reference
from bonekern.quant import DenseSource, forward_only_error, weight_source
from tests.support.problems import assert_close_to_reference

warnings.filterwarnings("ignore", message=".*kernels.*")


def _linear(n: int, k: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n)


def bnb4(n: int, k: int, quant_type: str = "nf4", compress: bool = True) -> nn.Module:
    bnb = pytest.importorskip("bitsandbytes")
    lin = _linear(n, k)
    layer = bnb.nn.Linear4bit(k, n, compute_dtype=torch.float32, quant_type=quant_type, compress_statistics=compress)
    layer.load_state_dict(lin.state_dict())
    return layer.to("cpu")


def bnb8(n: int, k: int) -> nn.Module:
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear8bitLt(k, n, has_fp16_weights=False)
    layer.load_state_dict(_linear(n, k).state_dict())
    return layer.to("cpu")


def torchao_layer(n: int, k: int, which: str) -> nn.Module:
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    lin = _linear(n, k)
    config = (
        Int8WeightOnlyConfig()
        if which == "int8"
        else IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))
    )
    quantize_(lin, config)
    return lin


def hqq_layer(n: int, k: int, nbits: int) -> nn.Module:
    pytest.importorskip("hqq")
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    return HQQLinear(
        _linear(n, k), BaseQuantizeConfig(nbits=nbits, group_size=32), compute_dtype=torch.float32, device="cpu"
    )


def peft_dequantised(layer: nn.Module) -> torch.Tensor:
    """The whole dequantised weight as PEFT reads it (its own quantisation backends)."""
    from peft.utils.quantization_utils import resolve_quantization_backend

    backend = resolve_quantization_backend(layer, get_apply_tensor_subclass=lambda: None)
    if backend is None:
        return layer.weight.detach()
    return backend.get_base_weight(layer)


LAYERS = {
    "bnb-nf4": lambda n, k: bnb4(n, k, "nf4"),
    "bnb-nf4-plain": lambda n, k: bnb4(n, k, "nf4", compress=False),
    "bnb-fp4": lambda n, k: bnb4(n, k, "fp4"),
    "bnb-int8": bnb8,
    "torchao-int8": lambda n, k: torchao_layer(n, k, "int8"),
    "torchao-int4-g32": lambda n, k: torchao_layer(n, k, "int4"),
    "hqq-4bit": lambda n, k: hqq_layer(n, k, 4),
    "hqq-8bit": lambda n, k: hqq_layer(n, k, 8),
    "dense": _linear,
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_rows_equal_the_whole_dequantisation(name):
    n, k = 96, 128
    layer = LAYERS[name](n, k)
    source = weight_source(layer)
    assert source is not None and source.shape == (n, k)
    assert not source.whole, f"{name}: expected a row-slicing source, got {source!r}"
    full = peft_dequantised(layer).to(torch.float32)
    for a, b in [(0, n), (0, 8), (8, 40), (40, 96), (88, 96)]:
        got = source.rows(a, b, torch.float32)
        assert got.shape == (b - a, k)
        assert torch.equal(got, full[a:b]), f"{name} rows {a}..{b}: max diff {(got - full[a:b]).abs().max()}"


def test_bnb4_with_k_not_a_blocksize_multiple_dequantises_whole():
    layer = bnb4(96, 80)
    source = weight_source(layer)
    assert source.whole
    full = peft_dequantised(layer)
    assert torch.equal(source.rows(16, 48, torch.float32), full[16:48])


def _problem(layer, n, k, r, m, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    block = (0.1 * torch.randn(n // r, r, r, generator=g)).requires_grad_()
    bias = torch.randn(n, generator=g).requires_grad_()
    return x.requires_grad_(), block, bias


def _check_vs_reference(base, w_deq, x, block, bias, chunk_blocks, strategy="auto"):
    y = bonekern.bat_linear_quantized(x, base, block, bias, chunk_blocks=chunk_blocks, strategy=strategy)
    dy = torch.randn_like(y)
    dx, dblock, dbias = torch.autograd.grad(y, (x, block, bias), dy)
    w64 = w_deq.to(torch.float64)
    x64 = x.detach().to(torch.float64).reshape(-1, x.shape[-1])
    b64 = block.detach().to(torch.float64)
    y_ref = reference.linear(x64, w64, b64, bias.detach().to(torch.float64), variant="bat")
    dy64 = dy.to(torch.float64).reshape(-1, y.shape[-1])
    dx_ref, dblock_ref = reference.bat_backward(dy64, x64, w64, b64)
    assert_close_to_reference(y.reshape(-1, y.shape[-1]), y_ref, x.dtype, "y")
    assert_close_to_reference(dx.reshape(-1, x.shape[-1]), dx_ref, x.dtype, "dx")
    assert_close_to_reference(dblock, dblock_ref, block.dtype, "dblock")  # dB is in the block's dtype
    assert_close_to_reference(dbias, dy64.sum(0), x.dtype, "dbias")


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("chunk_blocks", [1, 3, 1000])
def test_sourced_bat_matches_reference_on_the_dequantised_weight(name, chunk_blocks):
    n, k, r, m = 96, 128, 8, 13  # M not a tile multiple
    layer = LAYERS[name](n, k)
    x, block, bias = _problem(layer, n, k, r, m)
    _check_vs_reference(layer, peft_dequantised(layer).float(), x, block, bias, chunk_blocks)


@settings(max_examples=25)
@given(
    r=st.sampled_from([1, 2, 3, 4, 8]),
    nb=st.integers(1, 6),
    kb=st.integers(1, 6),
    m=st.integers(1, 9),
    batch=st.integers(1, 3),
    chunk_blocks=st.integers(1, 7),
    strided=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_sourced_bat_dense_random_shapes(r, nb, kb, m, batch, chunk_blocks, strided, dtype):
    n, k = nb * r, kb * r
    g = torch.Generator().manual_seed(r * 1000 + nb * 100 + kb * 10 + m)
    weight = torch.randn(n, k, generator=g, dtype=dtype)
    x = (
        torch.randn(batch, m, 2 * k, generator=g, dtype=dtype)[..., ::2]
        if strided
        else torch.randn(batch, m, k, generator=g, dtype=dtype)
    )
    x.requires_grad_()
    block = (0.1 * torch.randn(n // r, r, r, generator=g)).requires_grad_()
    bias = torch.randn(n, generator=g, dtype=dtype).requires_grad_()
    _check_vs_reference(DenseSource(weight), weight, x, block, bias, chunk_blocks)


@pytest.mark.parametrize("name", ["bnb-nf4", "bnb-int8", "torchao-int8", "hqq-4bit", "dense"])
def test_autograd_keeps_x_alone(name):
    n, k, r, m = 96, 128, 8, 16
    layer = LAYERS[name](n, k)
    x, block, bias = _problem(layer, n, k, r, m)
    _y, kept = kept_for_backward(
        lambda: bonekern.bat_linear_quantized(x, layer, block, bias, chunk_blocks=2), [block, bias]
    )
    assert [(t.shape, t.dtype) for t in kept] == [((m, k), "float32")], kept
    assert kept[0].bytes == m * k * 4


def test_peak_memory_follows_the_chunk_not_the_weight():
    """Forward + backward over an NF4 base: the peak grows with the chunk, and at one out-block per chunk is far
    below one dequantised N x K fp32 weight."""
    n, k, r, m = 1024, 512, 16, 8
    layer = bnb4(n, k)
    x, block, bias = _problem(layer, n, k, r, m)
    dy = torch.randn(m, n)

    def step(chunk_blocks):
        def run():
            y = bonekern.bat_linear_quantized(x, layer, block, bias, chunk_blocks=chunk_blocks)
            torch.autograd.grad(y, (x, block, bias), dy)

        return measure(run, torch.device("cpu"))[0].peak_bytes

    full_weight = n * k * 4
    small, large = step(1), step(n // r)
    assert small < full_weight / 4, (small, full_weight)
    assert large >= full_weight, (large, full_weight)  # one chunk of all rows: W and W' both alive


def test_forward_only_quantisation_raises_peft_error():
    from peft import MissConfig
    from peft.tuners.miss.layer import MissLinear
    from peft.utils.quantization_utils import ForwardOnlyQuantizationBackend

    class QuantLinear(nn.Linear):  # stands for gptqmodel's BaseQuantLinear: only its package name matters
        pass

    QuantLinear.__module__ = "gptqmodel.nn_modules.qlinear"
    base = QuantLinear(16, 16)
    with pytest.raises(ValueError) as ours:
        weight_source(base)
    layer = MissLinear(nn.Linear(16, 16), "default", config=MissConfig(r=4, init_weights="bat"), r=4)
    layer.quantization_backend = ForwardOnlyQuantizationBackend("gptq")
    with pytest.raises(ValueError) as peft:
        layer(torch.randn(2, 16))
    assert str(ours.value) == str(peft.value) == str(forward_only_error("gptq"))


def test_bad_arguments_name_themselves():
    weight = torch.randn(16, 8)
    block = torch.zeros(4, 4, 4)
    with pytest.raises(TypeError, match="base"):
        bonekern.bat_linear_quantized(torch.randn(2, 8), object(), block)
    with pytest.raises(ValueError, match="x must have last dimension"):
        bonekern.bat_linear_quantized(torch.randn(2, 9), weight, torch.zeros(8, 2, 2))
    with pytest.raises(ValueError, match="bias"):
        bonekern.bat_linear_quantized(torch.randn(2, 8), weight, torch.zeros(8, 2, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="chunk_blocks"):
        bonekern.bat_linear_quantized(torch.randn(2, 8), weight, torch.zeros(8, 2, 2), chunk_blocks=0)
    with pytest.raises(TypeError, match="x"):
        bonekern.bat_linear_quantized(torch.ones(2, 8, dtype=torch.int32), weight, torch.zeros(8, 2, 2))
    with pytest.raises(ValueError, match=r"out_features|in_features|block"):
        bonekern.bat_linear_quantized(torch.randn(2, 8), weight, torch.zeros(5, 3, 3))
    with pytest.raises(ValueError, match="rows"):
        DenseSource(weight).rows(4, 2, torch.float32)
