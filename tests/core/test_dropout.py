"""The counter-based dropout function every backend implements (bonekern/dropout.py)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bonekern.dropout import DropoutSpec, band_key, draw, keep_mask, keep_threshold, mix32, mix32_scalar


def _lowbias32(x: int) -> int:
    # Plain Python integers: an implementation independent of the tensor code under test.
    x ^= x >> 16
    x = (x * 0x7FEB352D) % 2**32
    x ^= x >> 15
    x = (x * 0x846CA68B) % 2**32
    return x ^ (x >> 16)


def _keep(spec: DropoutSpec, i: int, k: int, width: int) -> bool:
    c = spec.offset + i * width + k
    key = _lowbias32(spec.seed ^ _lowbias32((c >> 32) ^ 0x9E3779B9))
    return (_lowbias32((c % 2**32) ^ key) >> 8) >= keep_threshold(spec.p)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    offset=st.integers(0, 2**62),
    m=st.integers(1, 7),
    k=st.integers(1, 37),
    p=st.floats(0.01, 0.99),
)
def test_mask_matches_the_plain_integer_definition(seed, offset, m, k, p):
    spec = DropoutSpec(p=p, seed=seed, offset=offset)
    mask = keep_mask(spec, m, k)
    assert mask.shape == (m, k) and mask.dtype == torch.bool
    expected = torch.tensor([[_keep(spec, i, j, k) for j in range(k)] for i in range(m)])
    assert torch.equal(mask, expected)


@settings(max_examples=60, deadline=None)
@given(value=st.integers(0, 2**32 - 1), seed=st.integers(0, 2**32 - 1), high=st.integers(0, 2**31 - 1))
def test_scalar_hash_and_band_key_match_the_plain_integer_definition(value, seed, high):
    assert mix32_scalar(value) == _lowbias32(value) == int(mix32(torch.tensor(value, dtype=torch.int64)))
    assert band_key(seed, high) == _lowbias32(seed ^ _lowbias32(high ^ 0x9E3779B9))


def test_row_bands_equal_the_whole_mask():
    spec = DropoutSpec(p=0.3, seed=12345, offset=2**33 - 17)  # the counter crosses a 2**32 boundary
    whole = keep_mask(spec, 40, 130)
    bands = torch.cat([keep_mask(spec, 40, 130, rows=(a, min(a + 7, 40))) for a in range(0, 40, 7)])
    assert torch.equal(whole, bands)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_rate_is_one_minus_p(p):
    n = 512 * 512
    kept = keep_mask(DropoutSpec(p=p, seed=7), 512, 512).sum().item()
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(kept - n * (1 - p)) < 5 * sigma


def test_masks_of_different_seeds_and_offsets_are_independent():
    a = keep_mask(DropoutSpec(p=0.5, seed=1), 256, 256).float()
    b = keep_mask(DropoutSpec(p=0.5, seed=2), 256, 256).float()
    c = keep_mask(DropoutSpec(p=0.5, seed=1, offset=256 * 256), 256, 256).float()
    for other in (b, c):
        agreement = (a == other).float().mean().item()
        assert abs(agreement - 0.5) < 0.01


def test_draw_is_repeatable_under_manual_seed():
    torch.manual_seed(3)
    first = draw(0.1)
    torch.manual_seed(3)
    assert draw(0.1) == first
    assert draw(0.1) != first


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"p": 0.0, "seed": 1}, ValueError, "p must be in (0, 1)"),
        ({"p": 1.0, "seed": 1}, ValueError, "p must be in (0, 1)"),
        ({"p": float("nan"), "seed": 1}, ValueError, "p must be in (0, 1)"),
        ({"p": "0.1", "seed": 1}, TypeError, "p must be a float"),
        ({"p": 0.1, "seed": -1}, ValueError, "seed must be in [0, 2**32)"),
        ({"p": 0.1, "seed": 2**32}, ValueError, "seed must be in [0, 2**32)"),
        ({"p": 0.1, "seed": 1.5}, TypeError, "seed must be an int"),
        ({"p": 0.1, "seed": 1, "offset": -3}, ValueError, "offset must be in [0, 2**63)"),
    ],
)
def test_bad_specs_are_refused_with_the_argument_named(kwargs, error, words):
    with pytest.raises(error, match=re.escape(words)):
        DropoutSpec(**kwargs)
