"""What a tuned result is filed under: :class:`TuningKey`, M buckets, source hashes and library versions.

A key has three kinds of fields:

- the problem, matched exactly: op, scope (the candidate set compared: "auto" or one backend), the provider's
  problem fields (variant, dtype, N, K, r, ...), device type, device name and capability;
- M, bucketed to a power of two; lookups fall back to the nearest tuned bucket (see :mod:`autotune.store`);
- provenance: the library versions and a hash of the kernel source. A change in either makes an entry stale.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

SOURCE_SUFFIXES: tuple[str, ...] = (".py", ".cu", ".cuh", ".h", ".hpp", ".cpp", ".c")
"""Files that count as kernel source when a directory is hashed."""


def bucket_m(m: int) -> int:
    """The M bucket for ``m`` tokens: the smallest power of two >= m (1 for m <= 1)."""
    if m <= 1:
        return 1
    return 1 << (m - 1).bit_length()


def nearest_bucket(m: int, tuned: Iterable[int]) -> int:
    """The tuned bucket closest to ``m`` in log2 distance; ties go to the larger bucket (more work per call)."""
    target = math.log2(max(m, 1))
    return min(tuned, key=lambda b: (abs(math.log2(b) - target), -b))


def slug(text: str) -> str:
    """A file-name-safe lower-case form of a device name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def profile_name(device: str) -> str:
    """The file name of a device's profile: ``<slug of the device name>.json``."""
    return f"{slug(device)}.json"


def hash_sources(paths: Iterable[Path], root: Path | None = None) -> str:
    """A short sha256 over the contents of ``paths`` (directories: every source file below them, sorted).

    Names are hashed relative to ``root`` (or to each directory) so the hash is the same wherever the files
    are installed.
    """
    digest = hashlib.sha256()
    for path in paths:
        path = Path(path)
        base = root or (path if path.is_dir() else path.parent)
        files = sorted(p for p in path.rglob("*") if p.suffix in SOURCE_SUFFIXES) if path.is_dir() else [path]
        for f in files:
            digest.update(f.relative_to(base).as_posix().encode())
            digest.update(b"\0")
            digest.update(f.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()[:16]


def library_versions(distributions: Mapping[str, str]) -> dict[str, str]:
    """Installed versions, e.g. ``{"torch": "torch", "cupy": "cupy-cuda13x"}`` -> ``{"torch": "2.13.0", ...}``.

    ``distributions`` maps a short name to one or more distribution names separated by "|" (the first installed
    one counts); a library that is not installed is reported as "none". Nothing is imported.
    """
    out = {}
    for name, dists in distributions.items():
        version = "none"
        for dist in dists.split("|"):
            try:
                version = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        out[name] = version
    return out


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class TuningKey:
    """Everything a tuned choice depends on. Hashable; serialised as a JSON object inside each entry.

    Attributes:
        op: the operation, e.g. "bat_forward".
        scope: which candidates were compared: "auto" (every backend "auto" may pick) or one backend name.
        problem: the provider's exact-match fields (variant, dtype, N, K, r, ...) as (name, value) pairs in the
            provider's order (values: str, int or bool); identities sort them.
        m: the M bucket (:func:`bucket_m`).
        device_type: "cuda", "cpu", ...
        device: the device name ("NVIDIA H100 80GB HBM3", "cpu AMD EPYC").
        capability: what the device can do ("sm_90"; for a CPU the architecture and thread count).
        versions: library versions as sorted (name, version) pairs.
        source: hash of the kernel source of every backend in the scope.
    """

    op: str
    scope: str
    problem: tuple[tuple[str, Any], ...]
    m: int
    device_type: str
    device: str
    capability: str
    versions: tuple[tuple[str, str], ...] = field(default=())
    source: str = ""

    @staticmethod
    def make(
        op: str,
        scope: str,
        problem: Mapping[str, Any],
        m: int,
        device_type: str,
        device: str,
        capability: str,
        versions: Mapping[str, str],
        source: str,
    ) -> TuningKey:
        """Build a key; ``m`` is the real token count and is bucketed here."""
        return TuningKey(
            op,
            scope,
            tuple(problem.items()),
            bucket_m(m),
            device_type,
            device,
            capability,
            tuple(sorted(versions.items())),
            source,
        )

    @functools.cached_property
    def problem_id(self) -> str:
        """Identity without M and provenance: entries sharing it differ only in M bucket or staleness."""
        return _canonical([self.op, self.scope, sorted(self.problem), self.device_type, self.device, self.capability])

    @functools.cached_property
    def entry_id(self) -> str:
        """The full identity; one cache entry per id (a newer measurement replaces an older one)."""
        return _canonical(
            [
                self.op,
                self.scope,
                sorted(self.problem),
                self.m,
                self.device_type,
                self.device,
                self.capability,
                self.versions,
                self.source,
            ]
        )

    def with_scope(self, scope: str, source: str) -> TuningKey:
        """The same problem compared over another candidate set (one backend of an "auto" scope)."""
        return replace(self, scope=scope, source=source)

    def with_m(self, m_bucket: int) -> TuningKey:
        return replace(self, m=m_bucket)

    def to_json(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "scope": self.scope,
            "problem": dict(self.problem),
            "m": self.m,
            "device_type": self.device_type,
            "device": self.device,
            "capability": self.capability,
            "versions": dict(self.versions),
            "source": self.source,
        }

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> TuningKey:
        """Inverse of :meth:`to_json`; raises KeyError/TypeError/ValueError on a malformed object."""
        problem = data["problem"]
        versions = data["versions"]
        if not isinstance(problem, dict) or not isinstance(versions, dict):
            raise TypeError("problem and versions must be JSON objects")
        for name, value in problem.items():
            if not isinstance(value, (str, int)):  # bool is an int
                raise TypeError(f"problem field {name!r} must be a str, int or bool; got {type(value).__name__}")
        m = data["m"]
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"m must be a positive int; got {m!r}")
        for name in ("op", "scope", "device_type", "device", "capability", "source"):
            if not isinstance(data[name], str):
                raise TypeError(f"{name} must be a string; got {data[name]!r}")
        return TuningKey(
            data["op"],
            data["scope"],
            tuple(problem.items()),
            m,
            data["device_type"],
            data["device"],
            data["capability"],
            tuple(sorted((str(k), str(v)) for k, v in versions.items())),
            data["source"],
        )
