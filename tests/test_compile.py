"""The layers under ``torch.compile`` (whole graph, no breaks) and ``torch.export``.

A training step of 2C2F and of a small LiResNet compiles with ``fullgraph=True`` (AOTAutograd
through the forward, the power-iteration estimates and the loss; ``aot_eager`` runs the traced
graphs without generating code, which keeps the test fast) and gives the eager step's loss and
gradients; an eval-mode model exports, computes what the eager model computes, and its size check
survives as a shape guard. LipConv2d keeps its input size as Python ints for exactly this (the
old ``input_size.tolist()`` check was a data-dependent guard export refused).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import gloronet.models.liresnet as liresnet
from gloronet.nn import LipConv2d

pytestmark = pytest.mark.usefixtures("single_thread")

MODELS = {
    "2c2f": ("2c2f", (1, 28, 28), {}),
    "liresnet": ("liresnet", (3, 16, 16), {"depth": 2, "width": 16, "dense_width": 32}),
}


def _net(key):
    name, shape, kw = MODELS[key]
    torch.manual_seed(0)
    return liresnet.create(name, shape, 10, 0.3, **kw), shape


@pytest.mark.parametrize("key", list(MODELS))
def test_training_step_compiles_without_graph_breaks(key):
    net, shape = _net(key)
    twin = copy.deepcopy(net)
    x, y = torch.rand(8, *shape), torch.randint(0, 10, (8,))

    def step(model):
        model.train()
        loss = F.cross_entropy(model.bottom_logits(x), y)
        loss.backward()
        return loss.detach()

    compiled = torch.compile(lambda: F.cross_entropy(net.bottom_logits(x), y), fullgraph=True, backend="aot_eager")
    net.train()
    loss = compiled()
    loss.backward()
    ref = step(twin)
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(net.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("key", list(MODELS))
def test_eval_model_exports_and_compiles(key):
    net, shape = _net(key)
    net.eval()
    x = torch.rand(4, *shape)
    with torch.no_grad():
        ref = net(x)
    program = torch.export.export(net, (x,))
    torch.testing.assert_close(program.module()(x), ref, rtol=0, atol=1e-6)
    with pytest.raises(Exception):  # the input size is part of the exported program
        program.module()(torch.rand(4, shape[0], shape[1] + 4, shape[2] + 4))
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref, rtol=0, atol=1e-6)


def test_conv_size_check_without_tensor_reads():
    """The size lives in a plain attribute (mirrored by the ``input_size`` buffer for checkpoints):
    other sizes are still refused, a state_dict restores it, and an in-place edit of the mirror is
    refused by the bound instead of silently describing another map."""
    conv = LipConv2d(2, 3, 3, input_size=(6, 7))
    assert conv.input_hw == (6, 7) and conv.input_size.tolist() == [6, 7]
    with pytest.raises(ValueError, match="set up for 6x7"):
        conv(torch.rand(1, 2, 7, 7))
    fresh = LipConv2d(2, 3, 3)
    fresh.load_state_dict(conv.state_dict())
    assert fresh.input_hw == (6, 7) and fresh.lipschitz_bound() == conv.lipschitz_bound()
    conv.input_size.copy_(torch.tensor([8, 8]))
    with pytest.raises(ValueError, match="mirrors the size"):
        conv.lipschitz_bound()


def test_layers_run_where_torch_compiler_has_no_is_compiling(monkeypatch):
    """torch < 2.3 has no ``torch.compiler.is_compiling``: the eval forward, the training step and
    certification must go through ``gloronet.tracing`` (dynamo's flag) and still run."""
    net, shape = _net("liresnet")
    x = torch.rand(4, *shape)
    monkeypatch.delattr(torch.compiler, "is_compiling")
    F.cross_entropy(net.train().bottom_logits(x), torch.zeros(4, dtype=torch.long)).backward()
    net.eval()
    with torch.no_grad():
        assert torch.isfinite(net(x)).all()
    assert net.certify(x).radius.shape == (4,)
