"""Which backend and config run one call: the one place a call's backend is decided.

``backend="auto"`` may use every available backend in :data:`AUTO_ORDER` for the device type that implements the
call's op (:meth:`Backend.implements`); a named backend must be available and implement the op, or the call fails
with :class:`BackendUnavailableError` saying why. Among those, the
autotuner (:func:`bonekern.tuning.choose`) picks the backend and config: from a profile, the user cache, a
shipped profile, by timing the candidates on the call's real tensors, or -- when nothing is tuned or
``BONEKERN_AUTOTUNE=0`` -- the first backend's ``default_config(problem)``. The chosen config is handed once to
:meth:`Backend.prepare_config`, and the (backend, prepared config) pair is remembered for the rest of the
process, so a later call of the same problem costs one dictionary lookup.

Verify before trust (:mod:`bonekern.verify`): before a backend that runs its own kernels (Triton, CuPy) serves
a problem with a config for the first time, the config is checked once on the device against the torch backend
on a small problem of the same op, variant and dtypes (the verdict is cached per device, library versions and
kernel source, in memory and beside the tuning cache). A config that fails to compile or launch, or disagrees,
is passed over for the next candidate -- the chosen one, then each candidate backend's default in order, then
the torch backend's default (even when a kernel backend was named: training never stops on a broken kernel)
-- with one :class:`~bonekern.verify.KernelVerificationWarning`. ``BONEKERN_VERIFY=0`` turns this off.

Direction: dispatch -> :mod:`bonekern.tuning` -> :mod:`autotune`. Nothing below dispatch imports it: tuning is
given the backends to consider, and a backend whose availability changes at run time (a test registering a
kernel launcher) says so through :func:`bonekern.backends.availability_changed`, which retires every remembered
decision.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from autotune import Candidate

from . import tuning, verify
from .backends import Backend, OpProblem, availability_generation, check_backend_name, get_backend
from .errors import BackendUnavailableError

AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "cupy", "torch"),
}
"""Backends ``backend="auto"`` may use per device type, the default first."""

DEFAULT_ORDER: tuple[str, ...] = ("torch",)
"""Any other device type (the CPU included) uses the torch backend: on the CPU the Triton interpreter and the
CuPy host shim are test tools, never picked automatically."""

MEMO_ENV: tuple[str, ...] = (
    f"{tuning.ENV_PREFIX}_AUTOTUNE",
    f"{tuning.ENV_PREFIX}_AUTOTUNE_LOG",
    f"{tuning.ENV_PREFIX}_CACHE_DIR",
    f"{tuning.ENV_PREFIX}_AUTOTUNE_PROFILE",
    verify.ENV,
    "TRITON_INTERPRET",
    "XDG_CACHE_HOME",
)
"""The environment variables a decision depends on (part of the memo key, so changing one takes effect)."""


def require_available(name: str, device: torch.device) -> Backend:
    """The backend called ``name`` if it can run on ``device``; else BackendUnavailableError with the reason."""
    backend = get_backend(check_backend_name(name))
    reason = backend.unavailable_reason(device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run on {device}: {reason}")
    return backend


def require_op(backend: Backend, op: str) -> Backend:
    """``backend`` if it implements ``op``; else BackendUnavailableError saying so."""
    if not backend.implements(op):
        raise BackendUnavailableError(f"backend {backend.name!r} does not implement {op} (yet)")
    return backend


def auto_candidates(device: torch.device, op: str | None = None) -> list[Backend]:
    """The backends ``backend="auto"`` may choose from on ``device`` (for ``op``, when given: those that implement
    it), the default first."""
    order = AUTO_ORDER.get(device.type, DEFAULT_ORDER)
    return [
        b for b in map(get_backend, order) if b.unavailable_reason(device) is None and (op is None or b.implements(op))
    ]


def scope_members(scope: str, device_type: str) -> tuple[str, ...]:
    """The backends a tuning scope ("auto" or a backend name) stands for, whose sources its keys hash: for "auto"
    the whole auto order of the device type (available or not, so a key does not depend on what is installed:
    that is in the versions), else the one named."""
    return AUTO_ORDER.get(device_type, DEFAULT_ORDER) if scope == "auto" else (scope,)


def candidates_for(scope: str, device: torch.device, op: str | None = None) -> list[Backend]:
    """The backends a call with ``backend=scope`` may run on: the available ones of the auto order (that
    implement ``op``, when given), or the one named (BackendUnavailableError when it cannot run on ``device`` or
    does not implement ``op``). Never empty for "auto" on an op the torch backend implements."""
    if scope == "auto":
        found = auto_candidates(device, op)
        if not found:
            raise BackendUnavailableError(f"no available backend implements {op} on {device}")
        return found
    backend = require_available(scope, device)
    return [backend] if op is None else [require_op(backend, op)]


# ------------------------------------------------------------------------------------------------------------
# The per-process memo.
# ------------------------------------------------------------------------------------------------------------

_memo: dict[tuple, tuple[Backend, Any]] = {}
"""memo key -> (backend, prepared config): what :func:`select` decided, reused by every later call."""
_memo_lock = threading.Lock()
_memo_generation = availability_generation()
"""The backends' availability generation the memo's entries were decided under."""


def memo_key(problem: OpProblem, scope: str, args: Sequence[Any] | None) -> tuple:
    """What a decision depends on besides the cache files: the problem, the scope ("auto" or a backend name),
    the gradients a backward call needs, the tuner's environment variables, the CPU thread count and the
    backends' availability generation."""
    grads = tuning.needed_grads(problem.op, args)
    env = tuple(map(os.environ.get, MEMO_ENV))
    threads = torch.get_num_threads() if problem.device.type == "cpu" else 0
    return (problem, scope, grads, env, threads, availability_generation())


