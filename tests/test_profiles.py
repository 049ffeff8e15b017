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
from bonekern import tuning

PROFILES = sorted((Path(__file__).resolve().parent.parent / "profiles").glob("*.json"))


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_shipped_profile_entries_match_the_current_source(path):
    table, problem = parse_table(path.read_text())
    assert problem is None and len(table), problem
    stale = {
        (e.key.scope, e.key.source)
        for e in table.entries()
        if e.key.source != tuning.scope_source_hash(e.key.scope, e.key.device_type)
    }
    assert not stale, f"{path.name}: entries keyed to another source: {sorted(stale)}"
