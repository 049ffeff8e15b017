"""The contract every backend implements, and the description of one call that dispatch and tuning use.

A backend sees 2-D tensors only (the public functions flatten x to (M, K)) and three op families:

- "bone" family (variants bone and mini): block (r, C) with C | N acting as D[k, n] = block[k, n % C];
- "bat": block (N // r, r, r);
- "adapter": the bone/mini adapter term S D alone (no weight), for base layers that run their own forward
  (quantised, hooked, sharded), with optional counter-based dropout on x (:mod:`bonekern.dropout`).

What autograd keeps between forward and backward is fixed here, the same for every backend: S (M, r) for the
bone and adapter families (plus the dropout spec's three numbers), x for bat; never W', a dropout mask or any
other weight- or input-sized temporary. Weight gradients (rare: the weight is
normally frozen) are computed by :mod:`bonekern.ops` with plain GEMMs, not by backends.

Configs: the dispatcher chooses a JSON-serialisable dict per problem (from the autotuner or from
:meth:`Backend.default_config`) and hands it ONCE to :meth:`Backend.prepare_config`, which validates it and returns
whatever the op methods take (a typed, immutable object; by default the dict itself). The prepared config is
remembered with the decision and passed to every later call of the same problem, so no op method re-validates
or re-parses a config per launch; op methods must not mutate it. A backend must accept every dict its
:meth:`Backend.configs` yields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..dropout import DropoutSpec

Config = dict[str, Any]

OPS: tuple[str, ...] = (
    "bone_forward",
    "bone_backward",
    "bat_forward",
    "bat_backward",
    "adapter_forward",
    "adapter_backward",
)
"""The tunable operations; the key under which dispatch, tuning and profiles find a config."""

GRAD_FLAGS_AT: dict[str, int] = {"bone_backward": 4, "bat_backward": 4, "adapter_backward": 5}
"""For each backward op, the position of ``need_dx`` in its argument list (``need_dblock`` follows it)."""


@dataclass(frozen=True)
class OpProblem:
    """What one call computes, as dispatch and tuning see it (no tensors, hashable).

    Attributes:
        op: one of :data:`OPS`.
        m, n, k: tokens, out_features, in_features.
        r: block size.
        block_cols: C for the bone family (N for bone, mini_r for mini), r for bat.
        dtype: x's dtype; block_dtype: the block's dtype.
        device: the device the tensors live on.
        dropout: True when the call applies dropout (a :class:`~bonekern.dropout.DropoutSpec` is passed; adapter
            ops only). Part of tuning keys.

    For adapter ops there is no weight: n = out_features, k = in_features, r = block.shape[0], block_cols = C.
    """

    op: str
    m: int
    n: int
    k: int
    r: int
    block_cols: int
    dtype: torch.dtype
    block_dtype: torch.dtype
    device: torch.device
    dropout: bool = False

    @property
    def variant(self) -> str:
        """The variant name for logs and keys: "bat", "bone" (C == N) or "mini"."""
        if self.op.startswith("bat"):
            return "bat"
        return "bone" if self.block_cols == self.n else "mini"

    @staticmethod
    def from_tensors(op: str, m: int, weight: torch.Tensor, block: torch.Tensor, dtype: torch.dtype) -> OpProblem:
        n, k = weight.shape
        r = block.shape[-1] if op.startswith("bat") else block.shape[0]
        return OpProblem(op, m, n, k, r, block.shape[-1], dtype, block.dtype, weight.device)

    @staticmethod
    def for_adapter(
        op: str,
        m: int,
        out_features: int,
        in_features: int,
        block: torch.Tensor,
        dtype: torch.dtype,
        dropout: DropoutSpec | None,
    ) -> OpProblem:
        """The problem of an adapter op: block (r, C), no weight."""
        r, cols = block.shape
        return OpProblem(
            op, m, out_features, in_features, r, cols, dtype, block.dtype, block.device, dropout is not None
        )


class Backend:
    """Base class of the backends; see the module docstring for the contract.

    Shapes: x (M, K), weight (N, K), bias (N,) or None, dy (M, N), S (M, r) in the delta dtype
    (:func:`bonekern.validation.delta_dtype`). Outputs: y (M, N) in x's dtype; dx (M, K) in x's dtype; dblock in
    the block's dtype. M >= 1 (zero tokens never reach a backend).
    """

    name: ClassVar[str] = ""
    shared_source_modules: ClassVar[tuple[str, ...]] = ()
    """Modules outside the backend's own module or package whose code its ops run (hashed into tuning keys)."""
    verify_before_use: ClassVar[bool] = False
    """True for backends that run their own GPU kernels: each config is checked once on the device against the
    torch backend before it serves (:mod:`bonekern.verify`)."""

    def implements(self, op: str) -> bool:
        """Whether this backend overrides the method of ``op`` (one of :data:`OPS`); dispatch and tuning consider
        a backend for an op only when it does."""
        return getattr(type(self), op) is not getattr(Backend, op)

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None when this backend can run on ``device``, else one sentence that says why not."""
        raise NotImplementedError

    def default_config(self, problem: OpProblem) -> Config:
        """The config used when nothing is tuned: a sensible choice for the problem and device."""
        return {}

    def configs(self, problem: OpProblem) -> list[Config]:
        """Every candidate config the autotuner may time for ``problem`` (the default included)."""
        return [self.default_config(problem)]

    def prepare_config(self, problem: OpProblem, config: Config) -> Any:
        """Validate ``config`` (a JSON dict) for ``problem`` once and return what the op methods take.

        Called once per decision (and once per candidate while tuning), never per launch. Raises ValueError or
        TypeError naming the bad entry. The default returns the dict unchanged.
        """
        return config

    def bone_forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        block: torch.Tensor,
        bias: torch.Tensor | None,
        config: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """y = x W^T + b + S D and S (M, r), the group sums kept for backward."""
        raise NotImplementedError

    def bone_backward(
        self,
        dy: torch.Tensor,
        s: torch.Tensor,
        weight: torch.Tensor,
        block: torch.Tensor,
        need_dx: bool,
        need_dblock: bool,
        config: Any,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """dx = dY W + (dY D^T)[:, k % r] and dblock = S^T dY folded to (r, C); None where not needed."""
        raise NotImplementedError

    def bat_forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        block: torch.Tensor,
        bias: torch.Tensor | None,
        config: Any,
    ) -> torch.Tensor:
        """y = x W'^T + b with W'_ij = W_ij (I + B_i) + B_i; W' must not outlive the call."""
        raise NotImplementedError

    def bat_backward(
        self,
        dy: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        block: torch.Tensor,
        need_dx: bool,
        need_dblock: bool,
        config: Any,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """dx = dY W' and dB_i = sum_j (W_ij + I)^T G_ij with G = dY^T x; None where not needed."""
        raise NotImplementedError

    def adapter_forward(
        self,
        x: torch.Tensor,
        block: torch.Tensor,
        out_features: int,
        dropout: DropoutSpec | None,
        config: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (M, K), block (r, C), C | out_features. Returns (delta (M, N) in x's dtype, S (M, r) in the delta
        dtype :func:`bonekern.validation.delta_dtype` (x.dtype, block.dtype)). S[i, j] = sum_g xd[i, g*r + j] over
        groups with x zero-padded to a multiple of r (PEFT's padding), xd = x * keep / (1 - p) (x if dropout
        is None); delta = S @ D computed in the delta dtype, cast to x's dtype."""
        raise NotImplementedError

    def adapter_backward(
        self,
        dy: torch.Tensor,
        s: torch.Tensor,
        block: torch.Tensor,
        in_features: int,
        dropout: DropoutSpec | None,
        need_dx: bool,
        need_dblock: bool,
        config: Any,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """dy (M, N), s (M, r) as returned by adapter_forward. T = dY D^T (M, r) in the delta dtype;
        dx[i, k] = T[i, k % r] * keep(i, k) / (1 - p) (M, K = in_features) in dy's dtype;
        dblock[j, c] = sum over n with n % C == c of (S^T dY)[j, n], (r, C) in the block's dtype.
        None where not needed."""
        raise NotImplementedError
