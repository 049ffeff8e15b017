"""Every tunable Triton config, in one place: the autotuner reads :func:`candidate_configs`, dispatch reads
:func:`default_config` when nothing is tuned. A config is a JSON-serialisable dict (strategy, tile sizes,
``num_warps``, ``num_stages``); the kernel modules accept exactly the dicts produced here.
"""

from __future__ import annotations

import functools

import torch

from ..base import Config, OpProblem

# ----------------------------------------------------------------------------------------------------------
# Shared by every kernel module: which config family a device and a dtype belong to.
# ----------------------------------------------------------------------------------------------------------

SHIPPED_ARCHS: tuple[str, ...] = ("sm80", "sm90")
"""The config families with shipped tables. "sm90" also serves datacenter Blackwell (sm_100), so its tables are
compiled for both sm_90 and sm_100 (``resources.FAMILY``)."""


def arch_of(device: torch.device) -> str:
    """The config family for ``device``: "sm90" (Hopper, datacenter Blackwell), "sm80" (Ampere, Ada and other
    GPUs with less shared memory) or "interpreter" (CPU tensors through TRITON_INTERPRET=1)."""
    if device.type != "cuda":
        return "interpreter"
    major, _ = torch.cuda.get_device_capability(device)
    return "sm90" if major in (9, 10) else "sm80"


def dtype_family(dtype: torch.dtype) -> str:
    """ "half" for fp16/bf16 inputs (tensor-core GEMM), "fp32" for fp32 and fp64."""
    return "half" if dtype in (torch.float16, torch.bfloat16) else "fp32"


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (1 off the GPU): split counts aim at about two programs per SM."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


# ----------------------------------------------------------------------------------------------------------
# Candidates per op (the autotuner's entry points)
# ----------------------------------------------------------------------------------------------------------


def bone_forward_configs(problem: OpProblem) -> list[Config]:
    """Candidates for bone/mini forward, default first (see the "bone / mini" section at the end)."""
    return bone_forward_configs_for(problem, arch_of(problem.device))


def bone_backward_configs(problem: OpProblem) -> list[Config]:
    """Candidates for bone/mini backward, default first (see the "bone / mini" section at the end)."""
    return bone_backward_configs_for(problem, arch_of(problem.device))


def bat_forward_configs(problem: OpProblem) -> list[Config]:
    """Candidates for bat forward, default first (see the "bat" section below)."""
    return bat_forward_configs_for(problem, arch_of(problem.device))


def bat_backward_configs(problem: OpProblem) -> list[Config]:
    """Candidates for bat backward, default first (see the "bat" section below)."""
    return bat_backward_configs_for(problem, arch_of(problem.device))


# ----------------------------------------------------------------------------------------------------------
# bat (bat.py)
# ----------------------------------------------------------------------------------------------------------
#
# Forward config: {"strategy", "form_precision", "gemm", "block_m", "block_n", "block_k", "group_m", "num_warps",
#   "num_stages", "build": {...}, "tiles"}. The GEMM fields serve the fused kernel (strategy "fused") or the Triton
#   GEMM after the W' build ("materialize" with gemm "triton"); "build" launches the W' build kernel.
# Backward config: {"strategy", "form_precision", "gemm", "dx": {GEMM fields}, "build": {...}, "dblock": {"block_m",
#   "block_n", "block_k", "num_warps", "num_stages", "split_k", "reduce", "precision"}, "tiles"}. dx's block_n is its
#   reduction step over N (W's rows), its block_k the width of its output columns (W's columns).
# block_n / block_k count lanes of W's rows / columns; the kernels fit them to r (bat.py, "tilings"), so one
# tile set is valid for every r, and the tables below pick, per r class, the sets that compile without register
# spills (resources.py compiles every shipped one for sm_80, sm_90 and sm_100; profiles/resources/ keeps the figures).
# "tiles" names the forward / dx tile set (logs, resource baseline); kernels do not read it.

BAT_STRATEGIES: tuple[str, ...] = ("fused", "materialize")

