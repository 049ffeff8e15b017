"""Einsum references: the specification every backend is tested against.

Plain and readable on purpose: no chunking, no in-place tricks, no fusions. Every function computes in float32, or
in float64 when any input is float64 (tests call them in float64), and follows PEFT's MiSS semantics
(``peft/tuners/miss/layer.py``; docs/math.md, docs/peft-semantics.md). Shapes: x (M, K) or (..., K), weight (N, K),
block as in :mod:`bonekern.variants`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dropout import DropoutSpec, keep_mask
from .validation import delta_dtype


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = delta_dtype(dtype, t.dtype)
    return dtype


def group_sum(x: torch.Tensor, r: int) -> torch.Tensor:
    """S = sum over g of x[..., g*r:(g+1)*r], x zero-padded on the right to a multiple of r: (..., K) -> (..., r)."""
    k = x.shape[-1]
    groups = -(-k // r)
    padded = F.pad(x, (0, groups * r - k))
    return padded.reshape(*x.shape[:-1], groups, r).sum(dim=-2)


def expand_block(block: torch.Tensor, out_features: int) -> torch.Tensor:
    """bone/mini: the (r, N) matrix D with D[k, n] = block[k, n % C] for a block of shape (r, C)."""
    return block.repeat(1, out_features // block.shape[1])


def delta_weight(weight: torch.Tensor, block: torch.Tensor, variant: str) -> torch.Tensor:
    """dW (N, K) such that the adapted layer equals ``F.linear(x, weight + dW, bias)``.

    bone/mini: dW[n, k] = D[k % r, n]. bat: dW_ij = W_ij B_i + B_i for every r x r block (i: out, j: in).
    """
    dtype = _compute_dtype(weight, block)
    weight, block = weight.to(dtype), block.to(dtype)
    n, k = weight.shape
    if variant == "bat":
        r = block.shape[-1]
        wb = weight.reshape(n // r, r, k // r, r)  # wb[i, p, j, s] = W[i*r + p, j*r + s]
        dwb = torch.einsum("ipjs,isq->ipjq", wb, block) + block[:, :, None, :]
        return dwb.reshape(n, k)
    r = block.shape[0]
    d = expand_block(block, n)  # (r, N)
    return d[torch.arange(k, device=block.device) % r, :].T


def bat_weight(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """W' = W + dW, i.e. W'_ij = W_ij (I + B_i) + B_i, in the compute dtype."""
    return weight.to(_compute_dtype(weight, block)) + delta_weight(weight, block, "bat")


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    block: torch.Tensor,
    bias: torch.Tensor | None = None,
    variant: str = "bone",
) -> torch.Tensor:
    """The adapted layer's output (..., N) in x's dtype.

    bone/mini: y = x W^T + b + S D with S = group_sum(x, r). bat: y = x W'^T + b.
    """
    dtype = _compute_dtype(x, weight, block)
    xc, wc, bc = x.to(dtype), weight.to(dtype), block.to(dtype)
    if variant == "bat":
        y = torch.einsum("...k,nk->...n", xc, bat_weight(wc, bc))
    else:
        s = group_sum(xc, block.shape[0])
        y = torch.einsum("...k,nk->...n", xc, wc) + torch.einsum("...r,rn->...n", s, expand_block(bc, wc.shape[0]))
    if bias is not None:
        y = y + bias.to(dtype)
    return y.to(x.dtype)


def bone_backward(
    dy: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, block: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of bone/mini from the saved group sums S (M, r): returns dx (M, K) and dblock (r, C).

    dx[:, k] = (dY W)[:, k] + (dY D^T)[:, k % r];  dD = S^T dY, folded over mini's repeats.
    """
    dtype = _compute_dtype(dy, weight, block)
    dyc, wc, bc, sc = dy.to(dtype), weight.to(dtype), block.to(dtype), s.to(dtype)
    n, k = weight.shape
    r, cols = block.shape
    t = torch.einsum("mn,rn->mr", dyc, expand_block(bc, n))
    dx = torch.einsum("mn,nk->mk", dyc, wc) + t[:, torch.arange(k, device=dy.device) % r]
    d_full = torch.einsum("mr,mn->rn", sc, dyc)
    dblock = d_full.reshape(r, n // cols, cols).sum(dim=1)
    return dx.to(dy.dtype), dblock.to(block.dtype)


def bat_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, block: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of bat from the saved input x (M, K): returns dx (M, K) and dblock (N // r, r, r).

    dx = dY W';  with G = dY^T x cut into r x r blocks G_ij:  dB_i = sum_j (W_ij + I)^T G_ij.
    """
    dtype = _compute_dtype(dy, x, weight, block)
    dyc, xc, wc, bc = dy.to(dtype), x.to(dtype), weight.to(dtype), block.to(dtype)
    n, k = weight.shape
    r = block.shape[-1]
    dx = torch.einsum("mn,nk->mk", dyc, bat_weight(wc, bc))
    g = torch.einsum("mn,mk->nk", dyc, xc).reshape(n // r, r, k // r, r)
    wb_plus_eye = wc.reshape(n // r, r, k // r, r) + torch.eye(r, dtype=dtype, device=dy.device)[None, :, None, :]
    dblock = torch.einsum("ipjs,ipjq->isq", wb_plus_eye, g)
    return dx.to(dy.dtype), dblock.to(block.dtype)


def unmerge(merged_weight: torch.Tensor, block: torch.Tensor, variant: str) -> torch.Tensor:
    """The base weight W from a merged weight W' (in the compute dtype).

    bone/mini: W = W' - dW. bat: W_ij = (W'_ij - B_i)(I + B_i)^{-1}.
    """
    dtype = _compute_dtype(merged_weight, block)
    wm, bc = merged_weight.to(dtype), block.to(dtype)
    n, k = wm.shape
    if variant != "bat":
        r = block.shape[0]
        d = expand_block(bc, n)
        return wm - d[torch.arange(k, device=block.device) % r, :].T
    r = block.shape[-1]
    inv = torch.linalg.inv(torch.eye(r, dtype=dtype, device=block.device) + bc)
    wb = wm.reshape(n // r, r, k // r, r) - bc[:, :, None, :]
    return torch.einsum("ipjs,isq->ipjq", wb, inv).reshape(n, k)


def dropped_input(x: torch.Tensor, dropout: DropoutSpec | None) -> torch.Tensor:
    """x (M, K) with dropout applied: ``x * keep / (1 - p)`` (:func:`bonekern.dropout.keep_mask`); x itself for None."""
    if dropout is None:
        return x
    mask = keep_mask(dropout, x.shape[0], x.shape[1], x.device)
    return x * mask.to(x.dtype) * dropout.scale


def adapter_forward(
    x: torch.Tensor, block: torch.Tensor, out_features: int, dropout: DropoutSpec | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The bone/mini adapter term alone: delta = S D (M, N) in x's dtype and S (M, r) in the compute dtype.

    x (M, K), block (r, C) with C | N; S = group_sum(dropped_input(x)), zero-padded groups.
    """
    dtype = _compute_dtype(x, block)
    s = group_sum(dropped_input(x.to(dtype), dropout), block.shape[0])
    delta = torch.einsum("mr,rn->mn", s, expand_block(block.to(dtype), out_features))
    return delta.to(x.dtype), s


def adapter_backward(
    dy: torch.Tensor, s: torch.Tensor, block: torch.Tensor, in_features: int, dropout: DropoutSpec | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`adapter_forward` from S: dx (M, K) in dy's dtype and dblock (r, C) in the block's dtype.

    T = dY D^T (M, r); dx[i, k] = T[i, k % r] * keep(i, k) / (1 - p); dD = S^T dY folded over mini's repeats.
    """
    dtype = _compute_dtype(dy, block)
    dyc, bc, sc = dy.to(dtype), block.to(dtype), s.to(dtype)
    n = dy.shape[1]
    r, cols = block.shape
    t = torch.einsum("mn,rn->mr", dyc, expand_block(bc, n))
    dx = dropped_input(t[:, torch.arange(in_features, device=dy.device) % r], dropout)
    dblock = torch.einsum("mr,mn->rn", sc, dyc).reshape(r, n // cols, cols).sum(dim=1)
    return dx.to(dy.dtype), dblock.to(block.dtype)
