"""The tuner: which candidate runs for a problem, from which layer, and timing candidates when nothing is known.

A caller describes one problem as a :class:`SearchSpace` (its key, its candidates, the default) and, when it
has real inputs, a *runner*: ``runner(candidate)`` returns a zero-argument function that runs that candidate.
:meth:`Tuner.choose` then walks the layers, first hit wins:

1. the profile file named by ``<P>_AUTOTUNE_PROFILE``;
2. the user cache (``<P>_CACHE_DIR``/autotune.json, else the user cache directory);
3. the profile shipped for this device (the provider's ``profile_source``);
4. tuning now, when allowed (``<P>_AUTOTUNE`` is 1 or force, not under the Triton interpreter, a runner is
   given): the result goes to the user cache, so it is never paid for twice;
5. heuristic defaults (``space.default``).

A layer hits on the key's exact M bucket, or on the nearest tuned bucket when M lies between two tuned ones.
When tuning is not possible, a nearest bucket outside that range is used too before falling back to defaults.
The user cache also requires the library versions to match; profiles only the source hash (they carry
device-level advice that survives a library upgrade, but not a kernel change). Every looked-up candidate must
pass ``space.accepts`` (by default: its backend is in the space and its config has the structure of a current
candidate), so an old entry can never hand a backend a config it does not understand.

Tuning runs each candidate once (a warm-up that also checks it: candidates that raise -- fail to compile,
exceed the device's resources -- or whose output differs from the first good candidate's are dropped), then
times it with the timer for the device, and keeps the fastest median.
"""

from __future__ import annotations

import datetime
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .entries import Candidate, Entry, Timing
from .keys import TuningKey
from .log import AutotuneWarning, enable_stderr_log, logger
from .settings import Settings
from .store import CacheFile, Hit, Readable, Table, read_table
from .timing import Timer, median_ms, timer_for

Runner = Callable[[Candidate], Callable[[], object]]
"""``runner(candidate)`` -> a function running that candidate on the real (or synthetic) inputs."""

Compare = Callable[[object, object], "str | None"]
"""``compare(reference_output, output)`` -> None when they agree, else a short description of the difference."""


