"""The tuner's lookup order (profile file, user cache, shipped profile, tuning, defaults), nearest-M lookup, and
how tuning drops candidates that fail or disagree. Generic package only, with a fake search space and timer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from autotune import CacheFile, Candidate, Entry, SearchSpace, Table, Timing, Tuner, TuningKey, bucket_m
from autotune.settings import CACHE_FILE_NAME
from autotune.store import dump_table

PREFIX = "ATTEST"
DEFAULT = Candidate("toy", {"strategy": "a", "size": 4})


class FakeTimer:
    def __init__(self, times=None):
        self.times = times or {}
        self.timed: list[dict] = []

    def measure(self, candidate, fn, best_ms):
        fn()
        self.timed.append(dict(candidate.config))
        return [self.times.get((candidate.config["strategy"], candidate.config["size"]), 10.0)]

    def synchronize(self):
        pass

    def describe(self):
        return "fake"


def make_key(m: int, versions: str = "1", source: str = "src") -> TuningKey:
    return TuningKey.make("toy_op", "auto", {"n": 64}, m, "cpu", "cpu Test", "test", {"lib": versions}, source)


def make_space(m: int, **key_args) -> SearchSpace:
    sizes = (4, 8, 16)
    return SearchSpace(
        key=make_key(m, **key_args),
        m=m,
        default=DEFAULT,
        candidates=lambda: [Candidate("toy", {"strategy": s, "size": z}) for s in ("a", "b") for z in sizes],
        label="toy",
    )


def entry(key: TuningKey, strategy: str, size: int, when: str = "2026-01-01") -> Entry:
    choice = Candidate("toy", {"strategy": strategy, "size": size})
    return Entry(key, choice, DEFAULT, (Timing(choice, 1.0, 3),), key.m, "fake", when)


def runner(candidate):
    return lambda: candidate.config["size"]


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv(f"{PREFIX}_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(f"{PREFIX}_AUTOTUNE", "lookup")
    monkeypatch.delenv(f"{PREFIX}_AUTOTUNE_PROFILE", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return tmp_path


def test_layers_first_hit_wins(env, monkeypatch):
    key = make_key(256)
    profile = env / "mine.json"
    profile.write_text(dump_table(Table([entry(key, "b", 4)]), "profile"))
    shipped = env / "shipped.json"
    # Profiles are device advice: an entry tuned under another library version still counts there.
    shipped.write_text(dump_table(Table([entry(make_key(256, versions="0.9"), "b", 16)]), "profile"))
    cache = CacheFile(env / "cache" / CACHE_FILE_NAME)
    cache.put([entry(key, "b", 8)])

    def decide():
        tuner = Tuner("attest", PREFIX, profile_source=lambda k: shipped, timer=FakeTimer())
        d = tuner.choose(make_space(256), runner)
        return d.layer, d.candidate.config["size"]

    monkeypatch.setenv(f"{PREFIX}_AUTOTUNE_PROFILE", str(profile))
    assert decide() == ("profile", 4)
    monkeypatch.delenv(f"{PREFIX}_AUTOTUNE_PROFILE")
    assert decide() == ("user cache", 8)
    cache.remove(lambda e: True)
    assert decide() == ("shipped profile", 16)
    shipped.unlink()
    assert decide() == ("default", 4)


def test_user_cache_requires_matching_versions(env):
    CacheFile(env / "cache" / CACHE_FILE_NAME).put([entry(make_key(256, versions="0.9"), "b", 8)])
    d = Tuner("attest", PREFIX, timer=FakeTimer()).choose(make_space(256), runner)
    assert d.layer == "default"


def test_an_entry_the_space_does_not_accept_is_skipped(env):
    key = make_key(256)
    shipped = env / "shipped.json"
    shipped.write_text(dump_table(Table([entry(key, "b", 16)]), "profile"))
    CacheFile(env / "cache" / CACHE_FILE_NAME).put([entry(key, "retired-strategy", 8)])
    d = Tuner("attest", PREFIX, profile_source=lambda k: shipped, timer=FakeTimer()).choose(make_space(256), runner)
    assert (d.layer, d.candidate.config) == ("shipped profile", {"strategy": "b", "size": 16})


def test_nearest_m_bucket(env, monkeypatch):
    CacheFile(env / "cache" / CACHE_FILE_NAME).put([entry(make_key(256), "b", 4), entry(make_key(4096), "b", 16)])
    timer = FakeTimer()

    def decide(m):
        d = Tuner("attest", PREFIX, timer=timer).choose(make_space(m), runner)
        return d.layer, d.candidate.config["size"]

    assert bucket_m(3000) == 4096 and bucket_m(256) == 256 and bucket_m(257) == 512
    assert decide(200) == ("user cache", 4)  # bucket 256: exact
    assert decide(3000) == ("user cache", 16)  # bucket 4096: exact
    assert decide(300) == ("user cache", 4)  # bucket 512: nearest is 256
    assert decide(1000) == ("user cache", 16)  # bucket 1024: 256 and 4096 equally far, the larger wins
    assert decide(100_000) == ("user cache", 16)  # outside the tuned range: nearest, when tuning is off
    assert decide(16) == ("user cache", 4)
    assert timer.timed == []

    # With tuning on, M between tuned buckets still uses the nearest; outside the range it is tuned.
    monkeypatch.setenv(f"{PREFIX}_AUTOTUNE", "1")
    assert decide(1000) == ("user cache", 16) and timer.timed == []
    timer.times = {("a", 8): 1.0}
    assert decide(100_000) == ("tuned", 8)
    assert len(timer.timed) == 6


def test_tuning_drops_candidates_that_raise_or_disagree(env, monkeypatch):
    monkeypatch.setenv(f"{PREFIX}_AUTOTUNE", "1")

    def flaky_runner(candidate):
        if candidate.config == {"strategy": "b", "size": 4}:
            raise RuntimeError("out of shared memory: 300000 > 232448")

        def run():
            if candidate.config == {"strategy": "b", "size": 8}:
                return -1.0  # a broken config: wrong answer, and the fastest
            return 1.0

        return run

    space = make_space(256)
    space.compare = lambda ref, out: None if ref == out else f"{out} != {ref}"
    timer = FakeTimer({("b", 8): 0.1, ("b", 16): 0.5})
    d = Tuner("attest", PREFIX, timer=timer).choose(space, flaky_runner)
    assert (d.layer, d.candidate.config) == ("tuned", {"strategy": "b", "size": 16})
    errors = {(t.candidate.config["strategy"], t.candidate.config["size"]): t.error for t in d.entry.timings}
    assert errors[("b", 4)].startswith("RuntimeError: out of shared memory")
    assert errors[("b", 8)].startswith("wrong result")
    assert errors[("b", 16)] is None
    assert {"strategy": "b", "size": 8} not in timer.timed


def test_forced_retune_ignores_hits(env, monkeypatch):
    CacheFile(env / "cache" / CACHE_FILE_NAME).put([entry(make_key(256), "b", 4)])
    monkeypatch.setenv(f"{PREFIX}_AUTOTUNE", "force")
    timer = FakeTimer({("a", 16): 1.0})
    d = Tuner("attest", PREFIX, timer=timer).choose(make_space(256), runner)
    assert (d.layer, d.candidate.config["size"]) == ("tuned", 16) and len(timer.timed) == 6
    monkeypatch.setenv(f"{PREFIX}_AUTOTUNE", "lookup")
    d = Tuner("attest", PREFIX, timer=timer).choose(make_space(256), runner)
    assert (d.layer, d.candidate.config["size"]) == ("user cache", 16)


def test_cache_location_follows_the_environment(env, monkeypatch):
    assert Tuner("attest", PREFIX).settings().cache_path == env / "cache" / "autotune.json"
    monkeypatch.delenv(f"{PREFIX}_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(env / "xdg"))
    expected = env / "xdg" / "attest" / "autotune.json" if sys.platform.startswith("linux") else None
    if expected is not None:
        assert Tuner("attest", PREFIX).settings().cache_path == expected
        # XDG: a relative XDG_CACHE_HOME is invalid and ignored (~/.cache is used)
        monkeypatch.setenv("XDG_CACHE_HOME", "relative/xdg")
        home = Path.home() / ".cache" / "attest" / "autotune.json"
        assert Tuner("attest", PREFIX).settings().cache_path == home


def test_bad_switch_value_names_the_variable(env, monkeypatch):
    monkeypatch.setenv(f"{PREFIX}_AUTOTUNE", "sometimes")
    with pytest.raises(ValueError, match=f"{PREFIX}_AUTOTUNE must be one of"):
        Tuner("attest", PREFIX).choose(make_space(256), runner)


def test_cpu_timer_takes_several_samples_and_gives_up_on_clearly_slow_candidates():
    import time

    from autotune import CpuTimer

    timer = CpuTimer(warmup_s=0.0, min_repeats=3, max_repeats=5, budget_s=10.0)
    calls = []
    samples = timer.measure(DEFAULT, lambda: (calls.append(1), time.sleep(0.002)), None)
    assert len(samples) == 5 and len(calls) == 6 and min(samples) >= 2.0  # one warm-up call, then 5 timed
    slow = timer.measure(DEFAULT, lambda: time.sleep(0.004), best_ms=0.5)
    assert len(slow) == 2 and min(slow) >= 4.0
