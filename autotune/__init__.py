"""autotune: a generic autotuner with a persistent cache, per-device profiles and a CLI (``python -m autotune``).

It knows nothing about any kernel library: a library describes each problem as a :class:`SearchSpace`
(a :class:`TuningKey`, candidates = backend x config, the default) and how to run a candidate, and registers a
provider for the CLI (:mod:`autotune.provider`). bonekern's glue is ``bonekern/tuning.py``
(keys and search spaces) and ``bonekern/autotune_provider.py`` (the CLI provider).

Modules: :mod:`~autotune.keys` (keys, M buckets, source hashes), :mod:`~autotune.entries` (records),
:mod:`~autotune.store` (tables, the file format, the locked atomic cache file), :mod:`~autotune.settings`
(environment switches), :mod:`~autotune.timing` (CPU and CUDA timers), :mod:`~autotune.tuner` (layers,
lookup, tuning), :mod:`~autotune.presets` (model shapes), :mod:`~autotune.provider`, :mod:`~autotune.cli`.
"""

from .entries import Candidate, Entry, Timing
from .keys import TuningKey, bucket_m, hash_sources, library_versions, nearest_bucket, profile_name, slug
from .log import AutotuneWarning
from .settings import Settings, user_cache_dir
from .store import SCHEMA, CacheFile, Table, parse_table
from .timing import CpuTimer, CudaTimer, Timer
from .tuner import Decision, Runner, SearchSpace, Tuner, structurally_accepted

__all__ = [
    "SCHEMA",
    "AutotuneWarning",
    "CacheFile",
    "Candidate",
    "CpuTimer",
    "CudaTimer",
    "Decision",
    "Entry",
    "Runner",
    "SearchSpace",
    "Settings",
    "Table",
    "Timer",
    "Timing",
    "Tuner",
    "TuningKey",
    "bucket_m",
    "hash_sources",
    "library_versions",
    "nearest_bucket",
    "parse_table",
    "profile_name",
    "slug",
    "structurally_accepted",
    "user_cache_dir",
]
