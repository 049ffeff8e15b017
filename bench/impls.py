"""The implementations the bench compares, each built over the same tensors of one case.

- ``torch``, ``triton``, ``cupy``, ``reference`` (and ``auto``): ``bonekern.bone_linear(..., backend=name)``;
- ``peft``: PEFT's MiSS layer (``MissConfig``: bone = ``init_weights=True``, ``"bat"``, ``"mini"``);
- ``lora``: PEFT's LoRA layer with the number of trainable parameters of the bone variant it is compared with
  (:func:`lora_rank_for`);
- ``linear``: the frozen base layer alone, ``F.linear(x, W, b)``: the floor every adapter adds to.

A case with a quantised base (``case.quant``, the ``quant`` suite) builds one bitsandbytes layer from the case's
weight (:func:`quantised_base`); bonekern runs :func:`bonekern.bat_linear_quantized` over it for bat, the layer's
own forward plus ``bonekern.adapter_output`` for bone / mini (what ``accelerate`` runs), PEFT its MiSS layer over
the same layer.

All share one weight and bias tensor (PEFT wraps the same ``nn.Linear``); the adapters start from the same block
values, so bonekern's outputs and gradients can be checked against PEFT's. With dropout (``case.dropout > 0``,
bone/mini) bonekern runs what ``accelerate`` runs for such a layer, the base layer plus
``bonekern.adapter_output`` (its mask regenerated in backward), PEFT its ``nn.Dropout``; their masks differ, so
those cases are not output-checked (tests/integrations check them with PEFT given bonekern's masks). x requires
grad (a layer inside a network), W and the bias are frozen; backward computes dx and the adapter's gradients.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import bonekern
from bonekern.backends import BACKEND_NAMES, unavailable_reason
from bonekern.variants import AdapterSpec

from .suites import QUANT_BASES, Case

BONEKERN_IMPLS: tuple[str, ...] = (*BACKEND_NAMES, "auto")
"""bonekern's backends by name, plus "auto" (what ``backend="auto"`` picks)."""

OTHER_IMPLS: tuple[str, ...] = ("peft", "lora", "linear")
IMPL_NAMES: tuple[str, ...] = BONEKERN_IMPLS + OTHER_IMPLS
DEFAULT_IMPLS: tuple[str, ...] = tuple(n for n in BACKEND_NAMES if n != "reference") + OTHER_IMPLS
"""Every implementation except "reference" (the einsum specification: slow by design, ask for it by name) and
"auto" (one of the backends under another name)."""

GPU_ONLY_BACKENDS: dict[str, str] = {
    "triton": "the Triton interpreter",
    "cupy": "the CUDA host shim",
}
"""Backends that can execute on a CPU only through a test tool: their CPU timings would say nothing."""


def adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    """The adapter parameters' dtype: float32, or float64 for a float64 layer (PEFT's default, which keeps
    adapters in float32 for half-precision models through ``autocast_adapter_dtype=True``)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lora_rank_for(spec: AdapterSpec) -> int:
    """The LoRA rank q whose q * (K + N) trainable parameters come nearest to the bone variant's count.

    bone and bat train r * N parameters, so q = r * N / (K + N) (q = r / 2 for a square layer: the pairing of
    PEFT's own benchmark, MiSS r=64 against LoRA r=32); mini trains r * mini_r, usually q = 1. At least 1.
    """
    return max(1, round(spec.trainable_params / (spec.in_features + spec.out_features)))


def _peft_unavailable() -> str | None:
    if importlib.util.find_spec("peft") is None:
        return "peft is not installed (pip install 'bonekern[bench]')"
    return None


def not_run_reason(impl: str, device: torch.device) -> str | None:
    """None if ``impl`` can be timed on ``device``, else why it is not run.

    A bonekern backend reports its own reason (:func:`bonekern.backends.unavailable_reason`). Triton and CuPy are
    never timed off a GPU even where they could execute (through the Triton interpreter when TRITON_INTERPRET=1
    is set, or the CUDA host shim): those are correctness tools, orders of magnitude slower than any kernel.
    """
    if impl in BONEKERN_IMPLS:
        if impl == "auto":
            return None
        reason = unavailable_reason(impl, device)
        if reason is not None:
            return reason
        if impl in GPU_ONLY_BACKENDS and device.type != "cuda":
            return (
                f"the {impl} backend runs on a {device.type} only through {GPU_ONLY_BACKENDS[impl]}, a test tool; "
                "the bench times it on CUDA GPUs only"
            )
        return None
    if impl in ("peft", "lora"):
        return _peft_unavailable()
    if impl == "linear":
        return None
    raise ValueError(f"impl must be one of {IMPL_NAMES}; got {impl!r}")


@dataclass
class CaseTensors:
    """The tensors of one case, shared by every implementation.

    x (M, K) requires grad; weight (N, K) and bias (N,) or None are frozen, in the case's dtype; dy (M, N) is the
    upstream gradient; block_init holds the adapter block's starting values in the adapter dtype.
    """

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    dy: torch.Tensor
    block_init: torch.Tensor

    @staticmethod
    def make(case: Case, spec: AdapterSpec, seed: int = 0) -> CaseTensors:
        g = torch.Generator(device="cpu").manual_seed(seed)
        s = case.shape

        def rand(*shape: int, scale: float, dtype: torch.dtype = case.dtype) -> torch.Tensor:
            return (torch.randn(*shape, generator=g) * scale).to(device=case.device, dtype=dtype)

        x = rand(case.tokens, s.k, scale=1.0).requires_grad_()
        weight = rand(s.n, s.k, scale=s.k**-0.5)
        bias = rand(s.n, scale=0.1) if s.bias else None
        dy = rand(case.tokens, s.n, scale=1.0)
        # a trained-looking block: small but non-zero, so no implementation can shortcut a zero block
        block_init = rand(*spec.block_shape, scale=0.02, dtype=adapter_dtype(case.dtype))
        return CaseTensors(x, weight, bias, dy, block_init)

    def base_linear(self) -> nn.Linear:
        """An ``nn.Linear`` whose frozen parameters *are* this case's weight and bias (no copy)."""
        n, k = self.weight.shape
        layer = nn.Linear(k, n, bias=self.bias is not None, device="meta")
        layer.weight = nn.Parameter(self.weight, requires_grad=False)
        if self.bias is not None:
            layer.bias = nn.Parameter(self.bias, requires_grad=False)
        return layer


@dataclass
class Impl:
    """One implementation ready to run.

    Attributes:
        name: the ``--impls`` name. label: how the table shows it (e.g. ``lora r=32``).
        forward: x -> y (M, N).
        trainable: the adapter's trainable tensors; backward computes their gradients and dx.
        parameters: every parameter tensor (frozen or not): excluded from the bytes kept for backward.
        method: the cost model (:func:`bench.costs.cost`): "linear", "bone", "mini", "bat" or "lora".
        trainable_params: number of trainable parameters. lora_rank: q for LoRA, else None.
        checkable: whether its outputs must equal the Bone math of the case (bonekern and PEFT MiSS).
    """

    name: str
    label: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    trainable: list[torch.Tensor]
    parameters: list[torch.Tensor]
    method: str
    trainable_params: int
    lora_rank: int | None = None
    checkable: bool = False
    keepalive: list[object] = field(default_factory=list)


def quantised_base(quant: str, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A bitsandbytes base layer holding ``weight`` (N, K) and ``bias`` quantised as :data:`QUANT_BASES` names."""
    import bitsandbytes as bnb

    n, k = weight.shape
    if quant == "nf4":
        layer = bnb.nn.Linear4bit(k, n, bias=bias is not None, compute_dtype=weight.dtype, quant_type="nf4")
    elif quant == "int8":
        layer = bnb.nn.Linear8bitLt(k, n, bias=bias is not None, has_fp16_weights=False)
    else:
        raise ValueError(f"quant must be one of {tuple(QUANT_BASES)}; got {quant!r}")
    state = {"weight": weight.detach().cpu()} | ({} if bias is None else {"bias": bias.detach().cpu()})
    layer.load_state_dict(state)
    return layer.to(weight.device)  # quantises


def _base_plus_term(
    base: Callable[[torch.Tensor], torch.Tensor], block: torch.Tensor, case: Case, spec: AdapterSpec, impl: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """What ``accelerate`` runs for bone / mini over a base it does not fuse with: ``base(x)`` plus
    ``bonekern.adapter_output`` (with ``case.dropout`` while training)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = base(x)  # first, as accelerate does: a quantised base's dequantised W is freed before the term exists
        return y + bonekern.adapter_output(
            x,
            block,
            variant=spec.variant,
            out_features=spec.out_features,
            mini_r=spec.mini_r,
            dropout_p=case.dropout,
            backend=impl,
        )

    return forward


def _peft_miss(impl: str, base: nn.Module, case: Case, spec: AdapterSpec, t: CaseTensors, frozen: list) -> Impl:
    """PEFT's MiSS layer over ``base`` (the variant's ``init_weights``, ``case.dropout``), block from ``t``."""
    import peft

    init = {"bone": True, "bat": "bat", "mini": "mini"}[spec.variant]
    config = peft.MissConfig(
        r=spec.r, init_weights=init, mini_r=spec.mini_r or spec.r, miss_dropout=case.dropout, target_modules=["0"]
    )
    model = peft.get_peft_model(nn.Sequential(base), config)
    layer = model.base_model.model[0]
    block = layer.miss_block["default"]
    with torch.no_grad():
        block.copy_(t.block_init)
    return Impl(
        impl,
        impl,
        layer,
        [block],
        [*frozen, block],
        spec.variant,
        block.numel(),
        checkable=not case.dropout,
        keepalive=[model],  # by keyword: the positional slot after trainable_params is lora_rank
    )


def _build_quantised(impl: str, case: Case, spec: AdapterSpec, t: CaseTensors) -> Impl:
    """bonekern (any bonekern impl name) or PEFT's MiSS layer over a quantised base. bonekern: bat through the
    sourced op; bone / mini as ``accelerate`` serves them (:func:`_base_plus_term`)."""
    base = quantised_base(case.quant, t.weight, t.bias)
    frozen = [p for p in base.parameters()]
    if impl == "peft":
        return _peft_miss(impl, base, case, spec, t, frozen)
    if impl not in BONEKERN_IMPLS:
        raise ValueError(f"a quantised-base case runs bonekern impls and 'peft'; got {impl!r}")
    block = t.block_init.clone().requires_grad_()
    if spec.variant == "bat":

        def forward(x: torch.Tensor) -> torch.Tensor:
            return bonekern.bat_linear_quantized(x, base, block, base.bias)

        label = f"{impl} sourced"
    else:
        forward, label = _base_plus_term(base, block, case, spec, impl), f"{impl} base+term"
    parameters = [*frozen, block]
    return Impl(
        impl,
        label,
        forward,
        [block],
        parameters,
        spec.variant,
        block.numel(),
        checkable=not case.dropout,
        keepalive=[base],
    )


def build(impl: str, case: Case, spec: AdapterSpec, t: CaseTensors) -> Impl:
    """Build ``impl`` for ``case`` over the shared tensors ``t``."""
    if case.quant is not None:
        return _build_quantised(impl, case, spec, t)
    frozen = [t.weight] + ([t.bias] if t.bias is not None else [])
    if impl in BONEKERN_IMPLS:
        block = t.block_init.clone().requires_grad_()
        if case.dropout:
            forward = _base_plus_term(lambda x: F.linear(x, t.weight, t.bias), block, case, spec, impl)
        else:

            def forward(x: torch.Tensor) -> torch.Tensor:
                return bonekern.bone_linear(
                    x, t.weight, block, t.bias, variant=spec.variant, mini_r=spec.mini_r, backend=impl
                )

        checkable = not case.dropout
        return Impl(impl, impl, forward, [block], [*frozen, block], spec.variant, block.numel(), checkable=checkable)
    if impl == "linear":
        return Impl(impl, impl, lambda x: F.linear(x, t.weight, t.bias), [], frozen, "linear", 0)
    if impl == "peft":
        return _peft_miss(impl, t.base_linear(), case, spec, t, frozen)
    import peft

    if impl == "lora":
        q = lora_rank_for(spec)
        config = peft.LoraConfig(r=q, lora_alpha=q, lora_dropout=0.0, target_modules=["0"])
        model = peft.get_peft_model(nn.Sequential(t.base_linear()), config)
        layer = model.base_model.model[0]
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        with torch.no_grad():
            b.normal_(0, 0.02)  # PEFT starts B at zero; make the adapter non-trivial like the Bone blocks
        return Impl(
            impl, f"lora r={q}", layer, [a, b], [*frozen, a, b], "lora", a.numel() + b.numel(), q, False, [model]
        )
    raise ValueError(f"impl must be one of {IMPL_NAMES}; got {impl!r}")
