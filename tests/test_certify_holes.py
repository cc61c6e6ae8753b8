"""Every way a certificate could rest on something other than the map that runs (issue: near-equal
head rows, a GloroNet as a body, stale cached bounds, negative scales, mixed dtypes, the precision
API, in-place layers, radius vs certified) — each closed at the mechanism and tested here.

Oracles: a fresh model built from the same state (never the cache), exact linear algebra on tiny
nets, and the forward pass itself walked to or beyond the certified radius.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gloronet
from gloronet.certify import certify_dataset
from gloronet.models.liresnet import InputShift
from gloronet.nn import Flatten, LiResBlock, LiResStack, LipConv2d, LipLinear, MinMax, Normalize, Sequential

from conftest import half_scale_without_error_model

pytestmark = pytest.mark.usefixtures("single_thread")
D = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _mlp(dim=6, classes=3, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return gloronet.GloroNet(Sequential(Flatten(), LipLinear(dim, 8), MinMax()), LipLinear(8, classes), 0.1).to(dtype)


# --------------------------------------------------------------------------- hole 2: near-equal head rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_near_identical_head_rows_give_a_finite_sound_radius(dtype):
    """Rows differing by ~1e-38 (K ≈ 1e-38): the exact-arithmetic radius is astronomically large,
    yet far away the two logits tie in floating point. The sound radius stays below the distance at
    which the computed prediction changes."""
    head = LipLinear(2, 2).to(dtype)
    tiny = float(torch.finfo(dtype).tiny)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, tiny]], dtype=dtype))
        head.bias.copy_(torch.tensor([1e-3, 0.0], dtype=dtype))
    net = gloronet.GloroNet(Sequential(Flatten()), head, 0.0).to(dtype)
    x = torch.zeros(1, 2, dtype=dtype)
    exact = net.certify(x, arithmetic="exact")
    sound = net.certify(x)
    assert int(sound.pred) == 0 and exact.radius.item() > 1e30
    assert math.isfinite(sound.radius.item())
    # walk along e1: at distance t the logits are t + 1e-3 and t (+ tiny t): they tie once 1e-3 is rounded away
    def strictly_first(t):
        y = net.eval()(torch.tensor([[t, 0.0]], dtype=dtype))[0]
        return bool(y[0] > y[1])

    t = 1.0
    with torch.no_grad():
        while strictly_first(t) and t < 1e30:
            t *= 2
    assert t < 1e30  # the computed logits do tie: class 0 is no longer strictly first
    assert sound.radius.item() <= t


# --------------------------------------------------------------------------- hole 3: GloroNet as a body
def test_gloronet_inside_a_body_is_refused():
    inner = _mlp()
    with torch.no_grad():
        inner.head.weight.mul_(100.0)  # the head carries the true constant, the body does not
    outer = gloronet.GloroNet(Sequential(inner), LipLinear(3, 2), 0.1)
    for call in (outer.lipschitz_constant, lambda: outer.certify(torch.randn(2, 6))):
        with pytest.raises(gloronet.UnboundedLayerError, match="GloroNet"):
            call()
    with pytest.raises(gloronet.UnboundedLayerError):
        gloronet.GloroNet(inner, LipLinear(3, 2), 0.1).lipschitz_bound()


# --------------------------------------------------------------------------- hole 4: the cache key
class _PowerScale(gloronet.nn.LipschitzModule):
    """A real parameter whose name starts with ``power_`` (the old cache skipped such names)."""

    def __init__(self):
        super().__init__()
        self.power_scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return x * self.power_scale

    def lipschitz(self):
        return self.power_scale.abs()

    def lipschitz_bound(self):
        return math.nextafter(abs(float(self.power_scale)), math.inf)

    def error_model(self, in_shape, dtype, lip):
        return gloronet.fp.ErrorModel(lip=lip, rel=gloronet.fp.unit_roundoff(dtype) * lip)


def test_parameter_named_power_is_part_of_the_cache_key():
    net = gloronet.GloroNet(Sequential(Flatten(), _PowerScale()), LipLinear(4, 3), 0.1)
    L1 = net.lipschitz_bound()
    with torch.no_grad():
        net.body[1].power_scale.fill_(10.0)
    assert net.lipschitz_bound() >= 10 * L1 * (1 - 1e-9)


def test_declared_iterates_do_not_invalidate_but_everything_else_does(monkeypatch):
    net = _mlp()
    net.lipschitz_constant()
    calls = []
    orig = LipLinear.lipschitz_bound
    monkeypatch.setattr(LipLinear, "lipschitz_bound", lambda self: calls.append(self) or orig(self))
    net.train()
    net.pairwise_lipschitz()  # moves the power-iteration iterates only
    net.lipschitz_constant()
    assert calls == []
    with torch.no_grad():
        net.body[1].bias.add_(1.0)  # a bias does not change L, but it is part of the map
    net.lipschitz_constant()
    assert calls == [net.body[1]]


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("style", ["weight_norm", "spectral_norm"])
def test_forward_pre_hook_weights_are_refused(style):
    """Old-style weight_norm / spectral_norm rewrite ``weight`` in a forward pre-hook, after the
    bound would have read it: refused with a pointer to torch.nn.utils.parametrizations."""
    net = _mlp()
    getattr(nn.utils, style)(net.head)
    with pytest.raises(gloronet.UnboundedLayerError, match="parametrizations"):
        net.certify(torch.randn(2, 6))


def test_parametrized_head_bound_follows_its_parameters():
    net = _mlp()
    nn.utils.parametrizations.weight_norm(net.head)
    x = torch.randn(4, 6)
    K1 = net.lipschitz_constant()
    with torch.no_grad():
        net.head.parametrizations.weight.original0.mul_(3.0)  # the norm factor g
    K2 = net.lipschitz_constant()
    assert torch.allclose(K2, 3 * K1, rtol=1e-5)
    assert net.certify(x).radius.shape == (4,)


def test_forward_hooks_anywhere_are_refused():
    net = _mlp()
    handle = net.body[1].register_forward_hook(lambda m, a, out: 1000 * out)
    with pytest.raises(gloronet.UnboundedLayerError, match="hooks"):
        net.certify(torch.randn(2, 6))
    handle.remove()
    handle = net.register_forward_hook(lambda m, a, out: -out)
    with pytest.raises(gloronet.UnboundedLayerError, match="hooks"):
        net.certify(torch.randn(2, 6))
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, out: out)
    try:
        with pytest.raises(gloronet.UnboundedLayerError, match="global"):
            net.certify(torch.randn(2, 6))
    finally:
        handle.remove()
    assert net.certify(torch.randn(2, 6)).radius.shape == (2,)


def test_overridden_forwards_are_refused():
    class Doubled(LipLinear):
        def forward(self, x):
            return 2 * super().forward(x)

    net = gloronet.GloroNet(Sequential(Flatten(), Doubled(4, 4)), LipLinear(4, 3), 0.1)
    with pytest.raises(gloronet.UnboundedLayerError, match="overrides forward"):
        net.lipschitz_bound()
    net = _mlp()
    net.body[1].forward = lambda x: 5 * x
    with pytest.raises(gloronet.UnboundedLayerError, match="instance"):
        net.certify(torch.randn(2, 6))

    class Loud(gloronet.GloroNet):
        def forward(self, x):
            return 3 * super().forward(x)

    loud = Loud(Sequential(Flatten(), LipLinear(4, 4)), LipLinear(4, 3), 0.1)
    with pytest.raises(gloronet.UnboundedLayerError, match="GloroNet.forward"):
        loud.certify(torch.randn(2, 4))


def test_nonlinear_head_is_refused():
    class Head(nn.Linear):
        def forward(self, x):
            return super().forward(x) ** 3

    net = gloronet.GloroNet(Sequential(Flatten(), LipLinear(4, 4)), Head(4, 3), 0.1)
    with pytest.raises(gloronet.UnboundedLayerError, match="linear head"):
        net.certify(torch.randn(2, 4))


def test_liresblock_depth_and_input_size_are_part_of_the_key():
    """Plain attributes that shape the operator (LiResBlock.depth, LipConv2d.input_size) invalidate
    the cache: the bound equals that of a fresh model with the new value."""
    torch.manual_seed(0)
    block = LiResBlock(4, (5, 5), depth=1)
    with torch.no_grad():
        block.weight.mul_(30.0)
    net = gloronet.GloroNet(Sequential(block, Flatten()), LipLinear(100, 3), 0.1)
    L1 = net.lipschitz_bound()
    block.depth = 100
    fresh = copy.deepcopy(net)
    fresh._bound_cache = None
    L2 = net.lipschitz_bound()
    assert L2 == fresh.lipschitz_bound() and L2 < L1
    conv = LipConv2d(1, 2, 3, input_size=(4, 4))
    net = gloronet.GloroNet(Sequential(conv, Flatten()), LipLinear(32, 3), 0.1)
    net.lipschitz_bound()
    conv._set_input_size((8, 8))
    fresh = copy.deepcopy(net)
    fresh._bound_cache = None
    assert net.lipschitz_bound() == fresh.lipschitz_bound()
    shift = InputShift(0.0)
    net = gloronet.GloroNet(Sequential(shift, Flatten()), LipLinear(4, 3), 0.0)
    x = torch.zeros(2, 4)
    r1 = net.certify(x).radius
    shift.shift = 1e6  # changes the error model (the map's offset), not L
    r2 = net.certify(x).radius
    assert not torch.equal(r1, r2)


def test_editing_a_produced_weight_cannot_desynchronise_forward_and_bound():
    torch.manual_seed(0)
    layer = gloronet.nn.CholeskyOrthLinear(6, 6)
    net = gloronet.GloroNet(Sequential(layer), LipLinear(6, 3), 0.1).eval()
    x = torch.randn(4, 6)
    before = net(x)
    L = net.lipschitz_bound()
    layer.produced_weight().mul_(50.0)  # a copy: the map and its bound are unchanged
    assert torch.equal(net(x), before) and net.lipschitz_bound() == L


# --------------------------------------------------------------------------- hole 5: Normalize scales
def test_normalize_with_negative_or_zero_std():
    torch.manual_seed(0)
    norm = Normalize([0.5], [0.5])
    net = gloronet.GloroNet(Sequential(norm, Flatten()), LipLinear(4, 3), 0.1)
    state = net.state_dict()
    state["body.0.std"] = torch.tensor([-0.25]).view(1, 1, 1, 1)
    net.load_state_dict(state)
    assert net.lipschitz_bound() == pytest.approx(4.0) and net.lipschitz_bound() > 0
    cert = net.certify(torch.rand(8, 1, 2, 2))
    assert (cert.radius >= 0).all()
    state["body.0.std"] = torch.zeros(1, 1, 1, 1)
    net.load_state_dict(state)
    assert math.isinf(net.lipschitz_bound())
    assert not net.certify(torch.rand(8, 1, 2, 2)).certified.any()


# --------------------------------------------------------------------------- hole 6: mixed dtypes
def test_mixed_precision_models_are_refused():
    net = _mlp()
    net.body[1].double()
    with pytest.raises(ValueError, match="one dtype"):
        net.certify(torch.randn(2, 6))
    with pytest.raises(ValueError, match="one dtype"):
        net.lipschitz_constant()
    net.double()
    assert net.certify(torch.randn(2, 6)).logits.dtype == D


def test_float64_input_to_a_float32_model_shrinks_the_radius_by_the_cast():
    net = _mlp()
    x = torch.randn(16, 6, dtype=D, generator=_gen(1)) * 0.3 + 1 / 3
    r32 = net.certify(x.float()).radius
    r64 = net.certify(x).radius
    shift = (x - x.float().double()).norm(dim=1)
    assert (r64 <= r32 - shift + 1e-15).all() and (r64 >= r32 - 2 * shift - 1e-12).all()


# --------------------------------------------------------------------------- hole 7
def test_in_place_relu_does_not_mutate_the_input():
    net = gloronet.GloroNet(Sequential(nn.ReLU(inplace=True), Flatten(), LipLinear(4, 4)), LipLinear(4, 3), 0.1)
    x = torch.randn(5, 4, generator=_gen(2))
    before = x.clone()
    net.certify(x)
    net.certify(x, arithmetic="exact")
    assert torch.equal(x, before)


@pytest.mark.parametrize("arithmetic", ["float", "exact"])
def test_certified_is_exactly_radius_above_epsilon(arithmetic):
    """For ε equal to computed radii (and their neighbours) certified == radius > ε, the
    prediction does not depend on ε, and the dataset-level VRA equals the mean of correct &
    certified at that ε."""
    net = _mlp(seed=3)
    x = torch.randn(64, 6, generator=_gen(3))
    base = net.certify(x, arithmetic=arithmetic)
    slow = net.certify(x, arithmetic=arithmetic, fast=False)
    assert torch.equal(slow.pred, base.pred)
    labels = base.pred.clone()
    labels[::3] = (labels[::3] + 1) % 3
    for r in base.radius[base.radius > 0][:10].tolist():
        for eps in (r, math.nextafter(r, 0.0), math.nextafter(r, math.inf)):
            cert = net.certify(x, epsilon=eps, arithmetic=arithmetic)
            assert torch.equal(cert.certified, cert.radius > eps)
            assert torch.equal(net.certify(x, epsilon=eps, arithmetic=arithmetic, fast=False).radius, slow.radius)
            assert torch.equal(cert.pred, base.pred)
            # radii near ε may be proven larger (certify rechecks those with the certified program)
            assert torch.allclose(cert.radius, base.radius, rtol=1e-2, atol=0)
            net.epsilon = eps
            rep = certify_dataset(net, x.view(64, 1, 1, 6), labels, arithmetic=arithmetic)
            counted = rep["_correct"] & (rep["_radius"] > eps)  # how the dataset VRA counts
            assert torch.equal(counted, (cert.pred == labels) & cert.certified)


def test_float_certificates_are_never_larger_than_exact_ones():
    torch.manual_seed(0)
    net = gloronet.models.create("2c2f", (1, 28, 28), 10, 0.3)
    x = torch.rand(16, 1, 28, 28, generator=_gen(4))
    sound, exact = net.certify(x), net.certify(x, arithmetic="exact")
    assert torch.equal(sound.pred, exact.pred)
    assert (sound.radius <= exact.radius).all() and (sound.radius > 0).any()
    assert sound.arithmetic == "float" and exact.arithmetic == "exact"
    with pytest.raises(ValueError, match="arithmetic"):
        net.certify(x, arithmetic="fast")


def test_liresblock_with_a_foreign_activation_is_refused():
    stack = LiResStack(2, 4, (4, 4))
    stack.blocks[1].act = nn.Tanh()
    net = gloronet.GloroNet(Sequential(stack, Flatten()), LipLinear(64, 3), 0.1)
    with pytest.raises(gloronet.UnboundedLayerError, match="act"):
        net.lipschitz_bound()


def test_unknown_layer_without_error_model_certifies_only_in_exact_mode():
    net = gloronet.GloroNet(Sequential(Flatten(), half_scale_without_error_model()), LipLinear(4, 3), 0.1)
    x = torch.randn(3, 4)
    assert net.certify(x, arithmetic="exact").radius.shape == (3,)
    with pytest.raises(gloronet.UnboundedLayerError, match="error model"):
        net.certify(x)


def test_radius_stops_where_the_forward_pass_could_overflow():
    """Activations of 1e37 per unit of input: the float32 pass overflows to inf beyond ~17 units,
    so the certified radius must stop before that although the exact margin grows without bound."""
    body = Sequential(Flatten(), LipLinear(2, 2))
    head = LipLinear(2, 2)
    with torch.no_grad():
        body[1].weight.copy_(1e37 * torch.eye(2))
        body[1].bias.zero_()
        head.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        head.bias.zero_()
    net = gloronet.GloroNet(body, head, 0.0)
    x = torch.tensor([[1.0, 0.0]])
    cert, exact = net.certify(x), net.certify(x, arithmetic="exact")
    assert int(cert.pred) == 0 and 0 < cert.radius.item() < 17.1
    assert exact.radius.item() > cert.radius.item()
    with torch.no_grad():
        far = net.eval()(torch.tensor([[40.0, 0.0]]))
    assert not torch.isfinite(far).all()  # the computed logits really overflow out there
