"""Verify before trust: a kernel config runs once on the user's device against the torch backend before it serves.

No GPU kernel of bonekern is trusted because it compiled in CI: the user's GPU, driver, Triton or CuPy may differ.
So the first time :func:`bonekern.dispatch.select` is about to hand a problem to a backend that runs its own
kernels (``Backend.verify_before_use``: Triton, CuPy) with some config -- whatever chose it: tuning, a shipped
profile, the user cache or the default -- it calls :func:`check`, which

1. builds a *small problem* of the same op, variant and dtypes (:func:`small_problem`: the same r and mini_r,
   M, N and K cut to at most a few dozen while keeping each one's residue mod 16 and K's residue mod r, so the
   kernel sees the same masking and the same divisibility specialisation);
2. makes its inputs (:func:`build_args`, from the names of the op method's parameters, so an op added to
   :data:`bonekern.backends.OPS` needs no code here), with a private random generator (the user's RNG
   streams are not touched), under ``torch.no_grad()``;
3. runs the candidate and the torch backend's default on them, synchronises the device and compares the
   outputs with the tuner's agreement check (:data:`bonekern.tolerances.AGREEMENT`);
4. files the :class:`Verdict` -- ok, or the error ("RuntimeError: ...", "wrong result: ...") -- under a key
   of the device (name and capability), the library versions, the hash of the backend's source, the op, the
   small problem, the gradient flags and the config, in memory and in ``verify.json`` beside the tuning cache
   (:class:`autotune.CacheFile`, locked and atomic, with this module's :data:`CODEC`).

A bad verdict makes dispatch move to the next candidate (see :func:`bonekern.dispatch.select`) and issue one
:class:`KernelVerificationWarning` per bad verdict and process. Dispatch, the only caller, passes in what
identifies the device, versions and source (it owns the tuner; this module never imports it).

``BONEKERN_VERIFY=0`` turns verification off (every chosen config serves unchecked, as before). It cannot run
while a CUDA graph is being captured; dispatch then serves the chosen config unchecked. A kernel that corrupts
the CUDA context (an illegal memory access) cannot be recovered from by any fallback.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import inspect
import json
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autotune.store import CacheFile, Codec, parse_records

from .backends import Backend, OpProblem, get_backend
from .dropout import DropoutSpec
from .validation import delta_dtype

ENV = "BONEKERN_VERIFY"
"""``1`` (default) verifies each kernel config before it serves; ``0`` turns verification off."""

FILE_NAME = "verify.json"
"""The verdict file, in the tuning cache's directory (``BONEKERN_CACHE_DIR``, else the user cache directory)."""

SCHEMA = "bonekern-verify/1"

SMALL_CAP = 48
"""Largest M, N (bone) the small problem keeps before cutting (it then keeps the residue mod 16: < 64)."""

SMALL_GROUPS = 3
"""Most r-wide groups of K (and, for mini and bat, most repeats of the block along N) the small problem keeps."""

VERIFY_DROPOUT = DropoutSpec(0.25, seed=1234)
"""The dropout draw a check uses when the problem has dropout and no call's own draw is given."""

Compare = Callable[[object, object], "str | None"]


class KernelVerificationWarning(UserWarning):
    """A kernel config failed verification on this device; the message names it, the error and the fallback."""


def enabled() -> bool:
    """Whether :data:`ENV` allows verification (read on every decision; an unknown value raises ValueError)."""
    raw = os.environ.get(ENV, "1").strip().lower() or "1"
    if raw in ("1", "on", "true", "yes"):
        return True
    if raw in ("0", "off", "false", "no"):
        return False
    raise ValueError(f"{ENV} must be one of 0, 1, on, off, true, false, yes, no; got {os.environ[ENV]!r}")


@dataclass(frozen=True)
class Identity:
    """What else a verdict depends on: the device, library versions and the backend's source hash."""

    device: str
    capability: str
    versions: tuple[tuple[str, str], ...]
    source: str


