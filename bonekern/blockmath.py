"""The block arithmetic bonekern's fast paths share, written with plain torch ops.

Not the specification (that is :mod:`bonekern.reference`, einsums in float64): these are the memory-aware forms
the torch backend runs, that :mod:`bonekern.functional` merges and unmerges with, that :mod:`bonekern.ops` uses
for bat's weight gradient and that :mod:`bonekern.tuning` uses to build backward arguments. The math behind
each function is in docs/math.md.

Notation: x (M, K), W (N, K), dY (M, N); r the block size. bone/mini: block D (r, C) with C | N; S (M, r) the
sums of x's r-wide column groups. bat: block B (N // r, r, r); W_ij the r x r block of W at out-block i, in-block
j; ``W'_ij = W_ij (I + B_i) + B_i``; G = dY^T x (N, K).

Bat's block view: a contiguous W (N, K) viewed as (N // r, K, r) -- :func:`blocks_view`, free -- has rows
(p, j) and columns s: element ``[i, p * (K // r) + j, s] = W[i*r + p, j*r + s]``, so ``W_ij B_i`` for every j is
one GEMM per out-block: a single ``bmm`` over all out-blocks.
"""

from __future__ import annotations

import torch

from .dropout import HASH_MUL1, HASH_MUL2, MASK32, UNIFORM_BITS, DropoutSpec, band_key, keep_mask
from .validation import delta_dtype

MERGE_CHUNK_ROWS = 4096
"""Rows of W' that :func:`bat_weight` and :func:`bat_unmerge` handle at once for merge, unmerge and delta_weight;
see :func:`merge_chunk_blocks`."""


