"""Verify before trust (bonekern/verify.py, bonekern/dispatch.py) driven end to end on the CPU.

The interpreter-backed Triton backend and the shim-backed CuPy backend (tests/conftest.py) are made candidates of
``backend="auto"`` on the CPU, as they are on a GPU, so every real kernel is verified against the torch backend
through the Triton interpreter and the CUDA host shim. Broken configs are injected by wrapping a backend's op
method: one raises (as a failed compile or launch does), one returns wrong numbers. Checked: the call is served
by the next candidate with the right result, one warning names the kernel, config and error, the verdict is
filed and a second process reads it instead of checking again, and ``BONEKERN_VERIFY=0`` turns it all off.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bonekern
from bonekern import dispatch, reference, verify
from bonekern.backends import OPS, Backend, OpProblem, get_backend
from bonekern.backends.cupy import CupyBackend
from bonekern.backends.triton import TritonBackend
from bonekern.variants import VARIANTS
from tests.support import ROOT, assert_close_to_reference, backend_or_skip

KERNEL_BACKENDS = ("triton", "cupy")


@pytest.fixture
def kernels_for_auto(tmp_path, monkeypatch):
    """``auto`` on the CPU tries triton, then cupy, then torch (the CUDA order); verification on; a fresh cache."""
    for name in KERNEL_BACKENDS:
        backend_or_skip(name)
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", ("triton", "cupy", "torch"))
    monkeypatch.setenv("BONEKERN_VERIFY", "1")
    monkeypatch.setenv("BONEKERN_AUTOTUNE", "0")
    monkeypatch.setenv("BONEKERN_CACHE_DIR", str(tmp_path))
    dispatch.forget_choices()
    verify.forget()
    yield tmp_path
    dispatch.forget_choices()
    verify.forget()


class Injected:
    """Wraps ``cls.<op>``: counts calls and, per ``mode``, raises ("raise"), corrupts the first output
    ("wrong") or runs the real kernel (None)."""

    def __init__(self, monkeypatch, cls: type[Backend], op: str, mode: str | None):
        self.calls = 0
        self.mode = mode
        original = getattr(cls, op)

        def wrapper(backend, *args):
            self.calls += 1
            if self.mode == "raise":
                raise RuntimeError(f"injected failure of {cls.name} {op}")
            out = original(backend, *args)
            if self.mode == "wrong":
                first = out[0] if isinstance(out, tuple) else out
                bad = first * 1.5 + 1.0
                return (bad, *out[1:]) if isinstance(out, tuple) else bad
            return out

        monkeypatch.setattr(cls, op, wrapper)


def inputs(variant: str, m: int = 5, n: int = 24, k: int = 19, r: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = 16 if variant == "bat" else k  # bat needs K % r == 0; the others keep K % r != 0
    shape = {"bone": (r, n), "mini": (r, 8), "bat": (n // r, r, r)}[variant]
    x = torch.randn(m, k, generator=g, requires_grad=True)
    weight = torch.randn(n, k, generator=g) / k**0.5
    block = (0.1 * torch.randn(shape, generator=g)).requires_grad_()
    return x, weight, block, (8 if variant == "mini" else None)


def run_and_check(variant: str, **shape) -> None:
    """Forward and backward through ``auto``; output and both gradients against the float64 reference."""
    x, weight, block, mini_r = inputs(variant, **shape)
    y = bonekern.bone_linear(x, weight, block, variant=variant, mini_r=mini_r, backend="auto")
    y.square().sum().backward()
    x64, b64 = x.detach().double().requires_grad_(), block.detach().double().requires_grad_()
    ref_block = b64 if variant != "mini" else b64.repeat(1, weight.shape[0] // mini_r)
    want = reference.linear(x64, weight.double(), ref_block, None, "bat" if variant == "bat" else "bone")
    want.square().sum().backward()
    for got, expected, what in ((y, want, "y"), (x.grad, x64.grad, "dx"), (block.grad, b64.grad, "dblock")):
        assert_close_to_reference(got, expected, torch.float32, f"{variant} {what}")


def served(op: str) -> str:
    """The backend the last decision for ``op`` chose."""
    names = [backend.name for key, (backend, _) in dispatch._memo.items() if key[0].op == op]
    assert names, f"no decision for {op}"
    return names[-1]


def verdict_file(directory) -> list[dict]:
    return json.loads((directory / verify.FILE_NAME).read_text())["entries"]


def verification_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, verify.KernelVerificationWarning)]


def test_a_raising_kernel_is_passed_over_with_one_warning(kernels_for_auto, monkeypatch):
    triton_fwd = Injected(monkeypatch, TritonBackend, "bone_forward", "raise")
    cupy_fwd = Injected(monkeypatch, CupyBackend, "bone_forward", None)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run_and_check("bone", m=300)
        run_and_check("bone", m=316)  # another M with the same small problem: no new check
        run_and_check("bone", m=5)  # another small problem: checked again, but no second warning
    assert served("bone_forward") == "cupy" and served("bone_backward") == "triton"
    messages = verification_warnings(record)
    assert len(messages) == 1, messages
    problem = OpProblem.from_tensors("bone_forward", 5, *inputs("bone")[1:3], torch.float32)
    default = TritonBackend().default_config(problem)
    for word in (
        "triton kernel config",
        default["strategy"],
        "bone_forward",
        "injected failure",
        "cupy",
        "BONEKERN_VERIFY",
    ):
        assert word in messages[0], (word, messages[0])
    assert triton_fwd.calls == 2  # the two checks only; the calls went to cupy
    assert cupy_fwd.calls == 2 + 3  # its two checks, then one forward per call
    entries = {(e["key"]["backend"], e["key"]["problem"]["op"]): e for e in verdict_file(kernels_for_auto)}
    assert entries["triton", "bone_forward"]["ok"] is False
    assert entries["triton", "bone_forward"]["error"] == "RuntimeError: injected failure of triton bone_forward"
    assert entries["cupy", "bone_forward"]["ok"] and entries["triton", "bone_backward"]["ok"]
    key = entries["triton", "bone_forward"]["key"]
    assert key["device_type"] == "cpu" and {"torch", "triton", "cupy"} <= set(key["versions"]) and key["source"]
    assert key["config"] == default and key["flags"] == {}


def test_wrong_numbers_everywhere_end_at_the_torch_backend(kernels_for_auto, monkeypatch):
    Injected(monkeypatch, TritonBackend, "bat_forward", "wrong")
    Injected(monkeypatch, CupyBackend, "bat_forward", "wrong")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run_and_check("bat")
    assert served("bat_forward") == "torch" and served("bat_backward") == "triton"
    messages = verification_warnings(record)
    assert len(messages) == 2, messages  # one per failed kernel config
    assert {m.split(" kernel config")[0] for m in messages} == {"bonekern: triton", "bonekern: cupy"}
    assert all("wrong result against the torch backend" in m and "Serving it with 'torch" in m for m in messages)


@pytest.mark.parametrize("variant", VARIANTS)
def test_good_kernels_are_verified_once_and_serve(kernels_for_auto, monkeypatch, variant):
    checks = []
    real_check = verify.run_check
    monkeypatch.setattr(verify, "run_check", lambda *a: checks.append(a[0].op) or real_check(*a))
    with warnings.catch_warnings():
        warnings.simplefilter("error", verify.KernelVerificationWarning)
        run_and_check(variant, m=70)
        run_and_check(variant, m=86)  # the same small problem (M cut to 54 for both): checked once
    forward = "bat_forward" if variant == "bat" else "bone_forward"
    assert served(forward) == "triton"
    assert sorted(checks) == sorted([forward, forward.replace("forward", "backward")])
    assert all(e["ok"] for e in verdict_file(kernels_for_auto))


SECOND_PROCESS = textwrap.dedent(
    """
    import json, os, warnings
    import torch
    import bonekern
    from bonekern import dispatch, verify
    from bonekern.backends.cupy import CupyBackend
    from bonekern.backends.triton import TritonBackend
    from tests.cupy import cuda_shim

    cuda_shim.install()
    dispatch.AUTO_ORDER["cpu"] = ("triton", "cupy", "torch")
    calls = {"triton": 0, "cupy": 0, "checks": 0}
    for cls in (TritonBackend, CupyBackend):
        original = cls.bone_forward
        def counted(self, *args, _original=original, _name=cls.name):
            calls[_name] += 1
            return _original(self, *args)
        cls.bone_forward = counted
    real_check = verify.run_check
    def counted_check(*args):
        calls["checks"] += 1
        return real_check(*args)
    verify.run_check = counted_check
    g = torch.Generator().manual_seed(0)
    x, weight, block = torch.randn(5, 19, generator=g), torch.randn(24, 19, generator=g), torch.randn(4, 24)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        bonekern.bone_linear(x, weight, block, variant="bone", backend="auto")
    messages = [str(w.message) for w in record if issubclass(w.category, verify.KernelVerificationWarning)]
    print(json.dumps({"calls": calls, "messages": messages}))
    """
)


def test_a_second_process_reads_the_verdicts(kernels_for_auto, monkeypatch):
    Injected(monkeypatch, TritonBackend, "bone_forward", "raise")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        run_and_check("bone")
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(kernels_for_auto),
        "PYTHONPATH": str(ROOT),
        "TRITON_INTERPRET": "1",
        "BONEKERN_AUTOTUNE": "0",
        "BONEKERN_VERIFY": "1",
        "BONEKERN_CACHE_DIR": str(kernels_for_auto),
    }
    done = subprocess.run(
        [sys.executable, "-c", SECOND_PROCESS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # Triton's bad verdict and CuPy's good one come from the file: nothing is checked, triton never runs.
    assert report["calls"] == {"triton": 0, "cupy": 1, "checks": 0}, report
    assert len(report["messages"]) == 1 and "injected failure of triton bone_forward" in report["messages"][0]


def test_the_switch_turns_verification_off(kernels_for_auto, monkeypatch):
    Injected(monkeypatch, TritonBackend, "bone_forward", "raise")
    monkeypatch.setenv("BONEKERN_VERIFY", "0")
    x, weight, block, _ = inputs("bone")
    with pytest.raises(RuntimeError, match="injected failure of triton bone_forward"):
        bonekern.bone_linear(x, weight, block, variant="bone", backend="auto")
    assert not (kernels_for_auto / verify.FILE_NAME).exists()
    monkeypatch.setenv("BONEKERN_VERIFY", "maybe")
    with pytest.raises(ValueError, match=r"BONEKERN_VERIFY must be one of .*got 'maybe'"):
        bonekern.bone_linear(x, weight, block, variant="bone", backend="auto")


def test_a_named_kernel_backend_falls_back_to_torch(kernels_for_auto, monkeypatch):
    Injected(monkeypatch, CupyBackend, "bone_backward", "wrong")
    x, weight, block, _ = inputs("bone")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        bonekern.bone_linear(x, weight, block, variant="bone", backend="cupy").sum().backward()
    assert served("bone_backward") == "torch" and served("bone_forward") == "cupy"
    assert len(verification_warnings(record)) == 1


def test_a_damaged_verdict_file_is_ignored_with_one_warning_and_rewritten(kernels_for_auto):
    (kernels_for_auto / verify.FILE_NAME).write_text('{"schema": "bonekern-verify/1", "entries": [')
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run_and_check("mini")
    damaged = [str(w.message) for w in record if "verify cache" in str(w.message)]
    assert len(damaged) == 1 and "ignoring it" in damaged[0], damaged
    assert verdict_file(kernels_for_auto) and all(e["ok"] for e in verdict_file(kernels_for_auto))


def implemented(op: str) -> list[str]:
    return [n for n in KERNEL_BACKENDS if get_backend(n).implements(op)]


@pytest.mark.parametrize("op", OPS)
def test_every_op_of_every_kernel_backend_can_be_verified(kernels_for_auto, op):
    """Each op a kernel backend implements gets inputs from its parameter names and a real verdict."""
    variant_cols = {"bat": 4, "mini": 8}
    for name in implemented(op):
        for variant in ("bat",) if op.startswith("bat") else ("bone", "mini"):
            cols = variant_cols.get(variant, 40)
            problem = OpProblem(op, 300, 40, 36, 4, cols, torch.float32, torch.float32, torch.device("cpu"))
            backend = get_backend(name)
            verdict = dispatch.verify_config(problem, backend, backend.default_config(problem), None, kernels_for_auto)
            assert verdict is not None and verdict.ok, (name, op, variant, verdict)


@given(
    op=st.sampled_from(OPS),
    variant=st.sampled_from(VARIANTS),
    r=st.integers(1, 128),
    groups=st.integers(1, 200),
    rest=st.integers(0, 127),
    repeats=st.integers(1, 64),
    m=st.integers(1, 1 << 20),
)
def test_small_problem_keeps_what_the_kernel_specialises_on(op, variant, r, groups, rest, repeats, m):
    bat = op.startswith("bat")
    variant = "bat" if bat else ("mini" if variant == "mini" else "bone")
    cols = r if bat else (max(1, rest) if variant == "mini" else None)
    n = r * repeats if bat else (cols * repeats if variant == "mini" else r * groups + rest)
    k = r * groups + (0 if bat else rest % r)
    problem = OpProblem(op, m, n, k, r, cols or n, torch.float16, torch.float32, torch.device("cpu"))
    small = verify.small_problem(problem)
    assert small.variant == problem.variant and (small.op, small.r, small.dtype) == (op, r, torch.float16)
    assert small.m % 16 == m % 16 and small.m <= max(m, 63) and (small.m == 1) == (m == 1)
    assert small.k % r == k % r and small.k <= 4 * r + r
    if problem.variant == "bone":  # (a mini block as wide as N is bone)
        assert small.block_cols == small.n and small.n % 16 == n % 16 and small.n <= max(n, 63)
    else:
        assert small.block_cols == problem.block_cols and small.n % small.block_cols == 0
        assert small.n <= 3 * small.block_cols
    args = verify.build_args(small, None)
    assert len(args) == len(verify.op_parameters(op))


def test_a_config_the_cache_chose_is_verified_too(kernels_for_auto, monkeypatch):
    """Whatever chose the config: here the user cache picks a non-default CuPy config, which is broken; the call
    is served by CuPy's default (verified good), and the warning names the cached config."""
    from autotune import CacheFile, Candidate, Entry, Timing
    from autotune.settings import CACHE_FILE_NAME
    from bonekern import tuning

    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", ("cupy", "torch"))
    monkeypatch.delenv("TRITON_INTERPRET")  # the tuner reads no cache under the interpreter
    monkeypatch.setenv("BONEKERN_AUTOTUNE", "lookup")
    x, weight, block, _ = inputs("bone")
    problem = OpProblem.from_tensors("bone_forward", x.shape[0], weight, block, torch.float32)
    cupy = get_backend("cupy")
    default = cupy.default_config(problem)
    # (a config with an int 0 in it can never come from the cache: the tuner accepts positive ints only)
    cached = next(c for c in cupy.configs(problem) if c != default and all(v > 0 for v in c.values() if type(v) is int))
    key = tuning.make_key(problem, "auto", "", dispatch.scope_members("auto", "cpu"))
    choice = Candidate("cupy", cached)
    entry = Entry(key, choice, Candidate("cupy", default), (Timing(choice, 1.0, 3),), x.shape[0], "test", "2026-01-01")
    CacheFile(kernels_for_auto / CACHE_FILE_NAME).put([entry])
    broken_config = cupy.prepare_config(problem, dict(cached))
    original = CupyBackend.bone_forward

    def broken_for_the_cached_config(backend, *args):
        if args[-1] == broken_config:
            raise RuntimeError("injected launch failure")
        return original(backend, *args)

    monkeypatch.setattr(CupyBackend, "bone_forward", broken_for_the_cached_config)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        y = bonekern.bone_linear(x, weight, block, variant="bone", backend="auto")
    backend, prepared = next(v for k, v in dispatch._memo.items() if k[0].op == "bone_forward")
    assert backend.name == "cupy" and prepared == cupy.prepare_config(problem, dict(default))
    messages = verification_warnings(record)
    assert len(messages) == 1 and "injected launch failure" in messages[0], messages
    assert Candidate("cupy", cached).describe() in messages[0] and Candidate("cupy", default).describe() in messages[0]
    want = reference.linear(x.detach().double(), weight.double(), block.detach().double(), None, "bone")
    assert_close_to_reference(y, want, torch.float32, "y")
