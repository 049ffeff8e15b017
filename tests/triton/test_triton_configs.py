"""The Triton backend's configs, tile table and launch specs (bonekern/backends/triton/{tiles,configs,common}.py).

- One tile encoding: every shipped tile's canonical name parses back to it.
- Every shipped candidate's JSON dict round-trips through its typed config (``from_dict`` / ``to_dict``) and is JSON
  serialisable; ``prepare_config`` completes a partial bat dict from the problem's default and rejects bad dicts.
- The launchers and ``aot_cases()`` agree: every launch the shipped configs make, recorded at the kernel call under
  the AOT model (``common.AOT_ENV``: GPU, allow_tf32 off), is one of the AOT cases, argument by argument (kernel,
  constexprs, pointer dtypes, unit strides, warps, stages), and passes exactly the kernel's parameters.
- Importing the package, its configs or tiles never imports triton; importing the kernel modules never imports the
  resource checker.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bonekern.backends import OpProblem
from bonekern.backends.triton import TritonBackend, common, configs, tiles

CPU = torch.device("cpu")
ARCHS = ("sm80", "sm90", "interpreter")


def _problems():
    """A spread of problems for every op: r classes, odd r, mini's C, few and many tokens, every dtype family."""
    for op in configs.CONFIG_TYPES:
        for r, c in ((1, 1), (3, 3), (8, 8), (16, 12), (32, 32), (48, 48), (64, 16), (128, 128), (256, 256)):
            for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
                for m in (1, 64, 300, 1 << 16):
                    n = k = max(256, 2 * r)
                    yield OpProblem(op, m, n, k, r, c if op.startswith("bone") else r, dtype, torch.float32, CPU)


def test_every_shipped_tile_has_one_name():
    """Each tile of every table is spelled by its canonical name (Tile.parse inverts Tile.name)."""
    shipped = [tile for entries in tiles.BONE_GEMM.values() for tile, _ in entries]
    shipped += [*tiles.BONE_ADAPTER.values(), *tiles.BAT_GEMM.values(), tiles.BONE_SUM_SPLITS]
    for sets in (*tiles.BAT_HALF.values(), *tiles.BAT_FP32.values(), *tiles.BAT_INTERPRETER.values()):
        shipped += [*sets.fwd, *sets.dx, sets.build, sets.dblock]
    assert len(shipped) > 80
    for tile in shipped:
        assert tiles.Tile.parse(tile.name) == tile, tile
    assert tiles.Tile.parse("m128n64k64w8s3") == tiles.Tile(128, 64, 64, 8, 3)
    assert tiles.Tile.parse("n32k32w4s1").to_dict() == dict(block_n=32, block_k=32, num_warps=4, num_stages=1)
    assert tiles.GemmTile.of(tiles.Tile.parse("m64n64k64w4s3")).to_dict()["group_m"] == 8
    with pytest.raises(ValueError, match="tile name looks like"):
        tiles.Tile.parse("m128n64k64")


def test_every_candidate_round_trips_through_its_json_dict():
    """from_dict(to_dict(c)) == c and to_dict(from_dict(d)) == d for every shipped candidate, through JSON text (as
    the autotune cache stores it); the default is the first candidate; the backend yields the same dicts."""
    seen = 0
    for problem in _problems():
        for arch in ARCHS:
            shipped = configs.candidates(problem, arch)
            assert shipped, (problem, arch)
            cls = configs.CONFIG_TYPES[problem.op]
            for config in shipped:
                assert type(config) is cls
                stored = json.loads(json.dumps(config.to_dict()))
                assert cls.from_dict(stored) == config
                assert cls.from_dict(stored).to_dict() == stored
                seen += 1
        dicts = TritonBackend().configs(problem)
        assert dicts == [c.to_dict() for c in configs.candidates(problem)]
        assert TritonBackend().default_config(problem) == dicts[0]
    assert seen > 5000  # the loops ran (every op, arch, r class and dtype family)


