"""Every tile set the Triton kernels ship with, per architecture family, dtype family and (for bat) r class.

One encoding: a :class:`Tile` (block sizes, warps, pipeline stages) whose canonical name spells it, e.g.
"m128n64k64w8s3" (block_m 128, block_n 64, block_k 64, 8 warps, 3 stages) or "n32k32w4s1" for a kernel without a
token dimension. :mod:`configs` builds every candidate and default config from the tables here; ``resources.py``
compiles every shipped tile set for sm_80, sm_90 and sm_100 and ``profiles/resources/`` keeps the figures (none
spills). Importing this module does not import triton.

Families (the keys of the tables):

- architecture (:func:`arch_of`): "sm90" (Hopper, datacenter Blackwell: 227 KiB shared memory), "sm80" (Ampere,
  Ada and other GPUs with less shared memory; every "sm80" set needs at most 99 KiB) or "interpreter" (CPU tensors
  through TRITON_INTERPRET=1, the tests: every op costs the same whatever its size, warps and stages are ignored);
- dtype (:func:`dtype_family`): "half" (fp16/bf16 inputs: tensor-core GEMMs) or "fp32" (fp32 and fp64 inputs);
- bat's r class (:func:`bat_r_class`), by R = r rounded up to a power of two: "small" (R < 16: W' formed by a
  broadcast multiply-sum), "r16", "r32", "r64", "r128+".
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
from dataclasses import dataclass

import torch

# ----------------------------------------------------------------------------------------------------------
# The tile encoding
# ----------------------------------------------------------------------------------------------------------

_DIMS = (("m", "block_m"), ("n", "block_n"), ("k", "block_k"))
_NAME = re.compile(r"(?:m(\d+))?(?:n(\d+))?(?:k(\d+))?w(\d+)s(\d+)")


@dataclass(frozen=True)
class Tile:
    """The tile shape and launch options of one kernel launch.

    Attributes:
        block_m, block_n, block_k: lanes per program along tokens (M), W's rows (N) and W's columns (K); None
            where the kernel has no such tile dimension (bat's W' build has no block_m; bone's T and dblock
            kernels have no block_k). What each kernel tiles with them is said where its config is defined
            (:mod:`configs`).
        num_warps, num_stages: Triton launch options (warps per program, software-pipeline stages).
    """

    block_m: int | None
    block_n: int | None
    block_k: int | None
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        """The canonical name, e.g. "m128n64k64w8s3"; absent dimensions are left out ("n32k32w4s1")."""
        dims = "".join(f"{letter}{getattr(self, key)}" for letter, key in _DIMS if getattr(self, key) is not None)
        return f"{dims}w{self.num_warps}s{self.num_stages}"

    @staticmethod
    @functools.cache
    def parse(name: str) -> Tile:
        """The tile a canonical name spells (the inverse of :attr:`name`)."""
        match = _NAME.fullmatch(name)
        if match is None:
            raise ValueError(f"a tile name looks like 'm128n64k64w8s3' (m, n, k optional); got {name!r}")
        m, n, k, warps, stages = (None if g is None else int(g) for g in match.groups())
        return Tile(m, n, k, warps, stages)

    def to_dict(self) -> dict[str, int]:
        """The tile's entries of a JSON config: the present block sizes, then num_warps and num_stages."""
        out = {key: getattr(self, key) for _, key in _DIMS if getattr(self, key) is not None}
        return {**out, "num_warps": self.num_warps, "num_stages": self.num_stages}


@dataclass(frozen=True)
class GemmTile(Tile):
    """A GEMM kernel's :class:`Tile` with its program order: ``group_m`` row tiles share each column tile of the
    second operand in L2. Not part of the name (a launch order, not a tile shape; every shipped config uses 8)."""

    group_m: int = 8

    @staticmethod
    def of(tile: Tile, group_m: int = 8) -> GemmTile:
        return GemmTile(tile.block_m, tile.block_n, tile.block_k, tile.num_warps, tile.num_stages, group_m)

    def to_dict(self) -> dict[str, int]:
        return {**super().to_dict(), "group_m": self.group_m}


def tiles(*names: str) -> tuple[Tile, ...]:
    """:meth:`Tile.parse` of each name (how the tables below are written)."""
    return tuple(Tile.parse(name) for name in names)


# ----------------------------------------------------------------------------------------------------------
# Families
# ----------------------------------------------------------------------------------------------------------

