"""``python -m autotune``: tune, show, export and clear tuned entries; list model presets.

::

    python -m autotune tune --model Llama-3-8B --dtype bfloat16 --tokens 2048 4096   # tune on this machine
    python -m autotune tune --shape 11008x4096 --variant bat --r 64 --tokens 512   # N x K (out x in)
    python -m autotune show                     # the user cache as a table
    python -m autotune export --out-dir profiles  # write profiles/<device>.json from the user cache
    python -m autotune clear [--stale]

The ops come from a provider (:mod:`autotune.provider`); ``--provider`` picks one (default: bonekern).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from . import argtypes
from .argtypes import EXIT_CODES_HELP, EXIT_FAILED, EXIT_OK, EXIT_REGRESSION, EXIT_USAGE, first_line
from .entries import Entry
from .keys import profile_name
from .presets import LAYERS, MODELS, SHAPE_HELP, LayerShape, find_model, layer_shapes, parse_shape
from .provider import DEFAULT_PROVIDER, Provider, load_provider
from .store import Table, atomic_write_text, dump_table, read_table_file
from .timing import CpuTimer


class Progress:
    """tune's progress over every candidate of every job (tqdm): redrawn in place, at most 10 times a second, on
    a terminal; elsewhere (logs, CI) drawn at every step, so each candidate's label is recorded."""

    def __init__(self, total: int, stream: TextIO):
        from tqdm import tqdm  # imported here: only `tune` needs it (the `autotune` extra)

        tty = stream.isatty()
        self.bar = tqdm(
            total=total, file=stream, unit="candidate", dynamic_ncols=tty, mininterval=0.1 if tty else 0, ascii=not tty
        )

    def step(self, label: str) -> None:
        """One candidate (or job) done; ``label`` says which."""
        self.bar.set_description_str(label, refresh=False)
        self.bar.update()

    def close(self) -> None:
        self.bar.set_description_str("done", refresh=False)
        self.bar.close()


# Hand-written, not tabulate or rich: 8 lines vs a new dependency (rich.table alone imports in ~20 ms here).
def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with left-aligned columns."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _speedup(entry: Entry) -> str:
    best, default = entry.best_ms, entry.default_ms
    return "-" if not best or not default else f"{default / best:.2f}x"


def _is_stale(provider: Provider, entry: Entry) -> bool | None:
    current = provider.current_provenance(entry.key)
    if current is None:
        return None
    versions, source = current
    return dict(entry.key.versions) != versions or entry.key.source != source


# ------------------------------------------------------------------------------------------------------------
# Commands.
# ------------------------------------------------------------------------------------------------------------


def _parse_shape(text: str) -> LayerShape:
    try:
        n, k = parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return LayerShape("shape", (f"{n}x{k}",), n, k)


