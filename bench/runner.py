"""Measure every implementation of every case; one flat result record per (case, implementation).

Per implementation, in this order: time forward (with autograd recording, as in training); time forward+backward
(``torch.autograd.grad`` of y against x and the adapter's trainable tensors with a fixed dY); one forward+backward
under the memory tracker (peak); one forward under the memory tracker and ``saved_tensors_hooks`` (what stays
alive after forward and what autograd keeps). The tracked forward+backward's outputs are checked against PEFT's
(or, without PEFT, against bonekern's reference backend) so a wrong implementation cannot post a good time.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from bonekern.profiling import nvtx_range
from bonekern.variants import AdapterSpec, make_spec

from . import impls as impls_mod
from .costs import cost
from .memory import kept_for_backward, measure, storage_bytes
from .suites import Case
from .timing import Timer

CHECK_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.bfloat16: 3e-2,
    torch.float16: 1e-2,
}
"""Largest relative error ||a - b|| / ||b|| (Frobenius) tolerated between two implementations of the same math:
rounding differences grow with K, far below what a wrong formula or a missing term produces."""


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
        "model": s.model,
        "layers": "/".join(s.layers),
        "tokens": case.tokens,
        "in_features": s.in_features,
        "out_features": s.out_features,
        "bias": s.bias,
        "variant": case.variant,
        "r": case.r,
        "mini_r": case.mini_r if case.variant == "mini" else None,
        "dtype": str(case.dtype).removeprefix("torch."),
        "device": str(case.device),
    }


def not_run(case: Case, impl: str, reason: str) -> dict[str, Any]:
    return {**_case_fields(case), "impl": impl, "label": impl, "status": "not run", "reason": reason}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a64 - b64) / torch.linalg.vector_norm(b64).clamp_min(1e-30))


def _measure_impl(
    case: Case, impl: impls_mod.Impl, t: impls_mod.CaseTensors, timer: Timer, settings: Settings
) -> tuple[dict[str, Any], tuple[torch.Tensor, ...]]:
    x, dy = t.x, t.dy
    inputs = [x, *impl.trainable]
    tag = f"bench {case.case_id} {impl.name}"

    def fwd() -> torch.Tensor:
        return impl.forward(x)

    def fwd_bwd() -> tuple[torch.Tensor, ...]:
        y = impl.forward(x)
        return (y, *torch.autograd.grad(y, inputs, dy))

    budget = (settings.budget_s, settings.min_repeats, settings.max_repeats)
    timed = {"fwdbwd": timer.calibrated(fwd_bwd, f"{tag} forward+backward", *budget)}
    # forward+backward has just run the forward: no second warm-up
    timed["fwd"] = timer.calibrated(fwd, f"{tag} forward", *budget, warm_up=False)
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
        s.out_features,
        s.in_features,
        bias=s.bias,
        act_bytes=case.dtype.itemsize,
        adapter_bytes=impls_mod.adapter_dtype(case.dtype).itemsize,
        r=case.r,
        cols=(case.mini_r if impl.method == "mini" else s.out_features),
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
    record.update({"check_vs": ref_name, "check_max_rel_err": err, "check_ok": err <= CHECK_TOLERANCE[dtype]})


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
    linear_cache: dict[tuple, dict[str, Any]],
    progress: Callable[[str], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """Measure ``impl_names`` on ``case``; one record per name, in that order.

    The frozen linear layer's result depends only on the shape, not the variant: it is measured once per shape
    (``linear_cache``) and repeated in every variant's table.
    """
    try:
        spec: AdapterSpec = make_spec(
            case.variant, case.shape.out_features, case.shape.in_features, case.r, case.mini_r
        )
    except ValueError as e:
        return [not_run(case, name, f"the case is invalid: {e}") for name in impl_names]
    tensors = impls_mod.CaseTensors.make(case, spec)
    records: dict[str, dict[str, Any]] = {}
    reference: tuple[str, tuple[torch.Tensor, ...]] | None = None
    # PEFT first, then bonekern's reference backend: the first of them that runs is what the others are checked
    # against (and only its outputs are kept)
    order = sorted(impl_names, key=lambda n: {"peft": 0, "reference": 1}.get(n, 2))
    for name in order:
        reason = impls_mod.not_run_reason(name, case.device)
        if reason is not None:
            records[name] = not_run(case, name, reason)
            continue
        if name == "linear" and case.shape_key in linear_cache:
            records[name] = {**linear_cache[case.shape_key], **_case_fields(case)}
            continue
        progress(f"{case.case_id} {name}")
        try:
            impl = impls_mod.build(name, case, spec, tensors)
            record, out = _measure_impl(case, impl, tensors, timer, settings)
        except Exception as e:  # reported as failed; the other implementations still run
            records[name] = {**not_run(case, name, f"{type(e).__name__}: {e}"), "status": "failed"}
            continue
        records[name] = record
        if impl.checkable:
            if reference is None:
                reference = (name, out)
                record["check_reference"] = True
            else:
                _check(record, out, reference, case.dtype)
        if name == "linear":
            linear_cache[case.shape_key] = dict(record)
        del impl, out
    gc.collect()  # PEFT's wrappers hold reference cycles; free their adapters before the next case
    _ratios(records)
    return [records[name] for name in impl_names]