SHIPPED_ARCHS: tuple[str, ...] = ("sm80", "sm90")
"""The architecture families with shipped GPU tables. "sm90" also serves datacenter Blackwell (sm_100), so its
tables are compiled for both sm_90 and sm_100 (``resources.FAMILY``)."""


def arch_of(device: torch.device) -> str:
    """The architecture family for ``device``: "sm90" (Hopper, datacenter Blackwell), "sm80" (Ampere, Ada and other
    GPUs with less shared memory) or "interpreter" (CPU tensors through TRITON_INTERPRET=1)."""
    if device.type != "cuda":
        return "interpreter"
    major, _ = torch.cuda.get_device_capability(device)
    return "sm90" if major in (9, 10) else "sm80"


def dtype_family(dtype: torch.dtype) -> str:
    """ "half" for fp16/bf16 inputs (tensor-core GEMM), "fp32" for fp32 and fp64."""
    return "half" if dtype in (torch.float16, torch.bfloat16) else "fp32"


def triton_version(text: str | None = None) -> tuple[int, int]:
    """(major, minor) of ``text`` or of the installed Triton, read from the package metadata (importing triton is
    not needed); (999, 0) when Triton is not installed (then no table entry is ever launched)."""
    if text is None:
        try:
            text = importlib.metadata.version("triton")
        except importlib.metadata.PackageNotFoundError:
            return (999, 0)
    match = re.match(r"(\d+)\.(\d+)", text)
    if match is None:
        raise ValueError(f"triton version: expected 'major.minor[...]'; got {text!r}")
    return int(match.group(1)), int(match.group(2))


TRITON_VERSION: tuple[int, int] = triton_version()
"""The installed Triton's (major, minor). The tables below differ by Triton version only where a release cannot
compile a shipped config; each such difference is written next to the entry it changes."""

# ----------------------------------------------------------------------------------------------------------
# bone / mini (bone.py)
# ----------------------------------------------------------------------------------------------------------

BONE_FORWARD_STRATEGIES: tuple[str, ...] = ("group", "chunk", "two_pass")
"""The bone/mini forward strategies (bone.py's module docstring); which r each serves: ``configs``."""

_ALL = BONE_FORWARD_STRATEGIES
_TWO_PASS = ("two_pass",)


def sm90_half_strategies(version: tuple[int, int] | None = None) -> tuple[str, ...]:
    """The forward strategies the Hopper (and datacenter Blackwell) half-precision tile sets offer under Triton
    ``version`` (default: the installed one): all three from 3.7; without "chunk" before it. Triton 3.6's
    software pipeliner cannot compile "chunk" on sm_90 with any num_stages > 1 ("operand #0 does not dominate
    this use" in TritonGPUPipeline): the fp32 S @ D wgmma after the inner loop over groups (instruction shape
    k = 8) and that loop's half-precision x @ W^T wgmma (k = 16) share one accumulator, so the inner loop carries it
    in the S @ D layout with a layout conversion around the pipelined dot, which 3.6 cannot pipeline. The kernel
    changes that avoid the conversion spill or reach 255 registers (docs/testing-without-gpu.md, section 7). Under
    3.6, r = 128 (the r that chose "chunk") runs "two_pass" by default, r <= 64 "group" as on 3.7."""
    return _ALL if (version or TRITON_VERSION) >= (3, 7) else ("group", "two_pass")


def _offer(strategies: tuple[str, ...], *names: str) -> tuple[tuple[Tile, tuple[str, ...]], ...]:
    """(tile, the forward strategies offered on it) for each tile name."""
    return tuple((tile, strategies) for tile in tiles(*names))


BONE_GEMM: dict[tuple[str, str], tuple[tuple[Tile, tuple[str, ...]], ...]] = {
    # Hopper, half precision: 8 warps = two warpgroups on a 128 x 128 wgmma tile, 64-wide K steps; the 64-row
    # sets give small problems (few tokens) more programs.
    ("sm90", "half"): _offer(sm90_half_strategies(), "m128n128k64w8s3", "m64n128k64w4s4", "m64n64k64w4s3"),
    # Ampere, half precision: mma.sync keeps operands and accumulator in registers; 32-wide K steps keep the fused
    # S sums and the chunk strategy's (block_m, block_k) fp32 accumulator spill-free.
    ("sm80", "half"): _offer(_ALL, "m128n128k32w8s4", "m64n128k32w4s4", "m128n64k32w4s4"),
    # fp32 inputs: with allow_tf32 off, fp32 tl.dot runs on the FMA units ("ieee") with both operand tiles in
    # registers, so small tiles, and "two_pass" only: the fused sums take the FMA kernel to 255 registers.
    ("sm90", "fp32"): _offer(_TWO_PASS, "m64n64k32w8s3", "m32n64k32w4s3"),
    ("sm80", "fp32"): _offer(_TWO_PASS, "m64n64k32w8s3", "m32n64k32w4s3"),
    # CPU tensors through the Triton interpreter (tests).
    ("interpreter", "half"): _offer(_ALL, "m32n32k32w4s1"),
    ("interpreter", "fp32"): _offer(_ALL, "m32n32k32w4s1"),
}
"""Per (architecture family, dtype family): the bone/mini GEMM tile sets, default first, each with the forward
strategies offered on it. Every set offers "two_pass", so every r is served. The forward GEMM runs each set as it
is; the backward's dx GEMM (M x K output, reduction over N) uses every set of the family with its block_n as dx's
column width and its block_k as the reduction step (``configs.bone_dx_tile``)."""

