"""The Triton configs: one typed, frozen dataclass per op, its JSON dict form, and every candidate and default.

A config reaches the backend as a JSON-serialisable dict (what the autotune cache and profiles store, what
:meth:`TritonBackend.configs` yields); :func:`prepare` parses and validates it ONCE per decision into the op's
dataclass, which the kernel modules take. ``from_dict`` / ``to_dict`` convert between the two forms, exactly:
``X.from_dict(c.to_dict()) == c``. Tile sets come from :mod:`tiles`, the one table of shipped tiles.

Dict forms (block sizes are powers of two >= 16, ``num_warps`` a power of two, every count an int >= 1;
"tiles" is an optional label naming the tile set a config came from, for logs and the resource baseline; the
kernels do not read it):

- bone forward: {"strategy", "block_m", "block_n", "block_k", "num_warps", "num_stages", "group_m", "tiles"};
- bone backward: {"dx": {GEMM tile}, "t": {...}, "dblock": {...}, "tiles"}, one dict per kernel:
    dx     {"block_m", "block_n" (reduction step over N), "block_k" (dx columns), "num_warps", "num_stages",
           "group_m"}
    t      {"block_m", "block_n", "num_warps", "num_stages", "block_r", "split_n"}             T = dY D^T
    dblock {"block_m", "block_n", "num_warps", "num_stages", "block_r", "block_c", "split_m"}  dD = S^T dY
- bat forward: {"strategy", "form_precision", "gemm", GEMM tile entries, "build": {...}, "tiles"}: the tile serves
  the fused kernel (strategy "fused") or the Triton GEMM after the W' build ("materialize" with gemm "triton");
  "build" is the W' build kernel's tile (no block_m);
- bat backward: {"strategy", "form_precision", "gemm", "dx": {GEMM tile}, "build": {...}, "dblock": {GEMM tile,
  "split_k", "reduce", "precision"}, "tiles"}; dx's block_n is its reduction step over N, its block_k the width of
  its output columns. bat's block_n / block_k count lanes of W's rows / columns that the kernels fit to r;
- adapter forward: {"block_m", "block_n", "num_warps", "num_stages", "block_r", "tiles"}: the delta = S D kernel;
- adapter backward: {"dx": {"block_m", "block_k", "num_warps", "num_stages"}, "t": {...}, "dblock": {...}, "tiles"}:
  the element-wise dx kernel, and T / dblock as in bone backward.

Bad dicts raise ValueError naming the entry (TypeError when the config is not a dict at all). bone and adapter
configs must be complete; a bat config may leave entries out, which :func:`prepare` takes from the problem's default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from ..base import Config, OpProblem
from .common import sm_count
from .tiles import (
    ADAPTER_DELTA,
    ADAPTER_DX,
    BAT_R_CLASSES,
    BONE_ADAPTER,
    BONE_FORWARD_STRATEGIES,
    BONE_GEMM,
    BONE_T_MAX_STAGES,
    GemmTile,
    Tile,
    arch_of,
    bat_gemm_tile,
    bat_tiles,
    bone_adapter_block,
    dtype_family,
)

__all__ = [
    "BAT_R_CLASSES",
    "AdapterBackwardConfig",
    "AdapterForwardConfig",
    "BatBackwardConfig",
    "BatDblockConfig",
    "BatForwardConfig",
    "BoneBackwardConfig",
    "BoneDblockConfig",
    "BoneForwardConfig",
    "BoneTConfig",
    "TritonConfig",
    "candidate_configs",
    "candidates",
    "default_config",
    "prepare",
]


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints."""
    return -(-a // b)


# ----------------------------------------------------------------------------------------------------------
# Reading JSON dicts: every check names the entry it rejects.
# ----------------------------------------------------------------------------------------------------------


def _is_pow2(v: int) -> bool:
    return v >= 1 and v & (v - 1) == 0


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Reader:
    """One JSON dict of a config, read entry by entry; ``where`` (e.g. "Triton bone backward config['t']") names
    the dict in every error."""

    def __init__(self, where: str, config: Any, keys: tuple[str, ...], nested: bool = True):
        if not isinstance(config, dict):
            if nested:
                raise ValueError(f"{where} must be a dict; got {config!r}")
            raise TypeError(f"{where} must be a dict; got {type(config).__name__}")
        unknown = sorted(set(config) - set(keys))
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; known keys are {sorted(keys)}")
        self.where, self.config = where, config

    def get(self, key: str) -> Any:
        if key not in self.config:
            raise ValueError(f"{self.where}: missing {key!r}; got keys {sorted(self.config)}")
        return self.config[key]

    def block(self, key: str) -> int:
        """A tile size: a power of two >= 16 (``tl.dot``'s smallest inner size)."""
        value = self.get(key)
        if not _is_int(value) or not _is_pow2(value) or value < 16:
            raise ValueError(f"{self.where}[{key!r}] must be a power of two >= 16; got {value!r}")
        return value

    def count(self, key: str, minimum: int = 1, why: str = "") -> int:
        value = self.get(key)
        if not _is_int(value) or value < minimum:
            raise ValueError(f"{self.where}[{key!r}] must be an int >= {minimum}{why}; got {value!r}")
        return value

    def choice(self, key: str, allowed: tuple[str, ...]) -> str:
        value = self.get(key)
        if value not in allowed:
            raise ValueError(f"{self.where}[{key!r}] must be one of {allowed}; got {value!r}")
        return value

    def label(self) -> str | None:
        value = self.config.get("tiles")
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{self.where}['tiles'] must be a tile set's name (a string); got {value!r}")
        return value

    def tile(self, dims: str = "mnk") -> Tile:
        """The :class:`Tile` of the block sizes ``dims`` ("mnk", "mn" or "nk"), warps and stages."""
        sizes = {d: self.block(f"block_{d}") if d in dims else None for d in "mnk"}
        warps = self.count("num_warps")
        if not _is_pow2(warps):
            raise ValueError(f"{self.where}['num_warps'] must be a power of two; got {warps}")
        return Tile(sizes["m"], sizes["n"], sizes["k"], warps, self.count("num_stages"))

    def gemm_tile(self) -> GemmTile:
        return GemmTile.of(self.tile(), self.count("group_m"))

    def sub(self, key: str, keys: tuple[str, ...]) -> _Reader:
        return _Reader(f"{self.where}[{key!r}]", self.config.get(key), keys)


_TILE = ("num_warps", "num_stages")
_GEMM = ("block_m", "block_n", "block_k", *_TILE, "group_m")
_LABEL = ("tiles",)


def _with_label(out: Config, label: str | None) -> Config:
    return out if label is None else {**out, "tiles": label}


# ----------------------------------------------------------------------------------------------------------
# bone / mini (bone.py)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BoneForwardConfig:
    """bone/mini forward: y = x W^T + b + S D with ``strategy`` (bone.py's module docstring) on GEMM ``tile``
    (block_m x block_n output tile, block_k-wide K steps). ``label``: the dict's "tiles" entry."""

    strategy: str
    tile: GemmTile
    label: str | None = None

    OP: ClassVar[str] = "bone_forward"
    WHERE: ClassVar[str] = "Triton bone forward config"

    def to_dict(self) -> Config:
        return _with_label({"strategy": self.strategy, **self.tile.to_dict()}, self.label)

    @staticmethod
    def from_dict(config: Config) -> BoneForwardConfig:
        read = _Reader(BoneForwardConfig.WHERE, config, ("strategy", *_GEMM, *_LABEL), nested=False)
        return BoneForwardConfig(read.choice("strategy", BONE_FORWARD_STRATEGIES), read.gemm_tile(), read.label())


@dataclass(frozen=True)
class BoneTConfig:
    """The T = dY D^T kernel (M, r) of bone backward: ``tile`` block_m tokens x block_n columns of N per step,
    ``block_r`` columns of T per program, N cut into ``split_n`` partial sums (added in a fixed order)."""

    tile: Tile
    block_r: int
    split_n: int

    def to_dict(self) -> Config:
        return {**self.tile.to_dict(), "block_r": self.block_r, "split_n": self.split_n}

    @staticmethod
    def read(read: _Reader) -> BoneTConfig:
        return BoneTConfig(read.tile("mn"), read.block("block_r"), read.count("split_n"))


@dataclass(frozen=True)
class BoneDblockConfig:
    """The dblock = S^T dY kernel (r, C) of bone backward: ``tile`` block_m tokens per step (block_n: the one-hot
    fold's dY tile width), ``block_r`` x ``block_c`` outputs per program, M cut into ``split_m`` partials."""

    tile: Tile
    block_r: int
    block_c: int
    split_m: int

    def to_dict(self) -> Config:
        return {**self.tile.to_dict(), "block_r": self.block_r, "block_c": self.block_c, "split_m": self.split_m}

    @staticmethod
    def read(read: _Reader) -> BoneDblockConfig:
        return BoneDblockConfig(read.tile("mn"), read.block("block_r"), read.block("block_c"), read.count("split_m"))


@dataclass(frozen=True)
class BoneBackwardConfig:
    """bone/mini backward: the dx GEMM's tile (block_m x block_k output tile of dx (M, K), block_n-wide steps
    over N), the T kernel and the dblock kernel. ``label``: the GEMM tile set the dx tile came from."""

    dx: GemmTile
    t: BoneTConfig
    dblock: BoneDblockConfig
    label: str | None = None

    OP: ClassVar[str] = "bone_backward"
    WHERE: ClassVar[str] = "Triton bone backward config"

    def to_dict(self) -> Config:
        parts = {"dx": self.dx.to_dict(), "t": self.t.to_dict(), "dblock": self.dblock.to_dict()}
        return _with_label(parts, self.label)

    @staticmethod
    def from_dict(config: Config) -> BoneBackwardConfig:
        read = _Reader(BoneBackwardConfig.WHERE, config, ("dx", "t", "dblock", *_LABEL), nested=False)
        return BoneBackwardConfig(
            read.sub("dx", _GEMM).gemm_tile(),
            BoneTConfig.read(read.sub("t", ("block_m", "block_n", *_TILE, "block_r", "split_n"))),
            BoneDblockConfig.read(read.sub("dblock", ("block_m", "block_n", *_TILE, "block_r", "block_c", "split_m"))),
            read.label(),
        )


def forward_strategy_serves(strategy: str, r: int, block_k: int) -> bool:
    """Whether bone forward ``strategy`` computes the right answer for block size ``r`` with this ``block_k``.

    "group" needs r a power of two with r <= block_k (the x tile is reshaped into r-wide groups); "chunk" works
    for any r but wastes lanes when r < 16, so it is offered for r >= 16 only; "two_pass" serves every r.
    """
    if strategy == "group":
        return _is_pow2(r) and r <= block_k
    if strategy == "chunk":
        return r >= 16
    return strategy == "two_pass"


def default_forward_strategy(r: int, block_k: int) -> str:
    """The fused "group" path for power-of-two r <= block_k, fused "chunk" when block_k divides r (no masked
    lanes), else "two_pass" (awkward r: one cheap extra pass over x beats wasted tensor-core lanes)."""
    if forward_strategy_serves("group", r, block_k):
        return "group"
    if r % block_k == 0:
        return "chunk"
    return "two_pass"


def _bone_gemm_tiles(problem: OpProblem, arch: str) -> list[tuple[Tile, tuple[str, ...]]]:
    """The (tile set, offered strategies) entries for ``problem``, default first: the family's order, except that
    few tokens (M <= 64) put the tile sets with block_m <= 64 first (a 128-row tile would be mostly masked)."""
    entries = list(BONE_GEMM[(arch, dtype_family(problem.dtype))])
    if problem.m <= 64:
        entries.sort(key=lambda entry: entry[0].block_m > 64)
    return entries


def bone_forward_candidates(problem: OpProblem, arch: str) -> list[BoneForwardConfig]:
    """Every shipped tile set of the family with every strategy it offers that serves r, default first; on each
    tile set the :func:`default_forward_strategy` comes first when offered."""
    out = []
    for tile, offered in _bone_gemm_tiles(problem, arch):
        first = default_forward_strategy(problem.r, tile.block_k)
        for strategy in sorted(offered, key=lambda s: s != first):
            if forward_strategy_serves(strategy, problem.r, tile.block_k):
                out.append(BoneForwardConfig(strategy, GemmTile.of(tile), tile.name))
    return out


def bone_dx_tile(tile: Tile) -> GemmTile:
    """dx (M, K) is a GEMM with N as its reduction: the tile set's block_n becomes dx's column width block_k, its
    block_k dx's step over N."""
    return GemmTile(tile.block_m, tile.block_k, tile.block_n, tile.num_warps, tile.num_stages)


def bone_small_configs(problem: OpProblem, arch: str) -> tuple[BoneTConfig, BoneDblockConfig]:
    """The T and dblock kernels' configs (bone backward and the adapter backward): split counts that fill about two
    waves of the GPU (one split on the interpreter)."""
    small = BONE_ADAPTER[(arch, dtype_family(problem.dtype))]
    block_r = bone_adapter_block(problem.r)
    block_c = bone_adapter_block(problem.block_cols)
    target = 2 * sm_count(problem.device)
    t_programs = cdiv(problem.m, small.block_m) * cdiv(problem.r, block_r)
    t_split = max(1, min(cdiv(target, t_programs), cdiv(problem.n, 4 * small.block_n)))
    d_programs = cdiv(problem.r, block_r) * cdiv(problem.block_cols, block_c)
    d_split = max(1, min(cdiv(target, d_programs), cdiv(problem.m, 4 * small.block_m)))
    t = BoneTConfig(dataclasses.replace(small, num_stages=min(BONE_T_MAX_STAGES, small.num_stages)), block_r, t_split)
    dblock = BoneDblockConfig(small, block_r, block_c, d_split)
    return t, dblock


def bone_backward_candidates(problem: OpProblem, arch: str) -> list[BoneBackwardConfig]:
    """The dx GEMM takes each shipped tile set, default first; T and dblock as :func:`bone_small_configs`."""
    t, dblock = bone_small_configs(problem, arch)
    return [BoneBackwardConfig(bone_dx_tile(tile), t, dblock, tile.name) for tile, _ in _bone_gemm_tiles(problem, arch)]


# ----------------------------------------------------------------------------------------------------------
# the adapter term alone (adapter.py)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterForwardConfig:
    """Adapter forward: the delta = S D kernel's ``tile`` (block_m x block_n of delta (M, N)) and ``block_r``, its
    step over r. The group sum before it is not tuned (``tiles.bone_group_sum_tiles``). ``label``: "tiles"."""

    tile: Tile
    block_r: int
    label: str | None = None

    OP: ClassVar[str] = "adapter_forward"
    WHERE: ClassVar[str] = "Triton adapter forward config"

    def to_dict(self) -> Config:
        return _with_label({**self.tile.to_dict(), "block_r": self.block_r}, self.label)

    @staticmethod
    def from_dict(config: Config) -> AdapterForwardConfig:
        keys = ("block_m", "block_n", *_TILE, "block_r", *_LABEL)
        read = _Reader(AdapterForwardConfig.WHERE, config, keys, nested=False)
        return AdapterForwardConfig(read.tile("mn"), read.block("block_r"), read.label())


@dataclass(frozen=True)
class AdapterBackwardConfig:
    """Adapter backward: the T and dblock kernels (as bone backward's) and the element-wise ``dx`` kernel's tile
    (block_m x block_k of dx (M, K)). ``label``: "tiles"."""

    dx: Tile
    t: BoneTConfig
    dblock: BoneDblockConfig
    label: str | None = None

    OP: ClassVar[str] = "adapter_backward"
    WHERE: ClassVar[str] = "Triton adapter backward config"

    def to_dict(self) -> Config:
        parts = {"dx": self.dx.to_dict(), "t": self.t.to_dict(), "dblock": self.dblock.to_dict()}
        return _with_label(parts, self.label)

    @staticmethod
    def from_dict(config: Config) -> AdapterBackwardConfig:
        read = _Reader(AdapterBackwardConfig.WHERE, config, ("dx", "t", "dblock", *_LABEL), nested=False)
        return AdapterBackwardConfig(
            read.sub("dx", ("block_m", "block_k", *_TILE)).tile("mk"),
            BoneTConfig.read(read.sub("t", ("block_m", "block_n", *_TILE, "block_r", "split_n"))),
            BoneDblockConfig.read(read.sub("dblock", ("block_m", "block_n", *_TILE, "block_r", "block_c", "split_m"))),
            read.label(),
        )


def adapter_forward_candidates(problem: OpProblem, arch: str) -> list[AdapterForwardConfig]:
    """Each shipped delta tile set of the family, default first; r in 16- or 64-wide steps."""
    block_r = bone_adapter_block(problem.r)
    shipped = ADAPTER_DELTA[(arch, dtype_family(problem.dtype))]
    return [AdapterForwardConfig(tile, block_r, tile.name) for tile in shipped]


def adapter_backward_candidates(problem: OpProblem, arch: str) -> list[AdapterBackwardConfig]:
    """One config: the architecture's dx tile and the T / dblock configs of :func:`bone_small_configs`."""
    t, dblock = bone_small_configs(problem, arch)
    dx = ADAPTER_DX[arch]
    return [AdapterBackwardConfig(dx, t, dblock, dx.name)]


# ----------------------------------------------------------------------------------------------------------
# bat (bat.py)
# ----------------------------------------------------------------------------------------------------------

BAT_STRATEGIES: tuple[str, ...] = ("fused", "materialize")
BAT_GEMMS: tuple[str, ...] = ("cublas", "triton")
BAT_FORM_PRECISIONS: tuple[str, ...] = ("matched", "tf32x3", "ieee")
BAT_DB_REDUCES: tuple[str, ...] = ("partials", "atomic")

BAT_FUSED_MAX_M_TILES = 4
"""The default strategy is "fused" while M needs at most this many m-tiles, else "materialize".

A model, not a measurement (no GPU was available when this was written): the fused kernel forms each W' tile
once per m-tile, ``r / block_m`` extra tensor-core MACs (r=64, block_m=128: +50% over the GEMM tile at
half-precision rate); materializing forms W' once but writes and re-reads N x K elements (about two extra passes
over W: ~20 us for 4096 x 4096 bf16 at 3.3 TB/s, the cost of a few m-tiles of formation). The autotuner replaces
this guess per shape."""


@dataclass(frozen=True)
class BatForwardConfig:
    """bat forward: ``strategy`` "fused" (W' formed per tile inside the GEMM on ``tile``) or "materialize" (W' built
    by one kernel on ``build``, then the GEMM ``gemm``: "cublas", or "triton" on ``tile``); ``form_precision`` of
    the W' formation product (bat.py's module docstring). ``label``: the dict's "tiles" entry."""

    strategy: str
    form_precision: str
    gemm: str
    tile: GemmTile
    build: Tile
    label: str | None = None

    OP: ClassVar[str] = "bat_forward"
    WHERE: ClassVar[str] = "Triton bat forward config"

    def to_dict(self) -> Config:
        head = {"strategy": self.strategy, "form_precision": self.form_precision, "gemm": self.gemm}
        return _with_label({**head, **self.tile.to_dict(), "build": self.build.to_dict()}, self.label)

    @staticmethod
    def from_dict(config: Config) -> BatForwardConfig:
        keys = ("strategy", "form_precision", "gemm", *_GEMM, "build", *_LABEL)
        read = _Reader(BatForwardConfig.WHERE, config, keys, nested=False)
        return BatForwardConfig(
            read.choice("strategy", BAT_STRATEGIES),
            read.choice("form_precision", BAT_FORM_PRECISIONS),
            read.choice("gemm", BAT_GEMMS),
            read.gemm_tile(),
            read.sub("build", ("block_n", "block_k", *_TILE)).tile("nk"),
            read.label(),
        )


@dataclass(frozen=True)
class BatDblockConfig:
    """The dB kernel: ``tile`` (block_m tokens per step of G = dY^T x, block_n x block_k lanes of G per program;
    its group_m is carried by the dict form, the kernel does not reorder programs), ``split_k`` K splits (0: enough
    for about two programs per SM), ``reduce`` "partials" (deterministic) or "atomic", ``precision`` of the
    epilogue (W + I)^T G."""

    tile: GemmTile
    split_k: int
    reduce: str
    precision: str

    def to_dict(self) -> Config:
        extra = {"split_k": self.split_k, "reduce": self.reduce, "precision": self.precision}
        return {**self.tile.to_dict(), **extra}

    @staticmethod
    def read(read: _Reader) -> BatDblockConfig:
        return BatDblockConfig(
            read.gemm_tile(),
            read.count("split_k", minimum=0, why=" (0: fill the GPU)"),
            read.choice("reduce", BAT_DB_REDUCES),
            read.choice("precision", BAT_FORM_PRECISIONS),
        )


@dataclass(frozen=True)
class BatBackwardConfig:
    """bat backward: dx = dY W' as bat forward does y (``strategy``, ``form_precision``, ``gemm``, GEMM tile ``dx``,
    ``build``), and the dB kernel (``dblock``). ``label``: the dict's "tiles" entry (the dx tile set)."""

    strategy: str
    form_precision: str
    gemm: str
    dx: GemmTile
    build: Tile
    dblock: BatDblockConfig
    label: str | None = None

    OP: ClassVar[str] = "bat_backward"
    WHERE: ClassVar[str] = "Triton bat backward config"

    def to_dict(self) -> Config:
        head = {"strategy": self.strategy, "form_precision": self.form_precision, "gemm": self.gemm}
        parts = {"dx": self.dx.to_dict(), "build": self.build.to_dict(), "dblock": self.dblock.to_dict()}
        return _with_label({**head, **parts}, self.label)

    @staticmethod
    def from_dict(config: Config) -> BatBackwardConfig:
        keys = ("strategy", "form_precision", "gemm", "dx", "build", "dblock", *_LABEL)
        read = _Reader(BatBackwardConfig.WHERE, config, keys, nested=False)
        return BatBackwardConfig(
            read.choice("strategy", BAT_STRATEGIES),
            read.choice("form_precision", BAT_FORM_PRECISIONS),
            read.choice("gemm", BAT_GEMMS),
            read.sub("dx", _GEMM).gemm_tile(),
            read.sub("build", ("block_n", "block_k", *_TILE)).tile("nk"),
            BatDblockConfig.read(read.sub("dblock", (*_GEMM, "split_k", "reduce", "precision"))),
            read.label(),
        )


def bat_default_strategy(problem: OpProblem, block_m: int) -> str:
    """ "fused" while M spans at most :data:`BAT_FUSED_MAX_M_TILES` m-tiles, else "materialize"."""
    return "fused" if problem.m <= BAT_FUSED_MAX_M_TILES * block_m else "materialize"


def bat_forward_candidates(problem: OpProblem, arch: str) -> list[BatForwardConfig]:
    """Each shipped forward tile set fused and materialized (cuBLAS after the build: NVIDIA's per-shape tuned GEMM,
    the default), default first, plus the materialized path with the Triton GEMM. The formation precision stays at
    its default, "matched" for fused and "tf32x3" for materialize: the autotuner must not trade accuracy for speed
    behind the user's back."""
    sets = bat_tiles(arch, problem.dtype, problem.r)
    out = []
    for tile in sets.fwd:
        fused = BatForwardConfig("fused", "matched", "cublas", GemmTile.of(tile), sets.build, tile.name)
        mat = dataclasses.replace(fused, strategy="materialize", form_precision="tf32x3")
        out += [fused, mat] if bat_default_strategy(problem, tile.block_m) == "fused" else [mat, fused]
    gemm = bat_gemm_tile(arch, problem.dtype)
    out.append(BatForwardConfig("materialize", "tf32x3", "triton", GemmTile.of(gemm), sets.build, gemm.name))
    return out


def bat_backward_candidates(problem: OpProblem, arch: str) -> list[BatBackwardConfig]:
    """dx takes each shipped dx tile set, fused and materialized (cuBLAS), default first, plus materialized with the
    Triton GEMM; dB always uses the table's tile set with ``split_k=0`` (enough K splits for about two programs per
    SM) and the deterministic partial-sum reduction."""
    sets = bat_tiles(arch, problem.dtype, problem.r)
    dblock = BatDblockConfig(GemmTile.of(sets.dblock), split_k=0, reduce="partials", precision="matched")
    out = []
    for tile in sets.dx:
        fused = BatBackwardConfig("fused", "matched", "cublas", GemmTile.of(tile), sets.build, dblock, tile.name)
        mat = dataclasses.replace(fused, strategy="materialize", form_precision="tf32x3")
        out += [fused, mat] if bat_default_strategy(problem, tile.block_m) == "fused" else [mat, fused]
    gemm = bat_gemm_tile(arch, problem.dtype)
    out.append(BatBackwardConfig("materialize", "tf32x3", "triton", GemmTile.of(gemm), sets.build, dblock, gemm.name))
    return out


def _complete(config: Any, default: Config, where: str) -> Config:
    """``config`` with missing entries (and missing entries of its nested dicts) taken from ``default``."""
    if not isinstance(config, dict):
        raise TypeError(f"{where} must be a dict; got {type(config).__name__}")
    unknown = sorted(set(config) - set(default))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known keys are {sorted(default)}")
    out = {**default, **config}
    for key, value in default.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            out[key] = {**value, **config[key]}
    return out


# ----------------------------------------------------------------------------------------------------------
# Per op: the backend's entry points
# ----------------------------------------------------------------------------------------------------------

TritonConfig = (
    BoneForwardConfig
    | BoneBackwardConfig
    | BatForwardConfig
    | BatBackwardConfig
    | AdapterForwardConfig
    | AdapterBackwardConfig
)

CONFIG_TYPES: dict[str, type] = {
    "bone_forward": BoneForwardConfig,
    "bone_backward": BoneBackwardConfig,
    "bat_forward": BatForwardConfig,
    "bat_backward": BatBackwardConfig,
    "adapter_forward": AdapterForwardConfig,
    "adapter_backward": AdapterBackwardConfig,
}
"""op -> its config dataclass."""

_CANDIDATES = {
    "bone_forward": bone_forward_candidates,
    "bone_backward": bone_backward_candidates,
    "bat_forward": bat_forward_candidates,
    "bat_backward": bat_backward_candidates,
    "adapter_forward": adapter_forward_candidates,
    "adapter_backward": adapter_backward_candidates,
}


def candidates(problem: OpProblem, arch: str | None = None) -> list[TritonConfig]:
    """Every config the autotuner may time for ``problem``, typed, the default first; ``arch`` (an architecture
    family of :mod:`tiles`) defaults to the one of ``problem.device``."""
    return _CANDIDATES[problem.op](problem, arch_of(problem.device) if arch is None else arch)


def candidate_configs(problem: OpProblem) -> list[Config]:
    """:func:`candidates` as JSON dicts (what :meth:`TritonBackend.configs` yields)."""
    return [c.to_dict() for c in candidates(problem)]


def default_config(problem: OpProblem) -> Config:
    """The config used when nothing is tuned, as a JSON dict."""
    return candidates(problem)[0].to_dict()


def prepare(problem: OpProblem, config: Any) -> TritonConfig:
    """Parse and validate a JSON ``config`` for ``problem`` into the op's dataclass (once per decision).

    bat configs may leave entries out: they are taken from :func:`default_config`. A bone forward strategy must
    serve the problem's r (:func:`forward_strategy_serves`). ValueError / TypeError name the bad entry.
    """
    cls = CONFIG_TYPES[problem.op]
    if problem.op.startswith("bat"):
        config = _complete(config, default_config(problem), cls.WHERE)
    typed = cls.from_dict(config)
    if isinstance(typed, BoneForwardConfig) and not forward_strategy_serves(
        typed.strategy, problem.r, typed.tile.block_k
    ):
        raise ValueError(
            f"{cls.WHERE}: strategy {typed.strategy!r} cannot serve r = {problem.r} with block_k = "
            f"{typed.tile.block_k} ('group' needs r a power of two <= block_k; 'chunk' needs r >= 16; 'two_pass' "
            "serves every r)"
        )
    return typed
