"""``backend="cupy"``: hand-written CUDA C++ kernels (kernels/*.cu, launched through CuPy) around cuBLAS GEMMs.

Per operation (x (M, K), W (N, K), block as in :mod:`bonekern.backends.base`; "acc" = float32, or float64):

- bone_forward: ``S = group_sum(x, r)`` (kernel, reads x through its strides), ``y = x W^T + b`` (cuBLAS via
  F.linear), then ``y += S D`` in place (kernel; mini's ``n % C`` repeat is applied while D is loaded).
- bone_backward: ``dx = dY W`` (cuBLAS), ``T = dY_f D^T`` and ``dD = S^T dY_f`` (cuBLAS, rank r, in acc), then
  ``dx[:, k] += T[:, k % r]`` in place (kernel). ``dY_f`` is dY folded over mini's N / C repeats (the group-sum
  kernel, (M, C)), or for bone with a 16-bit dY, dY widened to acc ``chunk_cols`` columns at a time (bounded
  temporary M x chunk_cols).
- bat_forward: ``W'`` built by a kernel (whole, or ``chunk_blocks`` out-blocks at a time), then cuBLAS; W' is
  dropped before returning.
- bat_backward: per chunk of out-blocks, the W' rows (kernel) for ``dx += dY[:, rows] W'_rows`` (cuBLAS), and
  ``G_rows = dY[:, rows]^T x`` (cuBLAS, in acc) reduced to ``sum_j W_ij^T G_ij`` by the block-gradient kernel; the
  identity part ``sum_j G_ij = dY_i^T S(x)`` is a rank-r GEMM with ``S(x) = group_sum(x, r)`` (kernel, once).
  Temporary memory is bounded by the chunk: ``chunk_blocks * r * K`` elements of W' rows (x's dtype) plus as many
  of G (acc), plus (splits, chunk_blocks, r, r) partial sums, plus S(x) (M x r) -- never an N x K tensor unless
  chunk_blocks covers every out-block. When x is 16-bit, G is formed from a float32 copy of x (M x K) unless
  torch's CUDA ``mm(out_dtype=...)`` is there to multiply the 16-bit tensors into float32 directly.

Strided x: the group-sum kernel reads any strides; F.linear / torch.mm get x as it is (cuBLAS takes row- or
column-major views directly; for other layouts torch makes its own contiguous copy inside the call).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...validation import delta_dtype
from ..base import Backend, Config, OpProblem
from . import host
from .launcher import launcher_for
from .sources import tile_shape

_CHUNK_BYTES = 16 << 20
"""Default size of one chunk of a streamed temporary (W' rows, G rows, widened dY columns)."""

_FILL_TILES = 256
"""Below this many 64 x 64 tiles the output is small: use 32 x 32 tiles so more blocks share the work."""


def _acc_size(problem: OpProblem) -> int:
    return 8 if torch.float64 in (problem.dtype, problem.block_dtype) else 4


def _chunk_blocks(problem: OpProblem) -> int:
    """Out-blocks per chunk so that one chunk of G / W' rows is about 16 MiB."""
    blocks = problem.n // problem.r
    rows = _CHUNK_BYTES // (_acc_size(problem) * max(problem.k, 1))
    return max(1, min(blocks, rows // problem.r))


def _default_splits(problem: OpProblem, chunk_blocks: int, tile: str) -> int:
    """Split the Bat gradient's K reduction until a chunk launches ~2 blocks per SM of a large GPU (264), keeping
    every split at least 256 rows of the (K, r) view long."""
    bm, bn = tile_shape(tile)
    tiles = chunk_blocks * -(-problem.r // bm) * -(-problem.r // bn)
    return max(1, min(-(-264 // tiles), problem.k // 256, 65535))


class CupyBackend(Backend):
    """CUDA C++ kernels through CuPy; available on CUDA devices when CuPy (with NVRTC) imports."""

    name = "cupy"
    verify_before_use = True
    shared_source_modules = ("bonekern.backends.cupy",)  # the whole package: host.py, sources.py, kernels/*.cu

    def unavailable_reason(self, device: torch.device) -> str | None:
        launcher = launcher_for(device)
        if launcher is None:
            return f"CuPy kernels need a CUDA GPU; the tensors are on a {device.type} device"
        return launcher.unavailable_reason(device)

    # -- configs ------------------------------------------------------------------------------------------------

    def default_config(self, problem: OpProblem) -> Config:
        if problem.op == "bone_forward":
            tiles = -(-problem.m // 64) * -(-problem.n // 64)
            return {"tile": "t64x64" if tiles >= _FILL_TILES else "t32x32", "vector": True, "threads_per_row": 0}
        if problem.op == "adapter_forward":
            tiles = -(-problem.m // 64) * -(-problem.n // 64)
            return {"tile": "t64x64" if tiles >= _FILL_TILES else "t32x32", "vector": True, "threads_per_row": 0}
        if problem.op in ("bone_backward", "adapter_backward"):
            cols = max(1, _CHUNK_BYTES // (_acc_size(problem) * problem.m))
            return {"vector": True, "threads_per_row": 0, "chunk_cols": min(problem.n, cols)}
        chunk = _chunk_blocks(problem)
        weight_tile = "t64x64" if problem.r > 32 else "t128x16"
        if problem.op == "bat_forward":
            return {"strategy": "materialize", "chunk_blocks": chunk, "weight_tile": weight_tile}
        grad_tile = "t64x64" if problem.r > 32 else "t32x32"
        return {
            "strategy": "rowchunk",
            "chunk_blocks": chunk,
            "weight_tile": weight_tile,
            "grad_tile": grad_tile,
            "splits": _default_splits(problem, chunk, grad_tile),
        }

    def configs(self, problem: OpProblem) -> list[Config]:
        default = self.default_config(problem)
        out = [default]

        def add(**changes) -> None:
            cfg = {**default, **changes}
            if cfg not in out:
                out.append(cfg)

        if problem.op in ("bone_forward", "adapter_forward"):
            for tile in ("t64x64", "t32x32"):
                for threads in (0, 32, 256):
                    add(tile=tile, threads_per_row=threads)
            add(vector=False)
        elif problem.op in ("bone_backward", "adapter_backward"):
            for threads in (0, 32, 256):
                add(threads_per_row=threads)
            add(chunk_cols=problem.n)
            add(vector=False)
        else:
            blocks = problem.n // problem.r
            chunks = sorted({default["chunk_blocks"], max(1, blocks // 8), blocks})
            for strategy in ("materialize", "rowchunk"):
                for chunk in chunks:
                    add(strategy=strategy, chunk_blocks=chunk)
            add(weight_tile="t128x16" if default["weight_tile"] == "t64x64" else "t64x64")
            if problem.op == "bat_backward":
                add(grad_tile="t32x32" if default["grad_tile"] == "t64x64" else "t64x64")
                for splits in (1, 4, 16):
                    add(splits=splits)
        return out

    # -- bone / mini --------------------------------------------------------------------------------------------

    def bone_forward(self, x, weight, block, bias, config):
        r = block.shape[0]
        acc = delta_dtype(x.dtype, block.dtype)
        s = host.group_sum(
            x, r, acc, vector=config.get("vector", True), threads_per_row=config.get("threads_per_row", 0)
        )
        y = F.linear(x, weight, bias)
        host.add_adapter_(y, s, block.to(acc).contiguous(), tile=config.get("tile", "t64x64"))
        return y, s

    def bone_backward(self, dy, s, weight, block, need_dx, need_dblock, config):
        t, dblock = _t_and_dblock(dy, s, block, need_dx, need_dblock, config)
        dx = None
        if need_dx:
            dx = torch.mm(dy, weight)
            host.add_grouped_(dx, t.contiguous(), vector=config.get("vector", True))
        return dx, dblock

    # -- the adapter term alone (bone / mini over any base layer) -----------------------------------------------

    def adapter_forward(self, x, block, out_features, dropout, config):
        r = block.shape[0]
        acc = delta_dtype(x.dtype, block.dtype)
        if dropout is None:
            s = host.group_sum(
                x, r, acc, vector=config.get("vector", True), threads_per_row=config.get("threads_per_row", 0)
            )
        else:
            s = host.adapter_group_sum(x, r, acc, dropout).mul_(dropout.scale)
        y = torch.empty(x.shape[0], out_features, dtype=x.dtype, device=x.device)
        host.write_adapter_(y, s, block.to(acc).contiguous(), tile=config.get("tile", "t64x64"))
        return y, s

    def adapter_backward(self, dy, s, block, in_features, dropout, need_dx, need_dblock, config):
        t, dblock = _t_and_dblock(dy, s, block, need_dx, need_dblock, config)
        dx = None
        if need_dx:
            t = t.contiguous() if dropout is None else t.mul(dropout.scale)
            dx = host.adapter_spread(t, in_features, dy.dtype, dropout)
        return dx, dblock

    # -- bat ----------------------------------------------------------------------------------------------------

    def bat_forward(self, x, weight, block, bias, config):
        weight = weight.contiguous()
        acc = delta_dtype(x.dtype, block.dtype)
        b = block.to(acc).contiguous()
        r = block.shape[-1]
        blocks = block.shape[0]
        tile = config.get("weight_tile", "t64x64")
        if config.get("strategy", "materialize") == "materialize":
            w_prime = host.bat_weight_(torch.empty_like(weight), weight, b, tile=tile)
            return F.linear(x, w_prime, bias)
        chunk = max(1, int(config.get("chunk_blocks", blocks)))
        y = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
        for i0 in range(0, blocks, chunk):
            i1 = min(blocks, i0 + chunk)
            rows = slice(i0 * r, i1 * r)
            w_rows = host.bat_weight_(torch.empty_like(weight[rows]), weight[rows], b[i0:i1], tile=tile)
            y[:, rows] = F.linear(x, w_rows, None if bias is None else bias[rows])
        return y

    def bat_backward(self, dy, x, weight, block, need_dx, need_dblock, config):
        weight = weight.contiguous()
        acc = delta_dtype(x.dtype, block.dtype)
        b = block.to(acc).contiguous()
        r = block.shape[-1]
        blocks = block.shape[0]
        weight_tile = config.get("weight_tile", "t64x64")
        dx = dblock = None
        materialize = config.get("strategy", "rowchunk") == "materialize"
        if need_dx and materialize:
            dx = torch.mm(dy, host.bat_weight_(torch.empty_like(weight), weight, b, tile=weight_tile))
        if not (need_dblock or (need_dx and not materialize)):
            return dx, dblock
        if need_dblock:
            dblock = torch.empty(block.shape, dtype=acc, device=block.device)
            x_for_g = x if _mm_widens(x, acc) else x.to(acc)
            s_x = host.group_sum(x, r, acc, vector=config.get("vector", True))
        chunk = max(1, int(config.get("chunk_blocks", blocks)))
        for i0 in range(0, blocks, chunk):
            i1 = min(blocks, i0 + chunk)
            rows = slice(i0 * r, i1 * r)
            w_rows = weight[rows]
            if need_dx and not materialize:
                w_prime_rows = host.bat_weight_(torch.empty_like(w_rows), w_rows, b[i0:i1], tile=weight_tile)
                if dx is None:
                    dx = torch.mm(dy[:, rows], w_prime_rows)
                else:
                    dx.addmm_(dy[:, rows], w_prime_rows)
                del w_prime_rows
            if need_dblock:
                dy_t = dy[:, rows].t()
                g = _mm_acc(dy_t, x_for_g, acc)
                dblock[i0:i1] = host.bat_block_grad(
                    g, w_rows, r, splits=int(config.get("splits", 1)), tile=config.get("grad_tile", "t64x64")
                )
                del g
                dblock[i0:i1] += _mm_acc(dy_t, s_x, acc).view(i1 - i0, r, r)
        if dblock is not None:
            dblock = dblock.to(block.dtype)
        return dx, dblock


_MM_OUT_DTYPE_WORKS: bool | None = None
"""Whether torch.mm(..., out_dtype=float32) works for 16-bit CUDA tensors (torch >= 2.8); probed on first use."""


def _mm_widens(x: torch.Tensor, acc: torch.dtype) -> bool:
    """Whether ``_mm_acc`` can multiply 16-bit ``x`` into ``acc`` without a widened copy of x."""
    global _MM_OUT_DTYPE_WORKS
    if x.dtype == acc:
        return True
    if not (x.is_cuda and acc == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)):
        return False
    if _MM_OUT_DTYPE_WORKS is None:
        try:
            probe = torch.ones(1, 1, dtype=x.dtype, device=x.device)
            _MM_OUT_DTYPE_WORKS = torch.mm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE_WORKS = False
    return _MM_OUT_DTYPE_WORKS


def _mm_acc(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """a @ b in ``acc``; ``b`` is either in acc already or 16-bit with :func:`_mm_widens` true."""
    if b.dtype == acc:
        return torch.mm(a.to(acc), b)
    return torch.mm(a, b, out_dtype=acc)


def _t_and_dblock(
    dy: torch.Tensor, s: torch.Tensor, block: torch.Tensor, need_t: bool, need_dblock: bool, config: Config
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """T = dY D^T (M, r) in acc (when ``need_t``) and dblock = S^T dY folded mod C (r, C) in the block's dtype (when
    ``need_dblock``): what bone backward and the adapter backward share. dY_f is dY folded over mini's N / C repeats
    (the group-sum kernel, (M, C)), or for bone with a 16-bit dY, dY widened to acc ``chunk_cols`` columns at a time
    (bounded temporary M x chunk_cols)."""
    acc = s.dtype
    cols = block.shape[1]
    m, n = dy.shape
    d = block.to(acc).contiguous()
    vector = config.get("vector", True)
    threads = config.get("threads_per_row", 0)
    t = dblock = None
    if cols < n or dy.dtype == acc:
        dy_f = host.group_sum(dy, cols, acc, vector=vector, threads_per_row=threads) if cols < n else dy
        if need_t:
            t = torch.mm(dy_f, d.t())
        if need_dblock:
            dblock = torch.mm(s.t(), dy_f)
    else:
        chunk = max(1, int(config.get("chunk_cols", n)))
        t = torch.zeros(m, block.shape[0], dtype=acc, device=dy.device) if need_t else None
        dblock = torch.empty(block.shape, dtype=acc, device=dy.device) if need_dblock else None
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            dy_c = host.group_sum(dy[:, c0:c1], c1 - c0, acc, vector=vector, threads_per_row=threads)
            if need_t:
                t.addmm_(dy_c, d[:, c0:c1].t())
            if need_dblock:
                dblock[:, c0:c1] = torch.mm(s.t(), dy_c)
    if dblock is not None:
        dblock = dblock.to(block.dtype)
    return t, dblock
