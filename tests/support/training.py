"""Short, deterministic training runs of the tiny Llama through transformers' Trainer and TRL's SFTTrainer, with
PEFT's own MiSS forward or with bonekern, recording every step's loss (the convergence tests, Liger-Kernel style).

A run is fully determined by (stack, variant, precision, seed): same base model, same adapter init, same batches in
the same order, no dropout; only the MiSS forward differs between ``mode="peft"`` and ``mode="bonekern"``.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .models import TARGETS, VARIANTS, VOCAB, tiny_llama

STEPS = 20
BATCH = 2
SEQ = 12
LAYERS = 1
LR = 5e-3


def tiny_tokenizer():
    """A word-level tokenizer over VOCAB tokens ``t0 ...`` (``t0`` doubles as pad / eos): SFTTrainer needs one."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="t0", eos_token="t0", unk_token="t0")


def dataset(seed: int = 0, rows: int = STEPS * BATCH):
    """Pre-tokenised rows of ``SEQ`` ids: arithmetic progressions mod VOCAB (learnable, so the loss moves)."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    start = torch.randint(1, VOCAB, (rows, 1), generator=g)
    step = torch.randint(1, 5, (rows, 1), generator=g)
    ids = ((start + step * torch.arange(SEQ)) % (VOCAB - 1) + 1).tolist()  # no t0 (pad) inside a row
    return Dataset.from_dict({"input_ids": ids, "labels": ids, "attention_mask": [[1] * SEQ] * rows})


@dataclass
class Run:
    losses: list[float] = field(default_factory=list)
    adapters: dict[str, torch.Tensor] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)
    layer_kinds: set[str] = field(default_factory=set)


def _recording(trainer_cls):
    class Recording(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
            loss = out[0] if return_outputs else out
            self.recorded_losses.append(loss.detach().float().item())
            return out

    return Recording


def _arguments(stack: str, bf16: bool, output_dir: str):
    common = dict(
        output_dir=output_dir,
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        gradient_checkpointing=True,
        use_cpu=True,
        bf16=bf16,
        report_to=[],
        logging_steps=STEPS,
        save_strategy="no",
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    if stack == "trainer":
        from transformers import TrainingArguments

        return TrainingArguments(**common)
    from trl import SFTConfig

    return SFTConfig(**common, max_length=SEQ, packing=False, dataset_num_proc=None)


def train(stack: str, variant: str, mode: str, *, bf16: bool, output_dir: str, base: nn.Module | None = None) -> Run:
    """One run. ``stack``: "trainer" (the PeftModel built here, bonekern through ``BonekernCallback``) or "sft"
    (TRL builds the PeftModel from ``peft_config``; bonekern through ``patch()``). ``mode``: "peft" or "bonekern"."""
    from peft import MissConfig, get_peft_model
    from transformers import Trainer
    from trl import SFTTrainer

    from bonekern.integrations.peft import FallbackWarning, patch, unpatch
    from bonekern.integrations.transformers import BonekernCallback

    base = copy.deepcopy(base) if base is not None else tiny_llama(layers=LAYERS)
    config = MissConfig(target_modules=TARGETS, **VARIANTS[variant])
    args = _arguments(stack, bf16, output_dir)
    run = Run()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FallbackWarning)
        if stack == "trainer":
            model = get_peft_model(base, config)
            base.enable_input_require_grads()
            callbacks = [BonekernCallback()] if mode == "bonekern" else []
            trainer = _recording(Trainer)(model=model, args=args, train_dataset=dataset(), callbacks=callbacks)
        else:
            if mode == "bonekern":
                patch()
            try:
                trainer = _recording(SFTTrainer)(
                    model=base,
                    args=args,
                    train_dataset=dataset(),
                    processing_class=tiny_tokenizer(),
                    peft_config=config,
                )
            finally:
                unpatch()
        trainer.recorded_losses = run.losses
        trainer.train()
    run.fallbacks = [str(w.message) for w in caught if issubclass(w.category, FallbackWarning)]
    from peft.tuners.miss.layer import MissLayer

    run.layer_kinds = {type(m).__name__ for m in trainer.model.modules() if isinstance(m, MissLayer)}
    run.adapters = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return run


def weight_error(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all adapter tensors together (Frobenius, float64). The adapters start at PEFT's init
    (zero blocks), so ``b`` is the update the run learned."""
    assert actual.keys() == expected.keys()
    diff = torch.cat([(actual[n].double() - e.double()).flatten() for n, e in expected.items()])
    total = torch.cat([e.double().flatten() for e in expected.values()])
    return (diff.norm() / total.norm()).item()


def loss_error(actual: list[float], expected: list[float]) -> float:
    """max over steps of |a - b| / |b|."""
    assert len(actual) == len(expected)
    return max(abs(a - b) / abs(b) for a, b in zip(actual, expected, strict=True))