BONE_ADAPTER: dict[tuple[str, str], Tile] = {
    ("sm90", "half"): Tile.parse("m64n64w4s3"),
    ("sm80", "half"): Tile.parse("m64n64w4s3"),
    # fp32: 32-wide tiles, as the one-hot fold runs on the FMA units.
    ("sm90", "fp32"): Tile.parse("m32n32w4s3"),
    ("sm80", "fp32"): Tile.parse("m32n32w4s3"),
    ("interpreter", "half"): Tile.parse("m32n32w4s1"),
    ("interpreter", "fp32"): Tile.parse("m32n32w4s1"),
}
"""Token tile (block_m), reduction tile (block_n), warps and stages of the backward's small kernels: T = dY D^T
(reduction over N) and dblock = S^T dY (block_n: the one-hot fold's dY tile width). Not tuned: each is a few
percent of the backward's work. T runs with at most :data:`BONE_T_MAX_STAGES` stages."""

BONE_T_MAX_STAGES = 2
"""Pipeline stages of the T kernel: 3 spill a few bytes on sm_80."""


def bone_adapter_block(width: int) -> int:
    """Tile width over r (T, dblock) or C (dblock): 16 for widths up to 16, else 64 (masked past the width)."""
    return 16 if width <= 16 else 64


@dataclass(frozen=True)
class GroupSumTiles:
    """Launch of the "two_pass" group-sum kernel (a bandwidth-bound pass over x, not tuned).

    Attributes:
        onehot: sum through a 0/1 matrix on the tensor cores (r < 16) instead of looping over the groups.
        block_m, block_r, block_k: tokens, S columns and (one-hot only) x columns per program.
        num_warps, num_stages: launch options.
    """

    onehot: bool
    block_m: int
    block_r: int
    block_k: int
    num_warps: int
    num_stages: int


def bone_group_sum_tiles(r: int, family: str) -> GroupSumTiles:
    """One-hot fold for r < 16 (tensor cores for half inputs; 32-wide tiles for fp32, whose exact "ieee" one-hot
    dot runs on the FMA units), else one program per (64 rows, 64 group columns)."""
    if r < 16:
        width = 32 if family == "fp32" else 64
        return GroupSumTiles(onehot=True, block_m=width, block_r=16, block_k=width, num_warps=4, num_stages=2)
    return GroupSumTiles(onehot=False, block_m=64, block_r=64, block_k=16, num_warps=4, num_stages=2)


BONE_SUM_SPLITS = Tile.parse("n1024w4s1")
"""The kernel that sums dblock's per-split partials, viewed as (splits, r * C): block_n = 1024 elements per
program."""

# ----------------------------------------------------------------------------------------------------------
# the adapter term alone (adapter.py)
# ----------------------------------------------------------------------------------------------------------

ADAPTER_DELTA: dict[tuple[str, str], tuple[Tile, ...]] = {
    # delta = S D (M, N): a write-bound kernel (r MACs per written element); wide n tiles for long stores.
    ("sm90", "half"): tiles("m64n128w4s1", "m128n128w8s1"),
    ("sm80", "half"): tiles("m64n128w4s1", "m128n128w8s1"),
    ("sm90", "fp32"): tiles("m64n64w4s1", "m32n128w4s1"),
    ("sm80", "fp32"): tiles("m64n64w4s1", "m32n128w4s1"),
    ("interpreter", "half"): tiles("m32n32w4s1"),
    ("interpreter", "fp32"): tiles("m32n32w4s1"),
}
"""Per (architecture family, dtype family): the tile sets of the adapter forward's delta = S D kernel, default first
(block_m tokens x block_n output columns; the r reduction runs in :func:`bone_adapter_block` (r)-wide steps)."""

