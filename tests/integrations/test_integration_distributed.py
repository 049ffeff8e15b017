"""DistributedDataParallel, FSDP2 (``fully_shard``) and FSDP1 (``use_orig_params=True``) over two CPU processes
(gloo) train bonekern models, BoneLinear in all variants and an accelerated PEFT MiSS Llama, with the same gradients
as one process.

The ranks run tests/integrations/distributed_worker.py; this process computes the single-process reference on the
full batch and compares. Bounded: a file store (no ports to pick), a 60 s collective timeout in the workers and a
deadline here after which the workers are killed.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.support import assert_close_to_reference
from tests.support.spawn import run_workers

pytest.importorskip("peft", reason="needs the peft package (pip install 'bonekern[peft]')")
pytest.importorskip("transformers", reason="needs the transformers package (pip install 'bonekern[peft]')")

from tests.integrations import distributed_worker as worker

WORLD = 2
DEADLINE_S = 240


def one_process(model, loss_fn, *batch) -> dict:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    loss = loss_fn(model, *batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in params.items()}
    torch.optim.SGD(params.values(), lr=worker.LR).step()
    return {"loss": loss.detach(), "grads": grads, "params": {n: p.detach().clone() for n, p in params.items()}}


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_ddp_and_fsdp2_match_one_process(tmp_path):
    ranks = run_workers(worker.main, tmp_path, WORLD, DEADLINE_S)

    x, target = worker.bone_net_batch(WORLD)
    references = {"bonenet": one_process(worker.bone_net(), worker.bone_net_loss, x, target)}
    references["llama"] = one_process(worker.llama(), worker.llama_loss, worker.llama_batch(WORLD))

    for case in ("bonenet-ddp", "bonenet-fsdp2", "llama-ddp", "llama-fsdp2", "llama-fsdp2-late", "llama-fsdp1"):
        reference = references[case.split("-")[0]]
        mean_loss = sum(r[case]["loss"] for r in ranks) / WORLD
        assert_close_to_reference(mean_loss, reference["loss"], torch.float32, f"{case} loss")
        for rank, result in enumerate(ranks):
            assert result[case]["grads"].keys() == reference["grads"].keys(), case
            for name, grad in reference["grads"].items():
                assert_close_to_reference(
                    result[case]["grads"][name], grad, torch.float32, f"{case} rank {rank} d{name}"
                )
                param = reference["params"][name]
                assert_close_to_reference(
                    result[case]["params"][name], param, torch.float32, f"{case} rank {rank} {name}"
                )
    q_proj = "base_model.model.model.layers.0.self_attn.q_proj"
    for result in ranks:
        assert result["bonekern_calls"] == 2 * 14  # every MiSS layer ran bonekern under DDP and FSDP2
        assert result["bonekern_calls_late"] == 14
        assert "14 of 14 MiSS layers switched" in result["late_report"]
        assert result["bonekern_calls_fsdp1"] == 14  # FSDP1 (use_orig_params=True): no hook on the base layers
        # After FSDP1 wrapping the weights are flat shards outside forward: accelerate first (docs/training-stacks.md).
        assert "0 of 14 MiSS layers switched" in result["fsdp1"]["late_report"]
        assert "does not fit variant" in result["fsdp1"]["late_report"]  # a flat shard is not (r, N)
        # use_orig_params=False cannot flatten PEFT's frozen base and trainable blocks into one unit, with or without
        # bonekern.
        assert "uniform `requires_grad`" in result["fsdp1"]["flat_error"]
        classes = result["classes"]
        assert classes["accelerated_then_sharded"] == "FSDPBonekernMissLinear"
        assert classes["restored"] == 14
        assert classes["restored_class"] == "FSDPBonekernMissLinear"  # FSDP's class kept ...
        assert classes["restored_backend"] is None  # ... and switched off: PEFT's forward
        kept = classes["sharded_then_accelerated_kept"]
        assert list(kept) == [q_proj] and "call accelerate first" in kept[q_proj]
