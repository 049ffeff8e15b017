"""Tables of tuned entries, the JSON file format, and the persistent cache file.

File format (cache files and profiles alike)::

    {"schema": "autotune/1", "kind": "cache" | "profile", "entries": [<Entry.to_json()>, ...], ...}

The cache file is written atomically (a temporary file in the same directory, then ``os.replace``) while a
file lock (``filelock``, a dependency of torch) is held, after merging with what is on disk, so concurrent
processes and ranks never corrupt it nor lose each other's entries. Readers take no lock: they always see a
whole file. A file that is empty, truncated, not JSON or of another schema is ignored with one warning and
replaced on the next write; a directory that cannot be created or written makes the cache memory-only for the
process, with one warning.

:class:`CacheFile` holds tuned entries by default; given another :class:`Codec` it keeps any other table of
records with the same guarantees (bonekern's kernel verdicts, ``bonekern/verify.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .argtypes import parse_json_text, regular_file_problem
from .entries import Entry
from .keys import TuningKey, nearest_bucket
from .log import AutotuneWarning

SCHEMA = "autotune/1"
"""The ``schema`` value of every file this version reads and writes."""

LOCK_TIMEOUT_S = 60.0
"""How long a writer waits for another process's lock before giving up (and keeping its results in memory)."""


class Readable(Protocol):
    """A path or an ``importlib.resources`` Traversable."""

    def read_text(self, encoding: str = ...) -> str: ...


@dataclass(frozen=True)
class Hit:
    """A lookup result: the entry, and the bucket it was tuned for (== the key's bucket when ``exact``)."""

    entry: Entry
    exact: bool


class Table:
    """Entries indexed for lookup; one entry per :attr:`TuningKey.entry_id` (the last one added wins)."""

    def __init__(self, entries: Iterable[Entry] = ()):
        self._by_id: dict[str, Entry] = {}
        self._by_problem: dict[str, dict[str, Entry]] = defaultdict(dict)
        for e in entries:
            self.add(e)

    def add(self, entry: Entry) -> None:
        eid = entry.key.entry_id
        self._by_id[eid] = entry
        self._by_problem[entry.key.problem_id][eid] = entry

    def entries(self) -> list[Entry]:
        return list(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)

    def merged(self, newer: Iterable[Entry]) -> Table:
        """A copy with ``newer`` added on top (same id: ``newer`` wins)."""
        out = Table(self._by_id.values())
        for e in newer:
            out.add(e)
        return out

    def without(self, drop: Callable[[Entry], bool]) -> Table:
        return Table(e for e in self._by_id.values() if not drop(e))

    def lookup(self, key: TuningKey, *, match_versions: bool, between_only: bool) -> Hit | None:
        """The entry for ``key``'s problem and source hash, at its M bucket or the nearest tuned one.

        Args:
            match_versions: also require the library versions to match (the user cache); profiles leave it
                False (a tile size tuned under triton 3.6 is still good advice under 3.7) and then prefer an
                entry with matching versions when there are several for one bucket.
            between_only: use a nearest bucket only when M lies between the smallest and largest tuned
                buckets; outside that range there is no hit (the caller may tune instead).
        """
        group = self._by_problem.get(key.problem_id)
        if not group:
            return None
        by_bucket: dict[int, Entry] = {}
        for e in group.values():
            if e.key.source != key.source:
                continue
            same_versions = e.key.versions == key.versions
            if match_versions and not same_versions:
                continue
            best = by_bucket.get(e.key.m)
            rank = (same_versions, e.tuned_at)
            if best is None or rank > (best.key.versions == key.versions, best.tuned_at):
                by_bucket[e.key.m] = e
        if not by_bucket:
            return None
        if key.m in by_bucket:
            return Hit(by_bucket[key.m], exact=True)
        if between_only and not (min(by_bucket) < key.m < max(by_bucket)):
            return None
        return Hit(by_bucket[nearest_bucket(key.m, by_bucket)], exact=False)