ADAPTER_DX: dict[str, Tile] = {
    "sm90": Tile.parse("m16k256w4s1"),
    "sm80": Tile.parse("m16k256w4s1"),
    "interpreter": Tile.parse("m16k32w4s1"),
}
"""Per architecture family: the adapter backward's dx kernel (dx[m, k] = T[m, k % r] * keep / (1 - p), element-wise:
block_m rows x block_k columns per program)."""

# ----------------------------------------------------------------------------------------------------------
# bat (bat.py)
# ----------------------------------------------------------------------------------------------------------
#
# block_n / block_k count lanes of W's rows / columns; the kernels fit them to r (bat.py, "Tilings"), so one tile
# set is valid for every r, and the tables pick, per r class, the sets that compile without register spills.


@dataclass(frozen=True)
class BatTiles:
    """The bat tile sets of one (architecture, dtype family, r class).

    Attributes:
        fwd: the fused forward GEMM's tile sets, default first (each also names a "materialize" candidate, whose
            GEMM is cuBLAS).
        dx: the same for dx = dY W' (block_n: its reduction step over N, block_k: its output column width).
        build: the W' build kernel's (no block_m).
        dblock: the dB kernel's (block_m: its step over the tokens).
    """

    fwd: tuple[Tile, ...]
    dx: tuple[Tile, ...]
    build: Tile
    dblock: Tile


def _bat(fwd: tuple[str, ...], dx: tuple[str, ...], build: str, dblock: str) -> BatTiles:
    return BatTiles(tiles(*fwd), tiles(*dx), Tile.parse(build), Tile.parse(dblock))


BAT_R_CLASSES: tuple[str, ...] = ("small", "r16", "r32", "r64", "r128+")
"""r classes by R (r rounded up to a power of two): < 16, 16, 32, 64, >= 128. Each gets its own tile sets."""

BAT_HALF: dict[tuple[str, str], BatTiles] = {
    # Hopper (sm_90, 227 KiB shared memory).
    ("sm90", "small"): _bat(("m64n32k32w8s2",), ("m64n32k32w8s2",), "n32k32w4s1", "m64n32k32w8s2"),
    ("sm90", "r16"): _bat(
        ("m128n64k64w8s3", "m64n64k64w4s3"), ("m128n64k64w8s3", "m64n64k64w4s3"), "n32k64w8s1", "m64n64k64w4s3"
    ),
    ("sm90", "r32"): _bat(("m128n32k32w4s3", "m128n64k64w8s3"), ("m128n32k32w4s3",), "n32k32w8s1", "m64n64k64w8s3"),
    ("sm90", "r64"): _bat(
        ("m128n64k64w8s3", "m64n64k64w4s3"), ("m128n64k64w8s3", "m64n64k64w4s3"), "n32k64w8s1", "m128n64k64w8s3"
    ),
    # dB with 2 stages: with 3, r = 128 spills 24 B on sm_100 (ptxas-blackwell holds it to 128 registers).
    ("sm90", "r128+"): _bat(
        ("m128n128k64w8s3", "m64n64k64w4s3"), ("m128n64k64w8s3", "m64n64k64w4s3"), "n32k64w8s1", "m64n64k64w8s2"
    ),
    # Ampere / Ada (sm_80: 163 KiB shared memory; sm_86, sm_89: 99 KiB; every set below needs at most 99 KiB).
    ("sm80", "small"): _bat(("m64n32k32w8s2",), ("m64n32k32w8s2",), "n32k32w4s1", "m64n32k32w8s2"),
    ("sm80", "r16"): _bat(("m128n64k64w8s3", "m64n64k64w4s3"), ("m64n64k64w4s3",), "n32k64w8s1", "m64n64k64w4s3"),
    ("sm80", "r32"): _bat(("m128n32k32w4s3",), ("m128n32k32w4s3",), "n32k32w8s1", "m64n64k64w8s3"),
    ("sm80", "r64"): _bat(("m128n64k32w4s3", "m64n64k64w4s3"), ("m128n64k64w8s3",), "n32k64w8s1", "m128n64k64w8s3"),
    ("sm80", "r128+"): _bat(("m64n64k64w4s3",), ("m128n64k64w8s3",), "n32k64w8s1", "m64n64k64w8s3"),
}
"""Per (architecture family, r class): the bat tile sets for fp16/bf16 inputs."""

