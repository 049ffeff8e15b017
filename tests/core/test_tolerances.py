"""bonekern.tolerances is the one tolerance table: the tests, the tuner and the bench read it, and no use is held
to a tighter bound than the comparison against the exact reference."""

from __future__ import annotations

import pytest
import torch

from bench import runner
from bonekern import tolerances, tuning
from bonekern.tolerances import TABLE
from tests.support import problems as support


def test_every_use_reads_the_one_table():
    assert support.TOLERANCE is tolerances.VS_REFERENCE
    assert tuning.AGREEMENT is tolerances.AGREEMENT
    assert runner.BENCH_CHECK is tolerances.BENCH_CHECK
    for dtype, t in TABLE.items():
        assert (t.vs_reference, t.agreement, t.bench_check) == (
            tolerances.VS_REFERENCE[dtype],
            tolerances.AGREEMENT[dtype],
            tolerances.BENCH_CHECK[dtype],
        )


@pytest.mark.parametrize("dtype", list(TABLE), ids=str)
def test_comparisons_of_two_rounded_results_are_never_tighter_than_the_reference_check(dtype):
    t = TABLE[dtype]
    assert t.agreement >= t.vs_reference and t.bench_check >= t.vs_reference, t


def test_coarser_dtypes_get_looser_reference_bounds():
    ordered = [torch.float64, torch.float32, torch.float16, torch.bfloat16]  # by unit roundoff
    bounds = [TABLE[d].vs_reference for d in ordered]
    assert bounds == sorted(bounds), bounds


def test_interpreter_factor_applies_to_triton_bf16_only():
    factor = tolerances.TRITON_INTERPRETER_BF16_FACTOR
    assert support.tolerance(torch.bfloat16, "triton") == TABLE[torch.bfloat16].vs_reference * factor
    assert support.tolerance(torch.bfloat16, "cupy") == TABLE[torch.bfloat16].vs_reference
    assert support.tolerance(torch.float32, "triton") == TABLE[torch.float32].vs_reference
