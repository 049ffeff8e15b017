"""What the bench measures: layer shapes of real models, grouped into presets (``--suite``), and the cases built
from them.

Model dimensions and their projection shapes live in :mod:`autotune.presets` (copied from each model's Hugging
Face ``config.json``), as does :class:`~autotune.presets.LayerShape`, the shape record both CLIs share, so each
fact is written once. Projections with the same (out, in, bias) are one problem and are measured once, labelled
with every projection name they stand for (e.g. ``q_proj/o_proj``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from autotune.presets import MODELS, LayerShape, layer_shapes
from autotune.presets import parse_shape as parse_weight_shape

SUITE_MODELS: dict[str, str] = {
    "llama2-7b": "Llama-2-7B",
    "llama3-8b": "Llama-3-8B",
    "qwen2.5-7b": "Qwen2.5-7B",
    "tinyllama-1.1b": "TinyLlama-1.1B",
}
"""Bench model names -> the model presets of :mod:`autotune.presets`, where the dimensions are written."""


def projections(model: str) -> list[LayerShape]:
    """The 7 projections of one decoder layer of ``model``, identical shapes merged, in q, k, v, o, gate, up,
    down order."""
    groups: dict[tuple[int, int, bool], list[str]] = {}
    for shape in layer_shapes(SUITE_MODELS[model]):
        groups.setdefault((shape.n, shape.k, shape.bias), []).append(f"{shape.layers[0]}_proj")
    return [LayerShape(model, tuple(layers), n, k, bias) for (n, k, bias), layers in groups.items()]


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
    dropout: float = 0.0
    quant: tuple[str, ...] = ()
    """Quantised bases (:data:`QUANT_BASES`) every case is run over; empty: the plain float base."""


QUANT_BASES: dict[str, str] = {
    "nf4": "bitsandbytes Linear4bit, nf4, blocksize 64, double-quantised absmax (compress_statistics)",
    "int8": "bitsandbytes Linear8bitLt, int8 rows with a row scale (has_fp16_weights=False)",
}
"""The quantised base layers the bench builds (:func:`bench.impls.quantised_base`), by the name a case carries."""


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
        "two TinyLlama-1.1B shapes (W of q_proj/o_proj 2048x2048, gate_proj/up_proj 5632x2048); "
        "512 tokens on CPU, 8192 on a GPU",
        (_TINY["q_proj"], _TINY["gate_proj"]),
        tokens={"cpu": 512, "cuda": 8192},
    ),
    "llama2-7b": _model_suite("llama2-7b"),
    "llama3-8b": _model_suite("llama3-8b"),
    "qwen2.5-7b": _model_suite("qwen2.5-7b"),
    "dropout": Suite(
        "dropout",
        "bone and mini with miss_dropout = 0.1 while training, CPU fp32, TinyLlama-1.1B q_proj/o_proj and "
        "gate_proj/up_proj, 512 tokens: bonekern (base layer + adapter_output, the mask regenerated in backward) vs "
        "PEFT (nn.Dropout, the mask kept) vs the frozen linear layer",
        (_TINY["q_proj"], _TINY["gate_proj"]),
        tokens={"cpu": 512, "cuda": 8192},
        device="cpu",
        dtype=torch.float32,
        variants=("bone", "mini"),
        impls=("torch", "peft", "linear"),
        dropout=0.1,
    ),
    "quant": Suite(
        "quant",
        "bat and bone over quantised bases (bitsandbytes nf4 and int8): bat through bonekern's sourced op (W' "
        "formed a chunk of rows at a time from the packed weight) vs PEFT (dequantises W whole); bone with "
        "miss_dropout = 0.1 (the QLoRA-style recipe) as the base layer's forward + adapter_output vs PEFT; "
        "TinyLlama-1.1B q_proj/o_proj 2048x2048 and gate_proj/up_proj 5632x2048, 512 tokens, CPU fp32",
        (_TINY["q_proj"], _TINY["gate_proj"]),
        tokens={"cpu": 512, "cuda": 8192},
        device="cpu",
        dtype=torch.float32,
        variants=("bat", "bone"),
        impls=("torch", "peft"),
        dropout=0.1,
        quant=tuple(QUANT_BASES),
    ),
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
    """``NxK`` or ``NxK+bias`` (out_features x in_features, ``,`` works too) -> a custom :class:`LayerShape`."""
    body, plus, suffix = text.partition("+")
    if plus and suffix != "bias":
        raise ValueError(f"--shape takes NxK or NxK+bias; got {text!r}")
    n, k = parse_weight_shape(body)
    return LayerShape("custom", (f"{n}x{k}",), n, k, bool(plus))


@dataclass(frozen=True)
class Case:
    """One measured problem: a layer shape, a variant, the block size, tokens, dtype, device, and the adapter's
    dropout probability while training (bone/mini; 0 = none)."""

    shape: LayerShape
    variant: str
    r: int
    mini_r: int | None
    tokens: int
    dtype: torch.dtype
    device: torch.device
    dropout: float = 0.0
    quant: str | None = None
    """A :data:`QUANT_BASES` name: the base layer is quantised so (None: a plain float base)."""

    @property
    def case_id(self) -> str:
        """A stable key for baselines: shape, variant, r, dtype, tokens and quantised base (not the device)."""
        mini = f"/mini_r{self.mini_r}" if self.variant == "mini" else ""
        dtype = str(self.dtype).removeprefix("torch.")
        drop = f"/dropout{self.dropout:g}" if self.dropout else ""
        quant = f"/{self.quant}" if self.quant else ""
        return f"{self.shape.name}/{self.variant}/r{self.r}{mini}{drop}/{dtype}/M{self.tokens}{quant}"
