"""bonekern's provider for ``python -m autotune`` (entry point ``autotune.providers: bonekern``): the tuning
CLI's bonekern options and jobs on synthetic inputs.

A development tool, like the CLI it serves: nothing in bonekern's run-time path imports it (a test checks).
The problems it builds go through the same :func:`bonekern.tuning.search_space` and backend lists
(:mod:`bonekern.dispatch`) as a real call, so what ``tune`` stores is what dispatch later finds.
"""

from __future__ import annotations

import argparse
import functools

import torch

from autotune import Tuner, TuningKey
from autotune.argtypes import choice, positive_int
from autotune.presets import LayerShape
from autotune.provider import Job
from autotune.tuner import Runner

from .backends import BACKEND_NAMES, OpProblem
from .blockmath import group_sum
from .dispatch import candidates_for, scope_members
from .dropout import DropoutSpec
from .errors import BackendUnavailableError
from .tuning import (
    AGREEMENT,
    APP,
    ENV_PREFIX,
    TUNER,
    device_identity,
    dtype_name,
    needed_grads,
    runner_for,
    scope_source_hash,
    search_space,
    versions,
)
from .validation import delta_dtype
from .variants import VARIANTS, make_spec

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
    if problem.op.startswith("adapter"):
        spec = DropoutSpec(0.1, seed) if problem.dropout else None
        x = randn(m, k, dtype=problem.dtype)
        if problem.op == "adapter_forward":
            return (x, block, n, spec)
        s = group_sum(x, r, delta_dtype(problem.dtype, problem.block_dtype))
        return (randn(m, n, dtype=problem.dtype), s, block, k, spec, True, True)
    if problem.op.endswith("forward"):
        return (x, weight, block, None)
    dy = randn(m, n, dtype=problem.dtype)
    if problem.op == "bone_backward":
        return (dy, group_sum(x, r, delta_dtype(problem.dtype, problem.block_dtype)), weight, block, True, True)
    return (dy, x, weight, block, True, True)


class BonekernProvider:
    """bonekern's provider for ``python -m autotune`` (see :class:`autotune.provider.Provider`)."""

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
        group.add_argument("--r", type=positive_int, nargs="+", default=[64], help="block sizes (default: 64)")
        group.add_argument("--mini-r", type=positive_int, default=None, help="mini_r for variant mini (default: r)")
        group.add_argument(
            "--backend",
            default="auto",
            type=choice("a backend", ("auto", *BACKEND_NAMES)),
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
        dev = torch.device(device)
        try:
            backends = candidates_for(args.backend, dev)
        except BackendUnavailableError as exc:
            raise ValueError(f"argument --backend: {exc}") from None
        members = scope_members(args.backend, dev.type)
        jobs: dict[str, Job] = {}
        labels: dict[str, list[str]] = {}
        notes: list[str] = []
        for dtype_text in dtypes:
            if dtype_text not in _DTYPES:
                raise ValueError(f"argument --dtype: expected one of {', '.join(sorted(_DTYPES))}; got {dtype_text!r}")
            dtype = _DTYPES[dtype_text]
            block_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            for variant in args.variant:
                for r in args.r:
                    for shape in shapes:
                        mini_r = (args.mini_r or r) if variant == "mini" else None
                        try:
                            spec = make_spec(variant, shape.n, shape.k, r, mini_r)
                        except ValueError as exc:
                            notes.append(f"skipped {shape.name} ({shape.n}x{shape.k}) for {variant} r={r}: {exc}")
                            continue
                        family = "bat" if variant == "bat" else "bone"
                        for m in tokens:
                            for group in args.ops:
                                op = f"{family}_{group}"
                                problem = OpProblem(
                                    op, m, shape.n, shape.k, r, spec.block_cols, dtype, block_dtype, dev
                                )
                                backends = candidates_for(args.backend, dev, op)
                                space = search_space(problem, args.backend, members, backends, needed_grads(op, None))
                                eid = space.key.entry_id
                                labels.setdefault(eid, []).append("/".join(shape.layers))
                                if eid not in jobs:
                                    jobs[eid] = Job(space, functools.partial(_synthetic_runner, problem))
        for eid, job in jobs.items():
            job.space.label += f" ({','.join(dict.fromkeys(labels[eid]))})"
        return list(jobs.values()), notes

    def current_provenance(self, key: TuningKey) -> tuple[dict[str, str], str] | None:
        try:
            return versions(), scope_source_hash(scope_members(key.scope, key.device_type))
        except (KeyError, ValueError, ImportError):
            return None

    def devices(self) -> list[tuple[str, str]]:
        out = [("cpu", device_identity(torch.device("cpu"))[0])]
        if torch.cuda.is_available():
            out += [("cuda", device_identity(torch.device("cuda", i))[0]) for i in range(torch.cuda.device_count())]
        return list(dict.fromkeys(out))

    def default_device(self) -> str:
        return "cuda" if torch.cuda.is_available() else "cpu"

    def device_problem(self, device: str) -> str | None:
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError, TypeError):
            return f"expected cpu, cuda or cuda:N; got {device!r}"
        if dev.type == "cpu":
            return None
        if dev.type != "cuda":
            return f"expected cpu, cuda or cuda:N; got {device!r}"
        if not torch.cuda.is_available():
            return f"{device!r} was asked for, but torch sees no CUDA device"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"{device!r} was asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)"
        return None


def _synthetic_runner(problem: OpProblem) -> Runner:
    return runner_for(problem, synthetic_args(problem))


def autotune_provider() -> BonekernProvider:
    """Entry point of group ``autotune.providers``."""
    return BonekernProvider()