BAT_FUSED_MAX_M_TILES = 4
"""The default strategy is "fused" while M needs at most this many m-tiles, else "materialize".

A model, not a measurement (no GPU was available when this was written): the fused kernel forms each W' tile
once per m-tile, ``r / block_m`` extra tensor-core MACs (r=64, block_m=128: +50% over the GEMM tile at
half-precision rate); materializing forms W' once but writes and re-reads N x K elements (about two extra passes
over W: ~20 us for 4096 x 4096 bf16 at 3.3 TB/s, the cost of a few m-tiles of formation). The autotuner replaces
this guess per shape."""


def bat_tiles(name: str) -> dict[str, int]:
    """The tile set a name spells: "m128n64k64w8s3" -> block_m 128, block_n 64, block_k 64, 8 warps, 3 stages
    (``group_m`` is 8). Build-kernel sets omit "m"."""
    fields = {"m": "block_m", "n": "block_n", "k": "block_k", "w": "num_warps", "s": "num_stages"}
    out: dict[str, int] = {}
    number = ""
    for ch in reversed(name):
        if ch.isdigit():
            number = ch + number
        else:
            out[fields[ch]] = int(number)
            number = ""
    if "block_m" in out:
        out["group_m"] = 8
    return out


def bat_tile_name(block_n: int, block_k: int, num_warps: int, num_stages: int, block_m: int | None = None) -> str:
    """The name :func:`bat_tiles` reads back: "m128n64k64w8s3", or "n32k64w8s1" without ``block_m``."""
    m = "" if block_m is None else f"m{block_m}"
    return f"{m}n{block_n}k{block_k}w{num_warps}s{num_stages}"


BAT_R_CLASSES: tuple[str, ...] = ("small", "r16", "r32", "r64", "r128+")
"""r classes by R (r rounded up to a power of two): < 16 (W' formed by broadcast multiply-sum), 16, 32, 64,
>= 128. Each class gets its own tile sets."""

BAT_TABLE: dict[tuple[str, str, str], dict] = {
    # (arch, dtype class, r class): fwd / dx tile sets (candidates, default first), the Triton GEMM's set after a
    # W' build, the build kernel's set, the dB kernel's set.
    # Hopper (sm_90, 227 KiB shared memory).
    ("sm90", "half", "small"): dict(
        fwd=("m64n32k32w8s2",),
        dx=("m64n32k32w8s2",),
        build="n32k32w4s1",
        dblock="m64n32k32w8s2",
    ),
    ("sm90", "half", "r16"): dict(
        fwd=("m128n64k64w8s3", "m64n64k64w4s3"),
        dx=("m128n64k64w8s3", "m64n64k64w4s3"),
        build="n32k64w8s1",
        dblock="m64n64k64w4s3",
    ),
    ("sm90", "half", "r32"): dict(
        fwd=("m128n32k32w4s3", "m128n64k64w8s3"),
        dx=("m128n32k32w4s3",),
        build="n32k32w8s1",
        dblock="m64n64k64w8s3",
    ),
    ("sm90", "half", "r64"): dict(
        fwd=("m128n64k64w8s3", "m64n64k64w4s3"),
        dx=("m128n64k64w8s3", "m64n64k64w4s3"),
        build="n32k64w8s1",
        dblock="m128n64k64w8s3",
    ),
    ("sm90", "half", "r128+"): dict(
        fwd=("m128n128k64w8s3", "m64n64k64w4s3"),
        dx=("m128n64k64w8s3", "m64n64k64w4s3"),
        build="n32k64w8s1",
        # 2 stages: with 3, r = 128 spills 24 B on sm_100 (ptxas-blackwell holds it to 128 registers).
        dblock="m64n64k64w8s2",
    ),
    # Ampere / Ada (sm_80: 163 KiB shared memory; sm_86, sm_89: 99 KiB; every set below needs at most 99 KiB).
    ("sm80", "half", "small"): dict(
        fwd=("m64n32k32w8s2",),
        dx=("m64n32k32w8s2",),
        build="n32k32w4s1",
        dblock="m64n32k32w8s2",
    ),
    ("sm80", "half", "r16"): dict(
        fwd=("m128n64k64w8s3", "m64n64k64w4s3"),
        dx=("m64n64k64w4s3",),
        build="n32k64w8s1",
        dblock="m64n64k64w4s3",
    ),
    ("sm80", "half", "r32"): dict(
        fwd=("m128n32k32w4s3",),
        dx=("m128n32k32w4s3",),
        build="n32k32w8s1",
        dblock="m64n64k64w8s3",
    ),
    ("sm80", "half", "r64"): dict(
        fwd=("m128n64k32w4s3", "m64n64k64w4s3"),
        dx=("m128n64k64w8s3",),
        build="n32k64w8s1",
        dblock="m128n64k64w8s3",
    ),
    ("sm80", "half", "r128+"): dict(
        fwd=("m64n64k64w4s3",),
        dx=("m128n64k64w8s3",),
        build="n32k64w8s1",
        dblock="m64n64k64w8s3",
    ),
}
"""Shipped bat tile sets for fp16/bf16 inputs. fp32 (and fp64) inputs use :data:`BAT_TABLE_FP32` on every GPU."""

