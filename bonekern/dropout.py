"""Counter-based dropout on the adapter's input, regenerated instead of kept.

PEFT's MiSS applies ``nn.Dropout(miss_dropout)`` to x before the group sum of the bone/mini adapter term, and
autograd keeps the mask and the dropped x: two M x K tensors per layer. bonekern draws nothing it must keep.
Whether element (i, k) of the (M, K) input survives is a pure function of three integers:

    c    = offset + i * K + k                           (the element's counter, unsigned 64-bit)
    key  = mix(seed ^ mix(hi32(c) ^ 0x9E3779B9))        (seed: unsigned 32-bit)
    u    = mix(lo32(c) ^ key)
    keep = (u >> 8) >= threshold,   threshold = round(p * 2**24)

where ``mix`` is the 32-bit integer hash "lowbias32" (two multiply-xorshift rounds, all arithmetic modulo 2**32)
and kept elements are scaled by 1 / (1 - p), as ``nn.Dropout`` does. Forward and backward evaluate the same
function, so the backward pass regenerates the mask from (seed, offset) and nothing of M x K outlives the forward.
Every backend (PyTorch, Triton, CUDA C++) implements exactly this function, so their masks are bit-identical and
:func:`keep_mask` is the oracle the kernels are tested against.

The keep probability is 1 - threshold / 2**24, which equals 1 - p to within 2**-25.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MASK32 = 0xFFFFFFFF
HASH_MUL1 = 0x7FEB352D
"""First multiplier of the lowbias32 hash."""
HASH_MUL2 = 0x846CA68B
"""Second multiplier of the lowbias32 hash."""
HI_SALT = 0x9E3779B9
"""Mixed into the counter's upper 32 bits before they enter the key (golden-ratio constant)."""
UNIFORM_BITS = 24
"""The top 24 bits of the hash are the uniform variate compared with the threshold."""


@dataclass(frozen=True)
class DropoutSpec:
    """One dropout draw: probability ``p`` (0 < p < 1), a 32-bit ``seed`` and a 64-bit counter ``offset``.

    The same spec in forward and backward gives the same mask; a new forward draws a new spec
    (:func:`draw`).
    """

    p: float
    seed: int
    offset: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.p, bool) or not isinstance(self.p, (int, float)):
            raise TypeError(f"dropout p must be a float in (0, 1); got {type(self.p).__name__}")
        if not (0.0 < float(self.p) < 1.0) or math.isnan(self.p):
            raise ValueError(f"dropout p must be in (0, 1) (p = 0 means no dropout: pass None); got {self.p!r}")
        for name, value, bits in (("seed", self.seed, 32), ("offset", self.offset, 63)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"dropout {name} must be an int; got {type(value).__name__}")
            if not 0 <= value < 2**bits:
                raise ValueError(f"dropout {name} must be in [0, 2**{bits}); got {value}")

    @property
    def threshold(self) -> int:
        """Elements whose 24-bit uniform variate is below this are dropped."""
        return keep_threshold(self.p)

    @property
    def scale(self) -> float:
        """The factor kept elements are multiplied by: 1 / (1 - p)."""
        return 1.0 / (1.0 - self.p)


def keep_threshold(p: float) -> int:
    """round(p * 2**24): the drop threshold on the 24-bit uniform variate."""
    return round(p * (1 << UNIFORM_BITS))


def draw(p: float, generator: torch.Generator | None = None) -> DropoutSpec:
    """A fresh spec whose seed comes from torch's (CPU) generator, so ``torch.manual_seed`` makes runs repeatable.

    The CPU generator is used for every device: drawing a host integer from a CUDA generator would need a
    device sync. Activation checkpointing restores the CPU RNG state before recomputing, so a recomputed forward
    draws the same spec.
    """
    seed = int(torch.randint(0, 2**32, (), dtype=torch.int64, generator=generator))
    return DropoutSpec(p=p, seed=seed, offset=0)


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for int64 x in [0, 2**32), split in 16-bit halves so no int64 product overflows."""
    lo = x * (constant & 0xFFFF)
    hi = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The lowbias32 hash of int64 values in [0, 2**32) (elementwise, result in [0, 2**32))."""
    x = x ^ (x >> 16)
    x = _mul32(x, HASH_MUL1)
    x = x ^ (x >> 15)
    x = _mul32(x, HASH_MUL2)
    return x ^ (x >> 16)


def mix32_scalar(value: int) -> int:
    """:func:`mix32` of one Python int in [0, 2**32) (a band's key: no tensor round trip for a scalar)."""
    value ^= value >> 16
    value = (value * HASH_MUL1) & MASK32
    value ^= value >> 15
    value = (value * HASH_MUL2) & MASK32
    return value ^ (value >> 16)


def band_key(seed: int, high: int) -> int:
    """The key of every counter whose upper 32 bits are ``high``: ``mix(seed ^ mix(high ^ HI_SALT))``."""
    return mix32_scalar((seed & MASK32) ^ mix32_scalar((high ^ HI_SALT) & MASK32))


def keep_mask(
    spec: DropoutSpec, m: int, k: int, device: torch.device | str = "cpu", rows: tuple[int, int] | None = None
) -> torch.Tensor:
    """The boolean keep mask (M, K) of ``spec`` for an (M, K) input, or its rows ``rows = (start, stop)``.

    Allocates a few int64 temporaries of the produced size: callers that must bound memory ask for a band of
    rows at a time.
    """
    start, stop = (0, m) if rows is None else rows
    i = torch.arange(start, stop, device=device, dtype=torch.int64)[:, None]
    j = torch.arange(k, device=device, dtype=torch.int64)[None, :]
    counter = spec.offset + i * k + j  # [rows, K]
    hi = counter >> 32
    key = mix32((spec.seed & MASK32) ^ mix32((hi ^ HI_SALT) & MASK32))
    u = mix32((counter & MASK32) ^ key)
    return (u >> 8) >= spec.threshold
