"""DeepSpeed ZeRO-3 over two CPU processes (gloo): every MiSS call of an accelerated PEFT model runs on bonekern,
on the gathered base weight, with PEFT's losses and final adapters, for bone, bat and mini.

The ranks run tests/integrations/zero3_worker.py (both runs per variant: PEFT's forward, then bonekern, each its
own ZeRO-3 engine; every parameter partitioned). Bounded: a file store, a 120 s collective timeout in the workers
and a deadline here after which they are killed. The first run on a machine JIT-builds DeepSpeed's small shm op
with g++ (about 30 s, cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.support import assert_close_to_reference

pytest.importorskip("peft", reason="needs the peft package (pip install 'bonekern[peft]')")
pytest.importorskip("transformers", reason="needs the transformers package (pip install 'bonekern[peft]')")
pytest.importorskip("deepspeed", reason="needs deepspeed (see tests/install_extras.sh)")

from bonekern.integrations.deepspeed import KNOWN_HOOKS
from tests.integrations import zero3_worker as worker
from tests.support.spawn import run_workers

LAYERS = 14  # 2 decoder layers x 7 MiSS linear layers


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_workers(worker.main, tmp_path_factory.mktemp("zero3"), deadline_s=420)


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
@pytest.mark.parametrize("variant", worker.VARIANTS)
def test_zero3_runs_every_call_on_bonekern_with_peft_losses(ranks, variant):
    for rank, result in enumerate(ranks):
        peft, ours = result[f"{variant}-peft"], result[f"{variant}-bonekern"]
        where = f"{variant} rank {rank}"
        assert ours["fallbacks"] == [], where  # no call ran PEFT's forward ...
        assert ours["calls"] == LAYERS * worker.STEPS, where  # ... every one ran bonekern on gathered weights
        assert peft["calls"] == 0, where
        if "report" in ours:  # accelerate after deepspeed.initialize: shapes read from ds_shape
            assert f"{LAYERS} of {LAYERS} MiSS layers switched" in ours["report"], ours["report"]
        assert_close_to_reference(
            torch.tensor(ours["losses"]), torch.tensor(peft["losses"]), torch.float32, f"{where} losses"
        )
        assert ours["blocks"].keys() == peft["blocks"].keys()
        for name, block in peft["blocks"].items():
            assert_close_to_reference(ours["blocks"][name], block, torch.float32, f"{where} {name}")
        # Nothing of a base weight's shape is kept for backward (PEFT's F.linear keeps the weight itself), and no
        # base weight is left gathered after a forward or a backward.
        assert ours["weight_shaped_saved"] == [], where
        assert peft["weight_shaped_saved"], "the saved-tensor check sees PEFT's kept weights"
        assert set(ours["gathered_after_calls"]) == {0}, where


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_zero3_hooks_are_the_known_ones_and_a_foreign_hook_still_falls_back(ranks):
    for result in ranks:
        ours = result["bat-bonekern"]  # bat: the fused call needs the base weight, so a foreign hook falls back
        assert set(ours["hooks"]) == KNOWN_HOOKS  # DeepSpeed's hooks on a base layer, unwrapped
        (message,) = ours["foreign_hook"]
        assert "layers.0.self_attn.q_proj runs PEFT's own forward" in message
        assert "hooks that must see its own call" in message


def test_helpers_leave_plain_modules_alone():
    """Without DeepSpeed: shapes are .shape, parameters are the module's, and no hook is taken for a ZeRO-3 one."""
    import functools

    from torch import nn

    from bonekern.integrations import deepspeed as bk_zero

    linear = nn.Linear(6, 4)
    assert bk_zero.shape_of(linear.weight) == (4, 6) and not bk_zero.is_partitioned(linear.weight)
    weight, bias = bk_zero.base_parameters(linear)
    assert weight is linear.weight and bias is linear.bias

    def _pre_forward_module_hook(module, args):  # DeepSpeed's name, but not DeepSpeed's module
        return None

    wrapped = functools.wraps(_pre_forward_module_hook)(lambda *a: _pre_forward_module_hook(*a))
    assert bk_zero.hook_name(wrapped)[1].endswith("_pre_forward_module_hook")
    assert not bk_zero.is_known_hook(wrapped)
    assert bk_zero.zero_call_reason(linear.weight, linear.bias, linear.weight) is not None  # a trainable base