BAT_TABLE_FP32: dict[str, dict] = {
    # fp32 operands take twice the registers and shared memory, and the default formation precision "tf32x3"
    # (torch's allow_tf32 is False by default) three times the formation product's: smaller tiles.
    "small": dict(
        fwd=("m64n16k32w8s2",),
        dx=("m64n16k32w8s2",),
        build="n32k32w4s1",
        dblock="m64n32k32w8s2",
    ),
    "r16": dict(
        fwd=("m64n32k32w4s3",),
        dx=("m64n32k32w4s3",),
        build="n32k64w4s1",
        dblock="m64n64k32w4s3",
    ),
    "r32": dict(
        # 8 warps: with 4, the (R, BK) and (BN, BK) B tiles the r = 32 forward keeps in registers spill.
        fwd=("m64n32k32w8s3",),
        dx=("m64n32k32w8s3",),
        build="n32k32w4s1",
        dblock="m64n32k32w4s3",
    ),
    "r64": dict(
        fwd=("m64n32k32w4s3",),
        dx=("m64n32k32w4s3",),
        build="n32k64w4s1",
        dblock="m64n64k32w4s3",
    ),
    "r128+": dict(
        fwd=("m64n32k32w4s3",),
        dx=("m64n32k32w4s3",),
        build="n32k64w4s1",
        dblock="m64n32k32w8s3",
    ),
}

BAT_GEMM_TILES: dict[tuple[str, str], str] = {
    ("sm90", "half"): "m128n128k64w8s3",
    ("sm80", "half"): "m128n128k64w8s3",
    ("sm90", "fp32"): "m128n128k32w8s2",
    ("sm80", "fp32"): "m128n128k32w8s2",
}
"""The Triton GEMM after a W' build (gemm "triton"): a plain GEMM, the same for every r."""

BAT_INTERPRETER: dict[str, dict] = {
    # CPU tensors through the Triton interpreter (tests): every op costs the same whatever its size, so tiles are
    # as large as the block allows; warps and stages are ignored.
    "small": dict(
        fwd=("m32n32k32w4s1",),
        dx=("m32n32k32w4s1",),
        build="n32k32w4s1",
        dblock="m32n32k32w4s1",
    ),
    "r16": dict(
        fwd=("m32n32k32w4s1",),
        dx=("m32n32k32w4s1",),
        build="n32k32w4s1",
        dblock="m32n32k32w4s1",
    ),
    "r32": dict(
        fwd=("m32n32k32w4s1",),
        dx=("m32n32k32w4s1",),
        build="n32k32w4s1",
        dblock="m32n32k32w4s1",
    ),
    "r64": dict(
        fwd=("m32n64k64w4s1",),
        dx=("m32n64k64w4s1",),
        build="n64k64w4s1",
        dblock="m32n64k64w4s1",
    ),
    "r128+": dict(
        fwd=("m32n128k128w4s1",),
        dx=("m32n128k128w4s1",),
        build="n128k128w4s1",
        dblock="m32n128k128w4s1",
    ),
}


def bat_padded_r(r: int) -> int:
    """R: block size ``r`` rounded up to a power of two, the lanes one r-block takes in a bat tile."""
    return 1 << (r - 1).bit_length()


