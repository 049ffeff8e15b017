"""Resource baseline of the Triton kernels (bone.py and bat.py): every kernel x shipped config x dtype compiled ahead
of time for sm_80, sm_90 and sm_100 (sm_100 runs the sm_90 family's tables; no GPU needed) must not spill, must fit
255 registers and the architecture's shared memory, and must not use more spills or shared memory than
the running Triton's profiles/resources/triton-<X.Y>/triton_sm{80,90,100}.json record. The
specialisations outside the shipped inputs (fp64, fp16, int64 offsets, atomic dB, fp64 block, r = 1 / 3 / 48) are
compiled in the same run and held to the same absolute rules, without being stored.

After an intended change, regenerate the baseline with ``python -m bonekern.backends.triton.resources --write``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bonekern.backends import OpProblem
from bonekern.backends.triton import common, configs, resources, tiles

pytest.importorskip("triton", reason="the triton package is not installed")

import triton

from bonekern.backends.triton import bat

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def _ok(**kw) -> dict[str, int]:
    return dict(dict(registers=100, spill_stores=0, spill_loads=0, shared=1024, num_warps=4, num_stages=3), **kw)


def test_problems_flags_every_rule():
    base = {"k/a/bf16": _ok(), "k/b/bf16": _ok(), "k/gone/bf16": _ok()}
    results = {
        "k/a/bf16": _ok(spill_stores=8, spill_loads=8),
        "k/b/bf16": _ok(registers=256, shared=2048),
        "k/big/bf16": _ok(shared=resources.SHARED_LIMIT["sm80"] + 1),
        "k/broken/bf16": "CompilationError: boom",
        "k/checked/fp64": _ok(spill_stores=4),
    }
    found = "\n".join(resources.problems("sm80", results, base, checked_only={"k/checked/fp64"}))
    assert "k/a/bf16: spills (8 B stores, 8 B loads)" in found
    assert "spills grew from the baseline's 0 B" in found
    assert "k/b/bf16: 256 registers > 255" in found
    assert "k/b/bf16: shared memory grew from 1024 B to 2048 B" in found
    assert "k/big/bf16" in found and "> the 101376 B limit" in found and "not in the baseline" in found
    assert "k/broken/bf16: does not compile: CompilationError: boom" in found
    assert "k/gone/bf16: in the baseline but no longer compiled" in found
    assert "k/checked/fp64: spills (4 B stores, 0 B loads)" in found
    assert "k/checked/fp64: not in the baseline" not in found
    assert resources.problems("sm80", {"k/a/bf16": _ok()}, {"k/a/bf16": _ok()}) == []
    fp64_spill = {"k/c/fp64": _ok(spill_stores=4)}
    assert resources.problems("sm100", fp64_spill, {}, checked_only={"k/c/fp64"}) == []  # SPILLS_TOLERATED
    assert resources.problems("sm90", fp64_spill, {}, checked_only={"k/c/fp64"}) != []
    assert resources.problems("sm80", {"k/c/fp64": _ok()}, {}, checked_only={"k/c/fp64"}) == []
    second = {"ptxas-blackwell": {"registers": 256, "spills": 8}}
    found = "\n".join(resources.problems("sm90", {"k/a/bf16": _ok(**second)}, {"k/a/bf16": _ok()}))
    assert "spills 8 B with ptxas-blackwell" in found and "256 registers > 255 with ptxas-blackwell" in found


def test_every_compile_target_gets_the_tables_its_gpus_run(monkeypatch):
    """Each compile target is compiled with the config family that tiles.arch_of hands a GPU of that compute
    capability (sm_100, B200: Hopper's tables), and every shipped family is compiled."""
    assert set(resources.FAMILY) == set(resources.ARCHS) == set(resources.SHARED_LIMIT)
    assert set(resources.FAMILY.values()) == set(tiles.SHIPPED_ARCHS)
    for target, capability in resources.ARCHS.items():
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cc=capability: divmod(cc, 10))
        assert tiles.arch_of(torch.device("cuda")) == resources.FAMILY[target], target


