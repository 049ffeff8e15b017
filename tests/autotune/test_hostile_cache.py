"""Hostile tuning caches and profiles (issue 14): any bytes, any JSON, FIFOs, broken permissions, a lock that
cannot be created. A ``backend="auto"`` call must still return the right answer, the readers must never raise or
block, and each bad location gets one warning."""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import os
import stat
import tempfile
import time
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from autotune import AutotuneWarning, CacheFile, Candidate, SearchSpace, Tuner, TuningKey, parse_table
from autotune import cli as autotune_cli
from autotune.settings import CACHE_FILE_NAME
from autotune.store import SCHEMA, current_umask, dump_table, new_file_mode, read_table_file
from bonekern import bone_linear, dispatch

PREFIX = "HOSTILE"


class FakeTimer:
    def measure(self, candidate, fn, best_ms):
        fn()
        return [1.0 + candidate.config["i"]]

    def synchronize(self):
        pass

    def describe(self):
        return "fake timer"


def make_space(n: int = 64) -> SearchSpace:
    key = TuningKey.make(
        "toy_op", "auto", {"n": n, "dtype": "float32"}, 128, "cpu", "cpu Test", "test", {"l": "1"}, "s"
    )
    return SearchSpace(
        key=key,
        m=128,
        default=Candidate("toy", {"i": 0}),
        candidates=lambda: [Candidate("toy", {"i": i}) for i in range(3)],
    )


def runner(candidate):
    return lambda: candidate.config["i"]


def entry_json(**overrides) -> dict:
    """A valid cache entry's JSON, with fields replaced by ``overrides``."""
    tuner = Tuner("hostile-seed", "HOSTILESEED", timer=FakeTimer())
    decision = tuner.tune(make_space(), runner, tuner.settings())
    data = decision.entry.to_json()
    data.update(overrides)
    return data


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)

HOSTILE_DOCUMENTS = [
    "[" * 200_000,
    '{"schema": "autotune/1", "entries": [' + "[" * 100_000 + "]}",
    '{"schema": "autotune/1", "entries": "no"}',
    '{"schema": "autotune/1", "entries": [{"key": 1}]}',
    "\ufeff{}",
    "1e999",
    "NaN",
]


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv(f"{PREFIX}_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(f"{PREFIX}_AUTOTUNE", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    (tmp_path / "cache").mkdir()
    return tmp_path / "cache" / CACHE_FILE_NAME


@seed(1403)
@settings(max_examples=150, deadline=None)
@given(raw=st.binary(max_size=300) | st.sampled_from([d.encode() for d in HOSTILE_DOCUMENTS]))
def test_any_bytes_parse_without_raising(raw):
    table, problem = parse_table(raw)
    assert problem is not None or len(table) >= 0


@seed(1404)
@settings(max_examples=150, deadline=None)
@given(doc=JSON_VALUES, entries=st.lists(JSON_VALUES, max_size=3))
def test_any_json_parses_without_raising(doc, entries):
    parse_table(json.dumps(doc))
    table, problem = parse_table(json.dumps({"schema": SCHEMA, "entries": entries}))
    assert len(table) == 0 and (problem is not None or not entries)


@functools.cache
def _good_entry_text() -> str:
    return json.dumps(entry_json())


def _json_paths(value, prefix=()):
    """Every path (tuple of keys and indexes) into a JSON value, the root first."""
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from _json_paths(child, (*prefix, key))


RAW_LEAVES = {  # JSON text json.dumps cannot produce, spliced in for these placeholder strings
    "@huge-float@": "1e999",
    "@huge-int@": "1" + "0" * 5000,
    "@big-int@": str(2**70),
    "@deep@": "[" * 900 + "]" * 900,
}


@seed(1407)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_a_valid_entry_with_fields_replaced_never_raises(data):
    """Mutation rather than random documents: start from a real entry and replace 1-3 of its fields (at any
    depth) with hostile JSON, so the checks deep inside an entry are reached, not only the first KeyError."""
    good = json.loads(_good_entry_text())
    paths = list(_json_paths(good))[1:]
    leaves = JSON_VALUES | st.sampled_from([*RAW_LEAVES, -1, 0, 2**63, float("nan"), float("inf"), "", []])
    doc = copy.deepcopy(good)
    for path, value in data.draw(st.lists(st.tuples(st.sampled_from(paths), leaves), min_size=1, max_size=3)):
        parent = doc
        try:
            for step in path[:-1]:
                parent = parent[step]
            parent[path[-1]] = value
        except (KeyError, IndexError, TypeError):  # an earlier edit removed this path
            continue
    text = json.dumps({"schema": SCHEMA, "entries": [good, doc]})
    for placeholder, raw in RAW_LEAVES.items():
        text = text.replace(json.dumps(placeholder), raw)
    table, problem = parse_table(text)
    if not len(table):  # only a digit string past Python's int limit makes the whole document unreadable
        assert problem.startswith("it is not valid JSON (Exceeds the limit"), problem
        return
    assert len(table) <= 2  # the untouched entry always survives (or an equal-keyed valid edit replaced it)
    space = make_space()
    for match_versions in (True, False):
        hit = table.lookup(space.key, match_versions=match_versions, between_only=False)
        assert hit is not None
        space.is_acceptable(hit.entry.choice)
    assert len(parse_table(dump_table(table, "cache"))[0]) == len(table)  # what is kept can be written back
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "profile.json")
        with open(path, "w") as f:
            f.write(text)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err):
            code = autotune_cli.main(["show", "--file", path], out=out, err=err)
    assert code == 0 and "Traceback" not in err.getvalue()


