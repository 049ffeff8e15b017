"""The three Bone variants and their shape rules: the one place where these facts are written down.

Notation used throughout bonekern (the math per variant: docs/math.md):

- x is ``(..., K)`` and is flattened to ``(M, K)``; the weight W is ``(N, K)`` like ``nn.Linear.weight``;
- r is the block size; ``G = ceil(K / r)`` is the number of r-wide groups of input features;
- ``"bone"``: block D is ``(r, N)``; the adapter adds ``S @ D`` where ``S`` sums x's r-wide groups;
- ``"mini"``: block Dm is ``(r, mini_r)`` with ``N % mini_r == 0``; it acts as ``D[k, n] = Dm[k, n % mini_r]``;
- ``"bat"``: block B is ``(N // r, r, r)``; it requires ``N % r == 0`` and ``K % r == 0`` and replaces each
  r x r block of W by ``W_ij (I + B_i) + B_i``.

"bone" is "mini" with ``mini_r == N``; the kernels use that and see only a block of ``(r, C)`` with ``C | N``
(``C`` is called ``block_cols`` below).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

VARIANTS: tuple[str, ...] = ("bone", "bat", "mini")
"""Every variant name bonekern accepts. "bone" is PEFT's default ``MissConfig(init_weights=True)``."""


def check_variant(variant: object) -> str:
    """Return ``variant`` if it names a known variant, else raise ValueError/TypeError naming it."""
    if not isinstance(variant, str):
        raise TypeError(f"variant must be a str, one of {VARIANTS}; got {type(variant).__name__} {variant!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
    return variant


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1; got {value}")
    return value


@dataclass(frozen=True)
class AdapterSpec:
    """The shapes of one Bone adapter on one linear layer; constructed only through the validating helpers.

    Attributes:
        variant: "bone", "bat" or "mini".
        out_features: N, rows of the weight.
        in_features: K, columns of the weight.
        r: block size.
        mini_r: columns of a "mini" block; ``None`` for the other variants.
    """

    variant: str
    out_features: int
    in_features: int
    r: int
    mini_r: int | None = None

    @property
    def groups(self) -> int:
        """G = ceil(K / r): the number of r-wide input groups (the last one is zero-padded when K % r != 0)."""
        return -(-self.in_features // self.r)

    @property
    def block_cols(self) -> int:
        """C, the block's column count for bone/mini (``D[k, n] = block[k, n % C]``); r for bat."""
        if self.variant == "bat":
            return self.r
        return self.mini_r if self.variant == "mini" else self.out_features

    @property
    def block_shape(self) -> tuple[int, ...]:
        """The trainable block's shape: bone (r, N), mini (r, mini_r), bat (N // r, r, r)."""
        if self.variant == "bat":
            return (self.out_features // self.r, self.r, self.r)
        return (self.r, self.block_cols)

    @property
    def trainable_params(self) -> int:
        n = 1
        for d in self.block_shape:
            n *= d
        return n


def make_spec(variant: str, out_features: int, in_features: int, r: int, mini_r: int | None = None) -> AdapterSpec:
    """Validate a (variant, N, K, r, mini_r) combination and return its :class:`AdapterSpec`.

    Used to create new blocks (``BoneLinear.from_linear``) and, through :func:`spec_from_block`, to check
    existing ones. Raises ValueError/TypeError that name the offending argument.
    """
    check_variant(variant)
    _check_positive_int("out_features (weight.shape[0])", out_features)
    _check_positive_int("in_features (weight.shape[1])", in_features)
    _check_positive_int("r", r)
    if r > in_features:
        raise ValueError(f"r must be <= in_features (K = {in_features}); got r = {r}")
    if variant == "mini":
        if mini_r is None:
            raise ValueError("mini_r is required for variant 'mini' (the block's column count); got None")
        _check_positive_int("mini_r", mini_r)
        if out_features % mini_r != 0:
            raise ValueError(
                f"mini_r must divide out_features (N = {out_features}) for variant 'mini'; got mini_r = {mini_r}"
            )
    elif mini_r is not None:
        raise ValueError(f"mini_r is only used by variant 'mini'; got mini_r = {mini_r} with variant {variant!r}")
    if variant == "bat":
        if out_features % r != 0:
            raise ValueError(
                f"variant 'bat' needs out_features (N = {out_features}) to be a multiple of r = {r}: "
                "the weight must divide into r x r blocks"
            )
        if in_features % r != 0:
            raise ValueError(
                f"variant 'bat' needs in_features (K = {in_features}) to be a multiple of r = {r}: "
                "the weight must divide into r x r blocks"
            )
    return AdapterSpec(variant, out_features, in_features, r, mini_r if variant == "mini" else None)


@functools.lru_cache(maxsize=4096)
def spec_from_block(
    variant: str, weight_shape: tuple[int, ...], block_shape: tuple[int, ...], mini_r: int | None = None
) -> AdapterSpec:
    """Read r (and mini_r) off an existing block and check it against the weight's shape.

    Pure in its (hashable) arguments, so valid results are cached: every layer call validates its shapes
    through here. Errors are raised, never cached.

    Args:
        variant: "bone", "bat" or "mini".
        weight_shape: ``(N, K)``.
        block_shape: the block's shape; bone ``(r, N)``, mini ``(r, mini_r)``, bat ``(N // r, r, r)``.
        mini_r: for "mini", optional; when given it must equal ``block_shape[1]``.
    """
    check_variant(variant)
    weight_shape = tuple(weight_shape)
    block_shape = tuple(block_shape)
    if len(weight_shape) != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features); got shape {weight_shape}")
    n, k = weight_shape
    if variant == "bat":
        if len(block_shape) != 3:
            raise ValueError(f"block for variant 'bat' must be 3-D (N // r, r, r); got shape {block_shape}")
        r = block_shape[-1]
        if block_shape[1] != r:
            raise ValueError(
                f"block for variant 'bat' must be (N // r, r, r) with square r x r blocks; got shape {block_shape}"
            )
        spec = make_spec(variant, n, k, r, mini_r)
        if block_shape[0] != n // r:
            raise ValueError(
                f"block for variant 'bat' must be (N // r, r, r) = ({n // r}, {r}, {r}) for weight {weight_shape}; "
                f"got block.shape[0] = {block_shape[0]}"
            )
        return spec
    if len(block_shape) != 2:
        expected = "(r, N)" if variant == "bone" else "(r, mini_r)"
        raise ValueError(f"block for variant {variant!r} must be 2-D {expected}; got shape {block_shape}")
    r, cols = block_shape
    if variant == "bone":
        if cols != n:
            raise ValueError(
                f"block for variant 'bone' must be (r, N) with N = weight.shape[0] = {n}; got block.shape[1] = {cols}"
            )
        return make_spec(variant, n, k, r, mini_r)
    if mini_r is not None and mini_r != cols:
        raise ValueError(
            f"mini_r must equal block.shape[1] for variant 'mini'; got mini_r = {mini_r}, block shape {block_shape}"
        )
    return make_spec(variant, n, k, r, cols)
