"""One state fingerprint for every cache (issue 19, item 3): edit a certified model three ways —
the geometry a memoised bound depends on, an attribute that is not a Python number, a tensor
handed out by a public accessor — and certify must follow (each failed on the code before).

Oracle: a model built afresh with the edited state (no cache), compared bit for bit.
"""
from __future__ import annotations

import copy
import enum
import fractions
import math
import types

import numpy as np
import pytest
import torch

import gloronet
from gloronet import fp
from gloronet.nn import (
    CholeskyOrthConv2d,
    ChordLinear,
    ChordMLP,
    Flatten,
    LiResBlock,
    LipLinear,
    LipschitzModule,
    LLNLinear,
    MinMax,
    Sequential,
)
from gloronet.nn.state import FingerprintError, MapState, freeze

pytestmark = pytest.mark.usefixtures("single_thread")


def _uncached(net):
    """The same model and state with every cache emptied (the oracle)."""
    fresh = copy.deepcopy(net)
    fresh._bound_cache = None
    for cache in gloronet.nn.state.eval_caches(fresh):
        cache.clear()
    return fresh


# --------------------------------------------------------------------------- 1: a memo keyed on less
def test_a_blocks_bound_follows_its_input_size():
    """LiResBlock memoised its bound on its kernel only: after ``input_hw`` changed, certify used
    the bound of the old geometry."""
    torch.manual_seed(0)
    block = LiResBlock(4, (6, 6), depth=1)
    with torch.no_grad():
        block.weight.mul_(40.0)
    net = gloronet.GloroNet(Sequential(block, Flatten()), LipLinear(4 * 3 * 3, 3), 0.1).eval()
    net.lipschitz_bound()
    block.input_hw = (3, 3)  # now applied to 3x3 inputs (the head takes 4·3·3 features)
    x = torch.rand(5, 4, 3, 3)
    fresh = LiResBlock(4, (3, 3), depth=1)
    with torch.no_grad():
        for name in ("weight", "gamma", "bias", "running_mean"):
            getattr(fresh, name).copy_(getattr(block, name))
    oracle = gloronet.GloroNet(Sequential(fresh, Flatten()), copy.deepcopy(net.head), 0.1).eval()
    assert torch.equal(net(x), oracle(x))
    assert net.lipschitz_bound() == pytest.approx(oracle.lipschitz_bound(), rel=1e-9)
    assert torch.equal(net.certify(x).radius, oracle.certify(x).radius)


@pytest.mark.parametrize("layer,attr,value", [
    (lambda: ChordLinear(8, depth=1), "depth", 9),
    (lambda: ChordLinear(8, depth=1), "eps", 0.3),
    (lambda: ChordLinear(8, depth=1), "relative_eps", False),
    (lambda: CholeskyOrthConv2d(2, 8, 2), "eps", 0.5),
    (lambda: ChordMLP(8, 2), "eps", 0.5),
    (lambda: LLNLinear(8, 8), "in_features", 8),  # unchanged value: nothing to recompute
], ids=["chord-depth", "chord-eps", "chord-relative", "patch-eps", "mlp-eps", "lln-same"])
def test_derived_weights_follow_every_attribute(layer, attr, value):
    """Every layer with a derived weight: after an attribute edit, the forward pass, the bound and
    the error model equal those of an uncached copy."""
    torch.manual_seed(1)
    lay = layer().eval()
    in_shape = (2, 4, 4) if isinstance(lay, CholeskyOrthConv2d) else (8,)
    x = torch.randn(3, *in_shape)
    lay(x), lay.lipschitz_bound()
    setattr(lay, attr, value)
    fresh = copy.deepcopy(lay)
    assert torch.equal(lay(x), fresh(x))
    assert lay.lipschitz_bound() == fresh.lipschitz_bound()
    m1 = lay.error_model(in_shape, torch.float32, lay.lipschitz_bound())
    assert m1 == fresh.error_model(in_shape, torch.float32, fresh.lipschitz_bound())


# --------------------------------------------------------------------------- 2: values of any type
class _Scale(LipschitzModule):
    """``x ↦ factor·x`` for a factor held in any Python / numpy container."""

    def __init__(self, factor, read):
        super().__init__()
        self.factor, self.read = factor, read

    def value(self) -> float:
        return float(self.read(self.factor))

    def forward(self, x):
        return x * self.value()

    def lipschitz(self):
        return torch.tensor(abs(self.value()))

    def lipschitz_bound(self):
        return math.nextafter(abs(self.value()), math.inf)

    def error_model(self, in_shape, dtype, lip):
        return fp.ErrorModel(lip=lip, rel=fp.up(fp.unit_roundoff(dtype) * lip))


class _Colour(enum.Enum):
    DIM = 1.0
    BRIGHT = 40.0


def _set(attr):
    def edit(layer, new):
        layer.factor = new

    return edit


def _item(key):
    def edit(layer, new):
        layer.factor[key] = new

    return edit


