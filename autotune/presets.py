"""Linear-layer shapes of popular models, for ``python -m autotune tune --model`` and ``python -m bench --suite``
(the one place these model dimensions are written).

Each preset is the attention and MLP projections of one decoder layer, written as (N = out_features,
K = in_features) like ``nn.Linear.weight`` (:class:`LayerShape`, the shape record of both CLIs), derived from
the model's HuggingFace ``config.json``:
q (heads * head_dim, hidden), k and v (kv_heads * head_dim, hidden), o (hidden, heads * head_dim),
gate and up (intermediate, hidden), down (hidden, intermediate); head_dim = hidden / heads.
"""

from __future__ import annotations

from dataclasses import dataclass

from .argtypes import MAX_COUNT


@dataclass(frozen=True)
class ModelConfig:
    """The ``config.json`` fields that fix a decoder layer's projection shapes."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    attention_bias: bool = False
    """q, k and v projections carry a bias (Qwen2); o and the MLP never do in these models."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


MODELS: dict[str, ModelConfig] = {
    # meta-llama/Llama-2-7b-hf: hidden 4096, intermediate 11008, 32 heads, no GQA
    "Llama-2-7B": ModelConfig(4096, 11008, 32, 32),
    # meta-llama/Llama-2-13b-hf: hidden 5120, intermediate 13824, 40 heads, no GQA
    "Llama-2-13B": ModelConfig(5120, 13824, 40, 40),
    # meta-llama/Meta-Llama-3-8B: hidden 4096, intermediate 14336, 32 heads, 8 KV heads
    "Llama-3-8B": ModelConfig(4096, 14336, 32, 8),
    # Qwen/Qwen2.5-7B: hidden 3584, intermediate 18944, 28 heads, 4 KV heads (head_dim 128), q/k/v bias
    "Qwen2.5-7B": ModelConfig(3584, 18944, 28, 4, attention_bias=True),
    # TinyLlama/TinyLlama-1.1B: hidden 2048, intermediate 5632, 32 heads, 4 KV heads (bench's quick suite)
    "TinyLlama-1.1B": ModelConfig(2048, 5632, 32, 4),
}

LAYERS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class LayerShape:
    """One linear-layer shape to tune or measure: the weight is (N, K) = (out_features, in_features), the order
    of ``nn.Linear.weight.shape``; with or without a bias.

    Attributes:
        source: where it comes from: a model preset, or what the user typed it into (``--shape``).
        layers: the layer names it stands for (one, or several projections with the same shape).
        n: out_features; k: in_features.
        bias: the layer carries a bias.
    """

    source: str
    layers: tuple[str, ...]
    n: int
    k: int
    bias: bool = False

    @property
    def name(self) -> str:
        """``source.layer`` (``Llama-3-8B.q``), the layers joined by ``/`` when there are several."""
        return f"{self.source}.{'/'.join(self.layers)}"


def layer_shapes(model: str) -> list[LayerShape]:
    """The q, k, v, o, gate, up, down shapes of ``model`` (a key of :data:`MODELS`, case-insensitive)."""
    name = find_model(model)
    c = MODELS[name]
    q_out = c.num_attention_heads * c.head_dim
    kv_out = c.num_key_value_heads * c.head_dim
    shapes = {
        "q": (q_out, c.hidden_size),
        "k": (kv_out, c.hidden_size),
        "v": (kv_out, c.hidden_size),
        "o": (c.hidden_size, q_out),
        "gate": (c.intermediate_size, c.hidden_size),
        "up": (c.intermediate_size, c.hidden_size),
        "down": (c.hidden_size, c.intermediate_size),
    }
    return [
        LayerShape(name, (layer,), *shapes[layer], bias=c.attention_bias and layer in ("q", "k", "v"))
        for layer in LAYERS
    ]


SHAPE_HELP = "NxK = out_features x in_features, the order of nn.Linear.weight.shape (',' works too), e.g. 11008x4096"
"""How both CLIs describe ``--shape``."""


def parse_shape(text: str) -> tuple[int, int]:
    """(N, K) from ``NxK`` or ``N,K`` (out_features x in_features); ValueError naming ``--shape`` otherwise."""
    parts = [p.strip() for p in text.strip().lower().replace(",", "x").split("x")]
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--shape takes {SHAPE_HELP}; got {text!r}")
    n, k = (int(p) for p in parts)
    if max(n, k) > MAX_COUNT:
        raise ValueError(f"--shape takes N and K of at most {MAX_COUNT} each; got {text!r}")
    return n, k


def find_model(model: str) -> str:
    """The canonical preset name for ``model`` (case-insensitive); ValueError listing the presets otherwise."""
    for name in MODELS:
        if name.lower() == model.lower():
            return name
    raise ValueError(f"model preset must be one of {list(MODELS)}; got {model!r}")
