"""Every tunable Triton config, in one place: the autotuner reads :func:`candidate_configs`, dispatch reads
:func:`default_config` when nothing is tuned. A config is a JSON-serialisable dict (strategy, tile sizes,
``num_warps``, ``num_stages``); the kernel modules accept exactly the dicts produced here.
"""

from __future__ import annotations

import torch

from ..base import Config, OpProblem


def bone_forward_configs(problem: OpProblem) -> list[Config]:
    """Candidates for bone/mini forward, default first."""
    raise NotImplementedError("bone forward Triton configs are being written")


def bone_backward_configs(problem: OpProblem) -> list[Config]:
    """Candidates for bone/mini backward, default first."""
    raise NotImplementedError("bone backward Triton configs are being written")


def bat_forward_configs(problem: OpProblem) -> list[Config]:
    """Candidates for bat forward, default first (see the "bat" section below)."""
    return bat_forward_configs_for(problem, _bat_arch(problem.device))


def bat_backward_configs(problem: OpProblem) -> list[Config]:
    """Candidates for bat backward, default first (see the "bat" section below)."""
    return bat_backward_configs_for(problem, _bat_arch(problem.device))


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
# spills (tests/test_triton_bat.py checks every shipped one with ptxas for sm_80 and sm_90).
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
        dblock="m64n64k64w8s3",
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
        fwd=("m64n32k32w4s3",),
        dx=("m64n32k32w4s3",),
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


def _bat_arch(device: torch.device) -> str:
    """ "sm90" (Hopper, datacenter Blackwell), "sm80" (Ampere, Ada, other GPUs) or "interpreter" (CPU tensors)."""
    if device.type != "cuda":
        return "interpreter"
    major, _ = torch.cuda.get_device_capability(device)
    return "sm90" if major in (9, 10) else "sm80"


def bat_r_class(r: int) -> str:
    """The :data:`BAT_R_CLASSES` entry of block size ``r``."""
    rp = 1 << (r - 1).bit_length()
    if rp < 16:
        return "small"
    return {16: "r16", 32: "r32", 64: "r64"}.get(rp, "r128+")


def bat_plan(arch: str, dtype: torch.dtype, r: int) -> dict:
    """The table entry for (arch, x's dtype, r): fwd / dx candidates, gemm, build and dblock tile set names."""
    rc = bat_r_class(r)
    if arch == "interpreter":
        return {**BAT_INTERPRETER[rc], "gemm": "m32n32k32w4s1"}
    dclass = "half" if dtype in (torch.float16, torch.bfloat16) else "fp32"
    entry = BAT_TABLE[(arch, dclass, rc)] if dclass == "half" else BAT_TABLE_FP32[rc]
    return {**entry, "gemm": BAT_GEMM_TILES[(arch, dclass)]}


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