def parse_records(text: str | bytes, schema: str, record: Callable[[Any], Any]) -> tuple[list[Any], str | None]:
    """The records of a document ``{"schema": schema, "entries": [...]}``, each built by ``record(item)``, and,
    when something was wrong, what (else None).

    Never raises: an empty, truncated, non-UTF-8, non-JSON, too deeply nested or foreign-schema file gives no
    records; malformed items in an otherwise good file (``record`` raises anything) are skipped and counted.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            return [], f"it is not UTF-8 text ({exc.reason} at byte {exc.start})"
    if not text.strip():
        return [], "the file is empty"
    try:
        data = parse_json_text(text, "file")
    except ValueError as exc:
        return [], str(exc).removeprefix("file: ")
    if not isinstance(data, dict) or data.get("schema") != schema:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        return [], f"its schema is {_short(found)}, not {schema!r}"
    raw = data.get("entries")
    if not isinstance(raw, list):
        return [], "its 'entries' is not a list"
    records = []
    bad = 0
    for item in raw:
        try:
            records.append(record(item))
        except Exception:  # any malformed entry (KeyError, TypeError, OverflowError from 1e999, ...) is skipped
            bad += 1
    return records, (f"{bad} malformed entries were skipped" if bad else None)


def parse_table(text: str | bytes) -> tuple[Table, str | None]:
    """Parse a cache or profile file (:func:`parse_records` of :class:`Entry` records): the table and, when
    something was wrong, what (else None). Never raises."""
    entries, problem = parse_records(text, SCHEMA, Entry.from_json)
    return Table(entries), problem


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value) if isinstance(value, (str, int, float, type(None))) else type(value).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_table_file(
    path: Path, parse: Callable[[bytes], tuple[Any, str | None]] = parse_table
) -> tuple[Any, str | None]:
    """Read a cache or profile file at ``path`` without ever blocking or raising; ``parse`` turns its bytes into
    a table (default: :func:`parse_table`) and is called with ``b""`` for a file that is missing or unreadable.

    A missing file is an empty table with no problem; a FIFO, device or directory is skipped without being
    opened; anything unreadable or malformed gives an empty table (or the good entries) and what was wrong.
    """
    problem = regular_file_problem(path)
    if problem == "it does not exist":
        return parse(b"")[0], None
    if problem:
        return parse(b"")[0], problem
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return parse(b"")[0], None
    except OSError as exc:
        return parse(b"")[0], f"it cannot be read ({exc.strerror or exc})"
    return parse(raw)


def dump_table(table: Table, kind: str, **meta: Any) -> str:
    """The JSON text of a file holding ``table`` (entries sorted, so files diff well)."""
    entries = sorted(table.entries(), key=lambda e: e.key.entry_id)
    doc = {"schema": SCHEMA, "kind": kind, **meta, "entries": [e.to_json() for e in entries]}
    return json.dumps(doc, indent=1, sort_keys=False) + "\n"


def read_table(source: Readable, what: str, warn: Callable[[str], None]) -> Table:
    """Read a profile (a path or a package resource); a missing file is an empty table, a bad one warns once."""
    if isinstance(source, Path):
        table, problem = read_table_file(source)
    else:
        try:
            table, problem = parse_table(source.read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError):
            return Table()
        except (OSError, UnicodeDecodeError) as exc:
            table, problem = Table(), f"it cannot be read ({exc})"
    if problem:
        warn(f"{what} {source}: {problem}; ignoring {'those' if len(table) else 'it'}")
    return table


NEW_FILE_MODE = 0o644
"""Permissions, before the umask, of a file the store creates, or rewrites when the old one was not readable and
writable by its owner (a cache with mode 000 is not worth preserving)."""

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status), else by setting
    and restoring it under a lock."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def new_file_mode() -> int:
    """:data:`NEW_FILE_MODE` under the umask: what ``open()`` would give a new file (0o644 with umask 022, 0o600
    with 077), so a rewritten cache is never more readable than the user asked new files to be."""
    return NEW_FILE_MODE & ~current_umask()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old file or the new one, never a partial one.

    The file keeps its permissions when it exists and its owner may read and write it; otherwise (a new file,
    or one whose mode was broken, e.g. 000) it gets :func:`new_file_mode`.
    """
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        mode = new_file_mode()
    if mode & 0o600 != 0o600:
        mode = new_file_mode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class Records(Protocol):
    """What :class:`CacheFile` keeps: a table of records with an identity each (:class:`Table` is one)."""

    def merged(self, newer: Iterable[Any]) -> Records: ...

    def without(self, drop: Callable[[Any], bool]) -> Records: ...

    def entries(self) -> list[Any]: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class Codec:
    """How a :class:`CacheFile` reads and writes its table: ``parse(bytes) -> (table, problem or None)`` (never
    raising; ``b""`` gives the empty table), ``dump(table) -> text``, and ``what`` it holds, for warnings."""

    parse: Callable[[bytes], tuple[Any, str | None]]
    dump: Callable[[Any], str]
    what: str


