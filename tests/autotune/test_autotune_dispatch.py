"""bonekern's dispatch through the autotuner on the CPU: real tuning of the torch backend's bat strategies (the
winner decided by an injected timer), "auto" and named backends following the cache, the switches that keep
the tuner from timing, and logging."""

from __future__ import annotations

import logging

import pytest
import torch

import bonekern
from autotune import CacheFile, Candidate, Entry, Timing
from autotune.settings import CACHE_FILE_NAME
from bonekern import dispatch, reference, tuning
from bonekern.backends import OpProblem, get_backend
from bonekern.backends.pytorch import TorchBackend

M, N, K, R = 6, 64, 32, 8  # bat: 8 out-blocks


class FakeTimer:
    """Runs each candidate once (so tuning really executes it) and reports ``times`` (ms) by config."""

    def __init__(self, times: dict[tuple[str, int], float] | None = None, fail: bool = False):
        self.times = times or {}
        self.fail = fail
        self.timed: list[tuple[str, str, int]] = []

    def measure(self, candidate, fn, best_ms):
        if self.fail:
            raise AssertionError(f"nothing may be timed here; asked to time {candidate}")
        fn()
        key = (candidate.config["strategy"], candidate.config["chunk_blocks"])
        self.timed.append(key)
        return [self.times.get(key, 5.0)]

    def synchronize(self):
        pass

    def describe(self):
        return "fake timer"


