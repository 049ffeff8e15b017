"""The command line of ``python -m bench``; see ``python -m bench --help``.

Exit status (:mod:`autotune.argtypes`): 0 when everything measured and matched; 1 when ``--compare`` found a
regression; 2 for bad arguments or when no case is valid (checked before anything is measured); 3 when an
implementation failed or its outputs did not match PEFT's (its numbers mean nothing then).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
from typing import Any

import torch

from autotune.argtypes import (
    EXIT_CODES_HELP,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_REGRESSION,
    json_file,
    non_negative_float,
    output_file,
    positive_float,
    positive_int,
    up_to_cpus,
)
from autotune.presets import SHAPE_HELP
from bonekern.tuning import TUNER
from bonekern.variants import VARIANTS, make_spec

from . import compare as compare_mod
from . import report
from .impls import DEFAULT_IMPLS, IMPL_NAMES, not_run_reason
from .runner import Settings, run_case
from .suites import SUITES, Case, parse_shape
from .timing import Timer

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp64": torch.float64,
    "float64": torch.float64,
}

DEFAULT_DTYPE: dict[str, torch.dtype] = {"cpu": torch.float32, "cuda": torch.bfloat16}
"""The layer dtype when neither --dtype nor the suite names one: what fine-tuning runs in on each device."""


def _names(kind: str, allowed: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in text.split(",") if n.strip())
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"{kind} must be a comma-separated list from {allowed}; got {text!r}")
        return names

    return parse


def _dtype(text: str) -> torch.dtype:
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"--dtype must be one of {tuple(DTYPES)}; got {text!r}")
    return DTYPES[text]


def _shape(text: str):
    try:
        return parse_shape(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Time and memory of bonekern's backends against PEFT's MiSS layer, PEFT LoRA with the same "
        "number of trainable parameters, and the frozen linear layer alone.",
        epilog=EXIT_CODES_HELP,
    )
    p.add_argument("--suite", choices=tuple(SUITES), default="quick", help="preset (default quick); see --list")
    p.add_argument("--list", action="store_true", help="print every suite's description and shapes, then exit")
    p.add_argument(
        "--shape",
        type=_shape,
        action="append",
        help=f"custom weight shape, {SHAPE_HELP}; NxK+bias adds a bias (replaces the suite's shapes)",
    )
    p.add_argument("--variants", type=_names("--variants", VARIANTS), help=f"comma-separated from {VARIANTS}")
    p.add_argument(
        "--impls",
        type=_names("--impls", IMPL_NAMES),
        help=f"comma-separated from {IMPL_NAMES} (default: {','.join(DEFAULT_IMPLS)})",
    )
    p.add_argument(
        "--dtype",
        type=_dtype,
        help="layer dtype (default: float32 on CPU, bfloat16 on CUDA); adapters stay float32 as in PEFT",
    )
    p.add_argument("--tokens", type=positive_int, help="M, rows of x (default: the suite's, per device)")
    p.add_argument("--r", type=positive_int, help="block size r (default 64)")
    p.add_argument("--mini-r", type=positive_int, help="mini's block columns (default r)")
    p.add_argument(
        "--dropout",
        type=_dropout_p,
        help="miss_dropout while training, in [0, 1), bone/mini only (default: the suite's, else 0)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: the suite's, else CUDA if present")
    p.add_argument(
        "--threads", type=up_to_cpus, help="torch CPU threads, at most the CPUs usable here (default: torch's choice)"
    )
    p.add_argument(
        "--budget", type=positive_float, default=0.5, help="seconds of timed calls per measurement (default 0.5)"
    )
    p.add_argument("--min-repeats", type=positive_int, default=5, help="fewest timed calls per measurement (default 5)")
    p.add_argument("--json", metavar="PATH", type=output_file, help="write every result and the environment as JSON")
    p.add_argument("--csv", metavar="PATH", type=output_file, help="write one CSV row per case and implementation")
    p.add_argument(
        "--plot", metavar="PNG", type=output_file, help="bar charts of time and peak memory (matplotlib, Agg)"
    )
    p.add_argument(
        "--compare", metavar="BASELINE.json", type=json_file, help="exit 1 if a metric regressed against this --json"
    )
    p.add_argument(
        "--threshold",
        type=non_negative_float,
        default=10.0,
        help="regression threshold in percent, >= 0 (default 10)",
    )
    p.add_argument(
        "--autotune",
        choices=("lookup", "on", "off"),
        help="bonekern's autotuner during the bench: lookup = cache, shipped profiles or defaults, never time "
        "(default, unless BONEKERN_AUTOTUNE is set); on = tune each new shape in its warm-up call (not timed) "
        "and cache the result; off = heuristic defaults only",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def _dropout_p(text: str) -> float:
    value = non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1); got {text!r}")
    return value


def _device(args: argparse.Namespace, suite_device: str | None) -> torch.device:
    name = args.device or suite_device or "auto"
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and torch.cuda.is_available():
        return torch.device(name, torch.cuda.current_device())
    return torch.device(name)


def build_cases(args: argparse.Namespace, device: torch.device) -> tuple[list[Case], list[str], dict[str, Any]]:
    suite = SUITES[args.suite]
    shapes = tuple(args.shape) if args.shape else suite.shapes
    variants = args.variants or suite.variants or VARIANTS
    impls = list(args.impls or suite.impls or DEFAULT_IMPLS)
    dtype = args.dtype or suite.dtype or DEFAULT_DTYPE.get(device.type, torch.float32)
    tokens = args.tokens or suite.tokens.get(device.type, suite.tokens["cpu"])
    r = args.r or suite.r
    mini_r = args.mini_r or r
    dropout = suite.dropout if args.dropout is None else args.dropout
    cases, skipped = [], []
    for shape, quant in [(shape, quant) for shape in shapes for quant in suite.quant or (None,)]:
        for v in variants:
            case = Case(
                shape, v, r, mini_r if v == "mini" else None, tokens, dtype, device, dropout if v != "bat" else 0.0
            )
            case = dataclasses.replace(case, quant=quant) if quant else case
            try:
                make_spec(v, shape.n, shape.k, r, case.mini_r)
            except ValueError as exc:
                skipped.append(f"{case.case_id}: {exc}")
                continue
            cases.append(case)
    settings = {
        "suite": args.suite + (" (custom shapes)" if args.shape else ""),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "tokens": tokens,
        "r": r,
        "mini_r": mini_r,
        "dropout": dropout,
        "variants": list(variants),
        "impls": impls,
        "budget_s": args.budget,
        "min_repeats": args.min_repeats,
        "autotune": os.environ.get("BONEKERN_AUTOTUNE", "1"),
        "skipped": skipped,
    }
    return cases, impls, settings


def list_suites() -> list[str]:
    lines = []
    for suite in SUITES.values():
        tokens = ", ".join(f"{m} on {d}" for d, m in suite.tokens.items())
        lines += [f"{suite.name}: {suite.description}", f"  tokens: {tokens}; r = {suite.r}"]
        lines += [f"  {s.name}: in {s.k}, out {s.n}{', bias' if s.bias else ''}" for s in suite.shapes]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(list_suites()))
        return EXIT_OK
    # fail before measuring, not after
    named = (("--json", args.json), ("--csv", args.csv), ("--plot", args.plot))
    outputs = [(name, path) for name, path in named if path]
    for i, (name, path) in enumerate(outputs):
        for other, other_path in outputs[:i]:
            if path.resolve() == other_path.resolve():
                p.error(f"argument {name}: expected a file other than {other}'s; both name {str(path)!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    # The tuner reads BONEKERN_AUTOTUNE on every decision; by default the bench never times candidates itself.
    if args.autotune:
        os.environ["BONEKERN_AUTOTUNE"] = {"lookup": "lookup", "on": "1", "off": "0"}[args.autotune]
    else:
        os.environ.setdefault("BONEKERN_AUTOTUNE", "lookup")
    try:
        TUNER.settings()  # an unknown BONEKERN_AUTOTUNE value would otherwise fail every measurement
    except ValueError as e:
        p.error(str(e))
    baseline = None
    if args.compare:
        try:
            baseline = compare_mod.load(args.compare)
        except ValueError as e:
            p.error(f"argument --compare: {e}")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        p.error("--plot needs matplotlib (pip install 'bonekern[bench]')")
    device = _device(args, SUITES[args.suite].device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    cases, impls, settings = build_cases(args, device)
    for line in settings["skipped"]:
        print(f"skipped {line}", file=sys.stderr)
    if not cases:
        p.error("nothing valid to measure: every case was skipped (see above)")
    reasons = {impl: not_run_reason(impl, device) for impl in impls}
    if all(reasons.values()):
        for impl, reason in reasons.items():
            print(f"not run: {impl}: {reason}", file=sys.stderr)
        p.error(f"nothing valid to measure: no implementation in --impls can run on {device.type} (see above)")
    env = report.environment(device)
    print("\n".join(report.header_lines(env, settings)), flush=True)

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"  measuring {msg} ...", file=sys.stderr, flush=True)

    timer = Timer(device)
    run_settings = Settings(budget_s=args.budget, min_repeats=args.min_repeats)
    records: list[dict[str, Any]] = []
    for case in cases:
        case_records = run_case(case, impls, run_settings, timer, progress)
        records += case_records
        lines, _ = report.tables(case_records)
        print("\n".join(lines), flush=True)
    _, notes = report.tables(records)
    if notes:
        print("\nnot run / failed:\n" + "\n".join(notes))

    if args.json:
        report.write_json(args.json, env, settings, records)
    if args.csv:
        report.write_csv(args.csv, records)
    if args.plot:
        report.write_plot(args.plot, records, f"bonekern bench, suite {settings['suite']}, {env['device']}")

    status = EXIT_OK
    bad = [r for r in records if r["status"] == "failed" or r.get("check_ok") is False]
    for r in bad:
        what = r["reason"] if r["status"] == "failed" else f"outputs differ from {r['check_vs']}'s"
        print(f"ERROR {r['case_id']} [{r['impl']}]: {what}", file=sys.stderr)
        status = EXIT_FAILED
    if baseline is not None:
        for line in compare_mod.environment_notes(env, baseline.get("environment", {})):
            print(line)
        regressions, compare_notes = compare_mod.compare(records, baseline["results"], args.threshold)
        for line in compare_notes:
            print(line)
        for reg in regressions:
            print(reg.message(args.threshold), file=sys.stderr)
        if regressions:
            print(f"{len(regressions)} regression(s) past {args.threshold:g}% against {args.compare}")
            status = status or EXIT_REGRESSION
        else:
            print(f"no regression past {args.threshold:g}% against {args.compare}")
    return status
