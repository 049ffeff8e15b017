"""What the bench measures: layer shapes of real models, grouped into presets (``--suite``), and the cases built
from them.

Model dimensions live in :mod:`autotune.presets` (copied from each model's Hugging Face ``config.json``); the
projection shapes are derived from them in :func:`projections`, so each fact is written once. Projections with
the same (in, out, bias) are one problem and are measured once, labelled with every projection name they stand
for (e.g. ``q_proj/o_proj``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from autotune.presets import MODELS, layer_shapes

SUITE_MODELS: dict[str, str] = {
    "llama2-7b": "Llama-2-7B",
    "llama3-8b": "Llama-3-8B",
    "qwen2.5-7b": "Qwen2.5-7B",
    "tinyllama-1.1b": "TinyLlama-1.1B",
}
"""Bench model names -> the model presets of :mod:`autotune.presets`, where the dimensions are written."""


@dataclass(frozen=True)
class LayerShape:
    """One linear-layer problem: W is (out_features, in_features) = (N, K), with or without a bias."""

    model: str
    layers: tuple[str, ...]
    in_features: int
    out_features: int
    bias: bool

    @property
    def name(self) -> str:
        return f"{self.model}.{'/'.join(self.layers)}"


def projections(model: str) -> list[LayerShape]:
    """The 7 projections of one decoder layer of ``model``, identical shapes merged, in q, k, v, o, gate, up,
    down order."""
    preset = SUITE_MODELS[model]
    config = MODELS[preset]
    groups: dict[tuple[int, int, bool], list[str]] = {}
    for shape in layer_shapes(preset):
        bias = config.attention_bias and shape.layer in ("q", "k", "v")
        groups.setdefault((shape.k, shape.n, bias), []).append(f"{shape.layer}_proj")
    return [LayerShape(model, tuple(layers), k, n, bias) for (k, n, bias), layers in groups.items()]


@dataclass(frozen=True)
class Suite:
    """A preset: shapes plus the defaults it runs with (each can be overridden on the command line).

    ``tokens`` maps a device type to M, the number of tokens (rows of x); ``device`` None means the best device
    present; ``variants``/``impls`` None mean every variant / every implementation.
    """

    name: str
    description: str
    shapes: tuple[LayerShape, ...]
    tokens: dict[str, int] = field(default_factory=lambda: {"cpu": 2048, "cuda": 8192})
    device: str | None = None
    dtype: torch.dtype | None = None
    r: int = 64
    variants: tuple[str, ...] | None = None
    impls: tuple[str, ...] | None = None


def _model_suite(model: str) -> Suite:
    d = MODELS[SUITE_MODELS[model]]
    return Suite(
        model,
        f"every projection of one {model} decoder layer (hidden {d.hidden_size}, intermediate "
        f"{d.intermediate_size}, {d.num_attention_heads} heads, {d.num_key_value_heads} kv heads"
        f"{', q/k/v bias' if d.attention_bias else ''})",
        tuple(projections(model)),
    )


_TINY = {s.layers[0]: s for s in projections("tinyllama-1.1b")}

SUITES: dict[str, Suite] = {
    "quick": Suite(
        "quick",
        "two TinyLlama-1.1B shapes (q_proj/o_proj 2048x2048, gate_proj/up_proj 2048->5632); "
        "512 tokens on CPU, 8192 on a GPU",
        (_TINY["q_proj"], _TINY["gate_proj"]),
        tokens={"cpu": 512, "cuda": 8192},
    ),
    "llama2-7b": _model_suite("llama2-7b"),
    "llama3-8b": _model_suite("llama3-8b"),
    "qwen2.5-7b": _model_suite("qwen2.5-7b"),
    "acceptance": Suite(
        "acceptance",
        "the foundation's acceptance problem (docs/measurements.md): CPU, fp32, x 2048x4096, W 4096x4096, r=64, "
        "bone and bat, bonekern torch vs PEFT vs the frozen linear layer",
        (LayerShape("acceptance", ("square",), 4096, 4096, False),),
        tokens={"cpu": 2048, "cuda": 2048},
        device="cpu",
        dtype=torch.float32,
        variants=("bone", "bat"),
        impls=("torch", "peft", "linear"),
    ),
}


def parse_shape(text: str) -> LayerShape:
    """``KxN`` or ``KxN+bias`` (in_features x out_features) -> a custom :class:`LayerShape`."""
    body, plus, suffix = text.partition("+")
    if plus and suffix != "bias":
        raise ValueError(f"--shape must be KxN or KxN+bias (in_features x out_features); got {text!r}")
    parts = body.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--shape must be KxN or KxN+bias with positive integers; got {text!r}")
    k, n = (int(p) for p in parts)
    return LayerShape("custom", (f"{k}x{n}",), k, n, bool(plus))


@dataclass(frozen=True)
class Case:
    """One measured problem: a layer shape, a variant, the block size, tokens, dtype and device."""

    shape: LayerShape
    variant: str
    r: int
    mini_r: int | None
    tokens: int
    dtype: torch.dtype
    device: torch.device

    @property
    def case_id(self) -> str:
        """A stable key for baselines: shape, variant, r, dtype and tokens (not the device)."""
        mini = f"/mini_r{self.mini_r}" if self.variant == "mini" else ""
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{self.shape.name}/{self.variant}/r{self.r}{mini}/{dtype}/M{self.tokens}"
