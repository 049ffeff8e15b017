"""Supervised fine-tuning with TRL's SFTTrainer and PEFT MiSS, on bonekern through one call: ``patch()``.

SFTTrainer builds the PeftModel itself (from ``peft_config``), so there is no moment to call ``accelerate(model)``
before the first step. ``bonekern.integrations.peft.patch()`` before the trainer is built makes every MiSS layer
PEFT creates run on bonekern. Runs offline: the base model is a randomly initialised tiny Llama and the tokenizer a
word-level one over ``t0 ... t63``; the text rows are arithmetic progressions of those tokens, so the loss falls.

    python examples/sft_trl_patch.py                            # bone, 60 steps, fp32
    python examples/sft_trl_patch.py --variant bat --bf16       # bf16 autocast, as SFTConfig defaults to
    python examples/sft_trl_patch.py --compare-peft             # the same run on PEFT's own forward, side by side
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
from datasets import Dataset
from peft import MissConfig
from peft.tuners.miss.layer import MissLayer
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
from trl import SFTConfig, SFTTrainer

from bonekern.integrations.peft import patch, unpatch

VOCAB = 64
MISS = {"bone": {"init_weights": True}, "bat": {"init_weights": "bat"}, "mini": {"init_weights": "mini", "mini_r": 8}}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--variant", choices=list(MISS), default="bone")
    p.add_argument("--r", type=int, default=8, help="MiSS block size")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=16, help="tokens per text row")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (SFTConfig's default; off here for speed)")
    p.add_argument("--backend", default="auto", help="bonekern backend: auto, torch, triton, cupy, reference")
    p.add_argument("--compare-peft", action="store_true", help="also train on PEFT's own forward, same batches")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t0", unk_token="t0")


def base_model(args: argparse.Namespace) -> LlamaForCausalLM:
    """A randomly initialised Llama standing in for a pretrained one."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4 * args.seq,
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


def text_dataset(args: argparse.Namespace) -> Dataset:
    """Rows like "t5 t8 t11 ...": a random start and step per row, mod the vocabulary (t0 is padding)."""
    g = torch.Generator().manual_seed(args.seed)
    rows = args.steps * args.batch
    start = torch.randint(1, VOCAB, (rows, 1), generator=g)
    step = torch.randint(1, 6, (rows, 1), generator=g)
    ids = (start + step * torch.arange(args.seq)) % (VOCAB - 1) + 1
    return Dataset.from_dict({"text": [" ".join(f"t{i}" for i in row) for row in ids.tolist()]})


class LossLog(TrainerCallback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def train(args: argparse.Namespace, base: LlamaForCausalLM, *, bonekern: bool) -> dict:
    """One SFT run; with ``bonekern`` the trainer is built under ``patch()``."""
    peft_config = MissConfig(r=args.r, target_modules=TARGETS, task_type="CAUSAL_LM", **MISS[args.variant])
    log = LossLog()
    with tempfile.TemporaryDirectory() as output_dir:
        config = SFTConfig(
            output_dir=output_dir,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            logging_steps=1,
            save_strategy="no",
            use_cpu=not torch.cuda.is_available(),
            bf16=args.bf16,
            report_to=[],
            seed=args.seed,
            max_length=args.seq + 1,
            disable_tqdm=True,
        )
        if bonekern:
            patch(backend=args.backend)  # before the trainer: SFTTrainer calls get_peft_model itself
        try:
            trainer = SFTTrainer(
                model=copy.deepcopy(base),
                args=config,
                train_dataset=text_dataset(args),
                processing_class=tokenizer(),
                peft_config=peft_config,
                callbacks=[log],
            )
        finally:
            unpatch()  # PEFT as it was; the model built above keeps bonekern
        layers = [type(m).__name__ for m in trainer.model.modules() if isinstance(m, MissLayer)]
        trainer.train()
    switched = layers.count("BonekernMissLinear")
    name = "bonekern" if bonekern else "peft"
    print(f"{name}: {switched} of {len(layers)} MiSS layers switched to bonekern")
    first, last = sum(log.losses[:5]) / 5, sum(log.losses[-5:]) / 5
    print(f"{name}: loss {first:.4f} -> {last:.4f} over {len(log.losses)} steps")
    return {"losses": log.losses, "first_loss": first, "last_loss": last, "switched": switched, "layers": len(layers)}


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    base = base_model(args)
    results = {"bonekern": train(args, base, bonekern=True)}
    if args.compare_peft:
        results["peft"] = train(args, base, bonekern=False)
        worst = max(abs(a - b) for a, b in zip(results["bonekern"]["losses"], results["peft"]["losses"], strict=True))
        print(f"largest per-step loss difference bonekern vs peft: {worst:.2e}")
    return results


if __name__ == "__main__":
    main()