def forget_choices() -> None:
    """Drop every remembered decision (tests; after editing the cache by hand). The next call of each problem
    asks the tuner again, so it picks up cache entries another process (``python -m autotune tune``) wrote."""
    with _memo_lock:
        _memo.clear()


def select(problem: OpProblem, requested: str, args: Sequence[Any] | None = None) -> tuple[Backend, Any]:
    """The backend and its prepared config (:meth:`Backend.prepare_config`) for ``problem``; ``requested`` is
    "auto" or a backend name. Decided once per :func:`memo_key`, then remembered for the process.

    ``args`` are the call's tensors (and flags) as the backend method takes them, without the config; with them
    the tuner can time candidates on the real inputs when nothing is tuned yet.
    """
    global _memo_generation
    key = memo_key(problem, requested, args)
    hit = _memo.get(key)
    if hit is not None:  # the common case: this layer's shape was seen before in this process
        return hit
    backends = candidates_for(requested, problem.device, problem.op)
    members = scope_members(requested, problem.device.type)
    candidate = tuning.choose(problem, requested, members, backends, args)
    backend, prepared = trusted(problem, candidate, backends, args)
    with _memo_lock:
        if key[-1] > _memo_generation:  # availability changed: the older entries can never be hit again
            _memo.clear()
            _memo_generation = key[-1]
        _memo[key] = (backend, prepared)
    return backend, prepared


# ------------------------------------------------------------------------------------------------------------
# Verify before trust.
# ------------------------------------------------------------------------------------------------------------


def fallback_chain(problem: OpProblem, chosen: Candidate, backends: Sequence[Backend]) -> list[Candidate]:
    """The candidates tried in turn when verification fails: ``chosen``, each of ``backends``' default for
    ``problem``, then the torch backend's default; duplicates removed."""
    torch_backend = get_backend("torch")
    chain = [chosen, *(Candidate(b.name, b.default_config(problem)) for b in backends)]
    if torch_backend.unavailable_reason(problem.device) is None and torch_backend.implements(problem.op):
        chain.append(Candidate(torch_backend.name, torch_backend.default_config(problem)))
    out: list[Candidate] = []
    for c in chain:
        if not any(c.same_as(o) for o in out):
            out.append(c)
    return out


def _must_verify(backend: Backend, device: torch.device) -> bool:
    if not backend.verify_before_use or not verify.enabled():
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def verify_identity(problem: OpProblem, backend: Backend) -> verify.Identity:
    """What a verdict for ``backend`` on ``problem``'s device depends on besides the problem and config."""
    name, capability = tuning.device_identity(problem.device)
    versions = tuple(sorted(tuning.versions().items()))
    return verify.Identity(name, capability, versions, tuning.backend_source_hash(backend.name))


def verify_directory() -> Path:
    """Where the verdict file lives: the tuning cache's directory."""
    return tuning.TUNER.settings().cache_path.parent


def verify_config(
    problem: OpProblem, backend: Backend, config: dict, args: Sequence[Any] | None = None, directory: Path | None = None
) -> verify.Verdict | None:
    """The verdict on ``backend`` serving ``problem`` with ``config`` (:func:`bonekern.verify.check`, with this
    device's identity and the tuner's agreement check); the verdict file in ``directory`` (default: beside the
    tuning cache). None when the op cannot be verified."""
    prepared = backend.prepare_config(problem, dict(config))
    return verify.check(
        problem, backend, config, prepared, args, verify_identity(problem, backend), tuning.outputs_agree,
        directory or verify_directory(),
    )  # fmt: skip


def trusted(
    problem: OpProblem, chosen: Candidate, backends: Sequence[Backend], args: Sequence[Any] | None
) -> tuple[Backend, Any]:
    """The first candidate of :func:`fallback_chain` whose verdict is good (or that needs none), prepared.

    Each failed candidate gets one warning per process naming the kernel, config, error and what serves
    instead. If every candidate of the chain fails, the torch backend's default serves anyway.
    """
    failed: list[tuple[Candidate, verify.Verdict]] = []
    chain = fallback_chain(problem, chosen, backends)
    choice: tuple[Backend, Any] | None = None
    served = chain[-1]
    for candidate in chain:
        backend = get_backend(candidate.backend)
        prepared = backend.prepare_config(problem, dict(candidate.config))
        if not _must_verify(backend, problem.device):
            choice, served = (backend, prepared), candidate
            break
        verdict = verify.check(
            problem, backend, candidate.config, prepared, args, verify_identity(problem, backend), tuning.outputs_agree,
            verify_directory(),
        )  # fmt: skip
        if verdict is None or verdict.ok:
            choice, served = (backend, prepared), candidate
            break
        failed.append((candidate, verdict))
    if choice is None:  # nothing passed: the last resort serves unverified
        backend = get_backend(served.backend)
        choice = (backend, backend.prepare_config(problem, dict(served.config)))
    for candidate, verdict in failed:
        verify.warn_once(
            verdict, problem, f"{candidate.backend} kernel config {candidate.describe()!r}",
            f"{served.describe()!r}", verify_directory(),
        )  # fmt: skip
    return choice
