"""Frozen base weights that cannot be read whole: how each quantisation library dequantises a run of rows.

The one place in bonekern that knows bitsandbytes, torchao and hqq; each is imported lazily, only when a layer
of that library is seen. A :class:`WeightSource` stands for a base weight W (N, K) and hands out dequantised
out-rows on demand (:meth:`WeightSource.rows`), so bat's sourced op (:mod:`bonekern.quant_ops`) can form
``W'`` a chunk of out-blocks at a time and never hold a whole dequantised W.

What each source reads for rows ``start .. stop`` (``row_align`` is the granularity ``start`` must respect):

- :class:`DenseSource` -- a plain float weight: a slice (and a cast).
- :class:`Bnb4bitSource` -- bitsandbytes ``Linear4bit`` (nf4, fp4). Its 4-bit blocks run over the flattened
  weight, so when ``K % blocksize == 0`` every row holds whole blocks: the rows' packed bytes and absmax values
  are contiguous slices and are dequantised alone. The double-quantised absmax (``compress_statistics``) is
  dequantised once when the source is made (N * K / blocksize float32 values, 1/16 of the packed weight's
  bytes at blocksize 64). When ``K % blocksize != 0`` the CPU kernel's block layout is not the flat one (measured
  with bitsandbytes 0.50.2: slices then disagree with the whole dequantisation), so the source dequantises whole
  (``whole = True``; see below).
- :class:`Bnb8bitSource` -- bitsandbytes ``Linear8bitLt``: int8 rows times their row scale (``SCB / 127``),
  through ``bitsandbytes.functional.int8_vectorwise_dequant`` as PEFT does.
- :class:`TorchaoSource` -- a torchao quantised weight (``Int8Tensor`` from ``Int8WeightOnlyConfig``,
  ``IntxUnpackedToInt8Tensor`` from ``IntxWeightOnlyConfig``, ...): the tensor subclass is sliced by rows (its
  qdata and per-row / per-group scales are sliced with it) and the slice dequantised.
- :class:`HqqSource` -- hqq ``HQQLinear`` with groups along K (``axis=1``), 8-bit or 4-bit packing, plain
  scale and zero: the rows' groups are unpacked and dequantised alone (hqq's 4-bit packing stores group g of G
  in the high nibble of packed row g when g < G / 2, else in the low nibble of row g - G / 2). Other hqq layouts
  (``axis=0``, quantised scales or zeros, 1/2/3-bit packing) dequantise whole.

Whole dequantisation (``whole = True``) is the documented exception: ``rows`` then dequantises the full weight
and copies out the rows asked for, and the sourced op asks for all rows in one chunk, so one full W is alive for
the duration of a forward or backward pass -- what PEFT holds, plus its own copy and W'.

Forward-only quantisations (GPTQ, AWQ, AQLM, EETQ, INC, TransformerEngine: their kernels compute x W^T without
ever exposing W) raise the ValueError PEFT's MiSS bat path raises (:func:`forward_only_error`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn

FORWARD_ONLY_LIBRARIES: dict[str, str] = {
    "gptqmodel": "gptq",
    "auto_gptq": "gptq",
    "awq": "awq",
    "aqlm": "aqlm",
    "eetq": "eetq",
    "neural_compressor": "inc",
    "transformer_engine": "te",
}
"""Top-level package of a base layer's class -> PEFT's name for that forward-only quantisation backend."""


def forward_only_error(backend_name: str) -> ValueError:
    """The error PEFT 0.21's MiSS layer raises for bat over a quantisation that cannot be dequantised."""
    return ValueError(
        "Using MiSS with `init_weights='bat'` is not supported because quantization backend "
        f"{backend_name} does not support dequantization. Use a different "
        "quantization backend or a different MiSS initialization method."
    )


@dataclass(frozen=True)
class PackedWeight:
    """The tensors a kernel reads to dequantise tiles of W (N, K) itself, never writing a dequantised W
    (:mod:`bonekern.backends.triton.bat_packed`). ``W[n, k]`` in float32 is:

    - ``"code4"`` (bitsandbytes nf4 / fp4): with f = n * K + k, the 4-bit code ``data[f // 2] >> 4`` for even f,
      ``data[f // 2] & 15`` for odd f; ``code[q] * scale[f // blocksize]`` (scale: the absmax, de-nested).
    - ``"int8"`` (bitsandbytes LLM.int8 weights): ``data[n, k] * scale[n] * INT8_INV_127`` (scale: SCB), in that
      order, as ``bitsandbytes.functional.int8_vectorwise_dequant`` computes it.

    Attributes:
        format: "code4" or "int8".
        shape: (N, K).
        data: "code4": uint8 (N * K / 2,); "int8": int8 (N, K) contiguous.
        scale: float32; "code4": (N * K / blocksize,); "int8": (N,).
        code: "code4": the 16 float32 code values; None for "int8".
        blocksize: "code4": elements per absmax (K % blocksize == 0, so rows hold whole blocks); 0 for "int8".
    """

    format: str
    shape: tuple[int, int]
    data: Tensor
    scale: Tensor
    code: Tensor | None = None
    blocksize: int = 0