# ------------------------------------------------------------------------------------------------------------
# Verdicts and their file.
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """The outcome of one verification. ``key`` is the canonical JSON text of what was verified (see the module
    docstring); ``error`` is None when the config agreed with the torch backend; ``seconds`` is what the check
    cost (both runs, the first one's compile included)."""

    key: str
    ok: bool
    error: str | None
    seconds: float
    checked_at: str

    def to_json(self) -> dict[str, Any]:
        return {
            "key": json.loads(self.key),
            "ok": self.ok,
            "error": self.error,
            "seconds": round(self.seconds, 6),
            "checked_at": self.checked_at,
        }

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Verdict:
        """Inverse of :meth:`to_json`; raises on a malformed object."""
        key, ok, error, seconds, checked_at = (data[f] for f in ("key", "ok", "error", "seconds", "checked_at"))
        if not isinstance(key, dict) or not isinstance(ok, bool) or not isinstance(checked_at, str):
            raise TypeError("key must be an object, ok a bool and checked_at a string")
        if (error is not None and not isinstance(error, str)) or ok != (error is None):
            raise TypeError(f"error must be a string exactly when ok is false; got ok={ok!r}, error={error!r}")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
            raise TypeError(f"seconds must be a finite number; got {seconds!r}")
        return Verdict(_canonical(key), ok, error, float(seconds), checked_at)


class VerdictTable:
    """Verdicts by key (the last one added wins); the table a verdict :class:`autotune.CacheFile` keeps."""

    def __init__(self, verdicts: Iterable[Verdict] = ()):
        self._by_key = {v.key: v for v in verdicts}

    def get(self, key: str) -> Verdict | None:
        return self._by_key.get(key)

    def merged(self, newer: Iterable[Verdict]) -> VerdictTable:
        return VerdictTable([*self._by_key.values(), *newer])

    def without(self, drop: Callable[[Verdict], bool]) -> VerdictTable:
        return VerdictTable(v for v in self._by_key.values() if not drop(v))

    def entries(self) -> list[Verdict]:
        return list(self._by_key.values())

    def __len__(self) -> int:
        return len(self._by_key)


def _parse(raw: bytes) -> tuple[VerdictTable, str | None]:
    verdicts, problem = parse_records(raw, SCHEMA, Verdict.from_json)
    return VerdictTable(verdicts), problem


def _dump(table: VerdictTable) -> str:
    verdicts = sorted(table.entries(), key=lambda v: v.key)
    doc = {"schema": SCHEMA, "kind": "verdicts", "entries": [v.to_json() for v in verdicts]}
    return json.dumps(doc, indent=1) + "\n"


CODEC = Codec(_parse, _dump, "bonekern verify cache")
"""How the verdict file is read and written (the tuning cache's hardened store, another record type)."""


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


_stores: dict[Path, CacheFile] = {}
_memory: dict[str, Verdict] = {}
"""Verdicts this process has used, by key: a later problem with the same key costs one lookup."""
_warned: set[str] = set()
_lock = threading.RLock()


def store(directory: Path) -> CacheFile:
    """The verdict file in ``directory`` (one object per path, so its warnings come once)."""
    path = Path(directory) / FILE_NAME
    with _lock:
        if path not in _stores:
            _stores[path] = CacheFile(path, codec=CODEC)
        return _stores[path]


def forget() -> None:
    """Drop the verdicts and warnings remembered by this process (tests); the files stay."""
    with _lock:
        _memory.clear()
        _warned.clear()
        _stores.clear()


# ------------------------------------------------------------------------------------------------------------
# The small problem and its inputs.
# ------------------------------------------------------------------------------------------------------------


def _shrink(value: int, cap: int = SMALL_CAP) -> int:
    """``value`` if it is at most ``cap``, else a number below ``cap + 16`` with the same residue mod 16."""
    return value if value <= cap else cap - cap % 16 + value % 16


