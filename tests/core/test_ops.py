"""The custom ops: registration (opcheck), torch.compile without graph breaks, meta-device shapes, autocast,
and what autograd keeps between forward and backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bonekern
from bonekern import BoneLinear, bone_linear
from bonekern.backends import BACKEND_NAMES
from tests.support import assert_close_to_reference, backend_or_skip, make_problem, reference_outputs

VARIANT_ARGS = {"bone": {}, "mini": {"mini_r": 4}, "bat": {}}


@pytest.mark.parametrize("variant", ["bone", "mini", "bat"])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_opcheck(backend, variant):
    backend_or_skip(backend)
    p = make_problem(variant, (6,), 16, 16, 4, mini_r=VARIANT_ARGS[variant].get("mini_r"))
    block = p.block.clone().requires_grad_()
    x = p.x.clone().requires_grad_()
    if variant == "bat":
        torch.library.opcheck(torch.ops.bonekern.bat_forward, (x, p.weight, block, p.bias, backend))
        torch.library.opcheck(
            torch.ops.bonekern.bat_backward,
            (p.dy.reshape(6, 16), p.x, p.weight, p.block, True, True, backend),
        )
    else:
        torch.library.opcheck(torch.ops.bonekern.bone_forward, (x, p.weight, block, p.bias, backend))
        s = torch.randn(6, 4)
        torch.library.opcheck(
            torch.ops.bonekern.bone_backward,
            (p.dy.reshape(6, 16), s, p.weight, p.block, True, False, backend),
        )


class TwoLayer(nn.Module):
    def __init__(self, variant: str):
        super().__init__()
        kw = VARIANT_ARGS[variant]
        self.a = BoneLinear(16, 32, 4, variant=variant, **kw)
        self.b = BoneLinear(32, 8, 4, variant=variant, **({"mini_r": 2} if kw else {}))
        for layer in (self.a, self.b):
            nn.init.normal_(layer.block, std=0.1)

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x)))


@pytest.mark.parametrize("compiler", ["inductor", "aot_eager"])
@pytest.mark.parametrize("variant", ["bone", "mini", "bat"])
def test_compile_fullgraph(variant, compiler):
    torch.manual_seed(0)
    model = TwoLayer(variant)
    x = torch.randn(2, 5, 16)
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    y_eager = model(x)
    y_eager.square().sum().backward()
    grads_eager = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    y = compiled(x)
    y.square().sum().backward()
    torch.testing.assert_close(y, y_eager)
    for g_eager, p in zip(grads_eager, [p for p in model.parameters() if p.requires_grad], strict=True):
        torch.testing.assert_close(p.grad, g_eager)


def test_compile_has_no_graph_breaks():
    torch._dynamo.reset()
    model = TwoLayer("bone")
    explanation = torch._dynamo.explain(model)(torch.randn(3, 16))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("variant", ["bone", "mini", "bat"])
def test_meta_device_shapes(variant):
    layer = BoneLinear(16, 32, 4, variant=variant, device="meta", **VARIANT_ARGS[variant])
    x = torch.empty(2, 7, 16, device="meta", requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 7, 32) and y.device.type == "meta"
    y.sum().backward()
    assert layer.block.grad.shape == layer.block.shape and layer.block.grad.device.type == "meta"
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("variant", ["bone", "mini", "bat"])
def test_cpu_autocast_bf16(variant):
    """Under CPU autocast x, W, b run in bf16 (like nn.Linear); the fp32 block stays fp32 and gets fp32 grads."""
    p = make_problem(variant, (10,), 16, 16, 4, mini_r=VARIANT_ARGS[variant].get("mini_r"))
    block = p.block.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bone_linear(p.x, p.weight, block, p.bias, variant=variant, backend="torch")
    assert y.dtype == torch.bfloat16
    y.backward(p.dy.to(torch.bfloat16))
    assert block.grad.dtype == torch.float32
    rounded = make_problem(variant, (10,), 16, 16, 4, mini_r=VARIANT_ARGS[variant].get("mini_r"))
    for t in ("x", "weight", "bias", "dy"):
        setattr(rounded, t, getattr(rounded, t).to(torch.bfloat16))
    want = reference_outputs(rounded)
    assert_close_to_reference(y, want["y"], torch.bfloat16, "autocast y")
    assert_close_to_reference(block.grad, want["dblock"], torch.bfloat16, "autocast dblock")


# ------------------------------------------------------------------------------------------------------------
# What autograd keeps between forward and backward.
# ------------------------------------------------------------------------------------------------------------


def new_saved_tensors(fn, parameters):
    """Run ``fn`` and return the tensors autograd packed for backward that are *new* storage, i.e. do not share
    memory with ``parameters`` (which are alive anyway). Each entry: (shape, numel)."""
    param_storages = {p.untyped_storage().data_ptr() for p in parameters}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in param_storages:
            saved.append((tuple(t.shape), t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


M, N, K, R = 64, 128, 96, 16


def _linear_and_block(variant):
    linear = nn.Linear(K, N, bias=True)
    layer = BoneLinear.from_linear(linear, R, variant, **VARIANT_ARGS[variant])
    nn.init.normal_(layer.block, std=0.1)
    return layer


@pytest.mark.parametrize("path", ["eager", "custom_op"])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_bat_keeps_only_x(backend, path, monkeypatch):
    monkeypatch.setattr(bonekern.ops, "EAGER_FAST_PATH", path == "eager")
    layer = _linear_and_block("bat")
    layer.backend = backend
    x = torch.randn(M, K, requires_grad=True)
    y, saved = new_saved_tensors(lambda: layer(x), layer.parameters())
    assert saved == [((M, K), M * K)], f"bat must keep x alone, kept {saved}"
    assert all(numel < N * K for _, numel in saved)
    y.sum().backward()
    assert layer.block.grad is not None


@pytest.mark.parametrize("path", ["eager", "custom_op"])
@pytest.mark.parametrize("variant", ["bone", "mini"])
def test_bone_keeps_only_s(variant, path, monkeypatch):
    monkeypatch.setattr(bonekern.ops, "EAGER_FAST_PATH", path == "eager")
    layer = _linear_and_block(variant)
    x = torch.randn(M, K, requires_grad=True)
    _, saved = new_saved_tensors(lambda: layer(x), layer.parameters())
    assert saved == [((M, R), M * R)], f"{variant} must keep S (M x r) alone, kept {saved}"


def test_bone_keeps_x_when_weight_trains():
    layer = _linear_and_block("bone")
    layer.weight.requires_grad_(True)
    x = torch.randn(M, K, requires_grad=True)
    _, saved = new_saved_tensors(lambda: layer(x), layer.parameters())
    assert sorted(saved) == sorted([((M, R), M * R), ((M, K), M * K)])


def test_saved_tensor_check_detects_peft_bat():
    """The check above can fail: PEFT's bat layer keeps weight-sized tensors (W' and a temporary)."""
    peft = pytest.importorskip("peft", reason="needs the peft package (pip install 'bonekern[peft]')")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(K, N)

        def forward(self, x):
            return self.lin(x)

    model = peft.get_peft_model(Net(), peft.MissConfig(r=R, init_weights="bat", target_modules=["lin"]))
    x = torch.randn(M, K, requires_grad=True)
    _, saved = new_saved_tensors(lambda: model(x), model.parameters())
    assert any(numel >= N * K for _, numel in saved), saved


def test_public_api_names():
    for name in ("bone_linear", "delta_weight", "merge", "unmerge", "BoneLinear", "reference"):
        assert hasattr(bonekern, name)
    for op in ("bone_forward", "bone_backward", "bat_forward", "bat_backward"):
        assert hasattr(torch.ops.bonekern, op)


# ------------------------------------------------------------------------------------------------------------
# The eager fast path (autograd Functions) and the custom-op path compute the same thing.
# ------------------------------------------------------------------------------------------------------------


def _outputs_and_grads(variant, backend, weight_trains=False):
    p = make_problem(variant, (3, 5), 24, 16, 4, mini_r=VARIANT_ARGS[variant].get("mini_r"), strided_x=True)
    x = p.x.detach().requires_grad_()
    weight = p.weight.detach().requires_grad_(weight_trains)
    block = p.block.detach().requires_grad_()
    bias = p.bias.detach().requires_grad_()
    y = bone_linear(x, weight, block, bias, variant=variant, mini_r=p.mini_r, backend=backend)
    y.backward(p.dy)
    return [y, x.grad, block.grad, bias.grad] + ([weight.grad] if weight_trains else [])


@pytest.mark.parametrize("weight_trains", [False, True])
@pytest.mark.parametrize("variant", ["bone", "mini", "bat"])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_eager_path_equals_custom_op_path(backend, variant, weight_trains, monkeypatch):
    backend_or_skip(backend)
    eager = _outputs_and_grads(variant, backend, weight_trains)
    monkeypatch.setattr(bonekern.ops, "EAGER_FAST_PATH", False)
    via_ops = _outputs_and_grads(variant, backend, weight_trains)
    for a, b in zip(eager, via_ops, strict=True):
        assert torch.equal(a, b)


def test_paths_are_really_different(monkeypatch):
    """The equality above compares two code paths, not one path twice."""
    calls = []
    monkeypatch.setattr(bonekern.ops.BoneFunction, "apply", lambda *a: calls.append("eager") or torch.zeros(2, 24))
    _ = bone_linear(torch.randn(2, 16), torch.randn(24, 16), torch.zeros(4, 24))
    assert calls == ["eager"]
    monkeypatch.setattr(bonekern.ops, "EAGER_FAST_PATH", False)
    _ = bone_linear(torch.randn(2, 16), torch.randn(24, 16), torch.zeros(4, 24))
    assert calls == ["eager"], "with the fast path off the custom op must run"


def test_compiled_graph_calls_the_custom_ops():
    torch._dynamo.reset()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = TwoLayer("bat")
    torch.compile(model, fullgraph=True, backend=capture)(torch.randn(3, 16))
    targets = {str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}
    assert any("bonekern.bat_forward" in t for t in targets), targets
