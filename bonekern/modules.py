"""``BoneLinear``: an ``nn.Linear`` with a frozen weight and a trainable Bone block."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .backends import check_backend_name
from .functional import bone_linear, merge, unmerge
from .validation import FLOAT_DTYPES, check_device, check_dtype
from .variants import AdapterSpec, make_spec

MAX_NUMEL = 2**63 - 1
"""The most elements a torch tensor can have (its sizes are int64); a larger weight fails inside torch."""


class BoneLinear(nn.Module):
    """A linear layer ``y = x W^T + b`` adapted by Bone: W (and b) frozen, ``block`` trainable.

    Parameters: ``weight`` (N, K) and ``bias`` (N,) frozen; ``block`` with the variant's shape
    (bone (r, N), mini (r, mini_r), bat (N // r, r, r)), zero-initialised like PEFT, so a fresh layer equals its base.

    ``merge()`` folds the block into the weight (forward is then a plain linear layer); ``unmerge()`` restores it.
    The state_dict holds ``weight``, ``bias``, ``block`` and an extra state recording the variant, r, mini_r
    and whether the weight is merged, so a saved layer reloads into the same state.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        *,
        variant: str = "bone",
        mini_r: int | None = None,
        bias: bool = True,
        backend: str = "auto",
        block_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.spec: AdapterSpec = make_spec(variant, out_features, in_features, r, mini_r)
        self.backend = check_backend_name(backend)
        check_dtype("block_dtype", block_dtype)
        check_dtype("dtype", dtype, optional=True)
        device = check_device("device", device)
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool (whether the layer has one); got {type(bias).__name__}")
        if out_features * in_features > MAX_NUMEL:
            raise ValueError(
                f"in_features * out_features must be at most {MAX_NUMEL} (what a tensor can hold); "
                f"got {in_features} * {out_features}"
            )
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self.block = nn.Parameter(torch.zeros(self.spec.block_shape, device=device, dtype=block_dtype))
        self.merged = False
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int,
        variant: str = "bone",
        mini_r: int | None = None,
        *,
        backend: str = "auto",
        block_dtype: torch.dtype = torch.float32,
    ) -> BoneLinear:
        """Wrap ``linear``: its weight and bias Parameters are shared (not copied) and frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear; got {type(linear).__name__}")
        check_dtype("block_dtype", block_dtype)
        check_dtype("linear.weight.dtype", linear.weight.dtype)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.spec = make_spec(variant, linear.out_features, linear.in_features, r, mini_r)
        layer.backend = check_backend_name(backend)
        layer.weight = linear.weight
        layer.weight.requires_grad_(False)
        layer.bias = linear.bias
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        layer.block = nn.Parameter(torch.zeros(layer.spec.block_shape, device=linear.weight.device, dtype=block_dtype))
        layer.merged = False
        return layer

    @property
    def in_features(self) -> int:
        return self.spec.in_features

    @property
    def out_features(self) -> int:
        return self.spec.out_features

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return nn.functional.linear(x, self.weight, self.bias)
        return bone_linear(
            x,
            self.weight,
            self.block,
            self.bias,
            variant=self.spec.variant,
            mini_r=self.spec.mini_r,
            backend=self.backend,
        )

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the block into the weight in place; forward becomes a plain linear layer."""
        if self.merged:
            raise RuntimeError("BoneLinear.merge(): the block is already merged into the weight")
        self.weight.copy_(merge(self.weight, self.block, variant=self.spec.variant, mini_r=self.spec.mini_r))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` in place (bat through an fp32 inverse of I + B_i)."""
        if not self.merged:
            raise RuntimeError("BoneLinear.unmerge(): the block is not merged")
        self.weight.copy_(unmerge(self.weight, self.block, variant=self.spec.variant, mini_r=self.spec.mini_r))
        self.merged = False

    def extra_repr(self) -> str:
        s = self.spec
        parts = [
            f"in_features={s.in_features}",
            f"out_features={s.out_features}",
            f"bias={self.bias is not None}",
            f"variant={s.variant!r}",
            f"r={s.r}",
        ]
        if s.mini_r is not None:
            parts.append(f"mini_r={s.mini_r}")
        parts += [
            f"block={tuple(self.block.shape)} {str(self.block.dtype).removeprefix('torch.')}",
            f"trainable={s.trainable_params}",
            f"merged={self.merged}",
            f"backend={self.backend!r}",
        ]
        return ", ".join(parts)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors):
        """Check the tensors before torch copies them: a non-float tensor would be cast silently (complex with a
        warning), a block of another variant's shape would be reported only as a generic size mismatch. A
        mismatched extra state (another variant or r) is reported first: it says more than the shapes."""
        extra = prefix + "_extra_state"
        if extra in state_dict:
            self._merged_from_extra_state(state_dict[extra])
        for name in ("weight", "bias", "block"):
            value = state_dict.get(prefix + name)
            if value is None or not isinstance(value, Tensor):
                continue
            if value.dtype not in FLOAT_DTYPES:
                raise TypeError(
                    f"state_dict[{prefix + name!r}] must have a floating dtype (float16, bfloat16, float32 or "
                    f"float64); got {value.dtype}"
                )
        block = state_dict.get(prefix + "block")
        if isinstance(block, Tensor) and tuple(block.shape) != self.spec.block_shape:
            s = self.spec
            raise ValueError(
                f"state_dict[{prefix + 'block'!r}] must have shape {s.block_shape} for variant {s.variant!r} with "
                f"r = {s.r} on a {s.out_features}x{s.in_features} weight; got {tuple(block.shape)}"
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors)

    def get_extra_state(self) -> dict[str, Any]:
        s = self.spec
        return {"variant": s.variant, "r": s.r, "mini_r": s.mini_r, "merged": self.merged}

    def set_extra_state(self, state: Any) -> None:
        self.merged = self._merged_from_extra_state(state)

    def _merged_from_extra_state(self, state: Any) -> bool:
        """Check a saved extra state against this layer; return its ``merged`` flag."""
        s = self.spec
        mine = {"variant": s.variant, "r": s.r, "mini_r": s.mini_r}
        if not isinstance(state, dict):
            raise TypeError(
                f"BoneLinear extra state must be a dict with keys {sorted([*mine, 'merged'])}; "
                f"got {type(state).__name__} {state!r:.80}"
            )
        theirs = {key: state.get(key) for key in mine}
        if theirs != mine:
            raise ValueError(f"state_dict was saved from a BoneLinear with {theirs}; this layer has {mine}")
        merged = state.get("merged", False)
        if not isinstance(merged, bool):
            raise TypeError(f"BoneLinear extra state 'merged' must be a bool; got {type(merged).__name__} {merged!r}")
        return merged
