"""The backend contract's bookkeeping: which backends are candidates for an op, tuning keys of adapter ops."""

from __future__ import annotations

import pytest
import torch

from bonekern import dispatch, tuning
from bonekern.backends import OPS, Backend, OpProblem, get_backend
from bonekern.dropout import DropoutSpec
from bonekern.errors import BackendUnavailableError


class PartialBackend(Backend):
    """Implements bone_forward only."""

    name = "partial"

    def unavailable_reason(self, device):
        return None

    def bone_forward(self, x, weight, block, bias, config):
        raise AssertionError("not run here")


def test_implements_is_true_only_for_overridden_methods():
    backend = PartialBackend()
    assert backend.implements("bone_forward")
    assert [op for op in OPS if backend.implements(op)] == ["bone_forward"]
    assert not Backend().implements("adapter_forward")
    assert all(get_backend("torch").implements(op) for op in OPS if not op.startswith("adapter"))


def test_a_named_backend_without_the_op_is_refused():
    with pytest.raises(BackendUnavailableError, match="does not implement adapter_forward"):
        dispatch.require_op(PartialBackend(), "adapter_forward")
    assert dispatch.require_op(PartialBackend(), "bone_forward").name == "partial"


def test_search_space_drops_backends_without_the_op():
    problem = OpProblem("bat_forward", 4, 16, 16, 4, 4, torch.float32, torch.float32, torch.device("cpu"))
    space = tuning.search_space(problem, "torch", ("torch",), [PartialBackend(), get_backend("torch")], "")
    assert space.default.backend == "torch"
    with pytest.raises(ValueError, match="no backend"):
        tuning.search_space(problem, "torch", ("torch",), [PartialBackend()], "")


def test_adapter_problem_fields_and_keys():
    block = torch.zeros(4, 6)
    plain = OpProblem.for_adapter("adapter_forward", 5, 12, 10, block, torch.float16, None)
    assert (plain.m, plain.n, plain.k, plain.r, plain.block_cols) == (5, 12, 10, 4, 6)
    assert (plain.dtype, plain.block_dtype, plain.dropout) == (torch.float16, torch.float32, False)
    assert plain.variant == "mini"
    dropped = OpProblem.for_adapter("adapter_forward", 5, 12, 10, block, torch.float16, DropoutSpec(0.1, 3))
    assert dropped.dropout and dropped != plain
    key_plain = tuning.make_key(plain, "torch", "", ("torch",))
    key_dropped = tuning.make_key(dropped, "torch", "", ("torch",))
    assert key_plain.entry_id != key_dropped.entry_id
    # a bone op's key is what it was before adapter ops existed: no dropout field
    bone = OpProblem("bone_forward", 5, 12, 10, 4, 12, torch.float32, torch.float32, torch.device("cpu"))
    assert "dropout" not in repr(tuning.make_key(bone, "torch", "", ("torch",)))


@pytest.mark.parametrize(
    ("op", "args", "expected"),
    [
        ("adapter_backward", (None, None, None, 8, None, True, False), "dx"),
        ("adapter_backward", (None, None, None, 8, None, False, True), "dblock"),
        ("bone_backward", (None, None, None, None, False, True), "dblock"),
        ("adapter_forward", (None, None, 8, None), ""),
    ],
)
def test_needed_grads_reads_each_ops_flags(op, args, expected):
    assert tuning.needed_grads(op, args) == expected
