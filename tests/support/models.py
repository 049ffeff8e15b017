"""Tiny local models for the integration tests (tests/integrations/ and the distributed worker).

No hub access: a ``LlamaConfig`` with small dimensions, PEFT MiSS on every linear layer of the decoder. The shapes
are chosen so that bone/mini have K % r != 0 (PEFT's zero padding) and bat divides into r x r blocks.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

VARIANTS: dict[str, dict] = {
    "bone": {"r": 7, "init_weights": True},  # 48 % 7, 96 % 7 != 0
    "mini": {"r": 5, "init_weights": "mini", "mini_r": 8},  # 8 | N for N in (24, 48, 96)
    "bat": {"r": 8, "init_weights": "bat"},  # 8 | 24, 48, 96
}
"""MissConfig arguments per bonekern variant."""

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 64


def tiny_llama(layers: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A LlamaForCausalLM with hidden 48, MLP 96, 4 heads of 12 (2 KV heads), vocabulary 64, biased linear layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_bias=True,
        mlp_bias=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)  # transformers zero-initialises biases; make them matter
    return model.to(dtype)


def miss_model(variant: str, base: nn.Module | None = None, *, seed: int = 1, block_std: float = 0.05, **overrides):
    """A PeftModel with MiSS ``variant`` on every decoder linear layer; blocks set to N(0, block_std) (non-zero, so
    the adapters matter from the first step). ``base`` is deep-copied; default: ``tiny_llama()``."""
    from peft import MissConfig, get_peft_model

    base = copy.deepcopy(base) if base is not None else tiny_llama()
    config = MissConfig(target_modules=TARGETS, **{**VARIANTS[variant], **overrides})
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "miss_block" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * block_std)
    return model


def token_batch(seed: int, batch: int = 2, seq: int = 12) -> torch.Tensor:
    """(batch, seq) random token ids."""
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def adapter_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter, by name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def grad_errors(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Relative errors of ``grads`` against float64 ``reference`` gradients: (all tensors together, worst tensor).

    ``||g - g_ref|| / ||g_ref||``. The aggregate is dominated by the large gradients; the worst single tensor is
    usually one with a tiny gradient, where half-precision noise is relatively largest.
    """
    diff = torch.cat([(grads[n].double() - r).flatten() for n, r in reference.items()])
    total = torch.cat([r.flatten() for r in reference.values()])
    worst = max(((grads[n].double() - r).norm() / r.norm()).item() for n, r in reference.items())
    return (diff.norm() / total.norm()).item(), worst


def assert_as_accurate_as(ours: tuple[float, float], theirs: tuple[float, float], what: str) -> None:
    """Two half-precision computations of the same gradients, each compared with float64: ours must be about as
    accurate as theirs overall (1.5x), and no tensor may be far off (3x their worst tensor; a wrong tensor is ~1)."""
    assert ours[0] <= 1.5 * theirs[0], f"{what}: overall error {ours[0]:.3e} vs {theirs[0]:.3e}"
    assert ours[1] <= 3 * theirs[1], f"{what}: worst tensor error {ours[1]:.3e} vs {theirs[1]:.3e}"


class FixedMasks:
    """Gives PEFT the dropout masks bonekern drew, so the two runs are comparable exactly.

    ``record()`` wraps :func:`bonekern.dropout.draw` (as bonekern's public function calls it) and keeps every
    spec drawn, in call order; ``replay(peft_model)`` replaces each ``nn.Dropout`` of the PEFT model's MiSS layers
    with a module that applies the next recorded spec's :func:`bonekern.dropout.keep_mask` (on the first
    in_features columns: PEFT pads x before its dropout, and the padding is zero either way).
    """

    def __init__(self, monkeypatch):
        import bonekern.functional

        self.specs: list = []
        real = bonekern.functional.draw

        def recording(p, generator=None):
            spec = real(p, generator)
            self.specs.append(spec)
            return spec

        monkeypatch.setattr(bonekern.functional, "draw", recording)

    def replay(self, peft_model: nn.Module) -> None:
        from peft.tuners.miss.layer import MissLayer

        for module in peft_model.modules():
            if isinstance(module, MissLayer):
                for name, dropout in list(module.miss_dropout.items()):
                    if isinstance(dropout, nn.Dropout):
                        module.miss_dropout[name] = _ReplayDropout(self, dropout.p, module.in_features)


class _ReplayDropout(nn.Module):
    def __init__(self, masks: FixedMasks, p: float, in_features: int):
        super().__init__()
        self.masks, self.p, self.in_features = masks, p, in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from bonekern.dropout import keep_mask

        if not self.training:
            return x
        spec = self.masks.specs.pop(0)
        assert spec.p == self.p
        flat = x.reshape(-1, x.shape[-1])
        keep = torch.ones(flat.shape, dtype=torch.bool)
        keep[:, : self.in_features] = keep_mask(spec, flat.shape[0], self.in_features)
        return (flat * keep.to(x.dtype) * spec.scale).reshape(x.shape)


def loss_and_grads(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward and backward: the loss and every trainable parameter's gradient (cleared first)."""
    model.zero_grad()
    loss = lm_loss(model, ids)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in adapter_params(model).items() if p.grad is not None}