def _shrink_groups(total: int, width: int) -> int:
    """``total`` cut to at most :data:`SMALL_GROUPS` whole ``width``-wide groups plus its remainder."""
    return width * min(total // width, SMALL_GROUPS) + total % width


def small_problem(problem: OpProblem) -> OpProblem:
    """The problem a config of ``problem`` is verified on: same op, variant, dtypes, r and mini_r (and any other
    field of :class:`OpProblem`), M, N and K cut small (see the module docstring)."""
    m, r = _shrink(problem.m), problem.r
    k = max(1, _shrink_groups(problem.k, r))
    if problem.variant == "bat":
        n, cols = _shrink_groups(problem.n, r), problem.block_cols
    elif problem.variant == "mini":
        n, cols = _shrink_groups(problem.n, problem.block_cols), problem.block_cols
    else:
        n = _shrink(problem.n)
        cols = n
    return dataclasses.replace(problem, m=m, n=n, k=k, block_cols=cols)


class Unverifiable(Exception):
    """The op's inputs cannot be built (a parameter this module does not know, and no value from the call)."""


@functools.cache
def op_parameters(op: str) -> tuple[str, ...]:
    """The names of the arguments of :class:`Backend`'s method for ``op``, without ``self`` and ``config``."""
    names = list(inspect.signature(getattr(Backend, op)).parameters)
    if names[:1] != ["self"] or names[-1:] != ["config"]:
        raise Unverifiable(f"Backend.{op} does not take (self, ..., config)")
    return tuple(names[1:-1])


def build_args(problem: OpProblem, real_args: Sequence[Any] | None, seed: int = 0) -> tuple[Any, ...]:
    """Inputs of ``problem.op`` for ``problem`` (a small problem), by parameter name: x (M, K), weight (N, K),
    block ((r, C), or (N // r, r, r) for bat), bias (N,) when the call has one, dy (M, N), s (M, r) in the
    delta dtype, out_features N, in_features K; every other argument (gradient flags, dropout) is the real
    call's (``real_args``, in the method's order), or True for a ``need_*`` flag when there is none; without a
    call, dropout is :data:`VERIFY_DROPOUT` when ``problem.dropout`` is set, else None."""
    names = op_parameters(problem.op)
    real = dict(zip(names, real_args, strict=False)) if real_args is not None else {}
    m, n, k, r, cols = problem.m, problem.n, problem.k, problem.r, problem.block_cols
    dt, bdt, device = problem.dtype, problem.block_dtype, problem.device
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)

    block_shape = (n // r, r, r) if problem.variant == "bat" else (r, cols)
    makers: dict[str, Callable[[], Any]] = {
        "x": lambda: rand(m, k, dtype=dt),
        "weight": lambda: rand(n, k, dtype=dt, scale=k**-0.5),
        "block": lambda: rand(*block_shape, dtype=bdt, scale=0.1),
        "bias": lambda: rand(n, dtype=dt) if real.get("bias", True) is not None else None,
        "dy": lambda: rand(m, n, dtype=dt),
        "s": lambda: rand(m, r, dtype=delta_dtype(dt, bdt)),
        "out_features": lambda: n,
        "in_features": lambda: k,
        "dropout": lambda: real.get("dropout", VERIFY_DROPOUT if problem.dropout else None),
    }
    args = []
    for name in names:
        if name in makers:
            args.append(makers[name]())
        elif name in real:
            args.append(real[name])
        elif name.startswith("need_"):
            args.append(True)
        else:
            raise Unverifiable(f"no input for parameter {name!r} of {problem.op}")
    return tuple(args)


def flags_of(op: str, real_args: Sequence[Any] | None) -> dict[str, bool]:
    """The boolean arguments of the call (gradient flags), by name; every ``need_*`` flag True without a call."""
    names = op_parameters(op)
    if real_args is None:
        return {name: True for name in names if name.startswith("need_")}
    return {name: v for name, v in zip(names, real_args, strict=False) if isinstance(v, bool)}


def verdict_key(
    problem: OpProblem, backend: str, config: Mapping[str, Any], flags: Mapping[str, bool], identity: Identity
) -> str:
    """The canonical JSON text a verdict is filed under (``problem`` the small problem, ``flags`` the call's
    boolean arguments, :func:`flags_of`)."""
    fields = {f.name: getattr(problem, f.name) for f in dataclasses.fields(problem)}
    fields = {
        name: (str(v).removeprefix("torch.") if isinstance(v, (torch.dtype, torch.device)) else v)
        for name, v in fields.items()
        if name != "device"
    }
    return _canonical(
        {
            "backend": backend,
            "problem": fields,
            "flags": dict(flags),
            "config": dict(config),
            "device_type": problem.device.type,
            "device": identity.device,
            "capability": identity.capability,
            "versions": dict(identity.versions),
            "source": identity.source,
        }
    )


# ------------------------------------------------------------------------------------------------------------
# Checking.
# ------------------------------------------------------------------------------------------------------------


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_check(
    problem: OpProblem, backend: Backend, prepared: Any, args: tuple[Any, ...], compare: Compare
) -> str | None:
    """Run ``problem.op`` on ``backend`` with ``prepared`` and on the torch backend's default, both on ``args``
    (each gets its own copy of the tensors), and return None when they agree, else the error text. Raises
    :class:`Unverifiable` when the torch backend itself fails (nothing to compare with)."""
    torch_backend = get_backend("torch")

    def copy() -> list[Any]:
        return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]

    with torch.no_grad():
        try:
            expected = getattr(torch_backend, problem.op)(
                *copy(), torch_backend.prepare_config(problem, torch_backend.default_config(problem))
            )
            _synchronize(problem.device)
        except Exception as exc:
            raise Unverifiable(f"the torch backend failed on the small problem: {_error_text(exc)}") from exc
        try:
            output = getattr(backend, problem.op)(*copy(), prepared)
            _synchronize(problem.device)
        except Exception as exc:  # failed to compile, to launch, out of resources, asserted in the kernel
            return _error_text(exc)
    difference = compare(expected, output)
    return None if difference is None else f"wrong result against the torch backend: {difference}"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def check(
    problem: OpProblem,
    backend: Backend,
    config: Mapping[str, Any],
    prepared: Any,
    real_args: Sequence[Any] | None,
    identity: Identity,
    compare: Compare,
    directory: Path,
) -> Verdict | None:
    """The verdict on running ``problem`` with ``backend`` and ``config`` (``prepared`` by the backend for
    ``problem``): remembered, read from the verdict file in ``directory``, or checked now and filed there.
    None when the op's inputs cannot be built (see :func:`build_args`)."""
    small = small_problem(problem)
    try:
        key = verdict_key(small, backend.name, config, flags_of(problem.op, real_args), identity)
    except Unverifiable:
        return None
    with _lock:
        hit = _memory.get(key)
        if hit is not None:
            return hit
        file = store(directory)
        hit = file.table().get(key)
        if hit is None:
            start = time.perf_counter()
            try:
                error = run_check(small, backend, prepared, build_args(small, real_args), compare)
            except Unverifiable:
                return None
            hit = Verdict(key, error is None, error, time.perf_counter() - start, _now())
            file.put([hit])
        _memory[key] = hit
        return hit


def warn_once(verdict: Verdict, problem: OpProblem, kernel: str, replacement: str, directory: Path) -> None:
    """One :class:`KernelVerificationWarning` per process for each kernel config, op, variant, dtype and error
    (however many problem sizes it failed on): which kernel and config failed on which device, the error, what
    serves instead, where the verdict is kept and how to retry or turn it off."""
    what = _canonical([kernel, problem.op, problem.variant, str(problem.dtype), verdict.error])
    with _lock:
        if what in _warned:
            return
        _warned.add(what)
    device = json.loads(verdict.key)["device"]
    warnings.warn(
        f"bonekern: {kernel} for {problem.op} ({problem.variant}, {str(problem.dtype).removeprefix('torch.')}) "
        f"failed verification on {device}: {verdict.error}. Serving it with {replacement} instead. The verdict "
        f"is kept in {Path(directory) / FILE_NAME} (delete the file to check again; {ENV}=0 turns checking off).",
        KernelVerificationWarning,
        stacklevel=2,
    )
