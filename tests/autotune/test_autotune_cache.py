"""The autotune cache: round trip, staleness, damaged files, concurrent writers, unwritable directories.

These tests use the generic package only (no torch work): a fake search space whose candidates are numbers and
a timer that reports made-up times, so they check the bookkeeping, not kernels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

from autotune import AutotuneWarning, CacheFile, Candidate, Entry, SearchSpace, Timing, Tuner, TuningKey, parse_table
from autotune.settings import CACHE_FILE_NAME
from autotune.store import SCHEMA
from tests.support import ROOT

PREFIX = "ATTEST"


class FakeTimer:
    """Reports ``times[candidate config 'i']`` ms; counts the candidates it was asked to time."""

    def __init__(self, times: dict[int, float]):
        self.times = times
        self.calls: list[int] = []

    def measure(self, candidate, fn, best_ms):
        fn()
        self.calls.append(candidate.config["i"])
        return [self.times[candidate.config["i"]]]

    def synchronize(self):
        pass

    def describe(self):
        return "fake timer"


def make_key(n: int = 64, m: int = 128, source: str = "src-a", versions: dict | None = None) -> TuningKey:
    return TuningKey.make(
        "toy_op", "auto", {"n": n, "dtype": "float32"}, m, "cpu", "cpu Test", "test", versions or {"lib": "1"}, source
    )


def make_space(key: TuningKey, count: int = 3) -> SearchSpace:
    return SearchSpace(
        key=key,
        m=key.m,
        default=Candidate("toy", {"i": 0}),
        candidates=lambda: [Candidate("toy", {"i": i}) for i in range(count)],
        label=f"toy n={dict(key.problem)['n']}",
    )


def runner(candidate: Candidate):
    return lambda: candidate.config["i"]


@pytest.fixture
def env(tmp_path, monkeypatch):
    """An isolated environment: cache under tmp_path, autotuning on, no interpreter."""
    monkeypatch.setenv(f"{PREFIX}_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(f"{PREFIX}_AUTOTUNE", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return tmp_path / "cache" / CACHE_FILE_NAME


def test_entry_json_round_trip(env):
    key = make_key()
    timings = (Timing(Candidate("toy", {"i": 0}), 2.5, 3), Timing(Candidate("toy", {"i": 1}), error="boom"))
    entry = Entry(key, Candidate("toy", {"i": 0}), Candidate("toy", {"i": 0}), timings, 100, "fake", "2026-01-01")
    assert Entry.from_json(json.loads(json.dumps(entry.to_json()))) == entry

    CacheFile(env).put([entry])
    reread = CacheFile(env).table().entries()
    assert reread == [entry]
    data = json.loads(env.read_text())
    assert data["schema"] == SCHEMA and len(data["entries"]) == 1


def test_tuned_entry_is_reused_and_goes_stale_when_the_source_changes(env):
    timer = FakeTimer({0: 3.0, 1: 1.0, 2: 2.0})
    tuner = Tuner("attest", PREFIX, timer=timer)
    decision = tuner.choose(make_space(make_key()), runner)
    assert decision.layer == "tuned" and decision.candidate.config == {"i": 1}
    assert sorted(timer.calls) == [0, 1, 2]

    # A new process (new tuner) reads the winner back without timing anything.
    timer.calls.clear()
    again = Tuner("attest", PREFIX, timer=timer).choose(make_space(make_key()), runner)
    assert again.layer == "user cache" and again.candidate.config == {"i": 1} and timer.calls == []

    # The kernel source changed: the old entry no longer matches, the problem is tuned again.
    timer.times = {0: 1.0, 1: 5.0, 2: 5.0}
    changed = Tuner("attest", PREFIX, timer=timer).choose(make_space(make_key(source="src-b")), runner)
    assert changed.layer == "tuned" and changed.candidate.config == {"i": 0}
    # So does a library upgrade.
    upgraded = Tuner("attest", PREFIX, timer=timer).choose(make_space(make_key(versions={"lib": "2"})), runner)
    assert upgraded.layer == "tuned"
    assert len(CacheFile(env).table()) == 3


def test_a_tuned_zero_valued_config_is_read_back(env):
    """A config value of 0 that the candidate list carries (CuPy's ``threads_per_row = 0``) comes back from the
    cache; before, every non-positive int was refused there, so such a winner was re-tuned in every process."""
    timer = FakeTimer({0: 1.0, 1: 3.0, 2: 2.0})

    def space() -> SearchSpace:  # the default is not the winner, so the winner must come from the cache
        key = make_key()
        return SearchSpace(
            key, key.m, Candidate("toy", {"i": 2}), lambda: [Candidate("toy", {"i": i}) for i in (2, 1, 0)]
        )

    first = Tuner("attest", PREFIX, timer=timer).choose(space(), runner)
    assert first.layer == "tuned" and first.candidate.config == {"i": 0}
    timer.calls.clear()
    again = Tuner("attest", PREFIX, timer=timer).choose(space(), runner)
    assert again.layer == "user cache" and again.candidate.config == {"i": 0} and timer.calls == []


@pytest.mark.parametrize(
    ("config", "accepted"),
    [
        ({"i": 0}, True),  # a value a current candidate carries
        ({"i": 7}, True),  # a positive size the list does not enumerate (a neighbouring M bucket's)
        ({"i": -1}, False),  # not positive and not carried
        ({"i": True}, False),  # a bool is not the int 1
        ({"i": "0"}, False),
        ({"j": 0}, False),
    ],
)
def test_structural_acceptance_of_stored_configs(config, accepted):
    from autotune.tuner import structurally_accepted

    current = [Candidate("toy", {"i": i}) for i in range(3)]
    assert structurally_accepted(Candidate("toy", config), current) is accepted
    assert not structurally_accepted(Candidate("other", config), current)


DAMAGED = {
    "garbage": "{this is not json",
    "truncated": None,  # filled in from a real file below
    "empty": "",
    "foreign schema": json.dumps({"schema": "someone-else/7", "entries": []}),
    "not an object": "[1, 2, 3]",
}


@pytest.mark.parametrize("damage", list(DAMAGED))
def test_damaged_cache_file_is_ignored_with_one_warning_and_rewritten(env, damage):
    env.parent.mkdir(parents=True)
    text = DAMAGED[damage]
    if text is None:
        Tuner("attest", PREFIX, timer=FakeTimer({0: 1, 1: 2, 2: 3})).choose(make_space(make_key(n=1)), runner)
        full = env.read_text()
        text = full[: len(full) // 2]
    env.write_text(text)

    timer = FakeTimer({0: 2.0, 1: 1.0, 2: 3.0})
    tuner = Tuner("attest", PREFIX, timer=timer)
    with pytest.warns(AutotuneWarning, match="ignoring it, it will be rewritten") as record:
        first = tuner.choose(make_space(make_key(n=64)), runner)
        second = tuner.choose(make_space(make_key(n=65)), runner)
    assert len([w for w in record if issubclass(w.category, AutotuneWarning)]) == 1
    assert first.layer == second.layer == "tuned"
    table, problem = parse_table(env.read_text())
    assert problem is None and len(table) == 2


def test_malformed_entries_are_skipped_the_rest_is_kept(env):
    tuner = Tuner("attest", PREFIX, timer=FakeTimer({0: 1.0, 1: 2.0, 2: 3.0}))
    tuner.choose(make_space(make_key()), runner)
    data = json.loads(env.read_text())
    data["entries"].append({"key": {"op": "half an entry"}})
    env.write_text(json.dumps(data))
    table, problem = parse_table(env.read_text())
    assert len(table) == 1 and problem == "1 malformed entries were skipped"


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from autotune import Candidate, SearchSpace, Tuner, TuningKey

    class Timer:
        def measure(self, candidate, fn, best_ms):
            return [1.0 + candidate.config["i"]]
        def synchronize(self):
            pass
        def describe(self):
            return "fake"

    worker, count, go = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    while not go.exists():
        time.sleep(0.005)
    for j in range(count):
        key = TuningKey.make("toy_op", "auto", {"worker": worker, "j": j}, 64, "cpu", "cpu Test", "t", {}, "s")
        space = SearchSpace(key, 64, Candidate("toy", {"i": 0}), lambda: [Candidate("toy", {"i": 1})])
        Tuner("attest", "ATTEST", timer=Timer()).choose(space, lambda c: (lambda: None))
    """
)