def test_prepare_config_completes_bat_from_the_default_once():
    """A partial bat dict takes the missing entries (nested ones too) from the problem's default."""
    backend = TritonBackend()
    for op in ("bat_forward", "bat_backward"):
        problem = OpProblem(op, 300, 256, 256, 16, 16, torch.bfloat16, torch.float32, CPU)
        default = configs.candidates(problem)[0]
        assert backend.prepare_config(problem, {}) == default
        fused = backend.prepare_config(problem, {"strategy": "materialize", "gemm": "triton"})
        assert (fused.strategy, fused.gemm, fused.build) == ("materialize", "triton", default.build)
    problem = OpProblem("bat_backward", 300, 256, 256, 16, 16, torch.bfloat16, torch.float32, CPU)
    prepared = backend.prepare_config(problem, {"dblock": {"split_k": 3, "reduce": "atomic"}})
    default = configs.candidates(problem)[0]
    assert prepared.dblock == configs.BatDblockConfig(default.dblock.tile, 3, "atomic", "matched")


@pytest.mark.parametrize(
    "op, bad, error, match",
    [
        ("bat_forward", [], TypeError, "bat forward config must be a dict; got list"),
        ("bat_forward", {"build": {"block_m": 64}}, ValueError, r"\['build'\]: unknown keys \['block_m'\]"),
        ("bat_forward", {"build": 3}, ValueError, r"\['build'\] must be a dict; got 3"),
        ("bat_forward", {"num_warps": 3}, ValueError, r"\['num_warps'\] must be a power of two"),
        ("bat_forward", {"group_m": 0}, ValueError, r"\['group_m'\] must be an int >= 1"),
        ("bat_forward", {"tiles": 7}, ValueError, r"\['tiles'\] must be a tile set's name"),
        ("bat_backward", {"dblock": {"precision": "tf32"}}, ValueError, r"\['dblock'\]\['precision'\]"),
        ("bone_forward", {"strategy": "group"}, ValueError, "missing 'block_m'"),
        ("bone_backward", {"dx": {}, "t": {}, "dblock": {}}, ValueError, r"\['dx'\]: missing 'block_m'"),
        ("bone_backward", None, TypeError, "bone backward config must be a dict; got NoneType"),
    ],
)
def test_prepare_config_rejects_bad_dicts_naming_the_entry(op, bad, error, match):
    problem = OpProblem(op, 300, 256, 256, 16, 16, torch.bfloat16, torch.float32, CPU)
    with pytest.raises(error, match=match):
        TritonBackend().prepare_config(problem, bad)


def test_importing_the_package_loads_neither_triton_nor_the_resource_checker():
    """The backend registry imports the package on every ``import bonekern`` path: it must not load triton; the
    kernel modules load triton but not the development tool ``resources.py``."""
    probe = (
        "import sys; import bonekern.backends.triton, bonekern.backends.triton.configs, "
        "bonekern.backends.triton.tiles, bonekern.backends.triton.common; "
        "print('triton' in sys.modules); import bonekern.backends.triton.bone, bonekern.backends.triton.bat; "
        "print('bonekern.backends.triton.resources' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


# ----------------------------------------------------------------------------------------------------------
# The launchers and aot_cases() build their launches with the same functions: check that they agree.
# ----------------------------------------------------------------------------------------------------------


class _Recorder:
    """Stands in for a @triton.jit kernel: records (kernel, grid, kwargs) of each launch, runs nothing."""

    def __init__(self, kernel, log: list):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.kernel, grid, args, kwargs))


def _matches(case: common.AotCase, kernel, kwargs: dict) -> bool:
    """Whether a recorded launch is ``case``: same kernel, every constexpr and unit stride the same value, every
    pointer of the dtype the case's signature types, the same warps and stages."""
    if case.fn is not kernel or (kwargs["num_warps"], kwargs["num_stages"]) != (case.num_warps, case.num_stages):
        return False
    for name, kind in case.signature.items():
        if kind == "constexpr" and kwargs[name] != case.constexprs[name]:
            return False
        if kind.startswith("*") and kind != "*" + common.TRITON_TYPE_NAMES[str(kwargs[name].dtype)]:
            return False
    return True