VALUE_CASES = [
    ("numpy-scalar", np.float32(1.0), lambda f: f, _set("factor"), np.float32(40.0)),
    ("numpy-0d-in-place", np.array(1.0), lambda f: f[()], _item(()), 40.0),
    ("numpy-int-in-tuple", (np.int64(1),), lambda f: f[0], _set("factor"), (np.int64(40),)),
    ("list-in-place", [1.0], lambda f: f[0], _item(0), 40.0),
    ("dict-of-numpy", {"k": np.float64(1.0)}, lambda f: f["k"], _item("k"), np.float64(40.0)),
    ("fraction", fractions.Fraction(1), lambda f: f, _set("factor"), fractions.Fraction(40)),
    ("enum", _Colour.DIM, lambda f: f.value, _set("factor"), _Colour.BRIGHT),
]


@pytest.mark.parametrize("case", VALUE_CASES, ids=[c[0] for c in VALUE_CASES])
def test_attribute_values_of_any_type_are_fingerprinted(case):
    _, factor, read, edit, new = case
    torch.manual_seed(2)
    net = gloronet.GloroNet(Sequential(Flatten(), _Scale(factor, read), LipLinear(4, 6), MinMax()), LipLinear(6, 3), 0.1)
    x = torch.rand(6, 4)
    before = net.certify(x).radius
    edit(net.body[1], new)
    after = net.certify(x).radius
    assert torch.equal(after, _uncached(net).certify(x).radius)
    assert not torch.equal(before, after)  # the edit mattered: ×40 moves every radius


def test_values_it_cannot_fingerprint_are_refused_by_name():
    net = gloronet.GloroNet(Sequential(Flatten(), _Scale(types.SimpleNamespace(k=1.0), lambda f: f.k)),
                            LipLinear(4, 3), 0.1)
    with pytest.raises(FingerprintError, match=r"_Scale\.factor holds a SimpleNamespace") as info:
        net.certify(torch.rand(2, 4))
    assert "\n" not in str(info.value)


def test_freeze_is_exact():
    """Bit-level equality: −0.0 ≠ 0.0, NaN = NaN (same bits), int ≠ float ≠ bool, types kept."""
    assert freeze(0.0, "v") != freeze(-0.0, "v") and freeze(math.nan, "v") == freeze(math.nan, "v")
    assert len({repr(freeze(v, "v")) for v in (1, 1.0, True, np.float64(1.0), np.float32(1.0), np.int64(1))}) == 6
    t = torch.tensor([0.0, math.nan])
    assert freeze(t, "v") == freeze(t.clone(), "v") and freeze(t, "v") != freeze(torch.tensor([-0.0, math.nan]), "v")
    assert freeze(t[::2], "v") == freeze(torch.tensor([0.0]), "v")  # views compare by value
    with pytest.raises(FingerprintError):
        freeze(np.array([object()]), "v")


def test_declared_derived_attributes_are_not_part_of_the_fingerprint():
    class Counting(_Scale):
        derived_attributes = ("calls",)

        def forward(self, x):
            self.calls = getattr(self, "calls", 0) + 1
            return super().forward(x)

    layer = Counting(1.0, lambda f: f)
    state = MapState(layer)
    layer(torch.ones(1))
    assert state.matches(layer)
    layer.factor = 2.0
    assert not state.matches(layer)


# --------------------------------------------------------------------------- 3: accessors are copies
def _edits():
    torch.manual_seed(3)
    lln = LLNLinear(6, 3)
    block = LiResBlock(2, (3, 3))
    chord = ChordLinear(6, depth=2)
    return [
        ("LLNLinear.applied_weight", Sequential(Flatten(), LipLinear(18, 6)), lln, lambda: lln.applied_weight()),
        ("LLNLinear.head_weight", Sequential(Flatten(), LipLinear(18, 6)), lln, lambda: lln.head_weight()),
        ("LiResBlock.applied_residual_kernel", Sequential(block, Flatten(), LipLinear(18, 6)), LipLinear(6, 3),
         lambda: block.applied_residual_kernel()),
        ("ChordLinear.weight_matrix", Sequential(Flatten(), LipLinear(18, 6), chord), LipLinear(6, 3),
         lambda: chord.weight_matrix()),
        ("ChordLinear.produced_weight", Sequential(Flatten(), LipLinear(18, 6), chord), LipLinear(6, 3),
         lambda: chord.produced_weight()),
    ]


@pytest.mark.parametrize("case", _edits(), ids=lambda c: c[0])
def test_public_accessors_cannot_change_the_map_behind_its_bound(case):
    """Editing what a public accessor returns (in eval mode) leaves the eval forward, the bound
    and the certificates exactly as they were (they used to alias the cached tensor)."""
    _, body, head, accessor = case
    net = gloronet.GloroNet(body, head, 0.1).eval()
    x = torch.rand(4, 2, 3, 3)
    logits, L, radius = net(x), net.lipschitz_bound(), net.certify(x).radius
    with torch.no_grad():
        accessor().mul_(50.0)
    assert torch.equal(net(x), logits)
    assert net.lipschitz_bound() == L
    assert torch.equal(net.certify(x).radius, radius)