def merge_chunk_blocks(r: int) -> int:
    """Out-blocks per chunk when bat's W' is built or inverted whole (merge, unmerge, delta_weight): about
    :data:`MERGE_CHUNK_ROWS` rows, at least one out-block.

    Why chunk: the delta-dtype temporaries (W' rows in float32 for a half-precision weight, the unmerge's
    ``W'_ij - B_i``) then hold at most 4096 x K elements (64 MiB at K = 4096 in float32) instead of N x K. Why
    4096: a memory bound, not a measured speed optimum (a merge runs once per layer, and every chunk is still
    one batched GEMM over 4096 / r out-blocks). The torch backend's training-time chunks are a separate,
    measured choice (see :mod:`bonekern.backends.pytorch`).
    """
    return max(1, MERGE_CHUNK_ROWS // r)


# ----------------------------------------------------------------------------------------------------------
# Group sums and grouped adds (bone / mini).
# ----------------------------------------------------------------------------------------------------------


def group_sum(x: torch.Tensor, r: int, dtype: torch.dtype) -> torch.Tensor:
    """S (M, r) in ``dtype``: the sum of x's (M, K) r-wide column groups, the last one zero-padded (PEFT's padding).

    Reads x through views (works for any strides); never forms a padded copy.
    """
    m, k = x.shape
    full = k // r
    if full > 0:
        s = x[:, : full * r].unflatten(1, (full, r)).sum(dim=1, dtype=dtype)
    else:
        s = x.new_zeros(m, r, dtype=dtype)
    rem = k - full * r
    if rem:
        s[:, :rem] += x[:, full * r :]
    return s


DROPOUT_BAND_ELEMENTS = 1 << 18
"""Elements of x per row band whose dropout mask is generated at once (:func:`dropout_bands`): the mask's int32
temporaries are then 1 MiB each, whatever M x K is (a band of 2**20 raised the bench's peak above PEFT's)."""


def dropout_bands(m: int, k: int, band_elements: int = DROPOUT_BAND_ELEMENTS) -> list[tuple[int, int]]:
    """Row ranges (start, stop) of an (M, K) input, each about ``band_elements`` elements (at least one row)."""
    rows = max(1, band_elements // max(k, 1))
    return [(i, min(m, i + rows)) for i in range(0, m, rows)]


def _signed32(value: int) -> int:
    """The int32 whose bit pattern is the unsigned 32-bit ``value``."""
    return value - (1 << 32) if value >= 1 << 31 else value


def _xor_shifted_(x: torch.Tensor, shift: int, scratch: torch.Tensor) -> None:
    """In place: x ^= x >> shift (logical) for int32 x, through ``scratch`` (x's shape and dtype)."""
    torch.bitwise_right_shift(x, shift, out=scratch)
    scratch &= (1 << (32 - shift)) - 1  # clear the sign-extended bits: a logical shift
    x ^= scratch


def _mix32_int32_(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """In place: :func:`bonekern.dropout.mix32` on int32 tensors holding 32-bit patterns. Multiplication wraps
    modulo 2**32 in int32; right shifts are made logical by masking the sign-extended bits."""
    _xor_shifted_(x, 16, scratch)
    x *= _signed32(HASH_MUL1)
    _xor_shifted_(x, 15, scratch)
    x *= _signed32(HASH_MUL2)
    _xor_shifted_(x, 16, scratch)
    return x


_COUNTER_BASE: dict[torch.device, torch.Tensor] = {}
"""Per device, ``arange(n)`` in int32 for the longest band asked for so far (a band's counters are this plus one
scalar: an add is several times cheaper than a fresh ``arange``). At most :data:`DROPOUT_BAND_ELEMENTS` or one row
of K elements, 1 MiB at the default band."""


def _counter_base(count: int, device: torch.device) -> torch.Tensor:
    base = _COUNTER_BASE.get(device)
    if base is None or base.numel() < count:
        base = torch.arange(max(count, DROPOUT_BAND_ELEMENTS), dtype=torch.int32, device=device)
        _COUNTER_BASE[device] = base
    return base[:count]


class MaskWorkspace:
    """The two int32 band buffers :func:`keep_bits_band` computes in (counters and scratch), allocated once per
    pass over x and reused by every band: a fresh 1 MiB tensor per band costs its page faults again on the CPU.
    ``capacity`` is the largest band's element count (:func:`dropout_bands`)."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.counters = torch.empty(capacity, dtype=torch.int32, device=device)
        self.scratch = torch.empty(capacity, dtype=torch.int32, device=device)


def keep_bits_band(
    spec: DropoutSpec, k: int, rows: tuple[int, int], device: torch.device, work: MaskWorkspace | None = None
) -> torch.Tensor:
    """The keep mask of rows ``rows = (start, stop)`` of an (M, K) input as int32 bit masks, (rows, K): -1 (all
    bits set) where :func:`bonekern.dropout.keep_mask` keeps the element, 0 where it drops it.

    A bit mask, not a bool: ANDed with a tensor's bit pattern (:func:`_bits`) it zeroes the dropped elements in
    one pass, where ``torch.where`` or a bool multiply costs several times more on the CPU. Computed with int32
    arithmetic, in place on the two buffers of ``work`` (fresh ones when None); the result is a view of
    ``work.scratch``, valid until the next call with the same workspace. The counters of a band share their upper
    32 bits unless the band crosses a multiple of 2**32; then, rarely, the oracle itself computes the band.
    """
    i0, i1 = rows
    first = spec.offset + i0 * k
    count = (i1 - i0) * k
    if count == 0 or (first >> 32) != ((first + count - 1) >> 32):
        keep = keep_mask(spec, i1, k, device, rows=rows)
        return keep.to(torch.int32).neg_()
    work = work if work is not None and work.counters.numel() >= count else MaskWorkspace(count, device)
    key = band_key(spec.seed, first >> 32)
    u, scratch = work.counters[:count], work.scratch[:count]
    torch.add(_counter_base(count, device), _signed32(first & MASK32), out=u)  # lo32(c); no lo32 wraps in a band
    u ^= _signed32(key)
    _mix32_int32_(u, scratch)
    # keep <=> (u >>> 8) >= threshold <=> the sign bit of (u >>> 8) - threshold is clear (no overflow: both
    # are below 2**24); an arithmetic shift by 31 spreads that bit, giving -1 for dropped, 0 for kept.
    torch.bitwise_right_shift(u, 8, out=scratch)
    scratch &= (1 << UNIFORM_BITS) - 1
    scratch -= spec.threshold
    scratch >>= 31
    return scratch.bitwise_not_().view(i1 - i0, k)


def keep_band(spec: DropoutSpec, k: int, rows: tuple[int, int], device: torch.device) -> torch.Tensor:
    """:func:`keep_bits_band` as a bool mask (rows, K): bit-identical to :func:`bonekern.dropout.keep_mask`."""
    return keep_bits_band(spec, k, rows, device) != 0


_INT_OF_SIZE: dict[int, torch.dtype] = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
"""Element size in bytes -> the integer dtype a float tensor's bit pattern is viewed as."""


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bit pattern: a view of t as the integer dtype of its element size (any strides)."""
    return t.view(_INT_OF_SIZE[t.element_size()])


def _masked_bits(bits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``keep`` (int32 -1 / 0) widened or narrowed to ``bits``' integer dtype (-1 stays all ones)."""
    return keep if keep.dtype == bits.dtype else keep.to(bits.dtype)


def _band_capacity(bands: list[tuple[int, int]], k: int) -> int:
    return max((i1 - i0) * k for i0, i1 in bands) if bands else 0


def group_sum_dropped(
    x: torch.Tensor, r: int, dtype: torch.dtype, dropout: DropoutSpec, band_elements: int = DROPOUT_BAND_ELEMENTS
) -> torch.Tensor:
    """S (M, r) in ``dtype`` of ``x * keep / (1 - p)``: :func:`group_sum` of the dropped input, the mask generated
    one row band at a time (never an M x K mask or dropped copy of x: one band-sized buffer, reused). Dropped
    elements are zeroed through their bit pattern (a NaN there becomes 0, as with ``torch.where``; kept NaN and
    Inf propagate)."""
    m, k = x.shape
    s = torch.empty(m, r, dtype=dtype, device=x.device)
    bands = dropout_bands(m, k, band_elements)
    capacity = _band_capacity(bands, k)
    work = MaskWorkspace(capacity, x.device)
    buffer = torch.empty(capacity, dtype=dtype, device=x.device)  # the dropped band, [band * K]
    for i0, i1 in bands:
        keep = keep_bits_band(dropout, k, (i0, i1), x.device, work)  # [band, K] int32 -1 / 0
        band = buffer[: (i1 - i0) * k].view(i1 - i0, k)  # [band, K]
        values = x[i0:i1]  # x itself is never written
        if values.dtype == dtype:
            torch.bitwise_and(_bits(values), _masked_bits(_bits(band), keep), out=_bits(band))
        else:  # cast on the copy, then mask in place
            band.copy_(values)
            _bits(band).bitwise_and_(_masked_bits(_bits(band), keep))
        s[i0:i1] = group_sum(band, r, dtype)
    return s.mul_(dropout.scale)  # the 1 / (1 - p) scale applied to S (M x r), not to every element


def spread_dropped(
    t: torch.Tensor,
    k: int,
    out_dtype: torch.dtype,
    dropout: DropoutSpec | None,
    band_elements: int = DROPOUT_BAND_ELEMENTS,
) -> torch.Tensor:
    """dx (M, K) in ``out_dtype`` with ``dx[i, c] = t[i, c % r] * keep(i, c) / (1 - p)`` for t (M, r): the
    transpose of :func:`group_sum_dropped` (no mask factor when ``dropout`` is None)."""
    m, r = t.shape
    groups = -(-k // r)
    dx = torch.empty(m, k, dtype=out_dtype, device=t.device)
    if dropout is None:
        dx.copy_(t.repeat(1, groups)[:, :k])
        return dx
    # (M, r): the scale applied once per row group, not per element; cast once (masking commutes with the cast)
    ts_bits = _bits((t * dropout.scale).to(out_dtype))
    dx_bits = _bits(dx)
    full = k // r
    bands = dropout_bands(m, k, band_elements)
    work = MaskWorkspace(_band_capacity(bands, k), t.device)
    for i0, i1 in bands:
        keep = _masked_bits(dx_bits, keep_bits_band(dropout, k, (i0, i1), t.device, work))  # [band, K]
        rows = i1 - i0
        if full:  # [band, full, r] = [band, 1, r] & [band, full, r]: broadcast, no repeated copy of t
            torch.bitwise_and(
                ts_bits[i0:i1, None, :],
                keep[:, : full * r].view(rows, full, r),
                out=dx_bits[i0:i1, : full * r].view(rows, full, r),
            )
        if full * r < k:  # the zero-padded last group: its first k - full * r columns
            torch.bitwise_and(ts_bits[i0:i1, : k - full * r], keep[:, full * r :], out=dx_bits[i0:i1, full * r :])
    return dx


def add_grouped_(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """In place: ``out[:, k] += t[:, k % r]`` for out (M, K) and t (M, r); the transpose of :func:`group_sum`.

    Bone's dx epilogue: ``dx += (dY D^T)[:, k % r]``. Returns ``out``.
    """
    k = out.shape[1]
    r = t.shape[1]
    full = k // r
    if full > 0:
        out[:, : full * r].unflatten(1, (full, r)).add_(t[:, None, :])
    rem = k - full * r
    if rem:
        out[:, full * r :] += t[:, :rem]
    return out


def add_repeated_(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """In place: ``out[:, n] += t[:, n % C]`` for out (M, N) and t (M, C) with C | N (mini's repeated block).

    Mini's forward adds ``S Dm`` (M, C) this way, never forming the repeated (r, N) block. Returns ``out``.
    """
    cols = t.shape[1]
    out.unflatten(1, (out.shape[1] // cols, cols)).add_(t[:, None, :])
    return out


def fold_repeats(dy: torch.Tensor, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """dY (M, N) -> (M, C) in ``dtype``: the sum of the N // C repeats of mini's block (a cast for bone, C == N).

    The transpose of :func:`add_repeated_`: mini's ``dDm = S^T fold(dY)`` and ``dY D^T = fold(dY) Dm^T``.
    """
    n = dy.shape[1]
    if cols == n:
        return dy.to(dtype)
    return dy.unflatten(1, (n // cols, cols)).sum(dim=1, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------
# Bat: W', its gradients, its inverse.
# ----------------------------------------------------------------------------------------------------------


def blocks_view(weight: torch.Tensor, r: int) -> torch.Tensor:
    """Contiguous W (N, K) -> the free view (N // r, K, r), element ``[i, p * (K // r) + j, s] = W[i*r + p, j*r + s]``.

    Rows (p, j), columns s: ``blocks_view(W)[i] @ B_i`` is ``W_ij B_i`` for every in-block j at once.
    """
    n, k = weight.shape
    return weight.view(n // r, k, r)


def build_bat_weight_(
    out: torch.Tensor, weight: torch.Tensor, block: torch.Tensor, first_block: int = 0
) -> torch.Tensor:
    """Write the W' rows of out-blocks ``first_block .. first_block + out.shape[0] // r`` into ``out``; returns it.

    ``W'_ij = W_ij (I + B_i) + B_i``, computed in the delta dtype (float32, or float64) and stored in out's dtype.
    out: (c * r, K) contiguous; weight: (N, K) contiguous; block: (N // r, r, r).
    """
    r = block.shape[-1]
    count = out.shape[0] // r
    dtype = delta_dtype(weight.dtype, block.dtype)
    w = blocks_view(weight, r)[first_block : first_block + count].to(dtype)
    b = block[first_block : first_block + count].to(dtype)
    k = weight.shape[1]
    if out.dtype == dtype:
        built = torch.baddbmm(w, w, b, out=out.view(count, k, r))
    else:
        built = torch.baddbmm(w, w, b)
    built.view(count, r, k // r, r).add_(b[:, :, None, :])
    if out.dtype != dtype:
        out.view(count, k, r).copy_(built)
    return out


def bat_weight(weight: torch.Tensor, block: torch.Tensor, dtype: torch.dtype, chunk_blocks: int = 0) -> torch.Tensor:
    """The whole W' (N, K) in ``dtype`` from weight (N, K) and block (N // r, r, r).

    Built ``chunk_blocks`` out-blocks at a time (0: all at once); chunking bounds the delta-dtype temporary when
    ``dtype`` is half precision (see :func:`merge_chunk_blocks`).
    """
    weight = weight.contiguous()
    n, k = weight.shape
    r = block.shape[-1]
    blocks = n // r
    step = blocks if chunk_blocks <= 0 else chunk_blocks
    out = torch.empty(n, k, dtype=dtype, device=weight.device)
    for i0 in range(0, blocks, step):
        i1 = min(blocks, i0 + step)
        build_bat_weight_(out[i0 * r : i1 * r], weight, block, i0)
    return out


def bat_block_grad(
    dy_rows: torch.Tensor,
    x_c: torch.Tensor,
    s_x: torch.Tensor,
    weight_rows: torch.Tensor,
    r: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """dB (c, r, r) in ``dtype`` for a run of c out-blocks: ``dB_i = sum_j (W_ij + I)^T G_ij`` with G = dY^T x.

    G's rows for these out-blocks (c*r, K) are formed here and dropped. The identity part, ``sum_j G_ij``, equals
    ``dY_i^T S`` with ``S = group_sum(x)``: a rank-r product instead of a pass over G. dy_rows: (M, c*r), the
    columns of dY for those out-blocks; x_c: (M, K) and s_x: (M, r), both in ``dtype``; weight_rows: (c*r, K)
    contiguous.
    """
    count = dy_rows.shape[1] // r
    k = x_c.shape[1]
    dy_t = dy_rows.t().to(dtype)
    g = torch.mm(dy_t, x_c).view(count, k, r)  # rows (p, j), columns q
    w = blocks_view(weight_rows, r).to(dtype)  # rows (p, j), columns s
    db = torch.bmm(w.transpose(1, 2), g)
    db += torch.mm(dy_t, s_x).view(count, r, r)
    return db


def bat_weight_grad(dy: torch.Tensor, x: torch.Tensor, block: torch.Tensor, weight_dtype: torch.dtype) -> torch.Tensor:
    """dW (N, K) in ``weight_dtype`` for bat when the weight is trainable: ``dW_ij = G_ij (I + B_i)^T``, G = dY^T x.

    dy: (M, N), x: (M, K), block: (N // r, r, r); computed in the delta dtype.
    """
    dtype = delta_dtype(dy.dtype, block.dtype)
    r = block.shape[-1]
    g = torch.mm(dy.t().to(dtype), x.to(dtype))
    n, k = g.shape
    eye_plus_b = block.to(dtype) + torch.eye(r, dtype=dtype, device=block.device)
    dw = torch.bmm(g.view(n // r, k, r), eye_plus_b.transpose(1, 2))
    return dw.view(n, k).to(weight_dtype)


def bat_unmerge(
    merged_weight: torch.Tensor, block: torch.Tensor, dtype: torch.dtype, chunk_blocks: int
) -> torch.Tensor:
    """W (N, K) in the merged weight's dtype from W' (N, K): ``W_ij = (W'_ij - B_i)(I + B_i)^{-1}``.

    The inverses (N // r, r, r) are computed in ``dtype`` (the delta dtype); the rows are handled ``chunk_blocks``
    out-blocks at a time. Raises ValueError naming the out-blocks whose ``I + B_i`` is singular.
    """
    r = block.shape[-1]
    n, k = merged_weight.shape
    eye_plus_b = block.to(dtype) + torch.eye(r, dtype=dtype, device=block.device)
    inverse, info = torch.linalg.inv_ex(eye_plus_b)
    singular = torch.nonzero(info).flatten().tolist()
    if singular:
        raise ValueError(
            f"block: I + B_i is singular for out-block(s) {singular[:8]}; a bat merge with this block cannot be undone"
        )
    out = torch.empty_like(merged_weight)
    blocks = n // r
    wm = merged_weight.contiguous()
    for i0 in range(0, blocks, chunk_blocks):
        i1 = min(blocks, i0 + chunk_blocks)
        # the merged rows in the (p, j) x s layout of blocks_view, minus B_i broadcast over j
        rows = wm[i0 * r : i1 * r].view(i1 - i0, r, k // r, r).to(dtype) - block[i0:i1, :, None, :].to(dtype)
        w = torch.bmm(rows.view(i1 - i0, k, r), inverse[i0:i1])
        out[i0 * r : i1 * r] = w.view(-1, k).to(merged_weight.dtype)
    return out