def bat_r_class(r: int) -> str:
    """The :data:`BAT_R_CLASSES` entry of block size ``r``."""
    rp = bat_padded_r(r)
    if rp < 16:
        return "small"
    return {16: "r16", 32: "r32", 64: "r64"}.get(rp, "r128+")


def bat_plan(arch: str, dtype: torch.dtype, r: int) -> dict:
    """The table entry for (arch, x's dtype, r): fwd / dx candidates, gemm, build and dblock tile set names."""
    rc = bat_r_class(r)
    if arch == "interpreter":
        return {**BAT_INTERPRETER[rc], "gemm": "m32n32k32w4s1"}
    family = dtype_family(dtype)
    entry = BAT_TABLE[(arch, family, rc)] if family == "half" else BAT_TABLE_FP32[rc]
    return {**entry, "gemm": BAT_GEMM_TILES[(arch, family)]}


def bat_default_strategy(problem: OpProblem, block_m: int) -> str:
    """ "fused" while M spans at most :data:`BAT_FUSED_MAX_M_TILES` m-tiles, else "materialize"."""
    return "fused" if problem.m <= BAT_FUSED_MAX_M_TILES * block_m else "materialize"


def _bat_dblock(plan: dict) -> Config:
    return {**bat_tiles(plan["dblock"]), "split_k": 0, "reduce": "partials", "precision": "matched"}


def bat_forward_configs_for(problem: OpProblem, arch: str) -> list[Config]:
    """Forward candidates for ``problem`` on ``arch``, default first: each shipped forward tile set fused and
    materialized (cuBLAS after the build: NVIDIA's per-shape tuned GEMM, the default), plus the materialized
    path with the Triton GEMM. The formation precision stays at its default, "matched" for fused and "tf32x3"
    for materialize: the autotuner must not trade accuracy for speed behind the user's back."""
    plan = bat_plan(arch, problem.dtype, problem.r)
    build = bat_tiles(plan["build"])
    out: list[Config] = []
    for name in plan["fwd"]:
        fused = {"strategy": "fused", "form_precision": "matched", "gemm": "cublas", **bat_tiles(name)}
        mat = {**fused, "strategy": "materialize", "form_precision": "tf32x3"}
        pair = [fused, mat] if bat_default_strategy(problem, fused["block_m"]) == "fused" else [mat, fused]
        out.extend({**cfg, "build": dict(build), "tiles": name} for cfg in pair)
    gemm = {"strategy": "materialize", "form_precision": "tf32x3", "gemm": "triton", **bat_tiles(plan["gemm"])}
    out.append({**gemm, "build": dict(build), "tiles": plan["gemm"]})
    return out


def bat_backward_configs_for(problem: OpProblem, arch: str) -> list[Config]:
    """Backward candidates for ``problem`` on ``arch``, default first: dx takes each shipped dx tile set, fused
    and materialized (cuBLAS), plus materialized with the Triton GEMM; dB always uses the table's launch with
    ``split_k=0`` (enough K splits for about two programs per SM) and the deterministic partial-sum reduction."""
    plan = bat_plan(arch, problem.dtype, problem.r)
    build = bat_tiles(plan["build"])
    out: list[Config] = []
    for name in plan["dx"]:
        fused = {"strategy": "fused", "form_precision": "matched", "gemm": "cublas", "dx": bat_tiles(name)}
        mat = {**fused, "strategy": "materialize", "form_precision": "tf32x3"}
        pair = [fused, mat] if bat_default_strategy(problem, fused["dx"]["block_m"]) == "fused" else [mat, fused]
        out.extend(
            {**c, "dx": dict(c["dx"]), "build": dict(build), "dblock": _bat_dblock(plan), "tiles": name} for c in pair
        )
    gemm_tiles = bat_tiles(plan["gemm"])
    gemm = {"strategy": "materialize", "form_precision": "tf32x3", "gemm": "triton", "dx": gemm_tiles}
    out.append({**gemm, "build": dict(build), "dblock": _bat_dblock(plan), "tiles": plan["gemm"]})
    return out


