"""The counter-based dropout mask of :mod:`bonekern.dropout` in Triton: the same function, bit for bit.

Kernels that drop elements of x (the adapter's group sum) and that regenerate the mask in backward (the adapter's
dx) call :func:`keep` on the (rows, cols) offsets of their tile; nothing is read from memory. All hash arithmetic is
uint32 (wrapping multiplies, logical shifts); the element counter ``offset + i * K + k`` is int64 and split into its
32-bit halves exactly as :func:`bonekern.dropout.keep_mask` does.

Scalars (:func:`dropout_scalars`): the spec's 32-bit seed and the low half of its offset travel as int32 bit patterns
(so they are always Triton "i32" arguments, never an "i64" specialisation for large values), the high half of the
offset (< 2**31) and the threshold (< 2**24 + 1) as plain int32. Kernels list these four names in
``do_not_specialize``, so a value of 1 never becomes a constant (the kernel would recompile for it and ``.to`` of a
constant fails). The scale 1 / (1 - p) is applied by the host to the (M, r) sums, in their dtype (Triton passes
Python floats as fp32, which would not be exact enough for float64 sums).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...dropout import HASH_MUL1, HASH_MUL2, HI_SALT, MASK32, DropoutSpec

DROPOUT_SCALARS: tuple[str, ...] = ("SEED", "OFFSET_LO", "OFFSET_HI", "THRESHOLD")
"""The kernel parameters of one dropout spec (each kernel's ``do_not_specialize``)."""

_MUL1 = tl.constexpr(HASH_MUL1)
_MUL2 = tl.constexpr(HASH_MUL2)
_SALT = tl.constexpr(HI_SALT)


def _int32_bits(value: int) -> int:
    """The int32 whose bit pattern is the unsigned 32-bit ``value``."""
    value &= MASK32
    return value - (1 << 32) if value >= 1 << 31 else value


def dropout_scalars(spec: DropoutSpec | None) -> dict[str, int]:
    """The kernel arguments :data:`DROPOUT_SCALARS` of ``spec`` (zeros when there is no dropout: not read)."""
    if spec is None:
        return dict.fromkeys(DROPOUT_SCALARS, 0)
    return dict(
        SEED=_int32_bits(spec.seed),
        OFFSET_LO=_int32_bits(spec.offset),
        OFFSET_HI=spec.offset >> 32,
        THRESHOLD=spec.threshold,
    )


@triton.jit
def mix32(x):
    """The lowbias32 hash of a uint32 tensor (:func:`bonekern.dropout.mix32`). Each product is cast back to uint32,
    so the result is right whether Triton types the multiplier as uint32 or as a wider integer."""
    x = x ^ (x >> 16)
    x = (x * _MUL1).to(tl.uint32)
    x = x ^ (x >> 15)
    x = (x * _MUL2).to(tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def keep(rows, cols, K, SEED, OFFSET_LO, OFFSET_HI, THRESHOLD):
    """Whether element (rows[i], cols[j]) of an (M, K) input survives: a [len(rows), len(cols)] boolean tile.

    rows [BLOCK_M] and cols [BLOCK_K] are element indices (any integer type; lanes past the tensor give values that
    callers mask). counter = offset + row * K + col (int64), key = mix(seed ^ mix(hi32 ^ salt)),
    keep = (mix(lo32 ^ key) >> 8) >= threshold.
    """
    offset = (OFFSET_HI.to(tl.int64) << 32) | OFFSET_LO.to(tl.uint32).to(tl.int64)
    counter = offset + rows.to(tl.int64)[:, None] * K + cols.to(tl.int64)[None, :]  # [BLOCK_M, BLOCK_K]
    lo = counter.to(tl.uint32)  # [BLOCK_M, BLOCK_K]
    hi = (counter >> 32).to(tl.uint32)  # [BLOCK_M, BLOCK_K]
    key = mix32(SEED.to(tl.uint32) ^ mix32(hi ^ _SALT))  # [BLOCK_M, BLOCK_K]
    return (mix32(lo ^ key) >> 8) >= THRESHOLD
