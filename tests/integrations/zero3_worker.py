"""One rank of tests/integrations/test_integration_zero3.py: trains the tiny MiSS Llama under DeepSpeed ZeRO-3 (two
CPU processes over gloo), once on PEFT's own forward and once on bonekern, for bone, bat and mini.

Started by ``torch.multiprocessing.start_processes(main, args=(world, out_dir), nprocs=world)``. Every parameter is
partitioned (``stage3_param_persistence_threshold: 0``: base weights, biases and adapter blocks all have shape (0,)
between uses). Rank r trains on rows ``r * ROWS : (r + 1) * ROWS`` of each step's batch.

Saved to ``out_dir/rank{r}.pt``, per variant: the per-step losses of the PEFT run and of the bonekern run, the final
adapter blocks of both (gathered), how many calls bonekern served on gathered weights, the FallbackWarnings raised,
the shapes of every tensor autograd kept in the bonekern run's first step (and in the PEFT run's, to show the check
can see a kept weight), whether any base weight was still gathered after a forward or a backward; plus the names of
the hooks DeepSpeed put on a base layer and what a foreign hook on a base layer does.
"""

from __future__ import annotations

import os
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

ROWS = 2  # rows of each step's batch per rank
SEQ = 7  # M = ROWS * SEQ = 14 tokens per rank: no (M, K) activation has a base weight's shape
STEPS = 4
LR = 0.3  # plain SGD (a client optimizer): Adam would amplify rounding-level gradient differences, see docs
VARIANTS = ("bone", "bat", "mini")
ACCELERATE_BEFORE = {"bone": False, "bat": True, "mini": False}
"""accelerate() before deepspeed.initialize (bat) or after it on the engine's module (bone, mini)."""

CONFIG = {
    "train_micro_batch_size_per_gpu": ROWS,
    "gradient_accumulation_steps": 1,
    "zero_allow_untested_optimizer": True,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "steps_per_print": 10**9,
    "wall_clock_breakdown": False,
}

CALLS = [0]
"""Calls served by bonekern on gathered weights (ZeroGatheredLinear.apply), counted in main."""


def batches(world: int, rank: int) -> list[torch.Tensor]:
    from tests.support.models import token_batch

    rows = slice(rank * ROWS, (rank + 1) * ROWS)
    return [token_batch(100 + step, batch=world * ROWS, seq=SEQ)[rows] for step in range(STEPS)]


def base_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.miss.layer import MissLayer

    return [m.base_layer for m in model.modules() if isinstance(m, MissLayer)]


def _gathered_weights(model: nn.Module) -> int:
    """How many base weights hold gathered data right now (0: none kept past a call)."""
    return sum(1 for base in base_layers(model) if base._parameters["weight"].ds_status.name != "NOT_AVAILABLE")


def _blocks(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    params = {n: p for n, p in engine.module.named_parameters() if "miss_block" in n}
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {n: p.detach().clone() for n, p in params.items()}


def train(variant: str, world: int, rank: int, bonekern: bool) -> dict:
    import deepspeed

    from bonekern.integrations.peft import FallbackWarning, accelerate
    from tests.support.models import miss_model, tiny_llama

    model = miss_model(variant, tiny_llama())
    if bonekern and ACCELERATE_BEFORE[variant]:
        accelerate(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=CONFIG)
    out: dict = {}
    if bonekern and not ACCELERATE_BEFORE[variant]:
        out["report"] = str(accelerate(engine.module))
    weight_shapes = {tuple(base._parameters["weight"].ds_shape) for base in base_layers(engine.module)}
    losses, saved, gathered, calls = [], [], [], CALLS[0]
    kept: list[tuple[int, ...]] = []  # the shape of every tensor autograd keeps in the first step

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(tuple(t.shape))
        return t

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FallbackWarning)
        for step, ids in enumerate(batches(world, rank)):
            if step == 0:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    loss = engine(input_ids=ids, labels=ids).loss
                saved = [shape for shape in kept if shape in weight_shapes]
            else:
                loss = engine(input_ids=ids, labels=ids).loss
            gathered.append(_gathered_weights(engine.module))
            engine.backward(loss)
            gathered.append(_gathered_weights(engine.module))
            engine.step()
            losses.append(loss.item())
    out.update(
        losses=losses,
        blocks=_blocks(engine),
        weight_shaped_saved=saved,
        gathered_after_calls=gathered,
        fallbacks=[str(w.message) for w in caught if issubclass(w.category, FallbackWarning)],
        calls=CALLS[0] - calls,
    )
    if bonekern and variant == "bat":  # bone/mini serve a foreign hook with the base layer's own forward
        out["hooks"] = sorted(_hook_names(engine.module))
        out["foreign_hook"] = _foreign_hook(engine, batches(world, rank)[0])
    engine.destroy()
    return out


def _hook_names(model: nn.Module) -> set:
    from bonekern.integrations.deepspeed import hook_name

    base = base_layers(model)[0]
    hooks = [*base._forward_pre_hooks.values(), *base._forward_hooks.values()]
    return {hook_name(h) for h in hooks}


def _foreign_hook(engine, ids: torch.Tensor) -> list[str]:
    """A hook bonekern does not know on one base layer: that layer falls back (PEFT's forward), with a warning."""
    from bonekern.integrations.peft import FallbackWarning

    base = base_layers(engine.module)[0]
    handle = base.register_forward_hook(lambda module, args, output: None)
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always", FallbackWarning)
            engine(input_ids=ids, labels=ids)
    finally:
        handle.remove()
    return [str(w.message) for w in caught if issubclass(w.category, FallbackWarning)]


def main(rank: int, world: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu"
    )
    if Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{Path(out_dir) / 'store'}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    try:
        import deepspeed

        import bonekern.integrations.deepspeed as bk_zero

        deepspeed.init_distributed(dist_backend="gloo")
        real = bk_zero.ZeroGatheredLinear.apply

        def counting(*args):
            CALLS[0] += 1
            return real(*args)

        bk_zero.ZeroGatheredLinear.apply = counting
        results: dict = {}
        for variant in VARIANTS:
            results[f"{variant}-peft"] = train(variant, world, rank, bonekern=False)
            results[f"{variant}-bonekern"] = train(variant, world, rank, bonekern=True)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":  # manual run: python tests/integrations/zero3_worker.py OUT_DIR
    import torch.multiprocessing as mp

    mp.start_processes(main, args=(2, sys.argv[1]), nprocs=2, start_method="spawn")
