"""Test configuration shared by the whole suite.

- ``TRITON_INTERPRET=1`` is set before anything imports triton, so Triton kernels run on CPU tensors through the
  interpreter (docs/testing-without-gpu.md). Ahead-of-time compile tests build a fresh JITFunction from ``kernel.fn``.
- ``BONEKERN_AUTOTUNE=0`` keeps ``backend="auto"`` on defaults; the autotuner's own tests switch it back on.
- ``BONEKERN_VERIFY=0``: a kernel test must see its kernel fail, not the torch fallback that verify-before-trust
  would serve instead (and no test may write verdicts into the user's cache); tests/core/test_verify.py turns
  it on with a temporary cache directory.
- Tests marked ``gpu`` are skipped, and reported as skipped, where CUDA is absent.
- Hypothesis runs a derandomised profile in CI (the same examples every run) and a random one elsewhere.
- The CUDA host shim (tests/cupy/cuda_shim) is installed as the CuPy backend's launcher for CPU tensors, so
  ``backend="cupy"`` runs its real kernels on the CPU in every test; it is built by g++ on first use and a build
  failure fails those tests (it is never skipped).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("BONEKERN_AUTOTUNE", "0")
os.environ.setdefault("BONEKERN_VERIFY", "0")

import pytest
import torch
from hypothesis import HealthCheck, settings

from tests.cupy import cuda_shim

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))

cuda_shim.install()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is present on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
