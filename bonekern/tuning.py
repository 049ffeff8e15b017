"""bonekern's tunable ops declared for the generic :mod:`autotune` package: problem -> tuning key, search space,
agreement check.

:func:`bonekern.dispatch.select` -- the only caller at run time -- hands :func:`choose` a call's
:class:`~bonekern.backends.OpProblem`, its scope ("auto" or a backend name), the backends the scope stands for
(whose sources the key hashes), the available backends to choose among, and the call's real tensors; it gets
back the winning :class:`autotune.Candidate` (backend name and config dict). Dispatch prepares and remembers it;
this module keeps no per-process state besides caches of fixed facts, and never imports dispatch. The
``python -m autotune`` provider (:mod:`bonekern.autotune_provider`) builds its jobs from :func:`search_space`.

What a tuned result is filed under (:class:`autotune.TuningKey`):

- op, scope ("auto" or the backend name), variant, dtype, block dtype, N, K, r (and mini_r for mini), for
  backward ops which gradients are needed, whether dropout is applied (adapter ops; only when it is), and M
  bucketed to a power of two;
- the device name and capability (``sm_90``; on a CPU the architecture and torch's thread count);
- torch / triton / cupy versions and a hash of the source files of the backends in the scope.

Candidates are each backend's ``configs(problem)`` with its ``default_config(problem)`` first; the default of
the whole space is the first backend's default (what bonekern runs when nothing is tuned). While tuning, a
candidate whose output differs from the default's by more than :data:`AGREEMENT` is dropped, so a broken
config can never win. Shipped profiles live in the top-level ``profiles/`` directory, installed as the package
``bonekern.profiles``; :func:`profiles_dir` finds them either way.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.resources
import logging
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from autotune import Candidate, SearchSpace, Tuner, TuningKey, hash_sources, library_versions
from autotune.keys import profile_name
from autotune.tuner import Runner, structurally_accepted

from .backends import Backend, OpProblem, get_backend
from .backends.base import GRAD_FLAGS_AT
from .tolerances import AGREEMENT, AGREEMENT_FALLBACK

APP = "bonekern"
ENV_PREFIX = "BONEKERN"

LIBRARIES: dict[str, str] = {
    "torch": "torch",
    "triton": "triton|pytorch-triton",
    "cupy": "cupy-cuda13x|cupy-cuda12x|cupy",
}
"""Libraries whose versions are part of every key (short name -> distribution names, first installed wins)."""


# ------------------------------------------------------------------------------------------------------------
# Identity: device, versions, kernel source.
# ------------------------------------------------------------------------------------------------------------


@functools.cache
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


@functools.cache
def _cuda_identity(index: int) -> tuple[str, str]:
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"sm_{major}{minor}"


def device_identity(device: torch.device) -> tuple[str, str]:
    """(name, capability) of ``device``: ("NVIDIA H100 80GB HBM3", "sm_90") or ("cpu AMD EPYC", "x86_64, 2 threads")."""
    if device.type == "cuda":
        return _cuda_identity(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "cpu":
        return f"cpu {_cpu_model()}", f"{platform.machine()}, {torch.get_num_threads()} threads"
    return device.type, ""


@functools.cache
def versions() -> dict[str, str]:
    return library_versions(LIBRARIES)


@functools.cache
def backend_source_hash(name: str) -> str:
    """Hash of the source of backend ``name``: its module file, or every source file of its package, plus the
    files of its ``shared_source_modules``."""
    backend = get_backend(name)
    paths = []
    for module_name in (type(backend).__module__, *backend.shared_source_modules):
        module = importlib.import_module(module_name)
        path = Path(module.__file__ or "")
        if not path.is_file():
            return f"unhashable:{module.__name__}"
        paths.append(path.parent if path.name == "__init__.py" else path)
    return hash_sources(paths)


@functools.cache
def scope_source_hash(members: tuple[str, ...]) -> str:
    """Hash of the sources of a scope's backends (``members``, from :func:`bonekern.dispatch.scope_members`):
    the one backend's hash, or a hash of every member's."""
    if len(members) == 1:
        return backend_source_hash(members[0])
    joined = ";".join(f"{n}:{backend_source_hash(n)}" for n in members)
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def needed_grads(op: str, args: Sequence[Any] | None) -> str:
    """For backward ops, which gradients are computed ("dx+dblock", "dx", "dblock"); "" for forward ops."""
    if not op.endswith("backward"):
        return ""
    at = GRAD_FLAGS_AT[op]
    need_dx, need_dblock = (True, True) if args is None else (bool(args[at]), bool(args[at + 1]))
    return "+".join(name for name, need in (("dx", need_dx), ("dblock", need_dblock)) if need) or "none"


def make_key(problem: OpProblem, scope: str, grads: str, members: tuple[str, ...]) -> TuningKey:
    """The key ``problem`` is filed under in ``scope``; ``grads`` from :func:`needed_grads`; ``members`` the
    backends the scope stands for (their sources are hashed into the key)."""
    fields: dict[str, Any] = {
        "variant": problem.variant,
        "dtype": dtype_name(problem.dtype),
        "block_dtype": dtype_name(problem.block_dtype),
        "n": problem.n,
        "k": problem.k,
        "r": problem.r,
    }
    if problem.variant == "mini":
        fields["mini_r"] = problem.block_cols
    if grads:
        fields["grads"] = grads
    if problem.dropout:
        fields["dropout"] = True
    name, capability = device_identity(problem.device)
    return TuningKey.make(
        problem.op,
        scope,
        fields,
        problem.m,
        problem.device.type,
        name,
        capability,
        versions(),
        scope_source_hash(tuple(members)),
    )


# ------------------------------------------------------------------------------------------------------------
# Profiles shipped with bonekern.
# ------------------------------------------------------------------------------------------------------------


def profiles_dir() -> Any:
    """The shipped profiles: the package ``bonekern.profiles`` when installed (a normal ``pip install`` maps the
    top-level ``profiles/`` there), else the ``profiles/`` directory beside the package (a source checkout)."""
    try:
        return importlib.resources.files("bonekern.profiles")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "profiles"


def shipped_profile(key: TuningKey) -> Any:
    """The shipped profile for ``key``'s device: ``profiles/<slug of the device name>.json``, e.g.
    ``nvidia-h100-80gb-hbm3.json`` (it need not exist)."""
    return profiles_dir() / profile_name(key.device)


TUNER = Tuner(APP, ENV_PREFIX, profile_source=shipped_profile)
_log = logging.getLogger("autotune.bonekern")
"""The tuner bonekern's dispatch and ``python -m autotune`` share."""