def test_baseline_files_exist_and_name_the_regeneration_command():
    for arch in resources.ARCHS:
        path = resources.baseline_path(arch)
        assert path.exists(), f"missing {path}: run python -m bonekern.backends.triton.resources --write"
        assert resources.load_baseline(arch), f"{path} has no kernels"
        assert "resources --write" in path.read_text()


def _expected_keys(arch: str, family: str, dtype: str) -> set[str]:
    """AOT case keys the candidates of (arch, family) launch, for every r the strategies serve."""
    keys = set()
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    for r, c in ((1, 1), (3, 40), (16, 40), (32, 8), (64, 40), (128, 40)):
        problem = OpProblem("bone_forward", 4096, 4096, 4096, r, c, torch_dtype, torch.float32, torch.device("cpu"))
        for cfg in (c.to_dict() for c in configs.candidates(problem, arch)):
            name, strategy = cfg["tiles"], cfg["strategy"]
            if strategy == "group":
                keys |= {f"bone_fwd/group.{name}.r{cfg['block_k']}/{dtype}", f"bone_fwd/group.{name}.r8/{dtype}"}
            else:
                keys.add(f"bone_fwd/{strategy}.{name}/{dtype}")
            if strategy == "two_pass":
                keys.add(f"bone_group_sum/{'onehot' if r < 16 else 'groups'}/{dtype}")
        problem = OpProblem("bone_backward", 4096, 4096, 4096, r, c, torch_dtype, torch.float32, torch.device("cpu"))
        for cfg in (c.to_dict() for c in configs.candidates(problem, arch)):
            keys.add(f"bone_bwd_dx/{cfg['tiles']}/{dtype}")
            block_r = cfg["t"]["block_r"]
            keys.add(f"bone_bwd_t/r{block_r}/{dtype}")
            keys.add(f"bone_bwd_dblock/r{block_r}.c{cfg['dblock']['block_c']}{'.onehot' if c < 16 else ''}/{dtype}")
    return keys


def _tile_of(key: str) -> str | None:
    """The GEMM tile set a case key names ("bone_fwd/<strategy>.<tiles>[.r<r>]/<dtype>", "bone_bwd_dx/<tiles>/...")."""
    kernel, config_name, _ = key.split("/")
    if kernel == "bone_fwd":
        return config_name.split(".")[1]
    return config_name if kernel == "bone_bwd_dx" else None


@pytest.mark.parametrize("arch", tiles.SHIPPED_ARCHS)
def test_every_shipped_bone_config_has_an_aot_case(arch):
    """What the configs hand to the kernels on sm_80/sm_90 is what the baseline compiles (bf16 and fp32: every
    tile set; fp16: the default tile set and the small kernels), with the same warps and stages."""
    cases = {resources.case_key(c): c for c in resources.all_cases() if arch in c.archs}
    default = tiles.BONE_GEMM[(arch, "half")][0][0].name
    wanted = _expected_keys(arch, "half", "bf16") | _expected_keys(arch, "fp32", "fp32")
    wanted |= {k for k in _expected_keys(arch, "half", "fp16") if _tile_of(k) in (None, default)}
    assert wanted - cases.keys() == set()
    for key in wanted:
        tile = _tile_of(key)
        if tile is not None:
            shape = tiles.Tile.parse(tile)
            assert (cases[key].num_warps, cases[key].num_stages) == (shape.num_warps, shape.num_stages), key


def _bat_tile_name(entries: dict) -> str:
    """The tile name of a config's tile entries (block_m absent for the W' build)."""
    return tiles.Tile(
        entries.get("block_m"), entries["block_n"], entries["block_k"], entries["num_warps"], entries["num_stages"]
    ).name


