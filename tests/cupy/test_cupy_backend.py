"""The CuPy backend as a whole: availability, every config it offers, need_dx / need_dblock, what autograd keeps,
and proof that its kernels (not a torch fallback) do the work. On the CPU it runs through the host shim installed by
conftest.py; the tests marked ``gpu`` run the same checks with real CuPy launches where CUDA is present.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bonekern import BoneLinear, bone_linear
from bonekern.backends import OpProblem, get_backend, unavailable_reason
from bonekern.backends.cupy import host
from bonekern.backends.cupy import launcher as launcher_module
from bonekern.backends.cupy.launcher import CupyLauncher, install_launcher
from bonekern.backends.pytorch import TorchBackend
from bonekern.errors import BackendUnavailableError
from tests.cupy import cuda_shim
from tests.support import assert_close_to_reference, check_against_reference, make_problem

CUPY = get_backend("cupy")
TORCH = TorchBackend()


@pytest.fixture
def shim() -> cuda_shim.ShimLauncher:
    launcher = cuda_shim.install()
    launcher.history.clear()
    return launcher


def test_availability():
    """Users never get the CPU: without the test suite's shim launcher, backend="cupy" on CPU tensors says why."""
    assert unavailable_reason("cupy", "cpu") is None  # the test suite's shim is installed
    previous = install_launcher("cpu", None)
    try:
        reason = unavailable_reason("cupy", "cpu")
        assert reason is not None and "CUDA GPU" in reason
        p = make_problem("bone", (3,), 8, 8, 2)
        with pytest.raises(BackendUnavailableError, match="backend 'cupy' cannot run on cpu: CuPy kernels need a CUDA"):
            bone_linear(p.x, p.weight, p.block, p.bias, variant="bone", backend="cupy")
    finally:
        install_launcher("cpu", previous)
    assert "CUDA GPU" in CupyLauncher().unavailable_reason(torch.device("cpu"))
    assert "CUDA GPU" in unavailable_reason("cupy", "meta")


def _double(t):
    return None if t is None else t.double()


# (variant, M, N, K, r, C) -- K % r != 0 for bone/mini; bat needs r | N and r | K.
CASES = {
    "bone": (13, 24, 20, 8, 24),
    "mini": (13, 24, 20, 8, 6),
    "bat": (13, 24, 16, 4, 4),
}


def _inputs(variant: str, dtype: torch.dtype):
    m, n, k, r, cols = CASES[variant]
    g = torch.Generator().manual_seed(0)
    rand = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)
    x = rand(m, 2 * k)[:, ::2]  # strided x
    weight = rand(n, k, scale=k**-0.5)
    block = (rand(n // r, r, r, scale=0.3) if variant == "bat" else rand(r, cols, scale=0.3)).float()
    bias = rand(n)
    dy = rand(m, n)
    return x, weight, block, bias, dy


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", ["bone", "mini", "bat"])
def test_every_config_and_gradient_subset(shim, variant, dtype, device):
    """Each config of configs() gives the float64 answer; unneeded gradients come back as None."""
    x, weight, block, bias, dy = (t.to(device) for t in _inputs(variant, dtype))
    fam = "bat" if variant == "bat" else "bone"
    ops = (f"{fam}_forward", f"{fam}_backward")
    problems = [OpProblem.from_tensors(op, x.shape[0], weight, block, dtype) for op in ops]

    # float64 answers from the torch backend
    want_fwd = getattr(TORCH, ops[0])(x.double(), weight.double(), block.double(), bias.double(), {})
    want_y = want_fwd[0] if fam == "bone" else want_fwd
    saved = want_fwd[1] if fam == "bone" else x.double()
    want_dx, want_db = getattr(TORCH, ops[1])(
        dy.double(), saved, weight.double(), block.double(), True, True, TORCH.default_config(problems[1])
    )

    for config in CUPY.configs(problems[0]):
        out = getattr(CUPY, ops[0])(x, weight, block, bias, config)
        y = out[0] if fam == "bone" else out
        assert_close_to_reference(y, want_y, dtype, f"{variant} forward {config}")
    s = out[1] if fam == "bone" else None
    for config in CUPY.configs(problems[1]):
        for need_dx, need_db in ((True, True), (True, False), (False, True)):
            saved = s if fam == "bone" else x
            dx, db = getattr(CUPY, ops[1])(dy, saved, weight, block, need_dx, need_db, config)
            assert (dx is None) == (not need_dx) and (db is None) == (not need_db)
            if need_dx:
                assert dx.dtype == dtype
                assert_close_to_reference(dx, want_dx, dtype, f"{variant} dx {config}")
            if need_db:
                assert db.dtype == block.dtype
                assert_close_to_reference(db, want_db, dtype, f"{variant} dblock {config}")
    assert device == "cuda" or shim.history, "no kernel ran"


def test_bone_backward_widens_dy_in_column_chunks(shim):
    x, weight, block, bias, dy = _inputs("bone", torch.bfloat16)
    _, s = CUPY.bone_forward(x, weight, block, bias, {})
    whole = CUPY.bone_backward(dy, s, weight, block, True, True, {"chunk_cols": 24})
    shim.history.clear()
    chunked = CUPY.bone_backward(dy, s, weight, block, True, True, {"chunk_cols": 5})
    assert sum(name.startswith("bk_group_sum_bf16_f32") for name in shim.history) == 5  # 24 columns in chunks of 5
    torch.testing.assert_close(chunked[0], whole[0])
    torch.testing.assert_close(chunked[1], whole[1])


@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        ("bone", ["group_sum", "bone_add_adapter", "bone_add_grouped"]),
        ("mini", ["group_sum", "bone_add_adapter", "group_sum", "bone_add_grouped"]),
        ("bat", ["bat_weight", "group_sum", "bat_weight", "bat_block_grad"]),
    ],
)
def test_kernels_do_the_work(shim, variant, expected):
    """One forward + backward through bone_linear launches exactly the backend's kernels, in order."""
    p = make_problem(variant, (4, 3), 16, 16, 4, mini_r=8 if variant == "mini" else None)
    check_against_reference(p, "cupy")
    families = [name.removeprefix("bk_").rsplit("_", 3)[0] for name in shim.history]
    assert families == expected


