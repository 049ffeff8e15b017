"""One rank of tests/integrations/test_integration_distributed.py: trains bonekern models under DDP and FSDP2
over gloo (CPU) and saves what the test compares with a single process.

Started by ``torch.multiprocessing.start_processes(main, args=(world, out_dir), nprocs=world)``. Rank r takes rows
``r * ROWS : (r + 1) * ROWS`` of the full batch, so the ranks' mean losses average to the full batch's mean loss
and the synchronised gradients must equal the single-process gradients of the full batch.

Saved to ``out_dir/rank{r}.pt``: for each case ("bonenet-ddp", "bonenet-fsdp2", "llama-ddp", "llama-fsdp2",
"llama-fsdp2-late": accelerate after fully_shard, "llama-fsdp1": FSDP1 with use_orig_params=True, accelerated
before wrapping) the loss on this rank's rows, the full (gathered) gradient of
every trainable parameter after one backward, and the full trainable parameters after one SGD step; how many
bonekern calls the accelerated PEFT layers made; what accelerate / restore do with layers FSDP2 re-classed; what
FSDP1 does with accelerate after wrapping and with ``use_orig_params=False``.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from bonekern.integrations.peft import accelerate, restore

ROWS = 2  # rows of the batch per rank
LR = 0.1


def bone_net(seed: int = 0) -> nn.Module:
    """bonekern.BoneLinear in all three variants, odd shapes (bone K % r != 0), random non-zero blocks."""
    from bonekern import BoneLinear

    torch.manual_seed(seed)
    net = nn.Sequential(
        BoneLinear(24, 32, 5, variant="bone"),
        nn.GELU(),
        BoneLinear(32, 32, 8, variant="bat"),
        nn.GELU(),
        BoneLinear(32, 16, 4, variant="mini", mini_r=8, bias=False),
    )
    with torch.no_grad():
        for layer in net:
            if hasattr(layer, "block"):
                layer.block.normal_(0, 0.1)
    return net


def bone_net_batch(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return torch.randn(world * ROWS, 3, 24, generator=g), torch.randn(world * ROWS, 3, 16, generator=g)


def bone_net_loss(net: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(net(x), target)


def llama(variant: str = "bone", accelerated: bool = True) -> nn.Module:
    """The tiny local Llama with PEFT MiSS on every decoder linear layer, accelerated by bonekern."""
    from tests.support.models import miss_model, tiny_llama

    model = miss_model(variant, tiny_llama())
    if accelerated:
        accelerate(model)
    return model


def _sharded_layer_classes() -> dict:
    """fully_shard on a MiSS layer itself changes its class (FSDP<cls>): accelerate must come first, and restore
    must keep FSDP's class. Records what accelerate / restore did in both orders."""
    from torch.distributed.fsdp import fully_shard

    out = {}
    model = llama()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    fully_shard(layer)
    out["accelerated_then_sharded"] = type(layer).__name__
    out["restored"] = restore(model)
    out["restored_class"] = type(layer).__name__
    out["restored_backend"] = layer._bonekern_backend
    model = llama(accelerated=False)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    fully_shard(layer)
    out["sharded_then_accelerated_kept"] = accelerate(model).kept
    return out


def llama_batch(world: int) -> torch.Tensor:
    from tests.support.models import token_batch

    return token_batch(7, batch=world * ROWS)


def llama_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2's sharded parameters and gradients) gathered whole; a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _step(model: nn.Module, loss: torch.Tensor) -> dict:
    params = {n.removeprefix("module."): p for n, p in model.named_parameters() if p.requires_grad}
    loss.backward()
    grads = {n: _full(p.grad).detach().clone() for n, p in params.items()}
    torch.optim.SGD(params.values(), lr=LR).step()
    after = {n: _full(p).detach().clone() for n, p in params.items()}
    return {"loss": loss.detach(), "grads": grads, "params": after}


def _fsdp1(model: nn.Module, use_orig_params: bool = True) -> nn.Module:
    """FSDP1 with one unit per decoder layer (the usual transformer wrap policy), on the CPU."""
    from functools import partial

    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    policy = partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
    return FullyShardedDataParallel(
        model, auto_wrap_policy=policy, use_orig_params=use_orig_params, device_id=torch.device("cpu")
    )


def _step_fsdp1(model: nn.Module, loss: torch.Tensor) -> dict:
    from torch.distributed.fsdp import FullyShardedDataParallel

    def clean(name: str) -> str:
        return name.replace("_fsdp_wrapped_module.", "")

    loss.backward()
    with FullyShardedDataParallel.summon_full_params(model, with_grads=True):
        grads = {clean(n): p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR).step()
    with FullyShardedDataParallel.summon_full_params(model):
        after = {clean(n): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"loss": loss.detach(), "grads": grads, "params": after}


def _fsdp1_limits() -> dict:
    """accelerate after FSDP1 wrapping (flat, sharded weights outside forward) and use_orig_params=False."""
    out = {"late_report": str(accelerate(_fsdp1(llama(accelerated=False))))}
    try:
        _fsdp1(llama(), use_orig_params=False)
    except ValueError as error:
        out["flat_error"] = str(error)
    return out


def main(rank: int, world: int, out_dir: str) -> None:
    if Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{Path(out_dir) / 'store'}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        from torch.distributed.fsdp import fully_shard
        from torch.nn.parallel import DistributedDataParallel

        import bonekern.integrations.peft as bk_peft

        real, counter = bk_peft.bone_linear, [0]

        def counting(*args, **kwargs):
            counter[0] += 1
            return real(*args, **kwargs)

        bk_peft.bone_linear = counting
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        results: dict = {}

        x, target = bone_net_batch(world)
        net = DistributedDataParallel(bone_net())
        results["bonenet-ddp"] = _step(net, bone_net_loss(net, x[rows], target[rows]))
        net = bone_net()
        for layer in net:
            if hasattr(layer, "block"):
                fully_shard(layer)
        fully_shard(net)
        results["bonenet-fsdp2"] = _step(net, bone_net_loss(net, x[rows], target[rows]))

        ids = llama_batch(world)
        model = DistributedDataParallel(llama())
        results["llama-ddp"] = _step(model, llama_loss(model, ids[rows]))
        model = llama()  # accelerate first, then shard: the switched layers keep bonekern under FSDP2
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        results["llama-fsdp2"] = _step(model, llama_loss(model, ids[rows]))
        results["bonekern_calls"] = counter[0]

        model = llama(accelerated=False)  # the Trainer order: shard the decoder layers first, then accelerate
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        results["late_report"] = str(accelerate(model))
        results["llama-fsdp2-late"] = _step(model, llama_loss(model, ids[rows]))
        results["bonekern_calls_late"] = counter[0] - results["bonekern_calls"]

        before = counter[0]
        model = _fsdp1(llama())  # accelerate first, then wrap: FSDP1 unshards each unit before its forward/backward
        results["llama-fsdp1"] = _step_fsdp1(model, llama_loss(model, ids[rows]))
        results["bonekern_calls_fsdp1"] = counter[0] - before
        results["fsdp1"] = _fsdp1_limits()

        results["classes"] = _sharded_layer_classes()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":  # manual run: python tests/integrations/distributed_worker.py OUT_DIR
    import torch.multiprocessing as mp

    mp.start_processes(main, args=(2, sys.argv[1]), nprocs=2, start_method="spawn")
