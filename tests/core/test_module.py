"""BoneLinear: wrapping, training, merging and state_dict round trips."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from bonekern import BoneLinear

KW = {"bone": {}, "mini": {"mini_r": 6}, "bat": {}}


@pytest.mark.parametrize("variant", ["bone", "mini", "bat"])
def test_from_linear_shares_and_freezes(variant):
    linear = nn.Linear(16, 24)
    layer = BoneLinear.from_linear(linear, 4, variant, **KW[variant])
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.block.requires_grad and layer.block.dtype == torch.float32
    assert torch.count_nonzero(layer.block) == 0
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), linear(x), rtol=0, atol=0)  # zero block: the base layer exactly
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["block"]


@pytest.mark.parametrize("variant", ["bone", "mini", "bat"])
def test_merge_unmerge_module(variant):
    torch.manual_seed(0)
    layer = BoneLinear(16, 24, 4, variant=variant, **KW[variant])
    nn.init.normal_(layer.block, std=0.1)
    x = torch.randn(3, 16)
    y = layer(x)
    w0 = layer.weight.detach().clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("variant", ["bone", "mini", "bat"])
def test_state_dict_round_trip(variant, merged):
    torch.manual_seed(1)
    layer = BoneLinear(16, 24, 4, variant=variant, **KW[variant])
    nn.init.normal_(layer.block, std=0.1)
    if merged:
        layer.merge()
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = BoneLinear(16, 24, 4, variant=variant, **KW[variant])
    fresh.load_state_dict(torch.load(buf))
    assert fresh.merged == merged
    assert set(layer.state_dict()) == {"weight", "bias", "block", "_extra_state"}
    x = torch.randn(2, 16)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


def test_state_dict_from_another_shape_is_rejected():
    a = BoneLinear(16, 24, 4)
    b = BoneLinear(16, 24, 8)
    with pytest.raises((ValueError, RuntimeError), match="r"):
        b.load_state_dict(a.state_dict())


def test_extra_repr():
    text = repr(BoneLinear(16, 24, 4, variant="mini", mini_r=6, bias=False))
    for part in (
        "in_features=16",
        "out_features=24",
        "bias=False",
        "variant='mini'",
        "r=4",
        "mini_r=6",
        "block=(4, 6) float32",
        "trainable=24",
        "merged=False",
        "backend='auto'",
    ):
        assert part in text, text


def test_trains():
    torch.manual_seed(0)
    layer = BoneLinear(8, 8, 2, variant="bat")
    target = nn.Linear(8, 8)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(64, 8)
    losses = []
    for _ in range(50):
        loss = (layer(x) - target(x).detach()).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