def candidate_configs_for(problem: OpProblem, arch: str) -> list[Config]:
    """The bat candidates of :func:`candidate_configs` for an explicit architecture family (AOT cases, tests)."""
    return {"bat_forward": bat_forward_configs_for, "bat_backward": bat_backward_configs_for}[problem.op](problem, arch)


_BY_OP = {
    "bone_forward": bone_forward_configs,
    "bone_backward": bone_backward_configs,
    "bat_forward": bat_forward_configs,
    "bat_backward": bat_backward_configs,
}


def candidate_configs(problem: OpProblem) -> list[Config]:
    """Every config the autotuner may time for ``problem``; the first one is the default."""
    return _BY_OP[problem.op](problem)


def default_config(problem: OpProblem) -> Config:
    """The config used when nothing is tuned."""
    return candidate_configs(problem)[0]


# ----------------------------------------------------------------------------------------------------------
# bone / mini (bone.py)
# ----------------------------------------------------------------------------------------------------------
#
# Forward config: {"strategy", "block_m", "block_n", "block_k", "group_m", "num_warps", "num_stages", "tiles"}.
# Backward config: {"tiles", "dx": {...}, "t": {...}, "dblock": {...}}, one dict per kernel:
#   dx     {"block_m", "block_k" (dx columns), "block_n" (reduction step over N), "group_m", "num_warps", "num_stages"}
#   t      {"block_m", "block_n", "block_r", "split_n", "num_warps", "num_stages"}            T = dY D^T
#   dblock {"block_m", "block_r", "block_c", "block_n", "split_m", "num_warps", "num_stages"}  dD = S^T dY
# "tiles" names the GEMM tile set the config came from (logs, resource baseline); kernels do not read it.
# Every shipped tile set is compiled for its architectures by resources.py; none spills (profiles/resources/).

BONE_FORWARD_STRATEGIES: tuple[str, ...] = ("group", "chunk", "two_pass")

GEMM_TILES: dict[str, dict[str, int]] = {
    # Hopper, half precision: 8 warps = two warpgroups on a 128 x 128 wgmma tile, 64-wide K steps.
    "m128n128k64w8s3": dict(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
    "m64n128k64w4s4": dict(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4),
    # Ampere, half precision: mma.sync keeps operands and accumulator in registers; 32-wide K steps keep the
    # fused S sums and the chunk strategy's (block_m, block_k) fp32 accumulator spill-free.
    "m128n128k32w8s4": dict(block_m=128, block_n=128, block_k=32, num_warps=8, num_stages=4),
    "m64n128k32w4s4": dict(block_m=64, block_n=128, block_k=32, num_warps=4, num_stages=4),
    "m128n64k32w4s4": dict(block_m=128, block_n=64, block_k=32, num_warps=4, num_stages=4),
    # Hopper, small problems (few tokens): more programs.
    "m64n64k64w4s3": dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3),
    # fp32 inputs: with allow_tf32 off, fp32 tl.dot runs on the FMA units ("ieee") with both operand tiles in
    # registers, so small tiles, and "two_pass" only: the fused sums take the FMA kernel to 255 registers.
    "m64n64k32w8s3": dict(block_m=64, block_n=64, block_k=32, num_warps=8, num_stages=3),
    "m32n64k32w4s3": dict(block_m=32, block_n=64, block_k=32, num_warps=4, num_stages=3),
    # CPU tensors through the Triton interpreter (tests): warps and stages are ignored there.
    "interp32": dict(block_m=32, block_n=32, block_k=32, num_warps=4, num_stages=1),
}
"""Every GEMM tile set the bone kernels ship with, by name (block_m x block_n x block_k, warps, stages)."""

