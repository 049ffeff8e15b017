"""What one forward and one backward must compute and move, per method: the numerators of TFLOP/s and GB/s.

The counts belong to the *method* (frozen linear, bone, mini, bat, LoRA), never to an implementation, so every
implementation of a case is divided by the same numbers: a higher TFLOP/s is simply a shorter time. Conventions:

- FLOPs: a multiply-add is 2, an add is 1. Work an implementation repeats is not counted (bat's W' is counted
  once, in forward, even though a memory-frugal backward rebuilds it).
- Bytes: the compulsory traffic, a lower bound: every input read once and every output written once, at its
  dtype (x, dY, dx and y at the layer's dtype; W and bias at the layer's dtype; the adapter's parameters and
  gradients and bone's S at the adapter dtype). Backward also reads what forward kept (S for bone/mini, x for
  bat and LoRA's dA).

Notation: M tokens, K in_features, N out_features, r the block size, C the bone/mini block's columns (N or
mini_r), q the LoRA rank. x requires grad, so backward always computes dx; W and the bias are frozen.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cost:
    """FLOPs and bytes of one forward and of one backward."""

    fwd_flops: int
    bwd_flops: int
    fwd_bytes: int
    bwd_bytes: int

    @property
    def fwdbwd_flops(self) -> int:
        return self.fwd_flops + self.bwd_flops

    @property
    def fwdbwd_bytes(self) -> int:
        return self.fwd_bytes + self.bwd_bytes


def cost(
    method: str,
    m: int,
    n: int,
    k: int,
    *,
    bias: bool,
    act_bytes: int,
    adapter_bytes: int,
    r: int = 0,
    cols: int = 0,
    lora_rank: int = 0,
) -> Cost:
    """The :class:`Cost` of ``method`` ("linear", "bone", "mini", "bat" or "lora").

    Args:
        m, n, k: tokens, out_features, in_features.
        bias: whether the layer adds a bias.
        act_bytes: bytes per element of x, W, y and their gradients (the layer's dtype).
        adapter_bytes: bytes per element of the adapter's parameters and gradients (and of S).
        r: block size (bone, mini, bat). cols: C for bone/mini. lora_rank: q for LoRA.
    """
    base_fwd = 2 * m * n * k + (m * n if bias else 0)
    dx_base = 2 * m * n * k  # dx = dY W
    x, w, y = m * k * act_bytes, n * k * act_bytes, m * n * act_bytes
    b = n * act_bytes if bias else 0
    fwd_bytes = x + w + b + y
    bwd_bytes = y + w + x  # read dY and W, write dx
    if method == "linear":
        return Cost(base_fwd, dx_base, fwd_bytes, bwd_bytes)
    if method in ("bone", "mini"):
        s_bytes = m * r * adapter_bytes
        block_bytes = r * cols * adapter_bytes
        repeats_add = m * n if cols != n else 0  # mini: broadcast (M, C) over N, and fold dY back to (M, C)
        # forward: S = group sums (M*K adds), S @ block (2*M*r*C), add into y (M*N)
        fwd = base_fwd + m * k + 2 * m * r * cols + m * n
        # backward: dx = dY W + (dY D^T) broadcast over the groups; dD = S^T dY
        bwd = dx_base + repeats_add + 2 * m * cols * r + m * k + 2 * m * r * cols
        return Cost(fwd, bwd, fwd_bytes + block_bytes + s_bytes, bwd_bytes + 2 * block_bytes + s_bytes)
    if method == "bat":
        block_bytes = n * r * adapter_bytes
        # forward: W' = W_ij B_i + B_i over (N/r)*(K/r) blocks (2*N*K*r + N*K), then the GEMM
        fwd = base_fwd + 2 * n * k * r + n * k
        # backward: dx = dY W' (2MNK), G = dY^T x (2MNK), dB_i = sum_j (W_ij + I)^T G_ij (2NKr + NK)
        bwd = dx_base + 2 * m * n * k + 2 * n * k * r + n * k
        return Cost(fwd, bwd, fwd_bytes + block_bytes, bwd_bytes + x + 2 * block_bytes)
    if method == "lora":
        q = lora_rank
        ab_bytes = q * (k + n) * adapter_bytes
        # forward: h = x A^T (2MKq), y += h B^T (2MqN + MN)
        fwd = base_fwd + 2 * m * k * q + 2 * m * q * n + m * n
        # backward: dh = dY B (2MNq), dB = dY^T h (2MNq), dA = dh^T x (2MqK), dx += dh A (2MqK + MK)
        bwd = dx_base + 4 * m * n * q + 4 * m * q * k + m * k
        return Cost(fwd, bwd, fwd_bytes + ab_bytes, bwd_bytes + x + 2 * ab_bytes)
    raise ValueError(f"method must be one of linear, bone, mini, bat, lora; got {method!r}")
