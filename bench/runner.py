"""Measure every implementation of every case; one flat result record per (case, implementation).

Timing first, interleaved: forward+backward (``torch.autograd.grad`` of y against x and the adapter's trainable
tensors with a fixed dY) and forward (with autograd recording, as in training) of every implementation are timed
round-robin over :data:`ROUNDS` rounds, each implementation getting a slice of its calibrated repeats per round,
so a shared machine's drift (frequency, neighbours) lands on all of them alike instead of on whichever ran at the
wrong moment. Then, per implementation: one forward+backward under the memory tracker (peak); one forward under
the memory tracker and ``saved_tensors_hooks`` (what stays alive after forward and what autograd keeps). The
tracked forward+backward's outputs are checked against PEFT's (or, without PEFT, against bonekern's reference
backend) so a wrong implementation cannot post a good time.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from bonekern.profiling import nvtx_range
from bonekern.tolerances import BENCH_CHECK
from bonekern.variants import AdapterSpec, make_spec

from . import impls as impls_mod
from .costs import cost
from .memory import kept_for_backward, measure, storage_bytes
from .suites import Case
from .timing import Timer, TimeStats, stats

ROUNDS = 3
"""Timing rounds per case; see the module docstring."""


@dataclass(frozen=True)
class Settings:
    """How long to measure: ``budget_s`` of timed calls per measurement, within [min_repeats, max_repeats]."""

    budget_s: float = 0.5
    min_repeats: int = 5
    max_repeats: int = 1000


def _case_fields(case: Case) -> dict[str, Any]:
    s = case.shape
    return {
        "case_id": case.case_id,
        "model": s.source,
        "layers": "/".join(s.layers),
        "tokens": case.tokens,
        "in_features": s.k,
        "out_features": s.n,
        "bias": s.bias,
        "variant": case.variant,
        "r": case.r,
        "mini_r": case.mini_r if case.variant == "mini" else None,
        "dropout": case.dropout,
        "dtype": str(case.dtype).removeprefix("torch."),
        "device": str(case.device),
        "quant": case.quant,
    }


def not_run(case: Case, impl: str, reason: str) -> dict[str, Any]:
    return {**_case_fields(case), "impl": impl, "label": impl, "status": "not run", "reason": reason}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a64 - b64) / torch.linalg.vector_norm(b64).clamp_min(1e-30))


def _timed_functions(impl: impls_mod.Impl, t: impls_mod.CaseTensors) -> dict[str, Callable[[], object]]:
    """The two timed calls of ``impl``: "fwdbwd" (forward, then the gradients of x and the trainable tensors)
    and "fwd"."""
    inputs = [t.x, *impl.trainable]

    def fwd() -> torch.Tensor:
        return impl.forward(t.x)

    def fwd_bwd() -> tuple[torch.Tensor, ...]:
        y = impl.forward(t.x)
        return (y, *torch.autograd.grad(y, inputs, t.dy))

    return {"fwdbwd": fwd_bwd, "fwd": fwd}


def _time_interleaved(
    functions: dict[str, dict[str, Callable[[], object]]], tags: dict[str, str], timer: Timer, settings: Settings
) -> tuple[dict[str, dict[str, TimeStats]], dict[str, str]]:
    """Time every (implementation, call) round-robin; returns the stats and the implementations that raised."""
    samples: dict[tuple[str, str], list[float]] = {}
    per_round: dict[tuple[str, str], int] = {}
    failed: dict[str, str] = {}
    for name, calls in functions.items():  # warm up and estimate each call once
        try:
            for kind, fn in calls.items():
                label = f"{tags[name]} {kind}"
                timer.once_ms(fn, f"{label} (warm-up)")
                first = timer.once_ms(fn, label)
                total = timer.repeats_for(first, settings.budget_s, settings.min_repeats, settings.max_repeats)
                samples[name, kind] = [first]
                per_round[name, kind] = max(1, -(-(total - 1) // ROUNDS))
        except Exception as e:
            failed[name] = f"{type(e).__name__}: {e}"
    for _ in range(ROUNDS):
        for name, calls in functions.items():
            if name in failed:
                continue
            try:
                for kind, fn in calls.items():
                    label = f"{tags[name]} {kind}"
                    samples[name, kind] += [timer.once_ms(fn, label) for _ in range(per_round[name, kind])]
            except Exception as e:
                failed[name] = f"{type(e).__name__}: {e}"
    timed = {
        name: {kind: stats(samples[name, kind]) for kind in calls}
        for name, calls in functions.items()
        if name not in failed
    }
    return timed, failed


def _measure_impl(
    case: Case,
    impl: impls_mod.Impl,
    timed: dict[str, TimeStats],
    fwd_bwd: Callable[[], tuple[torch.Tensor, ...]],
    fwd: Callable[[], torch.Tensor],
) -> tuple[dict[str, Any], tuple[torch.Tensor, ...]]:
    """The record of one implementation: its timings (already measured), costs, memory and kept bytes."""
    tag = f"bench {case.case_id} {impl.name}"
    with nvtx_range(f"{tag} forward+backward (memory)"):
        use, outputs = measure(fwd_bwd, case.device)
    with nvtx_range(f"{tag} forward (kept for backward)"):
        fwd_use, (y, kept) = measure(lambda: kept_for_backward(fwd, impl.parameters), case.device)
        retained = fwd_use.live_bytes - storage_bytes(y)
        del y

    s = case.shape
    c = cost(
        impl.method,
        case.tokens,
        s.n,
        s.k,
        bias=s.bias,
        act_bytes=case.dtype.itemsize,
        adapter_bytes=impls_mod.adapter_dtype(case.dtype).itemsize,
        r=case.r,
        cols=(case.mini_r if impl.method == "mini" else s.n),
        lora_rank=impl.lora_rank or 0,
    )
    record: dict[str, Any] = {
        **_case_fields(case),
        "impl": impl.name,
        "label": impl.label,
        "status": "ok",
        "reason": None,
        "trainable_params": impl.trainable_params,
        "lora_rank": impl.lora_rank,
    }
    for key in ("fwd", "fwdbwd"):
        st = timed[key]
        flops = c.fwd_flops if key == "fwd" else c.fwdbwd_flops
        nbytes = c.fwd_bytes if key == "fwd" else c.fwdbwd_bytes
        record.update(
            {
                f"{key}_median_ms": st.median_ms,
                f"{key}_p20_ms": st.p20_ms,
                f"{key}_p80_ms": st.p80_ms,
                f"{key}_repeats": st.repeats,
                f"{key}_flops": flops,
                f"{key}_bytes": nbytes,
                f"{key}_tflops": flops / (st.median_ms * 1e-3) / 1e12,
                f"{key}_gbps": nbytes / (st.median_ms * 1e-3) / 1e9,
            }
        )
    record.update(
        {
            "peak_bytes": use.peak_bytes,
            "retained_bytes": retained,
            "kept_bytes": sum(k.bytes for k in kept),
            "kept_tensors": [asdict(k) for k in kept],
        }
    )
    return record, outputs


def _check(
    record: dict[str, Any], out: tuple[torch.Tensor, ...], ref: tuple[str, tuple[torch.Tensor, ...]], dtype
) -> None:
    """Record the largest relative error of ``out`` (y and every gradient) against the reference outputs."""
    ref_name, ref_out = ref
    err = max(_rel_err(a, b) for a, b in zip(out, ref_out, strict=True))
    record.update({"check_vs": ref_name, "check_max_rel_err": err, "check_ok": err <= BENCH_CHECK[dtype]})


def _ratios(records: dict[str, dict[str, Any]]) -> None:
    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else a / b

    peft = records.get("peft", {})
    linear = records.get("linear", {})
    for rec in records.values():
        if rec["status"] != "ok":
            continue
        for ref_name, ref in (("peft", peft), ("linear", linear)):
            if ref.get("status") != "ok":
                continue
            rec[f"time_vs_{ref_name}"] = ratio(rec["fwdbwd_median_ms"], ref["fwdbwd_median_ms"])
            rec[f"fwd_time_vs_{ref_name}"] = ratio(rec["fwd_median_ms"], ref["fwd_median_ms"])
            rec[f"peak_vs_{ref_name}"] = ratio(rec["peak_bytes"], ref["peak_bytes"])
        if peft.get("status") == "ok":
            rec["kept_vs_peft"] = ratio(rec["kept_bytes"], peft["kept_bytes"])


def run_case(
    case: Case,
    impl_names: list[str],
    settings: Settings,
    timer: Timer,
    progress: Callable[[str], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """Measure ``impl_names`` on ``case``; one record per name, in that order."""
    try:
        spec: AdapterSpec = make_spec(case.variant, case.shape.n, case.shape.k, case.r, case.mini_r)
    except ValueError as e:
        return [not_run(case, name, f"the case is invalid: {e}") for name in impl_names]
    tensors = impls_mod.CaseTensors.make(case, spec)
    records: dict[str, dict[str, Any]] = {}
    built: dict[str, impls_mod.Impl] = {}
    # PEFT first, then bonekern's reference backend: the first of them that runs is what the others are checked
    # against (and only its outputs are kept)
    order = sorted(impl_names, key=lambda n: {"peft": 0, "reference": 1}.get(n, 2))
    for name in order:
        reason = impls_mod.not_run_reason(name, case.device)
        if reason is not None:
            records[name] = not_run(case, name, reason)
            continue
        try:
            built[name] = impls_mod.build(name, case, spec, tensors)
        except Exception as e:  # reported as failed; the other implementations still run
            records[name] = {**not_run(case, name, f"{type(e).__name__}: {e}"), "status": "failed"}
    progress(f"{case.case_id}: timing {', '.join(built)} interleaved")
    functions = {name: _timed_functions(impl, tensors) for name, impl in built.items()}
    tags = {name: f"bench {case.case_id} {name}" for name in built}
    timed, failed = _time_interleaved(functions, tags, timer, settings)
    reference: tuple[str, tuple[torch.Tensor, ...]] | None = None
    for name, impl in built.items():
        if name in failed:
            records[name] = {**not_run(case, name, failed[name]), "status": "failed"}
            continue
        progress(f"{case.case_id} {name}: memory and outputs")
        try:
            record, out = _measure_impl(case, impl, timed[name], functions[name]["fwdbwd"], functions[name]["fwd"])
        except Exception as e:
            records[name] = {**not_run(case, name, f"{type(e).__name__}: {e}"), "status": "failed"}
            continue
        records[name] = record
        if impl.checkable:
            if reference is None:
                reference = (name, out)
                record["check_reference"] = True
            else:
                _check(record, out, reference, case.dtype)
        del out
    del built, functions
    gc.collect()  # PEFT's wrappers hold reference cycles; free their adapters before the next case
    _ratios(records)
    return [records[name] for name in impl_names]