_ALL = BONE_FORWARD_STRATEGIES
GEMM_TILES_BY_FAMILY: dict[tuple[str, str], tuple[tuple[str, tuple[str, ...]], ...]] = {
    ("sm90", "half"): (("m128n128k64w8s3", _ALL), ("m64n128k64w4s4", _ALL), ("m64n64k64w4s3", _ALL)),
    ("sm80", "half"): (("m128n128k32w8s4", _ALL), ("m64n128k32w4s4", _ALL), ("m128n64k32w4s4", _ALL)),
    ("sm90", "fp32"): (("m64n64k32w8s3", ("two_pass",)), ("m32n64k32w4s3", ("two_pass",))),
    ("sm80", "fp32"): (("m64n64k32w8s3", ("two_pass",)), ("m32n64k32w4s3", ("two_pass",))),
    ("interpreter", "half"): (("interp32", _ALL),),
    ("interpreter", "fp32"): (("interp32", _ALL),),
}
"""Per (architecture family, dtype family): the shipped tile sets, default first, each with the forward
strategies offered on it (see :func:`arch_of`, :func:`dtype_family`). Every tile set offers "two_pass", so every
r is served; the backward's dx GEMM uses every tile set of the family."""


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _is_pow2(v: int) -> bool:
    return v >= 1 and v & (v - 1) == 0


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


def _family(problem: OpProblem, arch: str) -> list[tuple[str, tuple[str, ...]]]:
    """The (tile set, offered strategies) entries for ``problem``, default first: the family's order, except that
    few tokens (M <= 64) put the tile sets with block_m <= 64 first (a 128-row tile would be mostly masked)."""
    entries = list(GEMM_TILES_BY_FAMILY[(arch, dtype_family(problem.dtype))])
    if problem.m <= 64:
        entries.sort(key=lambda entry: GEMM_TILES[entry[0]]["block_m"] > 64)
    return entries


def bone_forward_configs_for(problem: OpProblem, arch: str) -> list[Config]:
    """Forward candidates for ``problem`` on architecture family ``arch`` (see :func:`arch_of`), default first:
    every shipped tile set of the family with every strategy it offers that serves r; on each tile set the
    :func:`default_forward_strategy` comes first when offered."""
    out: list[Config] = []
    for name, offered in _family(problem, arch):
        tiles = GEMM_TILES[name]
        first = default_forward_strategy(problem.r, tiles["block_k"])
        for strategy in sorted(offered, key=lambda s: s != first):
            if forward_strategy_serves(strategy, problem.r, tiles["block_k"]):
                out.append({"strategy": strategy, **tiles, "group_m": 8, "tiles": name})
    return out


def dx_tiles(name: str) -> Config:
    """dx (M, K) is a GEMM with N as its reduction: the tile set's block_n becomes dx's column width block_k."""
    tiles = GEMM_TILES[name]
    return dict(
        block_m=tiles["block_m"],
        block_k=tiles["block_n"],
        block_n=tiles["block_k"],
        group_m=8,
        num_warps=tiles["num_warps"],
        num_stages=tiles["num_stages"],
    )


def adapter_block(width: int) -> int:
    """Tile width over r (T, dblock) or C (dblock): 16 for widths up to 16, else 64 (masked past the width)."""
    return 16 if width <= 16 else 64


def small_kernel_launch(arch: str, family: str) -> dict[str, int]:
    """Token tile, reduction tile, warps and stages of the T and dblock kernels (not tuned: each is a few
    percent of the backward's work). fp32 takes 32-wide tiles: its one-hot fold runs on the FMA units. T
    uses 2 stages (3 spill a few bytes on sm_80; see :func:`t_launch`)."""
    if arch == "interpreter":
        return dict(block_m=32, block_n=32, num_warps=4, num_stages=1)
    if family == "fp32":
        return dict(block_m=32, block_n=32, num_warps=4, num_stages=3)
    return dict(block_m=64, block_n=64, num_warps=4, num_stages=3)


def t_launch(arch: str, family: str) -> dict[str, int]:
    """:func:`small_kernel_launch` for the T kernel: at most 2 pipeline stages."""
    small = small_kernel_launch(arch, family)
    return dict(small, num_stages=min(2, small["num_stages"]))