def cmd_tune(provider: Provider, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    tuner = provider.tuner()
    settings = tuner.settings()
    if importlib.util.find_spec("tqdm") is None:
        err.write("error: `python -m autotune tune` needs tqdm (its progress bar): pip install 'bonekern[autotune]'\n")
        return EXIT_USAGE
    if settings.interpreter:
        err.write("error: TRITON_INTERPRET=1 is set; timings under the Triton interpreter mean nothing. Unset it.\n")
        return EXIT_USAGE
    shapes: list[LayerShape] = []
    for model in args.model or []:
        shapes += [s for s in layer_shapes(model) if not args.layers or set(s.layers) & set(args.layers)]
    shapes += args.shape or []
    if not shapes:
        err.write("error: give --model and/or --shape\n")
        return EXIT_USAGE
    device = provider.default_device() if args.device is None else args.device
    problem = provider.device_problem(device)
    if problem:
        err.write(f"error: argument --device: {problem}\n")
        return EXIT_USAGE
    dtypes = args.dtype or (["bfloat16"] if device.startswith("cuda") else ["float32"])
    jobs, notes = provider.jobs(shapes, args.tokens, dtypes, device, args)
    for note in notes:
        err.write(f"note: {note}\n")
    if not jobs:
        err.write("error: nothing to tune: every shape, variant and r combination was skipped (see the notes)\n")
        return EXIT_USAGE
    cache = tuner.cache(settings)
    timer = None
    if args.repeats is not None and not device.startswith("cuda"):
        rounds = CpuTimer().rounds  # --repeats caps the timed runs per candidate over all interleaved rounds
        timer = CpuTimer(
            min_repeats=1, max_repeats=max(1, -(-args.repeats // rounds)), rounds=min(rounds, args.repeats)
        )
    total = sum(len(j.space.candidate_list()) for j in jobs)
    progress = Progress(total, err)
    rows = []
    failures = []
    for job in jobs:
        space = job.space
        candidates = space.candidate_list()
        hit = None if args.force else cache.table().lookup(space.key, match_versions=True, between_only=True)
        if len(candidates) == 1 or (hit is not None and hit.exact):
            for _ in candidates:
                progress.step(space.label)
            status = "only candidate" if len(candidates) == 1 else "cached"
            entry = None if len(candidates) == 1 else hit.entry
            winner = candidates[0].describe() if entry is None else entry.choice.describe()
        else:
            try:  # building the synthetic inputs may fail too (a shape too large for this device's memory)
                decision = tuner.tune(
                    space,
                    job.make_runner(),
                    settings,
                    progress=lambda i, n, c, label=space.label: progress.step(f"{label}: {c.describe()}"),
                    timer=timer,
                )
            except Exception as exc:  # one job failing must not lose the others' results: reported, exit 3
                failures.append(f"{space.label}: {first_line(exc)}")
                rows.append([space.label, "failed", "-", "-", "-", "-"])
                continue
            entry = decision.entry
            status = "tuned" if entry is not None else "all failed"
            if entry is None:
                failures.append(f"{space.label}: every candidate failed")
            winner = decision.candidate.describe()
        rows.append(
            [
                space.label,
                status,
                winner,
                _ms(entry and entry.best_ms),
                _ms(entry and entry.default_ms),
                "-" if entry is None else _speedup(entry),
            ]
        )
    progress.close()
    out.write(format_table(["problem", "status", "winner", "best ms", "default ms", "speed-up"], rows) + "\n")
    out.write(f"cache: {cache.describe()}\n")
    for failure in failures:
        err.write(f"failed: {failure}\n")
    return EXIT_FAILED if failures else EXIT_OK


def _show_order(entry: Entry) -> tuple:
    """Sort key of ``show``: numbers in numeric order, and a str never compared with an int (a hand-edited file
    may hold 4096 in one entry and "4096" in another)."""
    key = entry.key
    problem = tuple((name, isinstance(value, str), value) for name, value in key.problem)
    return (key.device, key.op, problem, key.scope, key.m)


def cmd_show(provider: Provider, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.file:
        table, problem = read_table_file(args.file)
        if problem and not len(table):
            err.write(f"error: argument --file: {args.file}: {problem}\n")
            return EXIT_USAGE
        if problem:
            err.write(f"warning: {args.file}: {problem}\n")
        where = str(args.file)
    else:
        cache = provider.tuner().cache()
        table, where = cache.table(), cache.describe()
    entries = sorted(table.entries(), key=_show_order)
    fields: list[str] = []
    for e in entries:
        fields += [name for name, _ in e.key.problem if name not in fields]
    headers = ["op", "scope", *fields, "M", "tuned M", "device", "winner", "ms", "default ms", "speed-up", "stale"]
    rows = []
    for e in entries:
        problem = dict(e.key.problem)
        stale = _is_stale(provider, e)
        rows.append(
            [
                e.key.op,
                e.key.scope,
                *(problem.get(f, "-") for f in fields),
                e.key.m,
                e.m_tuned,
                f"{e.key.device} ({e.key.capability})",
                e.choice.describe(),
                _ms(e.best_ms),
                _ms(e.default_ms),
                _speedup(e),
                "?" if stale is None else ("yes" if stale else ""),
            ]
        )
    out.write(f"{where}: {len(entries)} entries\n")
    if rows:
        out.write(format_table(headers, rows) + "\n")
    return EXIT_OK


def cmd_export(provider: Provider, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    table = provider.tuner().cache().table()
    devices = args.device or [name for _, name in provider.devices()]
    out_dir = args.out_dir
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        err.write(f"error: argument --out-dir: cannot create {out_dir} ({exc.strerror or exc})\n")
        return EXIT_USAGE
    written = 0
    for device in devices:
        chosen = [e for e in table.entries() if e.key.device == device]
        stale = [e for e in chosen if _is_stale(provider, e)]
        fresh = [e for e in chosen if not _is_stale(provider, e)]
        if stale:
            err.write(
                f"note: {len(stale)} stale entries for {device} not exported (tuned with other versions/sources)\n"
            )
        if not fresh:
            err.write(f"note: no tuned entries for {device}; nothing written\n")
            continue
        path = out_dir / profile_name(device)
        existing = Table()
        if path.exists() and not args.replace:
            existing, problem = read_table_file(path)
            if problem:
                err.write(f"warning: {path}: {problem}; replacing it\n")
        merged = existing.merged(fresh)
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        text = dump_table(merged, "profile", device=device, created=created, generated_by="python -m autotune export")
        try:
            atomic_write_text(path, text)
        except OSError as exc:  # e.g. a directory where the profile goes
            err.write(f"error: argument --out-dir: cannot write {path} ({exc.strerror or exc})\n")
            return EXIT_USAGE
        out.write(f"wrote {path}: {len(merged)} entries ({len(fresh)} from {provider.tuner().cache().describe()})\n")
        written += 1
    return EXIT_OK if written else EXIT_REGRESSION


def cmd_clear(provider: Provider, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    cache = provider.tuner().cache()

    def drop(entry: Entry) -> bool:
        if args.device and entry.key.device not in args.device:
            return False
        return not args.stale or bool(_is_stale(provider, entry))

    removed = cache.remove(drop)
    out.write(f"removed {removed} entries from {cache.describe()}; {len(cache.table())} left\n")
    return EXIT_OK


def cmd_presets(provider: Provider | None, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    rows = [[name, "/".join(s.layers), s.n, s.k] for name in MODELS for s in layer_shapes(name)]
    out.write(format_table(["model", "layer", "N (out)", "K (in)"], rows) + "\n")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------------------
# Argument parsing.
# ------------------------------------------------------------------------------------------------------------


def _model(text: str) -> str:
    try:
        return find_model(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser(provider_hook: Provider | None = None) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--provider",
        default=None,
        help=f"entry point (group autotune.providers) or module with autotune_provider() (default: {DEFAULT_PROVIDER})",
    )
    parser = argparse.ArgumentParser(
        prog="python -m autotune", description=__doc__.split("\n")[0], parents=[common], epilog=EXIT_CODES_HELP
    )
    sub = parser.add_subparsers(dest="command", required=True)

    tune = sub.add_parser("tune", parents=[common], help="time candidates for model presets or shapes, fill the cache")
    tune.add_argument("--model", nargs="+", type=_model, help=f"model presets: {', '.join(MODELS)}")
    tune.add_argument("--layers", nargs="+", choices=LAYERS, help=f"only these preset layers ({' '.join(LAYERS)})")
    tune.add_argument("--shape", nargs="+", type=_parse_shape, help=f"explicit weight shapes: {SHAPE_HELP}")
    tune.add_argument(
        "--tokens", nargs="+", type=argtypes.positive_int, default=[2048], help="M values to tune (default: 2048)"
    )
    tune.add_argument("--dtype", nargs="+", help="dtypes (default: bfloat16 on a GPU, float32 on the CPU)")
    tune.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when present)")
    tune.add_argument("--force", action="store_true", help="retune problems already in the cache")
    tune.add_argument(
        "--repeats",
        type=argtypes.positive_int,
        help="at most this many timed runs per candidate on the CPU (default 10)",
    )
    if provider_hook is not None:
        provider_hook.add_tune_arguments(tune)

    show = sub.add_parser("show", parents=[common], help="print the cache (or a profile) as a table")
    show.add_argument(
        "--file", type=argtypes.existing_file, help="show this cache or profile file instead of the user cache"
    )

    export = sub.add_parser("export", parents=[common], help="write profiles/<device>.json from the user cache")
    export.add_argument(
        "--out-dir",
        type=argtypes.output_dir,
        default=Path("profiles"),
        help="directory to write to (default: ./profiles)",
    )
    export.add_argument("--device", nargs="+", help="device names to export (default: the devices present)")
    export.add_argument("--replace", action="store_true", help="overwrite an existing profile instead of merging")

    clear = sub.add_parser("clear", parents=[common], help="delete entries from the user cache")
    clear.add_argument("--stale", action="store_true", help="only entries tuned with other library versions/sources")
    clear.add_argument("--device", nargs="+", help="only entries of these device names")

    sub.add_parser("presets", parents=[common], help="list the model presets and their layer shapes")
    return parser


COMMANDS = {"tune": cmd_tune, "show": cmd_show, "export": cmd_export, "clear": cmd_clear, "presets": cmd_presets}


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    argv = list(sys.argv[1:] if argv is None else argv)
    # The provider adds its own tune options, so find --provider before the full parse.
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--provider", default=None)
    early.add_argument("command", nargs="?")
    pre, _ = early.parse_known_args(argv)
    provider = None
    if pre.command != "presets":
        try:
            provider = load_provider(pre.provider)
        except ValueError as exc:
            err.write(f"error: {exc}\n")
            return EXIT_USAGE
    args = build_parser(provider).parse_args(argv)
    try:
        return COMMANDS[args.command](provider, args, out, err)
    except ValueError as exc:
        err.write(f"error: {exc}\n")
        return EXIT_USAGE