def test_nan_and_inf_propagate(shim):
    """Non-finite inputs give the reference's Inf / NaN pattern (the kernels keep its order of terms).

    mini gets NaN only: it folds dY over the repeats before multiplying by S (C / N of the work), so an Inf in x
    can give +-Inf in dD where the reference's sum over repeats meets +Inf and -Inf (the torch backend does the same).
    """
    for variant in ("bone", "mini", "bat"):
        p = make_problem(variant, (6,), 16, 16, 4, mini_r=8 if variant == "mini" else None)
        p.x[1, 3] = float("nan")
        if variant != "mini":
            p.x[2, 0] = float("inf")
        check_against_reference(p, "cupy")


def _saved_tensors(layer: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    return saved


@pytest.mark.parametrize("variant", ["bone", "mini", "bat"])
def test_autograd_keeps_s_or_x_only(shim, variant):
    layer = BoneLinear.from_linear(nn.Linear(32, 48), 8, variant, **({"mini_r": 16} if variant == "mini" else {}))
    nn.init.normal_(layer.block, std=0.1)
    layer.backend = "cupy"
    saved = _saved_tensors(layer, torch.randn(10, 32, requires_grad=True))
    assert saved == ([(10, 32)] if variant == "bat" else [(10, 8)]), saved
    assert shim.history


def test_cupy_launcher_compiles_for_the_device_arch_once(tmp_path, monkeypatch):
    """The GPU launcher's compile step (NVRTC, the device's sm_XY, disk cache) works without a GPU."""
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="CuPy is not installed")
    monkeypatch.setattr(launcher_module, "_cache_dir", lambda: tmp_path)
    path = Path(CupyLauncher()._cubin("group_sum.cu", 90))
    assert path.parent == tmp_path and path.read_bytes()[:4] == b"\x7fELF" and "sm_90" in path.name
    stamp = path.stat().st_mtime_ns
    assert Path(CupyLauncher()._cubin("group_sum.cu", 90)) == path  # another process-level launcher: cache hit
    assert path.stat().st_mtime_ns == stamp and len(list(tmp_path.iterdir())) == 1


def test_rejects_unknown_tile(shim):
    x, weight, block, bias, _ = _inputs("bone", torch.float32)
    with pytest.raises(ValueError, match="variants"):
        CUPY.bone_forward(x, weight, block, bias, {"tile": "t16x16"})


# ----------------------------------------------------------------------------------------------------------------
# Real CuPy launches (GPU only)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", ["bone", "mini", "bat"])
def test_gpu_matches_reference(variant, dtype):
    assert unavailable_reason("cupy", "cuda") is None, unavailable_reason("cupy", "cuda")
    for case in (
        dict(lead=(3, 5), n=24, k=20, r=8),
        dict(lead=(65,), n=66, k=18, r=3),
        dict(lead=(300,), n=512, k=256, r=64),
    ):
        if variant == "bat" and (case["k"] % case["r"] or case["n"] % case["r"]):
            case["k"] = case["r"] * max(1, case["k"] // case["r"])
        mini_r = case["n"] // 2 if variant == "mini" else None
        for strided in (False, True):
            p = make_problem(variant, mini_r=mini_r, strided_x=strided, dtype=dtype, device="cuda", **case)
            check_against_reference(p, "cupy")


@pytest.mark.gpu
def test_gpu_kernels_match_the_shim():
    """The same kernel on the GPU and through the CPU shim gives the same numbers (up to summation order)."""
    x = torch.randn(37, 100, dtype=torch.bfloat16)
    cpu = host.group_sum(x, 8, torch.float32)
    gpu = host.group_sum(x.cuda(), 8, torch.float32)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-6)
    w, b = torch.randn(64, 96), torch.randn(4, 16, 16) * 0.1
    cpu = host.bat_weight_(torch.empty_like(w), w, b, tile="t128x16")
    gpu = host.bat_weight_(torch.empty_like(w.cuda()), w.cuda(), b.cuda(), tile="t128x16")
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_gpu_runs_on_torchs_current_stream():
    """Kernels are ordered after the work queued on torch's current stream, even a non-default one."""
    p = make_problem("bone", (512,), 256, 256, 16, device="cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # keep the side stream busy: a launch on another stream would race ahead
        x = p.x * 2  # produced on the side stream
        y = bone_linear(x, p.weight, p.block, p.bias, variant="bone", backend="cupy")
    side.synchronize()
    want = bone_linear(x, p.weight, p.block, p.bias, variant="bone", backend="torch")
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
