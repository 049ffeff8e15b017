"""Run PEFT MiSS models on bonekern, in place: ``accelerate(model)``, ``restore(model)``, ``accelerated(model)``.

``accelerate`` turns every PEFT ``MissLinear`` it can serve into a :class:`BonekernMissLinear`, a subclass whose
only change is ``forward``. The switch is a class change, so the module tree, parameters, state_dict keys,
``save_pretrained`` / ``from_pretrained``, ``merge`` / ``merge_and_unload`` and the adapter API (``set_adapter``,
``disable_adapter``, ``add_adapter``, ...) are PEFT's own, untouched. ``restore`` changes the class back.

How a call runs (semantics of PEFT's ``MissLinear.forward``, peft >= 0.17):

- bone/mini over a plain ``nn.Linear`` (no hooks, no extra arguments, matching dtypes): one fused
  :func:`bonekern.bone_linear` call for the adapters without dropout (several adapters with the same r share one
  group sum: their blocks are summed), plus :func:`bonekern.adapter_output` for each other adapter.
- bone/mini over any other base layer (bitsandbytes 4/8-bit, torchao, HQQ, GPTQ, hooked, nested, custom): the base
  layer's own forward (PEFT's call, with its arguments and hooks) plus :func:`bonekern.adapter_output` per r-group.
- ``miss_dropout > 0`` while training (bone/mini): each adapter's dropout is fused into its group sum with
  bonekern's counter-based mask (:mod:`bonekern.dropout`, seeded from torch's CPU generator), regenerated in
  backward; in eval mode there is no dropout. The masks differ from PEFT's ``nn.Dropout`` draws but have the same
  distribution (keep-probability 1 - p, scale 1 / (1 - p)). bat ignores ``miss_dropout``, as PEFT does.
- several active adapters: bone/mini terms add up; bat chains them in PEFT's order, W'' = W'(I + B2) + B2, which
  bonekern runs as one bat with the combined block E = E1 + B2 + E1 B2 (r x r per out-block, differentiable).
- bat over a plain ``nn.Linear``: :func:`bonekern.bone_linear` (W' built chunk by chunk, x kept).

Merged or disabled adapters run PEFT's own forward (a plain base layer call, nothing to add). Adapter terms are
computed in float32 as in PEFT's default (float32 adapters); bat builds W' in float32 and runs its GEMM in x's dtype
where PEFT runs it in float32 (within x's dtype's tolerance).

What bonekern does not serve runs PEFT's own forward, with a one-time warning (:class:`FallbackWarning`) naming the
layer and the reason: layers that cannot be switched (bat over a non-``nn.Linear`` base layer or a quantised one
bonekern cannot read by rows -- bat over bitsandbytes, torchao and hqq bases runs in
:mod:`bonekern.integrations.peft_quant` --,
subclasses of MissLinear, unknown variants; reported by ``accelerate``) and calls that cannot be served (bat with
extra forward arguments, hooks on its base layer, or dtypes/devices that differ from the weight's; x that is not a
float tensor). Under ``torch.compile`` the per-call warning is skipped (a warning would break the graph).
DeepSpeed ZeRO-3's own hooks on a base layer are no such reason: :mod:`bonekern.integrations.deepspeed` gathers
the partitioned base weight for the fused call instead, in forward and again in backward.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

try:
    from peft.tuners.miss.layer import MissLayer, MissLinear
except ImportError as error:  # pragma: no cover - exercised only without peft >= 0.17
    raise ImportError(
        "bonekern.integrations.peft needs peft >= 0.17 (MissConfig / MissLinear); install it with "
        "`pip install 'bonekern[peft]'`"
    ) from error

from ..backends import check_backend_name
from ..dispatch import require_available
from ..functional import adapter_output, bone_linear
from ..validation import FLOAT_DTYPES
from ..variants import spec_from_block
from . import deepspeed as _zero
from .peft_quant import quantised_forward, quantised_layer_reason

logger = logging.getLogger(__name__)

__all__ = [
    "AccelerateReport",
    "BonekernMissLinear",
    "FallbackWarning",
    "accelerate",
    "accelerated",
    "is_patched",  # noqa: F822 (lazily re-exported from .patch by __getattr__ below)
    "patch",  # noqa: F822 (lazily re-exported from .patch by __getattr__ below)
    "restore",
    "unpatch",  # noqa: F822 (lazily re-exported from .patch by __getattr__ below)
]

_AUTOCAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)
_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


class FallbackWarning(UserWarning):
    """A MiSS layer (or one call of it) runs PEFT's own forward instead of bonekern; the message says why."""