# ------------------------------------------------------------------------------------------------------------
# Search spaces and runners.
# ------------------------------------------------------------------------------------------------------------


def outputs_agree(reference: object, output: object) -> str | None:
    """None when ``output`` matches ``reference`` (tensors, tuples of tensors or None) within :data:`AGREEMENT`."""
    refs = reference if isinstance(reference, tuple) else (reference,)
    outs = output if isinstance(output, tuple) else (output,)
    if len(refs) != len(outs):
        return f"{len(outs)} outputs instead of {len(refs)}"
    for i, (a, b) in enumerate(zip(refs, outs, strict=True)):
        if a is None or b is None:
            if (a is None) != (b is None):
                return f"output {i} is {'None' if b is None else 'a tensor'} where the default's is not"
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"output {i} is {tuple(b.shape)} {b.dtype}, expected {tuple(a.shape)} {a.dtype}"
        if a.numel() == 0:
            continue
        if not torch.equal(torch.isnan(a), torch.isnan(b)):
            return f"output {i} has NaNs where the default's has none (or the reverse)"
        finite = torch.isfinite(a) & torch.isfinite(b)
        work = torch.float64 if a.dtype == torch.float64 else torch.float32
        scale = a[finite].to(work).abs().max().item() if finite.any() else 0.0
        err = (a[finite].to(work) - b[finite].to(work)).abs().max().item() if finite.any() else 0.0
        allowed = AGREEMENT.get(a.dtype, AGREEMENT_FALLBACK) * max(scale, 1e-30)
        if err > allowed:
            return f"output {i} differs from the default's by {err:.3g} (allowed {allowed:.3g})"
    return None


def _candidates(problem: OpProblem, backends: Sequence[Backend]) -> list[Candidate]:
    out = []
    for backend in backends:
        try:
            configs = [backend.default_config(problem), *backend.configs(problem)]
        except Exception as exc:  # a backend still being written, or one that cannot serve this problem
            _log.info(
                "%s: backend %s offers no configs for %s (%s); not a candidate", problem.op, backend.name, problem, exc
            )
            continue
        out += [Candidate(backend.name, config) for config in configs]
    return out


def search_space(
    problem: OpProblem, scope: str, members: tuple[str, ...], backends: Sequence[Backend], grads: str
) -> SearchSpace:
    """The tuner's view of one call: key (see :func:`make_key`), default (the first of ``backends``' default
    config), candidates (every config of every one of ``backends``), checks."""
    backends = [b for b in backends if b.implements(problem.op)]
    if not backends:
        raise ValueError(f"no backend given for {problem.op} implements it")
    key = make_key(problem, scope, grads, members)
    allowed = {b.name for b in backends}
    backend_keys = {}
    if scope == "auto":
        backend_keys = {b.name: key.with_scope(b.name, backend_source_hash(b.name)) for b in backends}
    capturing = problem.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    space = SearchSpace(
        key=key,
        m=problem.m,
        default=Candidate(backends[0].name, backends[0].default_config(problem)),
        candidates=lambda: _candidates(problem, backends),
        label=(
            f"{problem.op}[{scope}] {problem.variant} {dtype_name(problem.dtype)} "
            f"M={problem.m} N={problem.n} K={problem.k} r={problem.r}" + (f" {grads}" if grads else "")
        ),
        backend_keys=backend_keys,
        compare=outputs_agree,
        device=problem.device,
        may_time=not capturing,
    )
    space.accepts = lambda c: c.backend in allowed and structurally_accepted(c, space.candidate_list())
    return space


def runner_for(problem: OpProblem, args: Sequence[Any]) -> Runner:
    """``runner(candidate)``: a function that runs ``problem.op`` with ``args`` on the candidate's backend and
    config (the config prepared once, when the runner is made, as dispatch prepares a chosen one)."""

    def run(candidate: Candidate):
        backend = get_backend(candidate.backend)
        fn = getattr(backend, problem.op)
        prepared = backend.prepare_config(problem, dict(candidate.config))
        return lambda: fn(*args, prepared)

    return run


def choose(
    problem: OpProblem,
    scope: str,
    members: tuple[str, ...],
    backends: Sequence[Backend],
    args: Sequence[Any] | None = None,
) -> Candidate:
    """The backend and config (a JSON dict, not yet prepared) to run ``problem`` with, chosen among ``backends``
    by :data:`TUNER`: looked up, tuned now on ``args`` (the call's tensors, when given and tuning is allowed), or
    the first backend's default. ``scope`` and ``members`` as for :func:`make_key`."""
    space = search_space(problem, scope, members, backends, needed_grads(problem.op, args))
    return TUNER.choose(space, runner_for(problem, args) if args is not None else None).candidate


__all__ = [
    "AGREEMENT",
    "TUNER",
    "choose",
    "device_identity",
    "make_key",
    "needed_grads",
    "outputs_agree",
    "profiles_dir",
    "search_space",
]