def structurally_accepted(candidate: Candidate, current: Sequence[Candidate]) -> bool:
    """True when some current candidate has the same backend and config keys, and each value of ``candidate``
    either equals that candidate's or is a positive int where that candidate has an int.

    Integer values (tile sizes, chunk counts) are allowed to differ: an entry from a neighbouring M bucket may
    carry sizes the current candidate list does not enumerate. Strings (strategies) must be known, and so must
    a non-positive int (e.g. CuPy's ``threads_per_row = 0``, "one thread per row"): it is accepted only where a
    current candidate carries exactly that value.
    """
    config = dict(candidate.config)

    def is_int(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    for c in current:
        if c.backend != candidate.backend or set(c.config) != set(config):
            continue
        if all(
            (type(v) is type(c.config[k]) and v == c.config[k]) or (is_int(v) and v >= 1 and is_int(c.config[k]))
            for k, v in config.items()
        ):
            return True
    return False


@dataclass
class SearchSpace:
    """One problem as the tuner sees it.

    Attributes:
        key: where results are filed (M already bucketed).
        m: the real M (recorded as ``m_tuned``).
        default: the heuristic choice, used when nothing is tuned.
        candidates: every candidate, computed only when needed; within each backend, its default first.
        label: a short human description for logs and progress bars.
        backend_keys: for a scope spanning several backends ("auto"), each backend's own key, under which its
            best candidate is filed too (so asking for that backend by name is never timed again).
        accepts: whether a looked-up candidate may run; default :func:`structurally_accepted`.
        compare: checks a candidate's output against the first good candidate's (None: no check).
        device: passed to the timer ("cuda:1").
        may_time: False where timing must not happen even if allowed (e.g. during CUDA graph capture).
    """

    key: TuningKey
    m: int
    default: Candidate
    candidates: Callable[[], Sequence[Candidate]]
    label: str = ""
    backend_keys: Mapping[str, TuningKey] = field(default_factory=dict)
    accepts: Callable[[Candidate], bool] | None = None
    compare: Compare | None = None
    device: Any = None
    may_time: bool = True
    _listed: list[Candidate] | None = field(default=None, init=False, repr=False)

    def candidate_list(self) -> list[Candidate]:
        """The candidates, the default first, duplicates removed (computed once)."""
        if self._listed is None:
            out = [self.default]
            for c in self.candidates():
                if not any(c.same_as(o) for o in out):
                    out.append(c)
            self._listed = out
        return self._listed

    def is_acceptable(self, candidate: Candidate) -> bool:
        if self.accepts is not None:
            return self.accepts(candidate)
        return structurally_accepted(candidate, self.candidate_list())


@dataclass(frozen=True)
class Decision:
    """What runs and why: ``layer`` is "profile", "user cache", "shipped profile", "tuned", "only candidate" or
    "default"; ``detail`` says more (which file, which M bucket, why defaults)."""

    candidate: Candidate
    layer: str
    detail: str
    entry: Entry | None = None


@dataclass(frozen=True)
class _Layer:
    name: str
    table: Table
    match_versions: bool
    where: str


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    first_line = text.splitlines()[0] if text else type(exc).__name__
    return first_line[:300]


class Tuner:
    """Chooses candidates, tunes when allowed, and owns the user cache and loaded profiles of one provider.

    Args:
        app: names the user cache directory (``~/.cache/<app>``).
        env_prefix: prefix of the environment switches (see :mod:`autotune.settings`).
        profile_source: given a key, the shipped profile for its device (a path or package resource), or None.
        timer: overrides the per-device timer (tests inject one to decide the winner).
    """

    def __init__(
        self,
        app: str,
        env_prefix: str,
        profile_source: Callable[[TuningKey], Readable | None] | None = None,
        timer: Timer | None = None,
    ):
        self.app = app
        self.env_prefix = env_prefix
        self.profile_source = profile_source
        self.timer = timer
        self._caches: dict[Path, CacheFile] = {}
        self._profiles: dict[str, Table] = {}
        self._warned: set[str] = set()
        self._lock = threading.RLock()

    # -- configuration -------------------------------------------------------------------------------------

    def settings(self) -> Settings:
        return Settings.from_env(self.env_prefix, self.app)

    def cache(self, settings: Settings | None = None) -> CacheFile:
        """The user cache file named by the settings (one object per path, so warnings come once)."""
        path = (settings or self.settings()).cache_path
        with self._lock:
            if path not in self._caches:
                self._caches[path] = CacheFile(path)
            return self._caches[path]

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, AutotuneWarning, stacklevel=3)

    def _profile_table(self, source: Readable, what: str) -> Table:
        name = f"{what}:{source}"
        with self._lock:
            if name not in self._profiles:
                self._profiles[name] = read_table(source, what, self._warn_once)
            return self._profiles[name]

    def layers(self, key: TuningKey, settings: Settings) -> list[_Layer]:
        """The lookup layers for ``key``, first hit wins."""
        out = []
        if settings.profile_path is not None:
            table = self._profile_table(settings.profile_path, "profile file")
            if not len(table) and not settings.profile_path.exists():
                self._warn_once(
                    f"{self.env_prefix}_AUTOTUNE_PROFILE names {settings.profile_path}, which does not exist"
                )
            out.append(_Layer("profile", table, False, str(settings.profile_path)))
        cache = self.cache(settings)
        out.append(_Layer("user cache", cache.table(), True, cache.describe()))
        shipped = self.profile_source(key) if self.profile_source is not None else None
        if shipped is not None:
            out.append(_Layer("shipped profile", self._profile_table(shipped, "shipped profile"), False, str(shipped)))
        return out

    # -- deciding ------------------------------------------------------------------------------------------

    def choose(self, space: SearchSpace, runner: Runner | None = None, settings: Settings | None = None) -> Decision:
        """The candidate to run for ``space`` (see the module docstring for the order)."""
        settings = settings or self.settings()
        if settings.log:
            enable_stderr_log()
        decision = self._choose(space, runner, settings)
        logger.info(
            "%s -> %s [%s: %s]",
            space.label or space.key.op,
            decision.candidate.describe(),
            decision.layer,
            decision.detail,
        )
        return decision

    def _choose(self, space: SearchSpace, runner: Runner | None, settings: Settings) -> Decision:
        if settings.mode == "off":
            return Decision(space.default, "default", f"autotuning is off ({settings.why_off})")
        candidates = space.candidate_list()
        if len(candidates) == 1:
            return Decision(candidates[0], "only candidate", "nothing to tune")
        can_time = settings.may_time and runner is not None and space.may_time
        if settings.mode != "force":
            found = self.lookup(space, settings, between_only=can_time)
            if found is not None:
                return found
        if can_time:
            assert runner is not None
            return self.tune(space, runner, settings)
        found = self.lookup(space, settings, between_only=False)
        if found is not None:
            return found
        why = "no tuned entry" + ("" if settings.may_time else f" and timing is off (mode {settings.mode})")
        if settings.may_time and not space.may_time:
            why += " (timing is not possible here)"
        return Decision(space.default, "default", why)

    def lookup(self, space: SearchSpace, settings: Settings, between_only: bool) -> Decision | None:
        """The first layer's entry for ``space`` whose candidate ``space`` accepts, or None."""
        key = space.key
        for layer in self.layers(key, settings):
            hit: Hit | None = layer.table.lookup(key, match_versions=layer.match_versions, between_only=between_only)
            if hit is None:
                continue
            choice = hit.entry.choice
            if not space.is_acceptable(choice):
                logger.info(
                    "%s: %s entry %s is not a valid candidate any more; skipped",
                    space.label or key.op,
                    layer.name,
                    choice.describe(),
                )
                continue
            if hit.exact:
                detail = f"{layer.where}, M bucket {key.m} (tuned at M={hit.entry.m_tuned})"
            else:
                detail = f"{layer.where}, nearest tuned M bucket {hit.entry.key.m} (M={space.m} -> bucket {key.m})"
            return Decision(choice, layer.name, detail, hit.entry)
        return None

    # -- tuning --------------------------------------------------------------------------------------------

    def tune(
        self,
        space: SearchSpace,
        runner: Runner,
        settings: Settings | None = None,
        progress: Callable[[int, int, Candidate], None] | None = None,
        timer: Timer | None = None,
    ) -> Decision:
        """Time every candidate now, store the winner (and each backend's best) in the user cache, return it.

        ``progress(i, n, candidate)`` is called before each candidate is timed; ``timer`` overrides the tuner's.
        If every candidate fails, nothing is stored and the default is returned (with one warning naming the
        errors).
        """
        settings = settings or self.settings()
        with self._lock:
            candidates = space.candidate_list()
            timer = timer or self.timer or timer_for(space.key.device_type, space.device)
            timings = self._measure(space, candidates, runner, timer, progress)
            good = [t for t in timings if t.ms is not None]
            if not good:
                errors = "; ".join(f"{t.candidate.describe()}: {t.error}" for t in timings)
                self._warn_once(f"autotune: every candidate failed for {space.label or space.key.op}: {errors}")
                return Decision(space.default, "default", "every candidate failed while tuning")
            entries = [self._entry(space.key, timings, candidates, space.m, timer)]
            for backend, key in space.backend_keys.items():
                if key.entry_id == space.key.entry_id:
                    continue
                own = [t for t in timings if t.candidate.backend == backend]
                if any(t.ms is not None for t in own):
                    entries.append(self._entry(key, own, [t.candidate for t in own], space.m, timer))
            cache = self.cache(settings)
            cache.put(entries)
            best = entries[0]
            return Decision(
                best.choice, "tuned", f"timed {len(timings)} candidates now, stored in {cache.describe()}", best
            )

    @staticmethod
    def _entry(key: TuningKey, timings: list[Timing], candidates: list[Candidate], m: int, timer: Timer) -> Entry:
        good = [t for t in timings if t.ms is not None]
        winner = min(good, key=lambda t: t.ms)
        return Entry(key, winner.candidate, candidates[0], tuple(timings), m, timer.describe(), _now())

    @staticmethod
    def _measure(
        space: SearchSpace,
        candidates: list[Candidate],
        runner: Runner,
        timer: Timer,
        progress: Callable[[int, int, Candidate], None] | None,
    ) -> list[Timing]:
        """Two passes: run every candidate once (dropping failures and wrong results; this also warms up the
        process, whose first calls are slow), then time the survivors, interleaved in the timer's rounds."""
        dropped: dict[int, Timing] = {}
        runnable: dict[int, Callable[[], object]] = {}
        reference: object = None
        for i, candidate in enumerate(candidates):
            try:
                fn = runner(candidate)
                out = fn()
                timer.synchronize()
            except Exception as exc:  # failed to compile, raised, out of resources: drop it
                dropped[i] = Timing(candidate, error=_error_text(exc))
                cleanup = getattr(timer, "cleanup", None)
                if cleanup is not None:
                    cleanup()
                continue
            if not runnable:
                reference = out
            elif space.compare is not None:
                difference = space.compare(reference, out)
                if difference is not None:
                    dropped[i] = Timing(candidate, error=f"wrong result: {difference}")
                    continue
            runnable[i] = fn
            del out
        del reference
        # Time in rounds (``timer.rounds``, 1 unless the timer asks for more): every survivor gets a slice of its
        # budget per round, so slow drift of a shared machine (frequency, neighbours) lands on all candidates
        # alike instead of on whichever was timed at the wrong moment. Samples are merged; the median decides.
        samples: dict[int, list[float]] = {i: [] for i in runnable}
        errors: dict[int, str] = {}
        best: float | None = None
        for round_ in range(max(1, int(getattr(timer, "rounds", 1)))):
            for i, candidate in enumerate(candidates):
                if round_ == 0 and progress is not None:
                    progress(i, len(candidates), candidate)
                if i in dropped or i in errors:
                    continue
                try:
                    samples[i] += timer.measure(candidate, runnable[i], best)
                except Exception as exc:
                    errors[i] = _error_text(exc)
                    continue
                ms = median_ms(samples[i])
                best = ms if best is None else min(best, ms)
        timings: list[Timing] = []
        for i, candidate in enumerate(candidates):
            if i in dropped:
                timings.append(dropped[i])
            elif i in errors:
                timings.append(Timing(candidate, error=errors[i]))
            else:
                timings.append(Timing(candidate, median_ms(samples[i]), len(samples[i])))
        return timings