@pytest.fixture
def recorded(monkeypatch):
    """Launches of the bone/bat host functions under the AOT model, with the kernels replaced by recorders; yields
    (the log, every AOT case), the cases built before the kernels are replaced."""
    pytest.importorskip("triton", reason="the triton package is not installed")
    from bonekern.backends.triton import bat, bone

    cases = bone.aot_cases() + bat.aot_cases()
    log: list = []
    for module in (bone, bat):
        for name in dir(module):
            if name.endswith("_kernel"):
                monkeypatch.setattr(module, name, _Recorder(getattr(module, name), log))
    monkeypatch.setattr(common.KernelEnv, "of", staticmethod(lambda device: common.AOT_ENV))
    return log, cases


def _check_log(log: list, cases: list, what: str) -> int:
    assert log, what
    for kernel, _, args, kwargs in log:
        assert not args, f"{what}: {kernel.__name__} launched with positional arguments"
        assert set(kwargs) - {"num_warps", "num_stages"} == set(kernel.arg_names), f"{what}: {kernel.__name__}"
        found = [c for c in cases if c.in_baseline and _matches(c, kernel, kwargs)]
        shown = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
        assert found, f"{what}: {kernel.__name__} launch {shown} is no AOT case"
    count = len(log)
    log.clear()
    return count


def test_bone_launches_are_the_aot_cases(recorded):
    """Every shipped bone/mini config (bf16 and fp32, both GPU families, the r the baseline samples, mini's one-hot
    and plain folds, two M splits) launches exactly the specialisations aot_cases() compiles."""
    from bonekern.backends.triton import bone

    log, cases = recorded
    launches = 0
    for arch, rs in (("sm90", (8, 64)), ("sm80", (8, 32, 64))):
        for dtype in (torch.bfloat16, torch.float32):
            for r in rs:
                for c in (8, 64):
                    m, n, k = 300, 256, 256
                    x, w = torch.empty(m, k, dtype=dtype), torch.empty(n, k, dtype=dtype)
                    block, bias, dy = torch.empty(r, c), torch.empty(n, dtype=dtype), torch.empty(m, n, dtype=dtype)
                    s = torch.empty(m, r)
                    fwd = OpProblem("bone_forward", m, n, k, r, c, dtype, torch.float32, CPU)
                    for config in configs.candidates(fwd, arch):
                        bone.bone_forward(x, w, block, bias, config)
                        launches += _check_log(log, cases, f"{arch} r{r} c{c} {dtype} {config}")
                    bwd = OpProblem("bone_backward", m, n, k, r, c, dtype, torch.float32, CPU)
                    for config in configs.candidates(bwd, arch):
                        bone.bone_backward(dy, s, w, block, True, True, config)
                        launches += _check_log(log, cases, f"{arch} r{r} c{c} {dtype} {config}")
    assert launches > 300


def test_bat_launches_are_the_aot_cases(recorded):
    """Every shipped bat config of the baseline's specs (bat.AOT_SPECS: r per r class, bf16 every candidate, fp32
    and r = 256 the default tile set) launches exactly the specialisations aot_cases() compiles."""
    from bonekern.backends.triton import bat

    log, cases = recorded
    launches = 0
    for arch in tiles.SHIPPED_ARCHS:
        for r, dtype, default_only in bat.AOT_SPECS:
            m, n = 300, max(256, 2 * r)
            x, w, dy = torch.empty(m, n, dtype=dtype), torch.empty(n, n, dtype=dtype), torch.empty(m, n, dtype=dtype)
            block, bias = torch.empty(n // r, r, r), torch.empty(n, dtype=dtype)
            for op in ("bat_forward", "bat_backward"):
                shipped = configs.candidates(OpProblem(op, m, n, n, r, r, dtype, torch.float32, CPU), arch)
                if default_only:
                    shipped = [c for c in shipped if c.label == shipped[0].label or c.gemm == "triton"]
                for config in shipped:
                    if op == "bat_forward":
                        bat.bat_forward(x, w, block, bias, config)
                    else:
                        bat.bat_backward(dy, x, w, block, True, True, config)
                    launches += _check_log(log, cases, f"{arch} r{r} {dtype} {config}")
    assert launches > 100