BAT_FP32: dict[str, BatTiles] = {
    # fp32 operands take twice the registers and shared memory, and the default formation precision "tf32x3"
    # (torch's allow_tf32 is False by default) three times the formation product's: smaller tiles.
    "small": _bat(("m64n16k32w8s2",), ("m64n16k32w8s2",), "n32k32w4s1", "m64n32k32w8s2"),
    # dB with 2 stages: with 3 (m64n64k32w4s3), Triton 3.6 spills 8 B on sm_90 (3.7 does not).
    "r16": _bat(("m64n32k32w4s3",), ("m64n32k32w4s3",), "n32k64w4s1", "m64n64k32w4s2"),
    # 8 warps: with 4, the (R, BK) and (BN, BK) B tiles the r = 32 forward keeps in registers spill.
    "r32": _bat(("m64n32k32w8s3",), ("m64n32k32w8s3",), "n32k32w4s1", "m64n32k32w4s3"),
    "r64": _bat(("m64n32k32w4s3",), ("m64n32k32w4s3",), "n32k64w4s1", "m64n64k32w4s3"),
    "r128+": _bat(("m64n32k32w4s3",), ("m64n32k32w4s3",), "n32k64w4s1", "m64n32k32w8s3"),
}
"""Per r class: the bat tile sets for fp32 (and fp64) inputs, the same on every GPU."""

BAT_INTERPRETER: dict[str, BatTiles] = {
    # CPU tensors through the Triton interpreter (tests): tiles as large as the block allows.
    "small": _bat(("m32n32k32w4s1",), ("m32n32k32w4s1",), "n32k32w4s1", "m32n32k32w4s1"),
    "r16": _bat(("m32n32k32w4s1",), ("m32n32k32w4s1",), "n32k32w4s1", "m32n32k32w4s1"),
    "r32": _bat(("m32n32k32w4s1",), ("m32n32k32w4s1",), "n32k32w4s1", "m32n32k32w4s1"),
    "r64": _bat(("m32n64k64w4s1",), ("m32n64k64w4s1",), "n64k64w4s1", "m32n64k64w4s1"),
    "r128+": _bat(("m32n128k128w4s1",), ("m32n128k128w4s1",), "n128k128w4s1", "m32n128k128w4s1"),
}
"""Per r class: the bat tile sets under the interpreter, for every dtype."""

BAT_GEMM: dict[tuple[str, str], Tile] = {
    ("sm90", "half"): Tile.parse("m128n128k64w8s3"),
    ("sm80", "half"): Tile.parse("m128n128k64w8s3"),
    ("sm90", "fp32"): Tile.parse("m128n128k32w8s2"),
    ("sm80", "fp32"): Tile.parse("m128n128k32w8s2"),
    ("interpreter", "half"): Tile.parse("m32n32k32w4s1"),
    ("interpreter", "fp32"): Tile.parse("m32n32k32w4s1"),
}
"""Per (architecture family, dtype family): the plain Triton GEMM after a W' build (gemm "triton"), for every r."""


BAT_PACKED: dict[str, Tile] = {
    "build": Tile.parse("w4s1"),
    "dblock": Tile.parse("w4s1"),
}
"""Warps and stages of bat's packed-weight kernels (bat_packed.py), whose tile is one r x r block (padded to a power
of two >= 16): the W'_c build (one block a program, nothing to pipeline) and the dB products (a loop over K / r
blocks). Not tuned: next to the chunk's two cuBLAS GEMMs each is a few percent of the work."""


def bat_padded_r(r: int) -> int:
    """R: block size ``r`` rounded up to a power of two, the lanes one r-block takes in a bat tile."""
    return 1 << (r - 1).bit_length()


def bat_r_class(r: int) -> str:
    """The :data:`BAT_R_CLASSES` entry of block size ``r``."""
    rp = bat_padded_r(r)
    if rp < 16:
        return "small"
    return {16: "r16", 32: "r32", 64: "r64"}.get(rp, "r128+")


def bat_tiles(arch: str, dtype: torch.dtype, r: int) -> BatTiles:
    """The bat tile sets for architecture family ``arch``, inputs of ``dtype`` and block size ``r``."""
    r_class = bat_r_class(r)
    if arch == "interpreter":
        return BAT_INTERPRETER[r_class]
    if dtype_family(dtype) == "half":
        return BAT_HALF[(arch, r_class)]
    return BAT_FP32[r_class]


def bat_gemm_tile(arch: str, dtype: torch.dtype) -> Tile:
    """The plain Triton GEMM's tile set (gemm "triton") for ``arch`` and inputs of ``dtype``."""
    return BAT_GEMM[(arch, dtype_family(dtype))]
