"""Hostile arguments to the public constructors and functions (issue 14): either a working layer or a
ValueError/TypeError that names the argument -- never an error from inside torch, never a silent ignore."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, seed, settings
from hypothesis import strategies as st

import bonekern
from bonekern import BoneLinear

NAMES = ("in_features", "out_features", "r", "mini_r", "variant", "bias", "block_dtype", "dtype", "backend", "device")

ODD_VALUES = st.sampled_from([0, -1, 1, 2, 3, 4, 8, 12, 2.0, "4", None, True, torch.float32])
DTYPES = st.sampled_from(
    [
        torch.float32,
        torch.float64,
        torch.bfloat16,
        torch.float16,
        torch.int32,
        torch.complex64,
        torch.bool,
        "float32",
        1,
    ]
)


@seed(1406)
@settings(max_examples=200, deadline=None)
@given(
    in_features=ODD_VALUES,
    out_features=ODD_VALUES,
    r=ODD_VALUES,
    mini_r=ODD_VALUES,
    variant=st.sampled_from(["bone", "bat", "mini", "lora", 3, None]),
    bias=st.sampled_from([True, False, 1, None]),
    block_dtype=DTYPES,
    dtype=DTYPES | st.none(),
    backend=st.sampled_from(["auto", "torch", "reference", "fast", 1]),
    device=st.sampled_from([None, "cpu", torch.device("cpu"), "tpu", "cuda:7", "", 3.5, False]),
)
def test_constructor_builds_a_working_layer_or_names_the_argument(**kwargs):
    positional = (kwargs.pop("in_features"), kwargs.pop("out_features"), kwargs.pop("r"))
    try:
        layer = BoneLinear(*positional, **kwargs)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        assert any(name in message for name in NAMES), message
        return
    with torch.no_grad():
        layer.block.normal_()
    x = torch.randn(3, layer.in_features, dtype=layer.weight.dtype)
    expected = torch.nn.functional.linear(
        x.double(),
        bonekern.merge(
            layer.weight.double(), layer.block.double(), variant=layer.spec.variant, mini_r=layer.spec.mini_r
        ),
        None if layer.bias is None else layer.bias.double(),
    )
    torch.testing.assert_close(layer(x).double(), expected, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("fn", ["bone_linear", "merge", "delta_weight", "unmerge"])
def test_bat_refuses_mini_r_like_bone_does(fn):
    w, block, x = torch.randn(8, 8), torch.zeros(2, 4, 4), torch.randn(3, 8)
    args = (x, w, block) if fn == "bone_linear" else (w, block)
    with pytest.raises(ValueError, match="mini_r is only used by variant 'mini'; got mini_r = 4 with variant 'bat'"):
        getattr(bonekern, fn)(*args, variant="bat", mini_r=4)


@pytest.mark.parametrize("dtype", [torch.int32, torch.complex64, torch.bool, "float32"])
def test_block_dtype_is_checked_at_construction(dtype):
    with pytest.raises(TypeError, match="block_dtype must be one of float16, bfloat16, float32, float64"):
        BoneLinear(8, 8, 4, block_dtype=dtype)
    with pytest.raises(TypeError, match="block_dtype must be one of"):
        BoneLinear.from_linear(torch.nn.Linear(8, 8), 4, block_dtype=dtype)


@pytest.mark.parametrize(
    ("state", "error", "words"),
    [
        (None, TypeError, "extra state must be a dict"),
        (5, TypeError, "extra state must be a dict"),
        ("bone", TypeError, "extra state must be a dict"),
        ({"variant": "bone"}, ValueError, "state_dict was saved from a BoneLinear with"),
        ({"variant": "bone", "r": 4, "mini_r": None, "merged": "yes"}, TypeError, "'merged' must be a bool"),
    ],
)
def test_malformed_extra_state_is_refused_clearly(state, error, words):
    layer = BoneLinear(8, 8, 4)
    sd = layer.state_dict()
    sd["_extra_state"] = state
    with pytest.raises(error, match=words):
        layer.load_state_dict(sd)
    assert layer.merged is False


@pytest.mark.parametrize("mini_r", [4.0, True, "4", [4]])
def test_mini_r_must_be_an_int_even_after_a_cached_valid_call(mini_r):
    w, block, x = torch.randn(8, 8), torch.zeros(2, 4), torch.randn(3, 8)
    bonekern.bone_linear(x, w, block, variant="mini", mini_r=4)  # fills the shape cache for mini_r = 4
    with pytest.raises(TypeError, match="mini_r must be an int or None; got"):
        bonekern.bone_linear(x, w, block, variant="mini", mini_r=mini_r)
    with pytest.raises(TypeError, match="mini_r must be an int or None; got"):
        bonekern.merge(w, block, variant="mini", mini_r=mini_r)
    with pytest.raises(TypeError, match="mini_r must be an int or None; got"):
        bonekern.adapter_output(x, block, variant="mini", out_features=8, mini_r=mini_r)


def test_an_unhashable_variant_is_named():
    w, block, x = torch.randn(8, 8), torch.zeros(2, 8), torch.randn(3, 8)
    with pytest.raises(TypeError, match="variant must be a str"):
        bonekern.bone_linear(x, w, block, variant=["bone"])


@pytest.mark.parametrize(
    ("device", "error", "words"),
    [
        ("tpu", ValueError, "device must name a torch device such as 'cpu' or 'cuda:0'; got 'tpu'"),
        (3.5, TypeError, "device must be a torch.device, a str such as 'cuda:0', or None; got float"),
        (True, TypeError, "device must be a torch.device"),
    ],
)
def test_device_is_checked_at_construction(device, error, words):
    with pytest.raises(error, match=words):
        BoneLinear(8, 8, 4, device=device)


def test_an_absent_cuda_device_is_named():
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=r"device is 'cuda:\d+', but torch sees"):
        BoneLinear(8, 8, 4, device=f"cuda:{count}")


def test_meta_device_still_builds():
    assert BoneLinear(8, 8, 4, device="meta").weight.is_meta


def test_a_weight_larger_than_any_tensor_is_refused_before_torch():
    with pytest.raises(ValueError, match=r"in_features \* out_features must be at most 9223372036854775807"):
        BoneLinear(2**40, 2**40, 4)


@pytest.mark.parametrize(
    ("key", "value", "error", "words"),
    [
        ("block", torch.zeros(4, 8, dtype=torch.int32), TypeError, "state_dict\\['block'\\] must have a floating"),
        ("block", torch.zeros(4, 8, dtype=torch.complex64), TypeError, "state_dict\\['block'\\] must have a float"),
        ("weight", torch.zeros(8, 8, dtype=torch.int64), TypeError, "state_dict\\['weight'\\] must have a floating"),
        ("block", torch.zeros(3, 3), ValueError, "state_dict\\['block'\\] must have shape \\(4, 8\\) for variant"),
    ],
)
def test_load_state_dict_checks_dtypes_and_the_block_shape(key, value, error, words):
    layer = BoneLinear(8, 8, 4)
    before = {k: v.clone() for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}
    sd = layer.state_dict()
    sd[key] = value
    with pytest.raises(error, match=words):
        layer.load_state_dict(sd)
    for k, v in layer.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k  # nothing was copied


def test_another_variants_state_is_refused_by_its_extra_state_first():
    sd = BoneLinear(8, 8, 4, variant="bat").state_dict()
    with pytest.raises(ValueError, match="state_dict was saved from a BoneLinear with"):
        BoneLinear(8, 8, 4).load_state_dict(sd)