def bone_backward_configs_for(problem: OpProblem, arch: str) -> list[Config]:
    """Backward candidates for ``problem`` on ``arch``, default first: the dx GEMM takes each shipped tile set;
    T and dblock get split counts that fill about two waves of the GPU (one split on the interpreter)."""
    small = small_kernel_launch(arch, dtype_family(problem.dtype))
    block_r = adapter_block(problem.r)
    block_c = adapter_block(problem.block_cols)
    target = 2 * sm_count(problem.device)
    t_programs = _cdiv(problem.m, small["block_m"]) * _cdiv(problem.r, block_r)
    t_split = max(1, min(_cdiv(target, t_programs), _cdiv(problem.n, 4 * small["block_n"])))
    d_programs = _cdiv(problem.r, block_r) * _cdiv(problem.block_cols, block_c)
    d_split = max(1, min(_cdiv(target, d_programs), _cdiv(problem.m, 4 * small["block_m"])))
    t = dict(t_launch(arch, dtype_family(problem.dtype)), block_r=block_r, split_n=t_split)
    dblock = dict(small, block_r=block_r, block_c=block_c, split_m=d_split)
    return [
        {"tiles": name, "dx": dx_tiles(name), "t": dict(t), "dblock": dict(dblock)}
        for name, _ in _family(problem, arch)
    ]


def group_sum_launch(r: int, family: str) -> Config:
    """Launch parameters of the "two_pass" group-sum kernel (a bandwidth-bound pass over x, not tuned):
    one-hot fold for r < 16 (tensor cores for half inputs; 32-wide tiles for fp32, whose exact "ieee" one-hot
    dot runs on the FMA units), else one program per (64 rows, 64 group columns)."""
    if r < 16:
        width = 32 if family == "fp32" else 64
        return dict(onehot=True, block_m=width, block_r=16, block_k=width, num_warps=4, num_stages=2)
    return dict(onehot=False, block_m=64, block_r=64, block_k=16, num_warps=4, num_stages=2)


def _check_tile(where: str, cfg: Config, key: str, minimum: int = 16) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not _is_pow2(value) or value < minimum:
        raise ValueError(f"{where}[{key!r}] must be a power of two >= {minimum}; got {value!r}")
    return value


def _check_launch(where: str, cfg: Config) -> None:
    for key in ("num_warps", "num_stages"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}[{key!r}] must be a positive int; got {value!r}")
    if not _is_pow2(cfg["num_warps"]):
        raise ValueError(f"{where}['num_warps'] must be a power of two; got {cfg['num_warps']}")


def check_bone_forward_config(config: Config, r: int) -> Config:
    """Validate a bone forward config for block size ``r``; returns it (ValueError naming the bad entry)."""
    if not isinstance(config, dict):
        raise TypeError(f"bone forward config must be a dict; got {type(config).__name__}")
    where = "bone forward config"
    strategy = config.get("strategy")
    if strategy not in BONE_FORWARD_STRATEGIES:
        raise ValueError(f"{where}['strategy'] must be one of {BONE_FORWARD_STRATEGIES}; got {strategy!r}")
    for key in ("block_m", "block_n", "block_k"):
        _check_tile(where, config, key)
    _check_tile(where, config, "group_m", minimum=1)
    _check_launch(where, config)
    if not forward_strategy_serves(strategy, r, config["block_k"]):
        raise ValueError(
            f"{where}: strategy {strategy!r} cannot serve r = {r} with block_k = {config['block_k']} "
            "('group' needs r a power of two <= block_k; 'chunk' needs r >= 16; 'two_pass' serves every r)"
        )
    return config


def check_bone_backward_config(config: Config) -> Config:
    """Validate a bone backward config; returns it (ValueError naming the bad entry)."""
    if not isinstance(config, dict):
        raise TypeError(f"bone backward config must be a dict; got {type(config).__name__}")
    tiles = {
        "dx": ("block_m", "block_k", "block_n"),
        "t": ("block_m", "block_n", "block_r"),
        "dblock": ("block_m", "block_r", "block_c", "block_n"),
    }
    for part, keys in tiles.items():
        sub = config.get(part)
        where = f"bone backward config[{part!r}]"
        if not isinstance(sub, dict):
            raise ValueError(f"{where} must be a dict; got {sub!r}")
        for key in keys:
            _check_tile(where, sub, key)
        _check_launch(where, sub)
    _check_tile("bone backward config['dx']", config["dx"], "group_m", minimum=1)
    for part, key in (("t", "split_n"), ("dblock", "split_m")):
        value = config[part].get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"bone backward config[{part!r}][{key!r}] must be a positive int; got {value!r}")
    return config