def test_concurrent_processes_keep_every_entry(env, tmp_path):
    workers, per_worker = 4, 15
    go = tmp_path / "go"
    child_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(w), str(per_worker), str(go)], env=child_env)
        for w in range(workers)
    ]
    go.touch()
    assert [p.wait(timeout=120) for p in procs] == [0] * workers
    table, problem = parse_table(env.read_text())
    assert problem is None
    got = {(dict(e.key.problem)["worker"], dict(e.key.problem)["j"]) for e in table.entries()}
    assert got == {(w, j) for w in range(workers) for j in range(per_worker)}
    assert not list(env.parent.glob("*.tmp")), "a temporary file was left behind"


def test_read_only_directory_falls_back_to_memory_with_one_warning(env, monkeypatch):
    timer = FakeTimer({0: 2.0, 1: 1.0, 2: 3.0})
    Tuner("attest", PREFIX, timer=timer).choose(make_space(make_key(n=1)), runner)
    before = env.read_text()
    env.parent.chmod(0o555)
    try:
        if os.access(env.parent, os.W_OK):
            # Running as root: permission bits do not stop writes, so raise the error the OS would raise.
            def refuse(path, text):
                raise PermissionError(13, "Permission denied", str(path))

            monkeypatch.setattr("autotune.store.atomic_write_text", refuse)
        tuner = Tuner("attest", PREFIX, timer=timer)
        with pytest.warns(AutotuneWarning, match="kept in memory") as record:
            first = tuner.choose(make_space(make_key(n=2)), runner)
            tuner.choose(make_space(make_key(n=3)), runner)
        assert len(record) == 1
        assert first.layer == "tuned"
        timer.calls.clear()
        # The result lives on in memory: asked again, nothing is timed.
        assert tuner.choose(make_space(make_key(n=2)), runner).layer == "user cache"
        assert tuner.choose(make_space(make_key(n=1)), runner).layer == "user cache"
        assert timer.calls == []
        assert env.read_text() == before
    finally:
        env.parent.chmod(0o755)


