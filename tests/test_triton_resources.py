"""Resource baseline of the Triton kernels: every kernel x shipped config x dtype compiled ahead of time for sm_80
and sm_90 (no GPU needed) must not spill, must fit 255 registers and the architecture's shared memory, and must not
use more spills or shared memory than profiles/resources/triton_sm{80,90}.json record.

After an intended change, regenerate the baseline with ``python -m bonekern.backends.triton.resources --write``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bonekern.backends import OpProblem
from bonekern.backends.triton import configs, resources

triton = pytest.importorskip("triton", reason="the triton package is not installed")

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
    }
    found = "\n".join(resources.problems("sm80", results, base))
    assert "k/a/bf16: spills (8 B stores, 8 B loads)" in found
    assert "spills grew from the baseline's 0 B" in found
    assert "k/b/bf16: 256 registers > 255" in found
    assert "k/b/bf16: shared memory grew from 1024 B to 2048 B" in found
    assert "k/big/bf16" in found and "> the 166912 B limit" in found and "not in the baseline" in found
    assert "k/broken/bf16: does not compile: CompilationError: boom" in found
    assert "k/gone/bf16: in the baseline but no longer compiled" in found
    assert resources.problems("sm80", {"k/a/bf16": _ok()}, {"k/a/bf16": _ok()}) == []


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
        for cfg in configs.bone_forward_configs_for(problem, arch):
            name, strategy = cfg["tiles"], cfg["strategy"]
            if strategy == "group":
                keys |= {f"bone_fwd/group.{name}.r{cfg['block_k']}/{dtype}", f"bone_fwd/group.{name}.r8/{dtype}"}
            else:
                keys.add(f"bone_fwd/{strategy}.{name}/{dtype}")
            if strategy == "two_pass":
                keys.add(f"bone_group_sum/{'onehot' if r < 16 else 'groups'}/{dtype}")
        problem = OpProblem("bone_backward", 4096, 4096, 4096, r, c, torch_dtype, torch.float32, torch.device("cpu"))
        for cfg in configs.bone_backward_configs_for(problem, arch):
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


@pytest.mark.parametrize("arch", list(resources.ARCHS))
def test_every_shipped_config_has_an_aot_case(arch):
    """What the configs hand to the kernels on sm_80/sm_90 is what the baseline compiles (bf16 and fp32: every
    tile set; fp16: the default tile set and the small kernels), with the same warps and stages."""
    cases = {resources.case_key(c): c for c in resources.all_cases() if arch in c.archs}
    default = configs.GEMM_TILES_BY_FAMILY[(arch, "half")][0][0]
    wanted = _expected_keys(arch, "half", "bf16") | _expected_keys(arch, "fp32", "fp32")
    wanted |= {k for k in _expected_keys(arch, "half", "fp16") if _tile_of(k) in (None, default)}
    assert wanted - cases.keys() == set()
    for key in wanted:
        tile = _tile_of(key)
        if tile is not None:
            tiles = configs.GEMM_TILES[tile]
            assert (cases[key].num_warps, cases[key].num_stages) == (tiles["num_warps"], tiles["num_stages"]), key


@pytest.mark.slow
def test_compiled_kernels_fit_and_match_the_baseline():
    """Compile everything (spawned workers, Triton's bundled ptxas) and apply every rule of resources.problems."""
    if not PTXAS.exists():
        pytest.skip(f"triton's bundled ptxas is missing ({PTXAS}); this triton package ships without it")
    results = resources.measure()
    found = []
    for arch in resources.ARCHS:
        assert results[arch], f"nothing compiled for {arch}"
        found += resources.problems(arch, results[arch], resources.load_baseline(arch))
    assert not found, (
        "\n".join(found) + "\n(after an intended change: python -m bonekern.backends.triton.resources --write)"
    )
