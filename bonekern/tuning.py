"""bonekern's tunable ops declared for the generic :mod:`autotune` package, and its provider for the CLI.

Every call of a ``torch.ops.bonekern`` op reaches :func:`choose` (through :func:`bonekern.dispatch.select`)
with its :class:`~bonekern.backends.OpProblem`, the backends it may use (``"auto"``: every available backend of
:data:`bonekern.dispatch.AUTO_ORDER`; a named backend: that one) and its real tensors. :func:`choose` returns
the backend and config to run, remembered per problem for the life of the process.

What a tuned result is filed under (:class:`autotune.TuningKey`):

- op, scope ("auto" or the backend name), variant, dtype, block dtype, N, K, r (and mini_r for mini), for
  backward ops which gradients are needed, and M bucketed to a power of two;
- the device name and capability (``sm_90``; on a CPU the architecture and torch's thread count);
- torch / triton / cupy versions and a hash of the source files of the backends in the scope.

Candidates are each backend's ``configs(problem)`` with its ``default_config(problem)`` first; the default of
the whole space is the first backend's default (what bonekern runs when nothing is tuned). While tuning, a
candidate whose output differs from the default's by more than :data:`AGREEMENT` is dropped, so a broken
config can never win. Shipped profiles live in the top-level ``profiles/`` directory, installed as the package
``bonekern.profiles``; :func:`profiles_dir` finds them either way.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import importlib.resources
import logging
import os
import platform
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from autotune import Candidate, SearchSpace, Tuner, TuningKey, hash_sources, library_versions
from autotune.keys import profile_name
from autotune.presets import LayerShape
from autotune.provider import Job
from autotune.tuner import Runner, structurally_accepted

from .backends import Backend, OpProblem, get_backend
from .blockmath import group_sum
from .tolerances import AGREEMENT, AGREEMENT_FALLBACK
from .validation import delta_dtype
from .variants import VARIANTS, make_spec

APP = "bonekern"
ENV_PREFIX = "BONEKERN"

LIBRARIES: dict[str, str] = {
    "torch": "torch",
    "triton": "triton|pytorch-triton",
    "cupy": "cupy-cuda13x|cupy-cuda12x|cupy",
}
"""Libraries whose versions are part of every key (short name -> distribution names, first installed wins)."""

_ENV_NAMES: tuple[str, ...] = (
    f"{ENV_PREFIX}_AUTOTUNE",
    f"{ENV_PREFIX}_AUTOTUNE_LOG",
    f"{ENV_PREFIX}_CACHE_DIR",
    f"{ENV_PREFIX}_AUTOTUNE_PROFILE",
    "TRITON_INTERPRET",
    "XDG_CACHE_HOME",
)
"""The environment variables a decision depends on (part of the per-process memo key)."""


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


def scope_backends(scope: str, device_type: str) -> tuple[str, ...]:
    """The backends a scope compares: for "auto" the whole auto order of the device type (available or not, so
    the hash does not depend on what is installed: that is in the versions), else the one named."""
    if scope != "auto":
        return (scope,)
    from .dispatch import AUTO_ORDER, DEFAULT_ORDER

    return AUTO_ORDER.get(device_type, DEFAULT_ORDER)


@functools.cache
def scope_source_hash(scope: str, device_type: str) -> str:
    names = scope_backends(scope, device_type)
    if len(names) == 1:
        return backend_source_hash(names[0])
    joined = ";".join(f"{n}:{backend_source_hash(n)}" for n in names)
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def needed_grads(op: str, args: Sequence[Any] | None) -> str:
    """For backward ops, which gradients are computed ("dx+dblock", "dx", "dblock"); "" for forward ops."""
    if not op.endswith("backward"):
        return ""
    need_dx, need_dblock = (True, True) if args is None else (bool(args[4]), bool(args[5]))
    return "+".join(name for name, need in (("dx", need_dx), ("dblock", need_dblock)) if need) or "none"


def make_key(problem: OpProblem, scope: str, grads: str) -> TuningKey:
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
        scope_source_hash(scope, problem.device.type),
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


def search_space(problem: OpProblem, scope: str, backends: Sequence[Backend], grads: str) -> SearchSpace:
    """The tuner's view of one call: key, default (first backend's default config), candidates, checks."""
    key = make_key(problem, scope, grads)
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


_memo: dict[tuple, tuple[Backend, Any]] = {}
"""memo key -> (backend, prepared config): what :func:`choose` decided, reused by every later call."""
_memo_lock = threading.Lock()


def memo_key(problem: OpProblem, scope: str, args: Sequence[Any] | None) -> tuple:
    """What a decision depends on besides the cache files: the problem, the scope ("auto" or a backend name),
    the gradients a backward call needs, the tuner's environment variables and the CPU thread count."""
    grads = needed_grads(problem.op, args)
    env = tuple(map(os.environ.get, _ENV_NAMES))
    threads = torch.get_num_threads() if problem.device.type == "cpu" else 0
    return (problem, scope, grads, env, threads)


def remembered(key: tuple) -> tuple[Backend, Any] | None:
    """The decision made earlier in this process for ``key`` (see :func:`memo_key`): the backend and its prepared
    config (:meth:`Backend.prepare_config`), or None."""
    return _memo.get(key)


def choose(
    problem: OpProblem, scope: str, backends: Sequence[Backend], args: Sequence[Any] | None = None
) -> tuple[Backend, Any]:
    """The backend and its prepared config for one call, remembered for the rest of the process per
    :func:`memo_key`.

    Defaults are remembered too: a process picks up cache entries written by another process (e.g.
    ``python -m autotune tune``) when it restarts, or after :func:`forget_choices`.
    """
    key = memo_key(problem, scope, args)
    hit = remembered(key)
    if hit is not None:
        return hit
    space = search_space(problem, scope, backends, key[2])
    decision = TUNER.choose(space, runner_for(problem, args) if args is not None else None)
    backend = get_backend(decision.candidate.backend)
    prepared = backend.prepare_config(problem, dict(decision.candidate.config))
    with _memo_lock:
        _memo[key] = (backend, prepared)
    return backend, prepared


