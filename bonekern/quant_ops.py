"""bat over a base weight read through a :class:`~bonekern.quant.WeightSource` (quantised, usually): the
"sourced" bat op.

``y = x W'^T + b`` with ``W'_ij = W_ij (I + B_i) + B_i`` (docs/math.md), W' formed a chunk of out-blocks at a
time from ``source.rows(...)`` in forward, and again in backward for ``dx = dY W'`` and
``dB_i = sum_j (W_ij + I)^T G_ij`` (:func:`bonekern.blockmath.bat_block_grad`). Per chunk of c out-blocks
(c * r rows, :func:`bonekern.quant.chunk_rows`, default :func:`bonekern.blockmath.merge_chunk_blocks`) the live
temporaries are the dequantised rows W_c (c*r, K) and W'_c (c*r, K) in the delta dtype, and in backward G_c
(c*r, K); no whole dequantised W, no whole W', no other N x K tensor is ever alive (except for sources that
dequantise only whole, which run one chunk: see :mod:`bonekern.quant`).

What autograd keeps for backward: x (M x K) only, plus a reference to the source (the quantised weight, alive
anyway; a bnb 4-bit source also holds its dequantised absmax, N * K / blocksize float32 values) and to the block.

Dtypes, as PEFT's bat: W' is formed in the delta dtype (float32, float64 if x or the block is); the GEMMs run in
x's dtype (W'_c is cast to it); the output is x's dtype. PEFT ignores ``miss_dropout`` on the bat path, so this
op has no dropout. Eager only (an ``autograd.Function``; the source is a Python object, not a tensor, so there is
no custom op for torch.compile to trace: under compile it runs as a graph break).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from .blockmath import bat_block_grad, build_bat_weight_, group_sum, merge_chunk_blocks
from .quant import PackedWeight, WeightSource, chunk_rows, weight_source
from .validation import FLOAT_DTYPES, delta_dtype
from .variants import spec_from_block


def _chunks(source: WeightSource, r: int, chunk_blocks: int) -> list[tuple[int, int]]:
    n = source.shape[0]
    step = chunk_rows(source, r, chunk_blocks)
    return [(a, min(n, a + step)) for a in range(0, n, step)]


def _bat_rows(source: WeightSource, block: Tensor, a: int, b: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(W_c, W'_c): the dequantised rows a..b and their bat rows, both (b - a, K) in ``dtype``."""
    r = block.shape[-1]
    w = source.rows(a, b, dtype)  # [c*r, K]
    wp = torch.empty_like(w)  # [c*r, K]
    build_bat_weight_(wp, w, block[a // r : b // r])
    return w, wp


def _bat_rows_only(
    source: WeightSource, packed: PackedWeight | None, block: Tensor, a: int, b: int, dtype: torch.dtype
) -> Tensor:
    """W'_c (b - a, K) in ``dtype``: from the packed weight in-tile (Triton) when ``packed`` is given, else from
    the dequantised rows."""
    if packed is not None:
        from .backends.triton.bat_packed import packed_bat_rows

        return packed_bat_rows(packed, block, a, b, dtype)
    return _bat_rows(source, block, a, b, dtype)[1]


def sourced_bat_forward(
    x: Tensor,
    source: WeightSource,
    block: Tensor,
    bias: Tensor | None,
    chunk_blocks: int,
    packed: PackedWeight | None = None,
) -> Tensor:
    """y (M, N) in x's dtype from x (M, K); W'_c from ``packed`` in-tile when given (:func:`choose_packed`)."""
    dtype = delta_dtype(x.dtype, block.dtype)
    b_x = None if bias is None else bias.to(x.dtype)
    chunks = _chunks(source, block.shape[-1], chunk_blocks)
    y = None if len(chunks) == 1 else x.new_empty(x.shape[0], source.shape[0])
    for a, b in chunks:
        wp = _bat_rows_only(source, packed, block, a, b, x.dtype if packed is not None else dtype)
        wp_t = wp.to(x.dtype).t()  # [K, c*r]
        part = torch.mm(x, wp_t) if b_x is None else torch.addmm(b_x[a:b], x, wp_t)  # [M, c*r]
        if y is None:
            return part
        y[:, a:b] = part
        del wp, wp_t, part
    return y


def sourced_bat_backward(
    dy: Tensor,
    x: Tensor,
    source: WeightSource,
    block: Tensor,
    need_dx: bool,
    need_dblock: bool,
    chunk_blocks: int,
    packed: PackedWeight | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """dx (M, K) in x's dtype and dB (N // r, r, r) in the block's dtype, None where not needed; W from
    ``packed`` in-tile when given (never dequantised to memory: the dB products read it packed)."""
    r = block.shape[-1]
    dtype = delta_dtype(x.dtype, block.dtype)
    dx = torch.zeros(x.shape, dtype=dtype, device=x.device) if need_dx else None
    dblock = torch.empty(block.shape, dtype=dtype, device=block.device) if need_dblock else None
    x_c = x.to(dtype) if need_dblock else None  # [M, K]
    s_x = group_sum(x_c, r, dtype) if need_dblock else None  # [M, r]
    for a, b in _chunks(source, r, chunk_blocks):
        if packed is not None:
            from .backends.triton.bat_packed import packed_bat_rows, packed_block_products

            if need_dx:
                dx.addmm_(dy[:, a:b].to(dtype), packed_bat_rows(packed, block, a, b, dtype))
            if need_dblock:
                dy_t = dy[:, a:b].t().to(dtype)  # [c*r, M]
                g = torch.mm(dy_t, x_c)  # [c*r, K]: G_c
                db = packed_block_products(packed, g, a, r)  # [c, r, r]: sum_j W_ij^T G_ij
                dblock[a // r : b // r] = db + torch.mm(dy_t, s_x).view(-1, r, r)  # + sum_j G_ij = dY_i^T S
                del g
            continue
        w, wp = _bat_rows(source, block, a, b, dtype)
        if need_dx:
            dx.addmm_(dy[:, a:b].to(dtype), wp)
        del wp
        if need_dblock:
            dblock[a // r : b // r] = bat_block_grad(dy[:, a:b], x_c, s_x, w, r, dtype)
        del w
    return (
        None if dx is None else dx.to(x.dtype),
        None if dblock is None else dblock.to(block.dtype),
    )


class SourcedBatFunction(torch.autograd.Function):
    """bat over a :class:`WeightSource`. Keeps x (M x K) for backward; nothing of N x K."""

    @staticmethod
    def forward(ctx, x, block, bias, source, chunk_blocks, packed):
        ctx.source, ctx.chunk_blocks, ctx.packed = source, chunk_blocks, packed
        ctx.bias_dtype = None if bias is None else bias.dtype
        # Kept for backward: x (M x K) only; W and W' are re-formed chunk by chunk from the source.
        ctx.save_for_backward(x, block)
        return sourced_bat_forward(x, source, block, bias, chunk_blocks, packed)

    @staticmethod
    def backward(ctx, dy):
        x, block = ctx.saved_tensors
        need_dx, need_dblock, need_dbias = ctx.needs_input_grad[:3]
        dx = dblock = None
        if need_dx or need_dblock:
            dx, dblock = sourced_bat_backward(
                dy, x, ctx.source, block, need_dx, need_dblock, ctx.chunk_blocks, ctx.packed
            )
        dbias = dy.sum(0, dtype=delta_dtype(dy.dtype, torch.float32)).to(ctx.bias_dtype) if need_dbias else None
        return dx, dblock, dbias, None, None, None


STRATEGIES: tuple[str, ...] = ("auto", "torch", "triton")
"""How the sourced op forms W'_c: "torch" from dequantised rows; "triton" in-tile from the packed weight
(:mod:`bonekern.backends.triton.bat_packed`); "auto": "triton" on a CUDA device when the source has a packed
form the kernels read and they pass a one-time check on that device, else "torch"."""

_VERIFIED: dict[tuple, str | None] = {}
"""(device, format, r, x dtype) -> None when the packed kernels agreed with the torch path there, else the error."""


def _triton_ready() -> str | None:
    """None when Triton can run here, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "the triton package is not installed"
    return None


def _verify_packed(source: WeightSource, packed: PackedWeight, block: Tensor, x_dtype: torch.dtype) -> str | None:
    """Once per (device, format, r, x dtype): the packed kernels' W'_c and block products for the first out-block
    of this very weight against the torch path's, within ``tolerances.VS_REFERENCE[float32]``; None when they
    agree, else the error text (cached)."""
    from .verify import enabled

    r = block.shape[-1]
    key = (str(block.device), packed.format, r, x_dtype)
    if not enabled():
        return None
    if key not in _VERIFIED:
        from .backends.triton.bat_packed import packed_bat_rows, packed_block_products
        from .tolerances import VS_REFERENCE

        try:
            w, want = _bat_rows(source, block.detach().float(), 0, r, torch.float32)  # [r, K]
            got = packed_bat_rows(packed, block.detach(), 0, r, torch.float32)
            g = torch.randn(r, source.shape[1], device=block.device, generator=None)
            want_db = torch.einsum("pjs,pjq->sq", w.view(r, -1, r), g.view(r, -1, r))
            got_db = packed_block_products(packed, g, 0, r)[0]
            error = None
            for name, a, b in (("W'", got, want), ("dB products", got_db, want_db)):
                scale = b.abs().max().clamp_min(1e-30)
                if (
                    not bool(torch.isfinite(a).all())
                    or float((a - b).abs().max() / scale) > VS_REFERENCE[torch.float32]
                ):
                    error = f"{name} disagree with the torch path"
        except Exception as exc:  # a kernel that does not compile or launch on this device
            error = f"{type(exc).__name__}: {exc}"[:300]
        _VERIFIED[key] = error
        if error is not None:
            from .verify import KernelVerificationWarning

            warnings.warn(
                f"bonekern: bat packed-weight kernels ({packed.format}, r = {r}) failed their check on "
                f"{block.device}: {error}; this layer's bat runs the torch path (dequantised rows) instead",
                KernelVerificationWarning,
                stacklevel=4,
            )
    return _VERIFIED[key]


def choose_packed(strategy: str, source: WeightSource, block: Tensor, x: Tensor) -> PackedWeight | None:
    """The packed weight the Triton kernels read under ``strategy`` (:data:`STRATEGIES`), or None for the torch
    path. "triton" raises ValueError when they cannot serve this call."""
    from .backends.triton.bat_packed import supports

    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}; got {strategy!r}")
    if strategy == "torch":
        return None
    packed = source.packed_weight()
    dtype = delta_dtype(x.dtype, block.dtype)
    why = _triton_ready() or (
        None
        if supports(packed, block.shape[-1], dtype)
        else f"the base ({source.kind}) has no packed form the kernels read at r = {block.shape[-1]} with "
        f"{dtype} arithmetic (bitsandbytes nf4 / fp4 with K % blocksize == 0, or int8; float32 delta dtype)"
    )
    if strategy == "triton":
        if why is not None:
            raise ValueError(f"strategy 'triton': {why}")
        return packed
    if why is not None or x.device.type != "cuda":
        return None
    return None if _verify_packed(source, packed, block, x.dtype) is not None else packed


def bat_linear_quantized(
    x: Tensor,
    base: nn.Module | WeightSource | Tensor,
    block: Tensor,
    bias: Tensor | None = None,
    *,
    chunk_blocks: int | None = None,
    strategy: str = "auto",
) -> Tensor:
    """bat (PEFT's MiSS ``init_weights="bat"``) over a base weight that need not be readable whole.

    Args:
        x: (..., K) float input, any leading dims and strides.
        base: the frozen base: a layer :func:`bonekern.quant.weight_source` knows (bitsandbytes Linear4bit /
            Linear8bitLt, a torchao-quantised Linear, hqq HQQLinear, nn.Linear), a :class:`WeightSource`, or a
            float weight tensor (N, K).
        block: the trainable bat block (N // r, r, r), floating.
        bias: (N,) or None. Not taken from ``base``: pass ``base.bias`` for the layer's own.
        chunk_blocks: out-blocks per chunk of W' (default :func:`bonekern.blockmath.merge_chunk_blocks`, about
            4096 rows); rounded up to the source's row alignment.
        strategy: how W'_c is formed (:data:`STRATEGIES`): "auto" (default), "torch" or "triton" (the packed
            weight dequantised inside the kernels' tiles; runs on CPU tensors under ``TRITON_INTERPRET=1``).

    Returns:
        (..., N) in x's dtype, differentiable in x, block and bias (the base is frozen). Autograd keeps x alone.

    Raises ValueError for forward-only quantisations (PEFT's message) and for shapes bat cannot use; TypeError
    for a base bonekern cannot read or non-float tensors.
    """
    source = base if isinstance(base, WeightSource) else weight_source(base)
    if source is None:
        raise TypeError(
            "base: expected a bitsandbytes Linear4bit/Linear8bitLt, torchao-quantised Linear, hqq HQQLinear, "
            f"nn.Linear, WeightSource or float weight tensor; got {type(base).__name__}"
        )
    for name, t in (("x", x), ("block", block), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must have a floating dtype; got {t.dtype}")
    n, k = source.shape
    spec_from_block("bat", (n, k), tuple(block.shape), None)
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x must have last dimension in_features = {k}; got shape {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},); got {tuple(bias.shape)}")
    if chunk_blocks is None:
        chunk_blocks = merge_chunk_blocks(block.shape[-1])
    if not isinstance(chunk_blocks, int) or isinstance(chunk_blocks, bool) or chunk_blocks < 1:
        raise ValueError(f"chunk_blocks must be a positive int; got {chunk_blocks!r}")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, k)
    packed = choose_packed(strategy, source, block, x2d)
    y = SourcedBatFunction.apply(x2d, block, bias, source, chunk_blocks, packed)
    return y.reshape(*lead, n)