@pytest.mark.parametrize("arch", tiles.SHIPPED_ARCHS)
def test_every_shipped_bat_config_has_an_aot_case(arch):
    """Each bat candidate of configs.py (per r class and dtype family: every candidate in bf16, the default tile
    set in fp32) launches kernels that are among the baseline cases for ``arch``, with the same warps and stages;
    the specs cover every r class of both dtype families."""
    cases = {resources.case_key(c): c for c in resources.all_cases() if arch in c.archs and c.in_baseline}
    for family in ("half", "fp32"):
        rs = [r for r, dt, _ in bat.AOT_SPECS if tiles.dtype_family(dt) == family]
        assert {tiles.bat_r_class(r) for r in rs} == set(tiles.BAT_R_CLASSES), family
    for r, dtype, default_only in bat.AOT_SPECS:
        short = common.TRITON_TYPE_NAMES[str(dtype)]
        for op, prefix in (("bat_forward", "fwd"), ("bat_backward", "dx")):
            problem = OpProblem(op, 4096, 4096, 4096, r, r, dtype, torch.float32, torch.device("cpu"))
            candidates = [c.to_dict() for c in configs.candidates(problem, arch)]
            if default_only:
                candidates = [c for c in candidates if c["tiles"] == candidates[0]["tiles"] or c["gemm"] == "triton"]
            for cfg in candidates:
                gemm = cfg if op == "bat_forward" else cfg["dx"]
                launched = {}
                if cfg["strategy"] == "fused":
                    launched[f"bat_{prefix}_fused/{cfg['tiles']}.r{r}/{short}"] = gemm
                else:
                    launched[f"bat_build/{_bat_tile_name(cfg['build'])}.r{r}/{short}"] = cfg["build"]
                    if cfg["gemm"] == "triton":
                        launched[f"bat_{prefix}_gemm/{cfg['tiles']}/{short}"] = gemm
                if op == "bat_backward":
                    launched[f"bat_dblock/{_bat_tile_name(cfg['dblock'])}.r{r}/{short}"] = cfg["dblock"]
                for key, entries in launched.items():
                    assert key in cases, (arch, r, cfg)
                    want = (entries["num_warps"], entries["num_stages"])
                    assert (cases[key].num_warps, cases[key].num_stages) == want


def test_checked_specialisations_cover_the_inputs_outside_the_baseline():
    """fp64 and fp16 x, an fp64 block, int64 offsets, the atomic dB reduction and r = 1, 3, 48 are compiled for
    both architectures (held to the absolute rules, not stored)."""
    checked = [c for c in resources.all_cases() if not c.in_baseline]
    assert all(set(c.archs) == set(tiles.SHIPPED_ARCHS) for c in checked)
    assert {c.kernel for c in checked} == set(bat.AOT_KERNELS)
    parts = {p for c in checked for p in c.config_name.split(".")}
    assert {"fp64", "fp16"} <= {c.dtype for c in checked}
    assert {"block_fp64", "int64", "atomic", "r1", "r3", "r48"} <= parts


@pytest.mark.slow
def test_compiled_kernels_fit_and_match_the_baseline():
    """Compile every case, baseline and checked-only, in one pool of spawned workers (Triton's bundled ptxas, and
    ptxas-blackwell as well for sm_90 cases near the register limit) and apply every rule of resources.problems."""
    if not PTXAS.exists():
        pytest.skip(f"triton's bundled ptxas is missing ({PTXAS}); this triton package ships without it")
    cases = resources.all_cases()
    results = resources.measure()
    checked_only = resources.checked_only_keys(cases)
    found = []
    for arch in resources.ARCHS:
        wanted = {resources.case_key(c) for c in cases if resources.FAMILY[arch] in c.archs}
        assert wanted and results[arch].keys() == wanted, f"{arch}: compiled cases differ from the AOT cases"
        found += resources.problems(arch, results[arch], resources.load_baseline(arch), checked_only)
    assert not found, (
        "\n".join(found) + "\n(after an intended change: python -m bonekern.backends.triton.resources --write)"
    )