INT8_INV_127 = 7.874015718698502e-3
"""1 / 127 as bitsandbytes' int8 dequantisation writes it (its float32 rounding is what every backend uses)."""


class WeightSource(ABC):
    """A frozen base weight W (N, K) read a run of out-rows at a time.

    Attributes:
        shape: (N, K).
        device: where ``rows`` returns its tensors.
        dtype: the dtype the library dequantises to (what PEFT's ``get_base_weight`` returns).
        row_align: ``rows(start, stop)`` needs ``start % row_align == 0`` and ``stop`` a multiple of it or N.
        whole: True when the library can only dequantise the whole weight (see the module docstring).
        kind: a short name for reports ("dense", "bnb nf4", "bnb int8", "torchao Int8Tensor", "hqq 4bit").
    """

    shape: tuple[int, int]
    device: torch.device
    dtype: torch.dtype
    row_align: int = 1
    whole: bool = False
    kind: str = ""

    @abstractmethod
    def _rows(self, start: int, stop: int) -> Tensor:
        """Rows ``start .. stop`` (stop - start, K) in the library's dtype (bounds already checked)."""

    def rows(self, start: int, stop: int, dtype: torch.dtype) -> Tensor:
        """Dequantised rows ``start .. stop`` of W: (stop - start, K) in ``dtype``, contiguous."""
        n = self.shape[0]
        if not (0 <= start < stop <= n):
            raise ValueError(f"rows: need 0 <= start < stop <= N = {n}; got start = {start}, stop = {stop}")
        if start % self.row_align or (stop != n and stop % self.row_align):
            raise ValueError(
                f"rows: start and stop must be multiples of row_align = {self.row_align} (or stop = N = {n}) for "
                f"{self.kind}; got start = {start}, stop = {stop}"
            )
        return self._rows(start, stop).to(dtype).contiguous()

    def packed_weight(self) -> PackedWeight | None:
        """The packed tensors a kernel can dequantise in-tile, or None (this library or layout has no such path)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, shape={self.shape}, dtype={self.dtype})"


class DenseSource(WeightSource):
    """A plain float weight (N, K): rows are slices."""

    kind = "dense"

    def __init__(self, weight: Tensor) -> None:
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (out_features, in_features); got shape {tuple(weight.shape)}")
        self.weight = weight.detach()
        self.shape = (weight.shape[0], weight.shape[1])
        self.device, self.dtype = weight.device, weight.dtype

    def _rows(self, start: int, stop: int) -> Tensor:
        return self.weight[start:stop]


class _WholeMixin:
    """``rows`` for libraries that dequantise only whole: dequantise, copy the rows out, drop the rest."""

    whole = True

    def _dequantize_whole(self) -> Tensor:
        raise NotImplementedError

    def _rows(self, start: int, stop: int) -> Tensor:
        full = self._dequantize_whole()
        if start == 0 and stop == full.shape[0]:
            return full
        return full[start:stop].clone()


class Bnb4bitSource(WeightSource):
    """bitsandbytes ``Linear4bit`` (nf4 or fp4); see the module docstring for when it slices by rows."""

    def __init__(self, layer: nn.Module) -> None:
        import bitsandbytes.functional as bnbf

        weight = layer.weight
        state = weight.quant_state
        self._bnbf = bnbf
        self.packed = weight.data.view(-1)  # (N * K / 2,) uint8, two 4-bit codes a byte, row-major over W
        self.state = state
        self.shape = (int(state.shape[0]), int(state.shape[1]))
        self.device, self.dtype = weight.device, state.dtype
        self.blocksize = int(state.blocksize)
        self.kind = f"bnb {state.quant_type}"
        k = self.shape[1]
        self.whole = k % self.blocksize != 0
        if state.nested:  # double quantisation: absmax itself is 8-bit blockwise; dequantise it once
            absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
        else:
            absmax = state.absmax
        self.absmax = absmax.float()  # (N * K / blocksize,)

    def _rows(self, start: int, stop: int) -> Tensor:
        if self.whole:
            full = self._bnbf.dequantize_4bit(self.packed.view(-1, 1), self.state)
            return full if (start, stop) == (0, self.shape[0]) else full[start:stop].clone()
        from bitsandbytes.functional import QuantState

        k, bs = self.shape[1], self.blocksize
        part = QuantState(
            absmax=self.absmax[start * k // bs : stop * k // bs],
            shape=torch.Size((stop - start, k)),
            code=self.state.code,
            blocksize=bs,
            quant_type=self.state.quant_type,
            dtype=self.dtype,
        )
        return self._bnbf.dequantize_4bit(self.packed[start * k // 2 : stop * k // 2].view(-1, 1), part)

    def packed_weight(self) -> PackedWeight | None:
        if self.whole:  # the block layout is not the flat one (module docstring)
            return None
        code = self.state.code.to(device=self.device, dtype=torch.float32)
        return PackedWeight("code4", self.shape, self.packed, self.absmax, code, self.blocksize)


class Bnb8bitSource(WeightSource):
    """bitsandbytes ``Linear8bitLt``: int8 rows (N, K) times their row scale ``SCB / 127``."""

    kind = "bnb int8"

    def __init__(self, layer: nn.Module) -> None:
        import bitsandbytes.functional as bnbf

        weight = layer.weight
        scb = layer.state.SCB if layer.state.SCB is not None else weight.SCB
        if scb is None:
            raise ValueError(
                "base_layer: a bitsandbytes Linear8bitLt whose weight is not quantised yet (no SCB); move it to its "
                "device first (.to(device) quantises it)"
            )
        self._bnbf = bnbf
        self.qdata = weight.data  # (N, K) int8
        self.scb = scb.to(weight.device)  # (N,) float32
        self.shape = (self.qdata.shape[0], self.qdata.shape[1])
        self.device, self.dtype = weight.device, torch.float32

    def _rows(self, start: int, stop: int) -> Tensor:
        return self._bnbf.int8_vectorwise_dequant(self.qdata[start:stop], self.scb[start:stop])

    def packed_weight(self) -> PackedWeight | None:
        return PackedWeight("int8", self.shape, self.qdata.contiguous(), self.scb.float())


class TorchaoSource(WeightSource):
    """A torchao quantised weight (a ``TorchAOBaseTensor``), sliced by rows and dequantised per slice."""

    def __init__(self, weight: Tensor) -> None:
        self.weight = weight
        self.shape = (weight.shape[0], weight.shape[1])
        self.device, self.dtype = weight.device, weight.dtype
        self.kind = f"torchao {type(weight).__name__}"
        block_size = getattr(weight, "block_size", None)  # rows per scale group along N (1 for per-row/per-group)
        self.row_align = int(block_size[0]) if block_size and block_size[0] < self.shape[0] else 1
        try:
            weight[: self.row_align].dequantize()
        except (NotImplementedError, RuntimeError, TypeError, IndexError, ValueError):
            self.whole = True
            self.row_align = 1
        try:  # PEFT needs dequantize() itself; surface its message when even that is missing
            if self.whole:
                weight.dequantize()
        except NotImplementedError as error:
            raise NotImplementedError(
                f"Weights of type {type(weight).__name__} do not support dequantization (yet), which is needed to "
                "support merging."
            ) from error

    def _rows(self, start: int, stop: int) -> Tensor:
        if self.whole:
            full = self.weight.dequantize()
            return full if (start, stop) == (0, self.shape[0]) else full[start:stop].clone()
        return self.weight[start:stop].dequantize()


class HqqSource(WeightSource):
    """hqq ``HQQLinear``; slices by rows for axis-1 groups with 8-bit or 4-bit packing and plain scale/zero."""

    def __init__(self, layer: nn.Module) -> None:
        meta = layer.meta
        self.layer = layer
        self.shape = (int(meta["shape"][0]), int(meta["shape"][1]))
        self.device = layer.W_q.device
        self.dtype = meta.get("compute_dtype", layer.compute_dtype)
        self.nbits = int(meta["nbits"])
        self.kind = f"hqq {self.nbits}bit"
        self.group_size = int(meta["group_size"])
        plain = (
            meta.get("axis") == 1
            and meta.get("packing") in ("8bit_u8", "4bit_u8")
            and not meta.get("view_as_float", False)
            and not meta.get("quant_scale", False)
            and not meta.get("quant_zero", False)
            and "zero_scale" not in meta
            and torch.is_tensor(meta.get("scale"))
            and torch.is_tensor(meta.get("zero"))
            and self.shape[1] % self.group_size == 0
            and not getattr(layer, "offload_meta", False)
        )
        self.whole = not plain
        if plain:
            self.row_align = 1

    def _rows(self, start: int, stop: int) -> Tensor:
        if self.whole:
            full = self.layer.dequantize()
            return full if (start, stop) == (0, self.shape[0]) else full[start:stop].clone()
        meta, w_q = self.layer.meta, self.layer.W_q
        per_row = self.shape[1] // self.group_size
        g0, g1 = start * per_row, stop * per_row  # the rows' groups, each a row of (G, group_size)
        if meta["packing"] == "8bit_u8":
            codes = w_q[g0:g1].to(self.dtype)
        else:
            step = w_q.shape[0]  # G / 2 packed rows: group g < step in the high nibble, else the low one
            parts = []
            if g0 < step:
                parts.append((w_q[g0 : min(g1, step)] >> 4).to(self.dtype))
            if g1 > step:
                parts.append((w_q[max(g0, step) - step : g1 - step] & 0x0F).to(self.dtype))
            codes = torch.cat(parts) if len(parts) > 1 else parts[0]  # [g1 - g0, group_size]
        scale, zero = meta["scale"][g0:g1].to(self.dtype), meta["zero"][g0:g1].to(self.dtype)
        return ((codes - zero) * scale).reshape(stop - start, self.shape[1])


def _forward_only_name(layer: nn.Module) -> str | None:
    package = type(layer).__module__.split(".")[0]
    if package in FORWARD_ONLY_LIBRARIES:
        return FORWARD_ONLY_LIBRARIES[package]
    if "awq" in type(layer).__name__.lower() and package == "gptqmodel":
        return "awq"
    return None


def is_torchao_weight(weight: object) -> bool:
    """True when ``weight`` is a torchao quantised tensor subclass (torchao is imported only if it is loaded)."""
    import sys

    if "torchao" not in sys.modules or not isinstance(weight, Tensor) or type(weight) is Tensor:
        return False
    from torchao.utils import TorchAOBaseTensor

    return isinstance(weight, TorchAOBaseTensor)


def weight_source(base_layer: nn.Module | Tensor) -> WeightSource | None:
    """The :class:`WeightSource` for a base layer's (or a bare tensor's) weight, or None when bonekern does not
    know how to read it.

    Known: bitsandbytes ``Linear4bit`` and ``Linear8bitLt``, torchao quantised weights, hqq ``HQQLinear``, a
    plain float weight (``nn.Linear`` or a float tensor). Raises :func:`forward_only_error`'s ValueError for
    forward-only quantisations (GPTQ, AWQ, ...), as PEFT does. Only libraries already imported are consulted,
    so a layer of a library that was never imported cannot be one of its layers.
    """
    import sys

    if isinstance(base_layer, Tensor):
        if is_torchao_weight(base_layer):
            return TorchaoSource(base_layer)
        if base_layer.is_floating_point() and base_layer.dim() == 2:
            return DenseSource(base_layer)
        return None
    if not isinstance(base_layer, nn.Module):
        raise TypeError(f"base_layer must be a torch.nn.Module or a Tensor; got {type(base_layer).__name__}")
    name = _forward_only_name(base_layer)
    if name is not None:
        raise forward_only_error(name)
    if "bitsandbytes" in sys.modules:
        import bitsandbytes as bnb

        if isinstance(base_layer, bnb.nn.Linear4bit):
            return Bnb4bitSource(base_layer)
        if isinstance(base_layer, bnb.nn.Linear8bitLt):
            return Bnb8bitSource(base_layer)
    if "hqq" in sys.modules:
        from hqq.core.quantize import HQQLinear

        if isinstance(base_layer, HQQLinear):
            return HqqSource(base_layer)
    weight = getattr(base_layer, "weight", None)
    if is_torchao_weight(weight):
        return TorchaoSource(weight)
    if isinstance(base_layer, nn.Linear) and isinstance(weight, Tensor) and weight.is_floating_point():
        return DenseSource(weight)
    return None


def chunk_rows(source: WeightSource, r: int, chunk_blocks: int) -> int:
    """Rows per chunk for bat over ``source``: ``chunk_blocks`` out-blocks of r rows, rounded up to a multiple
    of the source's ``row_align``; all N rows when the source dequantises only whole."""
    n = source.shape[0]
    if source.whole:
        return n
    step = math.lcm(r, source.row_align)
    return min(n, max(step, -(-chunk_blocks * r // step) * step))
