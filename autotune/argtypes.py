"""Argument types and exit codes shared by the command lines (``python -m autotune``, ``python -m bench``).

Every argument is checked by argparse before any work starts; a bad one ends the program with one line naming the
argument, what was expected and what was given, and exit status :data:`EXIT_USAGE`. The types here are plain
functions of the argument's text (argparse calls them); the option's name comes from argparse itself
("argument --tokens: expected a positive integer; got '-5'").

Exit codes (both CLIs; documented in their ``--help`` and the README):

====  ===============================================================================
0     done
1     a regression was found (``bench --compare``) or nothing was written (``export``)
2     bad arguments, or nothing valid to do
3     a measurement failed (an implementation raised or disagreed with the reference)
====  ===============================================================================
"""

from __future__ import annotations

import argparse
import json
import math
import os
import stat
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

EXIT_OK, EXIT_REGRESSION, EXIT_USAGE, EXIT_FAILED = 0, 1, 2, 3

EXIT_CODES_HELP = (
    "exit status: 0 done; 1 a regression was found (bench --compare) or nothing was written (autotune export); "
    "2 bad arguments or nothing valid to do; 3 a measurement failed"
)

MAX_JSON_BYTES = 256 << 20
"""Larger files are refused rather than read (a tuning cache or bench result is a few MiB at most)."""

MAX_COUNT = 2**31 - 1
"""The largest count or size (tokens, r, repeats, a shape's N or K) an argument may give: far above any real layer
or token count, it turns a typo (extra digits) into a one-line error instead of a failure deep inside torch."""

MAX_ERROR_CHARS = 300
"""An unexpected error is reported as its first line, cut to this many characters (torch's C++ errors carry a
whole native backtrace in their message)."""


def _fail(expected: str, text: str) -> NoReturn:
    raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}")


def positive_int(text: str) -> int:
    """An integer in [1, :data:`MAX_COUNT`], written in ASCII decimal digits."""
    stripped = text.strip() if isinstance(text, str) else ""
    if not (stripped.isascii() and stripped.isdigit()) or int(stripped, 10) < 1:
        _fail("a positive integer", text)
    value = int(stripped, 10)
    if value > MAX_COUNT:
        _fail(f"a positive integer <= {MAX_COUNT}", text)
    return value


def usable_cpus() -> int:
    """How many CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def up_to_cpus(text: str) -> int:
    """A thread or worker-process count in [1, :func:`usable_cpus`]: more than the CPUs only measures (or waits
    on) oversubscription; torch crashes at exit when asked for 100000 threads, and a pool of 100000 processes
    never finishes starting."""
    value = positive_int(text)
    cpus = usable_cpus()
    if value > cpus:
        _fail(f"a positive integer <= {cpus} (the CPUs this process may use)", text)
    return value


def finite_float(text: str) -> float:
    """Any finite float (no nan, no inf)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        _fail("a finite number", text)
    if not math.isfinite(value):
        _fail("a finite number", text)
    return value


def positive_float(text: str) -> float:
    """A finite float > 0."""
    value = finite_float(text)
    if value <= 0:
        _fail("a finite number > 0", text)
    return value


def non_negative_float(text: str) -> float:
    """A finite float >= 0."""
    value = finite_float(text)
    if value < 0:
        _fail("a finite number >= 0", text)
    return value


def regular_file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as a regular file without blocking (a FIFO, a device, a folder), or None.

    A missing file is a problem too ("it does not exist"). Never opens the path.
    """
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return "it does not exist"
    except OSError as exc:
        return f"it cannot be examined ({exc.strerror or exc})"
    if stat.S_ISDIR(st.st_mode):
        return "it is a directory"
    if not stat.S_ISREG(st.st_mode):
        return "it is not a regular file (a FIFO, socket or device)"
    if st.st_size > MAX_JSON_BYTES:
        return f"it is {st.st_size} bytes, over the {MAX_JSON_BYTES >> 20} MiB limit"
    return None


def read_json_file(path: Path) -> Any:
    """The parsed JSON of a regular file; ValueError with one line saying what is wrong otherwise.

    Bounded: never blocks on a FIFO, never follows a deeply nested document into a RecursionError, never reads
    more than :data:`MAX_JSON_BYTES`.
    """
    problem = regular_file_problem(path)
    if problem:
        raise ValueError(f"{path}: {problem}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: it cannot be read ({exc.strerror or exc})") from None
    return parse_json_bytes(raw, str(path))


def parse_json_bytes(raw: bytes, where: str) -> Any:
    """Parse ``raw`` as UTF-8 JSON; ValueError naming ``where`` and the problem for anything else."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where}: it is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse_json_text(text, where)


def parse_json_text(text: str, where: str) -> Any:
    """Parse JSON text; ValueError naming ``where`` when it is not JSON or nested too deeply to read."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: it is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise ValueError(f"{where}: its JSON is nested too deeply to read") from None
    except ValueError as exc:  # e.g. an integer of more than sys.get_int_max_str_digits() digits
        raise ValueError(f"{where}: it is not valid JSON ({str(exc).splitlines()[0][:120]})") from None


def json_file(text: str) -> Path:
    """An existing regular file holding valid JSON (checked now, so a run never fails on it later)."""
    path = Path(text).expanduser()
    try:
        read_json_file(path)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a readable JSON file; {exc}") from None
    return path


def existing_file(text: str) -> Path:
    """An existing regular file (not opened here)."""
    path = Path(text).expanduser()
    problem = regular_file_problem(path)
    if problem:
        raise argparse.ArgumentTypeError(f"expected an existing file; {text!r}: {problem}")
    return path


def _writable_dir_problem(folder: Path) -> str | None:
    """Why files cannot be created in ``folder`` (after creating it if missing), or None."""
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def output_file(text: str) -> Path:
    """A path a file can be written to: not a directory; its folder exists or can be made, and is writable."""
    if not text or not text.strip():
        _fail("an output file path", text)
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"expected an output file path; {text!r} is a directory")
    problem = _writable_dir_problem(path.parent if str(path.parent) else Path("."))
    if problem:
        raise argparse.ArgumentTypeError(f"expected an output file path; {text!r}: {problem}")
    return path


def output_dir(text: str) -> Path:
    """A directory that exists or can be made, and is writable (not created here)."""
    if not text or not text.strip():
        _fail("an output directory", text)
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"expected an output directory; {text!r} is a file")
    problem = _writable_dir_problem(path)
    if problem:
        raise argparse.ArgumentTypeError(f"expected an output directory; {text!r}: {problem}")
    return path


def choice(kind: str, allowed: Sequence[str]) -> Callable[[str], str]:
    """One name out of ``allowed``; the message lists them."""

    def parse(text: str) -> str:
        if text not in allowed:
            raise argparse.ArgumentTypeError(f"expected {kind}, one of {', '.join(allowed)}; got {text!r}")
        return text

    parse.__name__ = kind
    return parse


def run_guarded(main: Callable[[], int], err: TextIO | None = None, prog: str = "") -> int:
    """Run a CLI's ``main``; anything it did not handle becomes one line on stderr and exit status 3.

    ``SystemExit`` (argparse, --help) and ``KeyboardInterrupt`` pass through.
    """
    err = err or sys.stderr
    try:
        return main()
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as exc:  # the last line of defence: a one-line message, never a traceback
        err.write(f"{prog}: error: {first_line(exc)}\n")
        return EXIT_FAILED


def first_line(exc: BaseException) -> str:
    """``Type: message`` on one line, at most :data:`MAX_ERROR_CHARS` long."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."