def test_directory_that_cannot_be_created_falls_back_to_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(f"{PREFIX}_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setenv(f"{PREFIX}_AUTOTUNE", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    timer = FakeTimer({0: 2.0, 1: 1.0, 2: 3.0})
    tuner = Tuner("attest", PREFIX, timer=timer)
    with pytest.warns(AutotuneWarning, match="kept in memory"):
        assert tuner.choose(make_space(make_key()), runner).candidate.config == {"i": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tuner.choose(make_space(make_key()), runner).layer == "user cache"


def test_rounds_interleave_candidates_so_drift_hits_all_alike(env):
    """A timer that asks for rounds sees every candidate once per round, in turn; the medians of all of a
    candidate's samples decide. With a machine that slows down over time, sequential timing would crown
    whichever candidate went first; interleaved, equal candidates stay equal and a real winner still wins."""

    class DriftingTimer(FakeTimer):
        rounds = 3

        def measure(self, candidate, fn, best_ms):
            fn()
            self.calls.append(candidate.config["i"])
            drift = len(self.calls)  # the machine gets slower with every timed call
            return [self.times[candidate.config["i"]] + drift]

    timer = DriftingTimer({0: 10.0, 1: 10.0, 2: 7.0})
    decision = Tuner("attest", PREFIX, timer=timer).choose(make_space(make_key()), runner)
    assert timer.calls == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    # medians: 0 -> 10 + (1, 4, 7) = 14, 1 -> 10 + (2, 5, 8) = 15, 2 -> 7 + (3, 6, 9) = 13. Timed one after the
    # other (drift 1-3, 4-6, 7-9) candidate 0 would have won with 12 against 15 and 15.
    assert decision.candidate.config == {"i": 2}