TUNED_ENTRIES = Codec(parse_table, lambda table: dump_table(table, "cache"), "autotune cache")
"""The codec of the tuner's user cache (:class:`Table` of :class:`Entry`)."""


class CacheFile:
    """The user cache: a :class:`Table` backed by one JSON file, merged on every write.

    ``path`` None means memory-only from the start (``why_memory`` says why, warned once on first use).
    ``codec`` makes it hold another kind of table (default: tuned entries, :data:`TUNED_ENTRIES`).
    """

    def __init__(self, path: Path | None, why_memory: str | None = None, codec: Codec = TUNED_ENTRIES):
        self.path = path
        self.codec = codec
        self._memory_reason = why_memory if path is None else None
        self._table: Any = None
        self._warned: set[str] = set()

    # -- reporting ---------------------------------------------------------------------------------------

    def _warn_once(self, kind: str, message: str) -> None:
        """At most one warning per cache file: the first thing found wrong with this location."""
        if not self._warned:
            self._warned.add(kind)
            warnings.warn(message, AutotuneWarning, stacklevel=4)

    @property
    def memory_only(self) -> bool:
        return self._memory_reason is not None

    def describe(self) -> str:
        return "memory (no writable cache directory)" if self.memory_only else str(self.path)

    def _fall_back_to_memory(self, reason: str) -> None:
        self._memory_reason = reason
        self._warn_once("memory", f"{self.codec.what}: {reason}; results are kept in memory for this process only")

    # -- reading ------------------------------------------------------------------------------------------

    def _read_disk(self) -> Any:
        assert self.path is not None
        table, problem = read_table_file(self.path, self.codec.parse)
        if problem:
            self._warn_once("corrupt", f"{self.codec.what} {self.path}: {problem}; ignoring it, it will be rewritten")
        return table

    def table(self) -> Any:
        """The entries: read from disk on first use, then kept (and refreshed on each write)."""
        if self._table is None:
            if self._memory_reason is not None and self.path is None:
                self._warn_once("memory", f"{self.codec.what}: {self._memory_reason}; results are kept in memory")
            self._table = self.codec.parse(b"")[0] if self.path is None else self._read_disk()
        return self._table

    # -- writing ------------------------------------------------------------------------------------------

    def _locked_update(self, update: Callable[[Any], Any]) -> Any:
        """Under the lock: read the file, apply ``update``, write it atomically. None if the file is unusable."""
        if self.memory_only or self.path is None:
            return None
        from filelock import FileLock, Timeout

        lock_path = Path(f"{self.path}.lock")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and not self.path.is_file():
                self._fall_back_to_memory(f"{self.path} is not a regular file, so it is left alone")
                return None
            # filelock retries for the whole timeout when the lock file cannot be created at all, and then blames
            # another process; creating it first says what is really wrong, at once.
            try:
                os.close(os.open(lock_path, os.O_RDWR | os.O_CREAT, NEW_FILE_MODE))
            except OSError as exc:
                self._fall_back_to_memory(f"cannot create the lock file {lock_path} ({exc.strerror or exc})")
                return None
            with FileLock(str(lock_path), timeout=LOCK_TIMEOUT_S):
                table = update(self._read_disk())
                atomic_write_text(self.path, self.codec.dump(table))
            return table
        except Timeout:
            self._fall_back_to_memory(f"another process held {lock_path} for over {LOCK_TIMEOUT_S:.0f} s")
        except OSError as exc:
            self._fall_back_to_memory(f"cannot write {self.path} ({exc.strerror or exc})")
        return None

    def put(self, entries: Iterable[Entry]) -> None:
        """Add ``entries`` (replacing same-key ones) and persist them, keeping every other process's entries."""
        entries = list(entries)
        merged = self._locked_update(lambda disk: disk.merged(entries))
        self._table = merged if merged is not None else self.table().merged(entries)

    def remove(self, drop: Callable[[Entry], bool]) -> int:
        """Delete the entries for which ``drop`` is true (on disk and in memory); returns how many went."""
        removed = 0

        def update(table: Any) -> Any:
            nonlocal removed
            kept = table.without(drop)
            removed = len(table) - len(kept)
            return kept

        on_disk = self._locked_update(update)
        self._table = on_disk if on_disk is not None else update(self.table())
        return removed
