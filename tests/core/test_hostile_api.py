"""Hostile arguments to the public constructors and functions (issue 14): either a working layer or a
ValueError/TypeError that names the argument -- never an error from inside torch, never a silent ignore."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, seed, settings
from hypothesis import strategies as st

import bonekern
from bonekern import BoneLinear

NAMES = ("in_features", "out_features", "r", "mini_r", "variant", "bias", "block_dtype", "dtype", "backend")

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