@pytest.fixture
def cache_path(tmp_path, monkeypatch):
    monkeypatch.setenv("BONEKERN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("BONEKERN_AUTOTUNE", "1")
    monkeypatch.delenv("BONEKERN_AUTOTUNE_PROFILE", raising=False)
    monkeypatch.delenv("BONEKERN_AUTOTUNE_LOG", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    dispatch.forget_choices()
    yield tmp_path / CACHE_FILE_NAME
    dispatch.forget_choices()


@pytest.fixture
def seen_configs(monkeypatch):
    """Records the config of every bat_forward / bat_backward the torch backend runs (then runs it)."""
    seen: dict[str, list[dict]] = {"bat_forward": [], "bat_backward": []}
    for op in seen:
        original = getattr(TorchBackend, op)

        def spy(self, *args, _op=op, _original=original):
            seen[_op].append(dict(args[-1]))
            return _original(self, *args)

        monkeypatch.setattr(TorchBackend, op, spy)
    return seen


def use_timer(monkeypatch, timer: FakeTimer) -> FakeTimer:
    monkeypatch.setattr(tuning.TUNER, "timer", timer)
    return timer


def bat_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g, requires_grad=True)
    weight = torch.randn(N, K, generator=g) / K**0.5
    block = (torch.randn(N // R, R, R, generator=g) * 0.1).requires_grad_()
    return x, weight, block


def forward_backward(backend: str = "auto"):
    x, weight, block = bat_inputs()
    y = bonekern.bone_linear(x, weight, block, variant="bat", backend=backend)
    y.square().sum().backward()
    return x, weight, block, y


def torch_default(op: str) -> dict:
    return get_backend("torch").default_config(OpProblem(op, M, N, K, R, R, torch.float32, torch.float32, "cpu"))


def store_choice(path, op: str, scope: str, config: dict) -> None:
    """Put an entry choosing ``config`` for this test's problem into the cache file, as a tuning run would."""
    problem = OpProblem(op, M, N, K, R, R, torch.float32, torch.float32, torch.device("cpu"))
    key = tuning.make_key(problem, scope, tuning.needed_grads(op, None), dispatch.scope_members(scope, "cpu"))
    choice = Candidate("torch", config)
    CacheFile(path).put([Entry(key, choice, Candidate("torch", torch_default(op)), (Timing(choice, 1.0, 3),), M,
                               "test", "2026-01-01")])  # fmt: skip


def test_cpu_tuning_times_the_torch_strategies_and_keeps_the_winner(cache_path, monkeypatch, seen_configs):
    assert torch_default("bat_forward") == {"strategy": "rowchunk", "chunk_blocks": 8}  # the winner below differs
    timer = use_timer(monkeypatch, FakeTimer({("rowchunk", 4): 1.0, ("materialize", 1): 2.0}))
    x, weight, block, y = forward_backward()

    # The tuned configs compute the right thing (output and both gradients against the float64 reference).
    x64, block64 = x.detach().double().requires_grad_(), block.detach().double().requires_grad_()
    expected = reference.linear(x64, weight.double(), block64, None, "bat")
    expected.square().sum().backward()
    for got, want in ((y, expected), (x.grad, x64.grad), (block.grad, block64.grad)):
        torch.testing.assert_close(got.detach().double(), want.detach(), rtol=1e-5, atol=1e-5)
    # Every candidate of both passes ran (checked, then timed); the injected times decided the winners.
    assert len(timer.timed) == 2 * len(get_backend("torch").configs(
        OpProblem("bat_forward", M, N, K, R, R, torch.float32, torch.float32, torch.device("cpu"))))  # fmt: skip
    assert seen_configs["bat_forward"][-1] == {"strategy": "rowchunk", "chunk_blocks": 4}
    assert seen_configs["bat_backward"][-1] == {"strategy": "rowchunk", "chunk_blocks": 4}

    entries = {(e.key.op, e.key.scope): e for e in CacheFile(cache_path).table().entries()}
    assert set(entries) == {(op, s) for op in ("bat_forward", "bat_backward") for s in ("auto", "torch")}
    assert entries["bat_forward", "auto"].choice.config == {"strategy": "rowchunk", "chunk_blocks": 4}
    assert entries["bat_forward", "auto"].key.device_type == "cpu"

    # A later process reads the winners back; nothing is timed again, by "auto" or by the named backend.
    dispatch.forget_choices()
    timer.timed.clear()
    for backend in ("auto", "torch"):
        forward_backward(backend)
        assert seen_configs["bat_forward"][-1] == {"strategy": "rowchunk", "chunk_blocks": 4}
    assert timer.timed == []


@pytest.mark.parametrize("scope", ["auto", "torch"])
def test_dispatch_follows_the_cache(cache_path, monkeypatch, seen_configs, scope):
    use_timer(monkeypatch, FakeTimer(fail=True))
    tuned = {"strategy": "rowchunk", "chunk_blocks": 2}
    assert tuned not in (torch_default("bat_forward"), torch_default("bat_backward"))
    store_choice(cache_path, "bat_forward", scope, tuned)
    store_choice(cache_path, "bat_backward", scope, tuned)
    forward_backward(scope)
    assert seen_configs["bat_forward"] == [tuned]
    assert seen_configs["bat_backward"] == [tuned]


@pytest.mark.parametrize("switch", [("BONEKERN_AUTOTUNE", "0"), ("TRITON_INTERPRET", "1")])
def test_switched_off_tuner_never_times_and_uses_defaults(cache_path, monkeypatch, seen_configs, switch):
    use_timer(monkeypatch, FakeTimer(fail=True))
    store_choice(cache_path, "bat_forward", "auto", {"strategy": "rowchunk", "chunk_blocks": 2})
    monkeypatch.setenv(*switch)
    forward_backward()
    assert seen_configs["bat_forward"] == [torch_default("bat_forward")]
    assert seen_configs["bat_backward"] == [torch_default("bat_backward")]
    assert not any(e.key.op == "bat_backward" for e in CacheFile(cache_path).table().entries())


def test_choices_are_logged_with_their_layer(cache_path, monkeypatch, caplog):
    use_timer(monkeypatch, FakeTimer(fail=True))
    store_choice(cache_path, "bat_forward", "auto", {"strategy": "rowchunk", "chunk_blocks": 2})
    monkeypatch.setenv("BONEKERN_AUTOTUNE", "lookup")
    monkeypatch.setenv("BONEKERN_AUTOTUNE_LOG", "1")
    caplog.set_level(logging.INFO, logger="autotune")
    forward_backward()
    lines = [r.getMessage() for r in caplog.records if r.name == "autotune"]
    assert any("bat_forward[auto]" in s and "rowchunk chunk_blocks=2" in s and "[user cache:" in s for s in lines)
    assert any("bat_backward[auto]" in s and "[default:" in s for s in lines)


def test_outputs_agree_catches_wrong_results():
    a = torch.randn(4, 5)
    assert tuning.outputs_agree((a, None), (a + 1e-6, None)) is None
    assert "differs" in tuning.outputs_agree(a, a * 1.5)
    assert "NaN" in tuning.outputs_agree(a, a.clone().fill_(float("nan")))
    assert "None" in tuning.outputs_agree((a, a), (a, None))


def test_key_names_device_versions_and_source():
    problem = OpProblem("bone_backward", 300, N, K, R, 16, torch.bfloat16, torch.float32, torch.device("cpu"))
    key = tuning.make_key(problem, "auto", "dx", dispatch.scope_members("auto", "cpu"))
    assert dict(key.problem) == {"variant": "mini", "dtype": "bfloat16", "block_dtype": "float32", "n": N, "k": K,
                                 "r": R, "mini_r": 16, "grads": "dx"}  # fmt: skip
    assert key.m == 512 and key.device.startswith("cpu ") and "threads" in key.capability
    assert set(dict(key.versions)) == {"torch", "triton", "cupy"} and dict(key.versions)["torch"] == torch.__version__
    assert key.source == tuning.backend_source_hash("torch") and len(key.source) == 16