def forget_choices() -> None:
    """Drop the per-process memo (tests; after editing the cache by hand)."""
    with _memo_lock:
        _memo.clear()


# ------------------------------------------------------------------------------------------------------------
# The CLI provider.
# ------------------------------------------------------------------------------------------------------------

_DTYPES = {dtype_name(d): d for d in AGREEMENT}


def synthetic_args(problem: OpProblem, seed: int = 0) -> tuple:
    """Random inputs for ``problem.op`` (both gradients requested for backward ops), O(1) outputs."""
    gen = torch.Generator(device=problem.device).manual_seed(seed)
    m, n, k, r, device = problem.m, problem.n, problem.k, problem.r, problem.device

    def randn(*shape, dtype, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)

    x = randn(m, k, dtype=problem.dtype)
    weight = randn(n, k, dtype=problem.dtype, scale=k**-0.5)
    if problem.op.startswith("bat"):
        block = randn(n // r, r, r, dtype=problem.block_dtype, scale=0.02)
    else:
        block = randn(r, problem.block_cols, dtype=problem.block_dtype, scale=0.02)
    if problem.op.endswith("forward"):
        return (x, weight, block, None)
    dy = randn(m, n, dtype=problem.dtype)
    if problem.op == "bone_backward":
        return (dy, group_sum(x, r, delta_dtype(problem.dtype, problem.block_dtype)), weight, block, True, True)
    return (dy, x, weight, block, True, True)


class BonekernProvider:
    """bonekern's provider for ``python -m autotune`` (entry point ``autotune.providers: bonekern``)."""

    name = APP
    env_prefix = ENV_PREFIX

    def tuner(self) -> Tuner:
        return TUNER

    def add_tune_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("bonekern")
        group.add_argument(
            "--variant",
            nargs="+",
            choices=VARIANTS,
            default=["bone", "bat"],
            help="variants to tune (default: bone bat)",
        )
        group.add_argument("--r", type=int, nargs="+", default=[64], help="block sizes (default: 64)")
        group.add_argument("--mini-r", type=int, default=None, help="mini_r for variant mini (default: r)")
        group.add_argument(
            "--backend",
            default="auto",
            help='"auto" (compare every backend auto may pick) or one backend name (default: auto)',
        )
        group.add_argument(
            "--ops",
            nargs="+",
            choices=["forward", "backward"],
            default=["forward", "backward"],
            help="which passes to tune (default: both)",
        )

    def jobs(
        self, shapes: list[LayerShape], tokens: list[int], dtypes: list[str], device: str, args: argparse.Namespace
    ) -> tuple[list[Job], list[str]]:
        from .dispatch import auto_candidates, require_available

        dev = torch.device(device)
        backends = auto_candidates(dev) if args.backend == "auto" else [require_available(args.backend, dev)]
        jobs: dict[str, Job] = {}
        labels: dict[str, list[str]] = {}
        notes: list[str] = []
        for dtype_text in dtypes:
            if dtype_text not in _DTYPES:
                raise ValueError(f"--dtype must be one of {sorted(_DTYPES)}; got {dtype_text!r}")
            dtype = _DTYPES[dtype_text]
            block_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            for variant in args.variant:
                for r in args.r:
                    for shape in shapes:
                        mini_r = (args.mini_r or r) if variant == "mini" else None
                        try:
                            spec = make_spec(variant, shape.n, shape.k, r, mini_r)
                        except ValueError as exc:
                            notes.append(f"skipped {shape.label} ({shape.n}x{shape.k}) for {variant} r={r}: {exc}")
                            continue
                        family = "bat" if variant == "bat" else "bone"
                        for m in tokens:
                            for group in args.ops:
                                op = f"{family}_{group}"
                                problem = OpProblem(
                                    op, m, shape.n, shape.k, r, spec.block_cols, dtype, block_dtype, dev
                                )
                                space = search_space(problem, args.backend, backends, needed_grads(op, None))
                                eid = space.key.entry_id
                                labels.setdefault(eid, []).append(shape.layer)
                                if eid not in jobs:
                                    jobs[eid] = Job(space, functools.partial(_synthetic_runner, problem))
        for eid, job in jobs.items():
            job.space.label += f" ({','.join(dict.fromkeys(labels[eid]))})"
        return list(jobs.values()), notes

    def current_provenance(self, key: TuningKey) -> tuple[dict[str, str], str] | None:
        try:
            return versions(), scope_source_hash(key.scope, key.device_type)
        except (KeyError, ValueError, ImportError):
            return None

    def devices(self) -> list[tuple[str, str]]:
        out = [("cpu", device_identity(torch.device("cpu"))[0])]
        if torch.cuda.is_available():
            out += [("cuda", _cuda_identity(i)[0]) for i in range(torch.cuda.device_count())]
        return list(dict.fromkeys(out))

    def default_device(self) -> str:
        return "cuda" if torch.cuda.is_available() else "cpu"


def _synthetic_runner(problem: OpProblem) -> Runner:
    return runner_for(problem, synthetic_args(problem))


def autotune_provider() -> BonekernProvider:
    """Entry point of group ``autotune.providers``."""
    return BonekernProvider()


__all__ = [
    "TUNER",
    "BonekernProvider",
    "autotune_provider",
    "choose",
    "device_identity",
    "forget_choices",
    "make_key",
    "profiles_dir",
    "search_space",
]
