"""Every numeric tolerance bonekern compares results with, per dtype, in one table.

Three comparisons use it, and they need different numbers because they compare different things:

- ``vs_reference`` (the test suite, ``tests/support/``): one implementation against the float64 einsum
  reference, on small test shapes. Measure: max |actual - reference| / max |reference|. The reference is exact
  for our purposes, so this is the error of one implementation: in half precision about two units in the last
  place of the largest value (one for the final rounding, one for intermediate roundings: W' or the adapter term
  rounded to the input dtype before the GEMM); in fp32 and fp64 room for a different summation order, far
  above one rounding and far below any wrong term.
- ``agreement`` (the autotuner, :func:`bonekern.tuning.outputs_agree`): a candidate config against the default
  config, both rounded, on the real full-size layer, on a GPU where fp32 GEMMs may run in TF32. Measure: max
  |candidate - default| / max |default|. Loose on purpose: two rounded results can be twice as far apart as
  each is from the truth, rounding error grows with K (thousands here), and TF32 keeps fp16's 10-bit mantissa,
  so fp32 gets fp16's bound. It exists to drop broken configs (a missing term or a wrong tile is off by O(1)),
  not to grade rounding.
- ``bench_check`` (the benchmark, ``bench/runner.py``): bonekern's output and gradients against PEFT's layer
  (or, without PEFT, against the reference backend) on benchmark-size shapes. Measure: ||a - b|| / ||b||
  (Frobenius), which averages over the tensor and so sits below a max-norm bound for the same data. Looser
  than ``vs_reference`` because PEFT rounds differently (with fp32 adapters it builds bat's W' and runs the GEMM
  in fp32, where bonekern uses x's dtype) and K is large.

- ``CONVERGENCE`` (tests/integrations/test_convergence.py; test_integration_zero3.py, 20 SGD steps under ZeRO-3):
  two short training runs of the same tiny model, one on PEFT's MiSS forward and one on bonekern, through
  transformers' Trainer / TRL's SFTTrainer with AdamW. Measures:
  per-step loss max |a - b| / |b|, and the final adapters ||a - b|| / ||b|| (Frobenius, all adapters together).
  Differences of one rounding per step compound over the steps, and AdamW divides each update by the root of the
  squared gradients, so a gradient element near zero whose sign flips moves its weight by a full learning-rate
  step: the adapter bound is looser than the loss bound. Under bf16 autocast the bound is what the two runs can
  differ while each is as close to the fp32 run as the other (docs/measurements.md has the distances).

No comparison may be tighter than ``vs_reference`` (both of the others compare two rounded results); a test
checks that. Values not in :data:`TABLE` (other dtypes) fall back to :data:`AGREEMENT_FALLBACK` in the tuner.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    """Relative tolerances for one dtype; see the module docstring for each measure and why they differ."""

    vs_reference: float
    agreement: float
    bench_check: float


TABLE: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(vs_reference=1e-10, agreement=1e-8, bench_check=1e-9),
    torch.float32: Tolerance(vs_reference=2e-5, agreement=1e-2, bench_check=1e-4),
    torch.float16: Tolerance(vs_reference=2e-3, agreement=1e-2, bench_check=1e-2),
    torch.bfloat16: Tolerance(vs_reference=1.6e-2, agreement=6e-2, bench_check=3e-2),
}
"""The tolerances per compute dtype (the coarser of the input dtype and the tensor's own)."""

VS_REFERENCE: dict[torch.dtype, float] = {dtype: t.vs_reference for dtype, t in TABLE.items()}
"""Largest max|actual - reference| / max|reference| against the float64 reference (the test suite)."""

AGREEMENT: dict[torch.dtype, float] = {dtype: t.agreement for dtype, t in TABLE.items()}
"""Largest max|candidate - default| / max|default| a tuning candidate may show (the autotuner)."""

AGREEMENT_FALLBACK = 1e-2
"""The tuner's agreement bound for a dtype not in :data:`TABLE`."""

BENCH_CHECK: dict[torch.dtype, float] = {dtype: t.bench_check for dtype, t in TABLE.items()}
"""Largest ||a - b|| / ||b|| (Frobenius) between bonekern and PEFT in the benchmark's output check."""

TRITON_INTERPRETER_BF16_FACTOR = 1.5
"""Extra factor on ``vs_reference`` for bf16 results of Triton kernels run by the Triton interpreter (the test
suite's CPU runs): it truncates fp32 -> bf16 instead of rounding, one more unit in the last place
(docs/testing-without-gpu.md)."""


@dataclass(frozen=True)
class ConvergenceTolerance:
    """Bounds between a PEFT run and a bonekern run of the same training (see the module docstring)."""

    loss: float
    """max over steps of |loss_bonekern - loss_peft| / |loss_peft|."""
    weights: float
    """||adapters_bonekern - adapters_peft|| / ||adapters_peft|| after the last step (Frobenius, all together)."""


CONVERGENCE: dict[torch.dtype, ConvergenceTolerance] = {
    # fp32: measured <= 3e-7 (loss) and <= 3e-6 (adapters) over 20 AdamW steps; room for other summation orders.
    torch.float32: ConvergenceTolerance(loss=1e-5, weights=1e-4),
    # bf16 autocast: each run is up to 4e-4 (loss) and 5e-2 (adapters) from the fp32 run; PEFT-bf16 and
    # bonekern-bf16 may differ by about the sum of the two (measured up to 1.6e-4 and 2.5e-2).
    torch.bfloat16: ConvergenceTolerance(loss=1e-3, weights=1e-1),
}
"""Per compute dtype (the autocast dtype, else the model's): how far a bonekern training run may be from PEFT's."""
