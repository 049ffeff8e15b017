"""The shipped tuning profiles are keyed to today's kernel source, so they are actually used.

A profile entry is only looked up while its source hash equals the backend's (bonekern.tuning); an edit of a
backend's source silently retires every shipped entry for it. When this fails: re-measure the profile on its
machine (``python -m autotune tune`` + ``export``), or -- only for an edit that provably leaves every kernel's
computation and speed unchanged -- re-key the entries and say so in the commit.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from autotune import parse_table
from bonekern import dispatch, tuning
from tests.support import ROOT

PROFILES = sorted((ROOT / "profiles").glob("*.json"))


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_shipped_profile_entries_match_the_current_source(path):
    table, problem = parse_table(path.read_text())
    assert problem is None and len(table), problem
    stale = {
        (e.key.scope, e.key.source)
        for e in table.entries()
        if e.key.source != tuning.scope_source_hash(dispatch.scope_members(e.key.scope, e.key.device_type))
    }
    assert not stale, f"{path.name}: entries keyed to another source: {sorted(stale)}"


@pytest.mark.parametrize(
    ("name", "must_cover"),
    [
        ("torch", ["bonekern/backends/pytorch.py", "bonekern/blockmath.py"]),
        ("cupy", ["bonekern/backends/cupy/host.py", "bonekern/backends/cupy/kernels/bat.cu"]),
        ("triton", ["bonekern/backends/triton/bat.py", "bonekern/backends/triton/configs.py"]),
        ("reference", ["bonekern/backends/einsum.py"]),
    ],
)
def test_source_hash_covers_the_code_a_backend_runs(monkeypatch, name, must_cover):
    """A tuned entry must go stale when any code its backend runs changes: kernels, host code, shared math."""
    root = Path(tuning.__file__).resolve().parent.parent
    seen: list[Path] = []
    monkeypatch.setattr(tuning, "hash_sources", lambda paths, root=None: seen.extend(map(Path, paths)) or "h")
    tuning.backend_source_hash.__wrapped__(name)
    covered = [p.relative_to(root).as_posix() for p in seen]
    for rel in must_cover:
        assert any(rel == c or rel.startswith(c + "/") for c in covered), f"{name}: {rel} not in {covered}"
