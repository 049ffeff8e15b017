"""Fine-tune a tiny local Llama with PEFT MiSS, accelerated by bonekern in one line.

The base model is randomly initialised (no hub access needed) and frozen; MiSS adapters on every linear layer of
the decoder learn a synthetic task: arithmetic progressions mod the vocabulary size, each sequence with its own
start and step, so the model has to read the step off the context. The loss starts at about ln(vocab) and falls
as the adapters learn.

    python examples/finetune_tiny_llama.py                       # bone, 300 steps, bonekern
    python examples/finetune_tiny_llama.py --variant bat --steps 100
    python examples/finetune_tiny_llama.py --compare-peft        # PEFT's own forward side by side, same batches

The one line that matters is ``bonekern.integrations.peft.accelerate(model)``.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from peft import MissConfig, get_peft_model
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from bonekern.integrations.peft import accelerate

INIT_WEIGHTS = {"bone": True, "bat": "bat", "mini": "mini"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--variant", choices=list(INIT_WEIGHTS), default="bone")
    p.add_argument("--r", type=int, default=16, help="MiSS block size")
    p.add_argument("--mini-r", type=int, default=16, help="block columns for --variant mini")
    p.add_argument("--backend", default="auto", help="bonekern backend: auto, torch, triton, cupy, reference")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="base model dtype (adapters stay fp32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bonekern", action="store_true", help="train with PEFT's own forward only")
    p.add_argument("--compare-peft", action="store_true", help="also train with PEFT's own forward, side by side")
    return p.parse_args(argv)


def base_model(args: argparse.Namespace) -> LlamaForCausalLM:
    """A randomly initialised Llama standing in for a pretrained one; frozen by PEFT."""
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=args.seq,
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config).to(device=args.device, dtype=DTYPES[args.dtype])


def progressions(args: argparse.Namespace, generator: torch.Generator) -> torch.Tensor:
    """(batch, seq) token ids: start + step * t mod vocab, a random start and step in 1..4 per sequence."""
    start = torch.randint(0, args.vocab, (args.batch, 1), generator=generator)
    step = torch.randint(1, 5, (args.batch, 1), generator=generator)
    return ((start + step * torch.arange(args.seq)) % args.vocab).to(args.device)


def train(models: dict[str, torch.nn.Module], args: argparse.Namespace) -> dict[str, dict]:
    """AdamW on the adapters for ``args.steps`` steps, every model on the same batches. Several models train side by
    side, one step each in turn, so a shared, noisy machine slows them alike. Returns losses and throughput."""
    optimizers = {
        k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=args.lr) for k, m in models.items()
    }
    generator = torch.Generator().manual_seed(args.seed + 1)
    stats = {k: {"losses": [], "tokens": 0, "elapsed": 0.0} for k in models}
    bar = tqdm(range(args.steps), desc="fine-tuning", unit="step")
    for step in bar:
        ids = progressions(args, generator)
        for label, model in models.items():
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizers[label].step()
            optimizers[label].zero_grad(set_to_none=True)
            loss_value = loss.item()  # synchronises the device before the clock stops
            run = stats[label]
            if step > 0:  # the first step pays one-time costs (allocations, lazy init)
                run["elapsed"] += time.perf_counter() - start
                run["tokens"] += ids.numel()
            run["losses"].append(loss_value)
        bar.set_postfix(
            {
                label: f"loss {run['losses'][-1]:.3f}, {run['tokens'] / run['elapsed']:,.0f} tok/s"
                if run["elapsed"]
                else f"loss {run['losses'][-1]:.3f}"
                for label, run in stats.items()
            }
        )
    window = max(1, min(10, args.steps // 4))
    return {
        label: {
            "losses": run["losses"],
            "first_loss": sum(run["losses"][:window]) / window,
            "last_loss": sum(run["losses"][-window:]) / window,
            "tokens_per_s": run["tokens"] / run["elapsed"] if run["elapsed"] else float("nan"),
        }
        for label, run in stats.items()
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    base = base_model(args)
    config = MissConfig(
        r=args.r, init_weights=INIT_WEIGHTS[args.variant], mini_r=args.mini_r, target_modules="all-linear"
    )
    labels = ["peft"] if args.no_bonekern else ["bonekern"] + (["peft"] if args.compare_peft else [])
    models = {}
    for label in labels:
        models[label] = get_peft_model(copy.deepcopy(base), config)
        if label == "bonekern":
            print(accelerate(models[label], backend=args.backend))  # the one line
    results = train(models, args)

    trainable = sum(p.numel() for p in models[labels[0]].parameters() if p.requires_grad)
    print(
        f"Llama {args.layers} x {args.hidden} (vocab {args.vocab}), MiSS {args.variant} r={args.r}, "
        f"{trainable:,} trainable parameters; batch {args.batch} x {args.seq} tokens, {args.dtype}, {args.device}"
    )
    for label, result in results.items():
        print(
            f"{label:>8}: loss {result['first_loss']:.3f} -> {result['last_loss']:.3f} "
            f"(mean of first / last steps), {result['tokens_per_s']:,.0f} tokens/s"
        )
    if len(results) == 2:
        print(
            f"bonekern / PEFT throughput: {results['bonekern']['tokens_per_s'] / results['peft']['tokens_per_s']:.2f}x"
        )
    return results


if __name__ == "__main__":
    main()