@pytest.mark.parametrize(
    "override",
    [
        {"m_tuned": 1e999},
        {"m_tuned": float("nan")},
        {"timings": [{"backend": "toy", "config": {}, "samples": 1e999}]},
        {"choice": {"backend": 3, "config": {}}},
        {"key": [1, 2]},
        {"tuned_at": None, "timer": {"a": 1}},
    ],
)
def test_malformed_numbers_and_types_in_an_entry_are_skipped(override):
    good = entry_json()
    table, problem = parse_table(json.dumps({"schema": SCHEMA, "entries": [good, entry_json(**override)]}))
    assert len(table) == 1 and "1 malformed entries were skipped" in problem


@seed(1405)
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(raw=st.binary(max_size=200) | st.sampled_from([d.encode() for d in HOSTILE_DOCUMENTS]))
def test_auto_call_with_a_hostile_cache_and_profile_gives_the_right_answer(raw, tmp_path_factory, monkeypatch):
    folder = tmp_path_factory.mktemp("hostile")
    (folder / CACHE_FILE_NAME).write_bytes(raw)
    (folder / "profile.json").write_bytes(raw)
    monkeypatch.setenv("BONEKERN_CACHE_DIR", str(folder))
    monkeypatch.setenv("BONEKERN_AUTOTUNE_PROFILE", str(folder / "profile.json"))
    monkeypatch.setenv("BONEKERN_AUTOTUNE", "lookup")
    dispatch.forget_choices()
    gen = torch.Generator().manual_seed(0)
    x, w, block = (
        torch.randn(5, 12, generator=gen),
        torch.randn(24, 12, generator=gen),
        torch.randn(8, 3, 3, generator=gen),
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        y = bone_linear(x, w, block, variant="bat", backend="auto")
    expected = bone_linear(x, w, block, variant="bat", backend="torch")
    torch.testing.assert_close(y, expected)
    dispatch.forget_choices()
    by_location: dict[str, int] = {}
    for w_ in record:
        if issubclass(w_.category, AutotuneWarning):
            where = "profile" if "profile" in str(w_.message) else "cache"
            by_location[where] = by_location.get(where, 0) + 1
    assert all(count == 1 for count in by_location.values()), [str(w_.message) for w_ in record]


@pytest.mark.timeout(60)
def test_a_fifo_at_the_cache_path_is_skipped_without_blocking(cache_env):
    os.mkfifo(cache_env)
    assert read_table_file(cache_env)[1] == "it is not a regular file (a FIFO, socket or device)"
    tuner = Tuner("hostile", PREFIX, timer=FakeTimer())
    with pytest.warns(AutotuneWarning) as record:
        decision = tuner.choose(make_space(), runner)
    assert decision.candidate.config == {"i": 0}
    assert len(record) == 1 and "not a regular file" in str(record[0].message)
    assert stat.S_ISFIFO(os.stat(cache_env).st_mode)  # left alone, not replaced


def test_a_cache_file_with_mode_000_is_rewritten_readable(cache_env):
    CacheFile(cache_env).put([])
    os.chmod(cache_env, 0)
    Tuner("hostile", PREFIX, timer=FakeTimer()).choose(make_space(), runner)
    assert stat.S_IMODE(os.stat(cache_env).st_mode) == new_file_mode() == 0o644 & ~current_umask()
    assert len(CacheFile(cache_env).table()) == 1


def test_a_lock_that_cannot_be_created_is_reported_as_that_at_once(cache_env):
    (cache_env.parent / f"{CACHE_FILE_NAME}.lock").mkdir()  # even root cannot open a directory as the lock file
    tuner = Tuner("hostile", PREFIX, timer=FakeTimer())
    start = time.monotonic()
    with pytest.warns(AutotuneWarning) as record:
        decision = tuner.choose(make_space(), runner)
    assert time.monotonic() - start < 10
    assert decision.layer == "tuned"
    assert len(record) == 1 and "cannot create the lock file" in str(record[0].message)
    assert "another process" not in str(record[0].message)


def test_one_bad_location_gives_one_warning(cache_env):
    cache_env.write_text("{broken")
    os.chmod(cache_env.parent, 0o555)  # a non-root user also cannot write; root still can: either way one warning
    try:
        tuner = Tuner("hostile", PREFIX, timer=FakeTimer())
        with pytest.warns(AutotuneWarning) as record:
            tuner.choose(make_space(64), runner)
            tuner.choose(make_space(65), runner)
    finally:
        os.chmod(cache_env.parent, 0o755)
    assert len(record) == 1


def test_a_timing_without_ms_or_error_does_not_break_the_next_write(cache_env):
    """Such a timing used to parse, and then every write of the cache (merging what is on disk) raised a
    TypeError out of the tuning call."""
    bad = entry_json()
    bad["timings"][0].pop("ms")
    cache_env.write_text(json.dumps({"schema": SCHEMA, "kind": "cache", "entries": [bad]}))
    tuner = Tuner("hostile", PREFIX, timer=FakeTimer())
    with pytest.warns(AutotuneWarning, match="1 malformed entries were skipped"):
        decision = tuner.choose(make_space(65), runner)
    assert decision.layer == "tuned"
    assert len(CacheFile(cache_env).table()) == 1


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_new_or_repaired_cache_file_gets_the_umask_mode(cache_env, umask):
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        CacheFile(cache_env).put([])
        assert stat.S_IMODE(os.stat(cache_env).st_mode) == 0o644 & ~umask  # never wider than the user allows
        os.chmod(cache_env, 0)
        Tuner("hostile", PREFIX, timer=FakeTimer()).choose(make_space(), runner)
        assert stat.S_IMODE(os.stat(cache_env).st_mode) == 0o644 & ~umask
    finally:
        os.umask(old)