@dataclass
class AccelerateReport:
    """What :func:`accelerate` did.

    Attributes:
        switched: names of the layers now running bonekern (already switched ones included).
        kept: layer name -> why it keeps PEFT's forward.
        will_fall_back: layer name -> a configuration under which a switched layer runs PEFT's forward at call time
            (e.g. ``miss_dropout > 0`` while training).
        backend: the bonekern backend the switched layers use.
    """

    switched: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    will_fall_back: dict[str, str] = field(default_factory=dict)
    backend: str = "auto"

    def __str__(self) -> str:
        total = len(self.switched) + len(self.kept)
        lines = [
            f"bonekern: {len(self.switched)} of {total} MiSS layers switched to bonekern (backend={self.backend!r})"
        ]
        for reason, names in _group(self.kept).items():
            lines.append(f"  {len(names)} kept on PEFT's forward ({reason}): {_names(names)}")
        for reason, names in _group(self.will_fall_back).items():
            lines.append(f"  {len(names)} will run PEFT's forward when {reason}: {_names(names)}")
        return "\n".join(lines)


def _group(reasons: dict[str, str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for name, reason in reasons.items():
        grouped.setdefault(reason, []).append(name)
    return grouped


def _names(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


# ------------------------------------------------------------------------------------------------------------
# What can be served
# ------------------------------------------------------------------------------------------------------------


def _variant(layer: MissLinear) -> str | None:
    """bonekern's variant name for PEFT's ``miss_fn`` (its ``init_weights``), or None when unknown."""
    fn = layer.miss_fn
    if fn is True or fn is False:  # False: bone with PEFT's random (kaiming) init
        return "bone"
    if fn in ("bat", "mini"):
        return fn
    return None


def _quantization(layer: MissLinear) -> str | None:
    """The name of the layer's quantisation backend (peft >= 0.21), or None for an unquantised base layer."""
    quantization = getattr(layer, "quantization_backend", None)
    if quantization is None:
        return None
    return str(getattr(quantization, "backend_name", type(quantization).__name__))


def _layer_reason(layer: nn.Module) -> str | None:
    """Why ``layer`` (a MissLayer) cannot be switched, or None when it can."""
    if type(layer) is not MissLinear and not isinstance(layer, BonekernMissLinear):
        hint = (
            " (a wrapper derived it, e.g. FSDP2's fully_shard: call accelerate first)"
            if isinstance(layer, MissLinear)
            else ""
        )
        return f"layer class {type(layer).__name__} is not peft's MissLinear{hint}"
    variant = _variant(layer)
    if variant is None:
        return f"unknown MiSS variant init_weights={layer.miss_fn!r}"
    shape = (layer.out_features, layer.in_features)
    for adapter, block in layer.miss_block.items():
        mini_r = layer.miss_mini_r.get(adapter) if variant == "mini" else None
        try:
            spec_from_block(variant, shape, _zero.shape_of(block), mini_r)
        except (TypeError, ValueError) as error:
            return f"adapter {adapter!r} does not fit variant {variant!r}: {error}"
        if block.dtype not in FLOAT_DTYPES:
            return f"adapter {adapter!r} has dtype {block.dtype}"
    if variant != "bat":
        return None  # bone/mini: the base layer runs its own forward, whatever it is
    if _quantization(layer) is not None:  # bat over a dequantisable base: bonekern.integrations.peft_quant
        return quantised_layer_reason(layer, variant)
    base = layer.base_layer
    if base is not layer.get_base_layer():
        return f"bat over a nested tuner layer (base layer is a {type(base).__name__})"
    if not _is_plain_linear(base):
        return f"bat over a {type(base).__name__}, not a plain torch.nn.Linear"
    if not isinstance(base.weight, Tensor) or base.weight.dtype not in FLOAT_DTYPES:
        return f"base weight dtype {getattr(base.weight, 'dtype', None)} is not a float dtype bonekern computes with"
    return None


def _is_plain_linear(base: nn.Module) -> bool:
    return isinstance(base, nn.Linear) and type(base).forward is nn.Linear.forward


def _dropout_p(layer: MissLinear, adapter: str) -> float | None:
    """The adapter's dropout probability; None when the dropout module is not one PEFT creates."""
    dropout = layer.miss_dropout[adapter]
    if isinstance(dropout, nn.Identity):
        return 0.0
    if type(dropout) is nn.Dropout:
        return dropout.p
    return None


def _config_fallback(layer: MissLinear) -> str | None:
    """A configuration (known now) under which this switched layer will run PEFT's forward at call time: none
    remain (dropout and several active adapters are served); kept for the report's shape."""
    return None


def _has_hooks(module: nn.Module, zero: bool = False) -> bool:
    """Hooks on ``module`` (or global ones) that must see its call; with ``zero``, DeepSpeed ZeRO-3's do not."""
    if any(not (zero and _zero.is_known_hook(h)) for name in _MODULE_HOOKS for h in getattr(module, name).values()):
        return True
    return any(getattr(nn.modules.module, name) for name in _GLOBAL_HOOKS)


def _weight_path_reason(layer: BonekernMissLinear, x: Tensor, block: Tensor, args: tuple, kwargs: dict) -> str | None:
    """Why this call cannot run as one :func:`bone_linear` on the base weight (None when it can). Pure Python on
    metadata: torch.compile traces it."""
    base = layer.base_layer
    if _quantization(layer) is not None or base is not layer.get_base_layer() or not _is_plain_linear(base):
        return "the base layer is not a plain torch.nn.Linear"
    weight, bias = _zero.base_parameters(base)
    if not isinstance(weight, Tensor) or weight.dtype not in FLOAT_DTYPES:
        return f"the base weight is {getattr(weight, 'dtype', type(weight).__name__)}"
    if args or kwargs:
        return "extra forward arguments for the base layer"
    zero = _zero.is_partitioned(weight)
    if _has_hooks(base, zero):
        return "the base layer has hooks that must see its own call"
    if zero and (reason := _zero.zero_call_reason(weight, bias, block)) is not None:
        return reason
    if x.device != weight.device or block.device != weight.device:
        return f"x is on {x.device}, the adapter on {block.device}, the base weight on {weight.device}"
    if torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type):
        tensors = (x, weight, block) if bias is None else (x, weight, block, bias)
        if any(t.dtype not in _AUTOCAST_DTYPES for t in tensors):
            return "float64 tensors under torch.autocast"
        return None
    if weight.dtype != x.dtype:
        return f"x is {x.dtype} but the base layer is {weight.dtype}"
    if bias is not None and bias.dtype != x.dtype:
        return f"x and the base weight are {x.dtype} but the base bias is {bias.dtype}"
    if not getattr(layer, "cast_input_dtype_enabled", True) and block.dtype != x.dtype:
        return f"input dtype casting is disabled and x is {x.dtype} while the adapter is {block.dtype}"
    return None


def _dropout_now(layer: MissLinear, adapter: str) -> float | None:
    """The dropout probability this call applies for ``adapter`` (0.0 in eval mode or without dropout); None when
    the dropout module is not one PEFT creates."""
    p = _dropout_p(layer, adapter)
    if p is None:
        return None
    return p if p > 0 and layer.miss_dropout[adapter].training else 0.0


@dataclass
class _Term:
    """One bone/mini adapter term of a call: a block (several adapters' blocks summed when they share r and apply
    no dropout) and its dropout probability."""

    block: Tensor
    dropout_p: float


def _bone_terms(layer: MissLinear, adapters: list[str], ps: dict[str, float]) -> list[_Term]:
    """The terms of a bone/mini call, in PEFT's adapter order: adapters without dropout grouped by r (one group
    sum per r; blocks summed, mini blocks repeated to a common width first), each adapter with dropout alone."""
    terms: list[_Term] = []
    groups: dict[int, list[Tensor]] = {}
    for adapter in adapters:
        block = layer.miss_block[adapter]
        if ps[adapter] > 0:
            terms.append(_Term(block, ps[adapter]))
        else:
            groups.setdefault(block.shape[0], []).append(block)
    grouped = []
    for blocks in groups.values():
        if len(blocks) == 1:
            grouped.append(_Term(blocks[0], 0.0))
            continue
        cols = math.lcm(*(b.shape[1] for b in blocks))
        dtype = blocks[0].dtype
        for b in blocks[1:]:
            dtype = torch.promote_types(dtype, b.dtype)
        grouped.append(_Term(sum(b.to(dtype).repeat(1, cols // b.shape[1]) for b in blocks), 0.0))
    return grouped + terms


def _bat_chain(layer: MissLinear, adapters: list[str]) -> Tensor:
    """The one block E with W(I + E) + E equal to PEFT's chain W_{a+1} = W_a (I + B_a) + B_a over ``adapters``:
    E_{a+1} = E_a + B_a + E_a B_a (per out-block, r x r; differentiable)."""
    chained = layer.miss_block[adapters[0]]
    for adapter in adapters[1:]:
        block = layer.miss_block[adapter]
        chained = chained + block + torch.matmul(chained, block)
    return chained


def _warn_once(layer: BonekernMissLinear, reason: str) -> None:
    if torch.compiler.is_compiling() or reason in layer._bonekern_warned:
        return
    layer._bonekern_warned.add(reason)
    warnings.warn(f"bonekern: {layer._bonekern_name} runs PEFT's own forward: {reason}", FallbackWarning, stacklevel=3)


# ------------------------------------------------------------------------------------------------------------
# The switched layer
# ------------------------------------------------------------------------------------------------------------


class BonekernMissLinear(MissLinear):
    """PEFT's ``MissLinear`` with its forward on bonekern; everything else (parameters, state_dict, merge, adapter
    API) is MissLinear's. Made only by :func:`accelerate` (a class change, never constructed directly).

    Instance attributes set by :func:`accelerate`: ``_bonekern_backend`` (the backend name; None after
    :func:`restore` when the class could not be changed back), ``_bonekern_name`` (the layer's qualified name, for
    warnings) and ``_bonekern_warned`` (the reasons already warned about).
    """

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """(..., K) -> (..., N) in x's dtype, on bonekern (see the module docstring), or PEFT's forward."""
        if self._bonekern_backend is None:  # restored while a wrapper's class derived from ours (see restore)
            return MissLinear.forward(self, x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return MissLinear.forward(self, x, *args, **kwargs)  # a plain base layer call: nothing to add
        adapters = [a for a in self.active_adapters if a in self.miss_block]
        if not adapters:
            return MissLinear.forward(self, x, *args, **kwargs)  # no adapter on this layer: a plain base layer
        if not isinstance(x, Tensor) or x.dtype not in FLOAT_DTYPES:
            return self._fall_back(f"x is {getattr(x, 'dtype', type(x).__name__)}, not a float tensor", x, args, kwargs)
        variant = _variant(self)
        if variant == "bat":
            shapes = {tuple(self.miss_block[a].shape) for a in adapters}
            if len(shapes) > 1:
                return self._fall_back(f"bat adapters {adapters} have different r ({sorted(shapes)})", x, args, kwargs)
            block = _bat_chain(self, adapters)
            if _quantization(self) is not None:  # bat over a quantised base: bonekern.integrations.peft_quant
                return quantised_forward(
                    self, block, x, args, kwargs, lambda why: self._fall_back(why, x, args, kwargs)
                )
            reason = _weight_path_reason(self, x, block, args, kwargs)
            if reason is not None:
                return self._fall_back(reason, x, args, kwargs)
            weight, bias = _zero.base_parameters(self.base_layer)
            linear = _zero.zero_linear if _zero.is_partitioned(weight) else bone_linear  # ZeRO-3: gathers W per call
            y = linear(x, weight, block, bias, variant="bat", backend=self._bonekern_backend)
            return y.to(x.dtype)  # under autocast bone_linear returns the autocast dtype; PEFT returns x's dtype
        ps = {a: _dropout_now(self, a) for a in adapters}
        unknown = [a for a, p in ps.items() if p is None]
        if unknown:
            return self._fall_back(f"miss_dropout of {unknown} is not nn.Dropout/nn.Identity", x, args, kwargs)
        devices = {self.miss_block[a].device for a in adapters}
        if devices != {x.device}:
            return self._fall_back(f"x is on {x.device}, the adapters on {sorted(map(str, devices))}", x, args, kwargs)
        terms = _bone_terms(self, adapters, ps)
        first = terms[0]
        if first.dropout_p == 0 and _weight_path_reason(self, x, first.block, args, kwargs) is None:
            weight, bias = _zero.base_parameters(self.base_layer)
            linear = _zero.zero_linear if _zero.is_partitioned(weight) else bone_linear  # ZeRO-3: gathers W per call
            y = linear(
                x,
                weight,
                first.block,
                bias,
                variant="bone" if first.block.shape[1] == self.out_features else "mini",
                backend=self._bonekern_backend,
            ).to(x.dtype)
            terms = terms[1:]
        else:
            y = self.base_layer(x, *args, **kwargs)
            quantization = getattr(self, "quantization_backend", None)
            if quantization is not None:
                y = quantization.maybe_clone_base_result(y)
        for term in terms:
            y = y + adapter_output(
                x,
                term.block,
                variant="bone" if term.block.shape[1] == self.out_features else "mini",
                out_features=self.out_features,
                dropout_p=term.dropout_p,
                backend=self._bonekern_backend,
            ).to(y.dtype)
        return y.to(x.dtype)

    def _fall_back(self, reason: str, x, args: tuple, kwargs: dict) -> Tensor:
        _warn_once(self, reason)
        return MissLinear.forward(self, x, *args, **kwargs)

    def extra_repr(self) -> str:
        own = super().extra_repr()
        ours = f"bonekern_backend={self._bonekern_backend!r}"
        return f"{own}, {ours}" if own else ours


# ------------------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------------------


def _miss_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a PeftModel with MiSS adapters); got {type(model).__name__}")
    return [(name, module) for name, module in model.named_modules() if isinstance(module, MissLayer)]


def accelerate(model: nn.Module, *, backend: str = "auto") -> AccelerateReport:
    """Switch every PEFT MiSS layer of ``model`` that bonekern can serve to bonekern, in place.

    Args:
        model: a ``PeftModel`` (or any module) holding PEFT MiSS layers (``MissConfig``, peft >= 0.17).
        backend: passed to :func:`bonekern.bone_linear` on every call ("auto", "torch", "triton", "cupy",
            "reference"). Calling ``accelerate`` again on a switched model changes the backend.

    Returns:
        An :class:`AccelerateReport` (also logged at INFO on the ``bonekern.integrations.peft`` logger): which layers
        were switched, which were kept on PEFT's forward and why, and which will fall back under some configuration.
        Each kept / will-fall-back reason is also warned once (:class:`FallbackWarning`).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ValueError: ``model`` holds no MiSS layer; TypeError /
        ValueError: ``backend`` is not a backend name; :class:`bonekern.BackendUnavailableError`: the named
        backend cannot run on the layers' device (nothing is switched then).
    """
    backend = check_backend_name(backend)
    layers = _miss_layers(model)
    if not layers:
        raise ValueError(
            "model has no PEFT MiSS layers (peft.tuners.miss.MissLayer); build it with "
            "get_peft_model(base_model, MissConfig(...)) first"
        )
    return _accelerate_layers(layers, backend)


def _accelerate_layers(layers: list[tuple[str, nn.Module]], backend: str) -> AccelerateReport:
    """:func:`accelerate` on the given (qualified name, MissLayer) pairs, ``backend`` already checked."""
    reasons = {name: _layer_reason(layer) for name, layer in layers}
    if backend != "auto":  # fail before switching anything, not at the first forward
        for device in {layer.base_layer.weight.device for name, layer in layers if reasons[name] is None}:
            if device.type != "meta":
                require_available(backend, device)
    report = AccelerateReport(backend=backend)
    for name, layer in layers:
        reason = reasons[name]
        if reason is not None:
            report.kept[name] = reason
            continue
        if not isinstance(layer, BonekernMissLinear):
            layer.__class__ = BonekernMissLinear
            layer._bonekern_warned = set()
        layer._bonekern_backend = backend
        layer._bonekern_name = name
        report.switched.append(name)
        later = _config_fallback(layer)
        if later is not None:
            report.will_fall_back[name] = later
    logger.info("%s", report)
    for reason, names in _group(report.kept).items():
        warnings.warn(
            f"bonekern: {len(names)} MiSS layer(s) keep PEFT's forward ({reason}): {_names(names)}",
            FallbackWarning,
            stacklevel=3,
        )
    for reason, names in _group(report.will_fall_back).items():
        warnings.warn(
            f"bonekern: {len(names)} MiSS layer(s) will run PEFT's forward when {reason}: {_names(names)}",
            FallbackWarning,
            stacklevel=3,
        )
    return report


def restore(model: nn.Module) -> int:
    """Give every switched layer of ``model`` PEFT's own forward back (undoes :func:`accelerate`); returns how many.

    A layer whose class is exactly :class:`BonekernMissLinear` becomes a ``MissLinear`` again. A layer whose class a
    wrapper derived from ours after ``accelerate`` (FSDP2's ``fully_shard`` makes ``FSDPBonekernMissLinear``) keeps
    that class, which the wrapper needs, and is switched off instead: its forward is PEFT's from then on.
    """
    count = 0
    for _, layer in _miss_layers(model):
        if _backend_of(layer) is not None:
            _restore_layer(layer)
            count += 1
    return count


def _restore_layer(layer: BonekernMissLinear) -> None:
    if type(layer) is BonekernMissLinear:
        layer.__class__ = MissLinear
        for attribute in ("_bonekern_backend", "_bonekern_name", "_bonekern_warned"):
            layer.__dict__.pop(attribute, None)
    else:
        layer._bonekern_backend = None


def _backend_of(layer: nn.Module) -> str | None:
    """The backend a layer runs on bonekern with, or None when it runs PEFT's forward."""
    return layer._bonekern_backend if isinstance(layer, BonekernMissLinear) else None


@contextlib.contextmanager
def accelerated(model: nn.Module, *, backend: str = "auto") -> Iterator[AccelerateReport]:
    """``with accelerated(model) as report:`` runs the block on bonekern; on exit every MiSS layer is back in the
    state it had before (PEFT's forward, or the backend an earlier :func:`accelerate` gave it)."""
    before = {id(layer): _backend_of(layer) for _, layer in _miss_layers(model)}
    report = accelerate(model, backend=backend)
    try:
        yield report
    finally:
        for _, layer in _miss_layers(model):
            if _backend_of(layer) is None or id(layer) not in before:
                continue
            if before[id(layer)] is None:
                _restore_layer(layer)
            else:
                layer._bonekern_backend = before[id(layer)]


_PATCH_NAMES = ("is_patched", "patch", "unpatch")


def __getattr__(name: str):
    """``patch``, ``unpatch`` and ``is_patched`` live in :mod:`.patch`, which builds on this module; they are
    re-exported here lazily (PEP 562) so the two modules never import each other at module level."""
    if name in _PATCH_NAMES:
        from . import patch as patch_module

        return getattr(patch_module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
