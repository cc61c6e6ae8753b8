"""The float64 centre of certify's re-measured rows (:mod:`gloronet.centre64`).

1. Which bodies it evaluates: exactly the conv / dense / LiResNet block / input shift / MinMax /
   Flatten steps whose map is fixed by their float32 tensors; any other step (a subclass, an SLL
   block, an orthogonal layer) refuses.
2. Same real map: each float64 step stays within the float32 step's own error model of the
   float32 output (a different weight or bias would not) — on the shipped 4C3F and on a LiResNet
   with non-zero shifts, whose input shift float32 cannot represent.
3. Its margin bounds hold for the certified program: at ``x`` and at points ``x'`` within the
   radius, the float32 chunked program's margins are at least ``low − slope·‖x' − x‖`` (the same
   two models).
4. certify uses it: on the shipped 4C3F, rows re-measured this way certify at least as far as
   with the chunked centre, and some farther.
"""
from __future__ import annotations

import copy

import pytest
import torch

from gloronet import centre64, models, pretrained
from gloronet.data import load_dataset
from gloronet.gloro import _run_steps, error_model_of
from gloronet.models.liresnet import InputShift
from gloronet.nn import AOLLinear, LipLinear, SLLLinear, accumulate
from gloronet.nn.residual import LiResBlock
from gloronet.nn.state import eval_caches

pytestmark = pytest.mark.usefixtures("single_thread")


def test_supported_bodies_only():
    net = models.create("4c3f", (1, 28, 28), 10, epsilon=1.58)
    steps = net._sound_bounds().steps
    assert centre64.float64_steps(steps) is not None
    assert centre64.float64_steps([*steps[:-1], SLLLinear(512)]) is None
    assert centre64.float64_steps([AOLLinear(4, 4)]) is None  # weights derived from parameters

    class Rescaled(LipLinear):  # a subclass may map differently: refused by type, whatever it does
        pass

    assert centre64.float64_steps([Rescaled(4, 4)]) is None and centre64.float64_steps([LipLinear(4, 4)]) is not None
    chord = models.create("chord-6l32w", (3, 32, 32), 10, epsilon=0.14)  # orthogonal layers derive their weights
    assert centre64.float64_steps(chord._sound_bounds().steps) is None
    assert chord.eval()._float64_centre_radii(torch.rand(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)) is None
    lires = models.create("liresnet-6l32w", (3, 32, 32), 10, epsilon=0.14)
    assert centre64.float64_steps(lires._sound_bounds().steps) is not None

    class Block(LiResBlock):  # a residual block that inherits float64_map but not the class: refused
        pass

    assert centre64.float64_steps([Block(4, 8)]) is None and centre64.float64_steps([LiResBlock(4, 8)]) is not None


def _trained_looking_liresnet():
    """A LiResNet whose residual blocks have non-zero biases, running means and a stem shift that
    float32 cannot represent (the float64 map must add the same rounded scalar)."""
    torch.manual_seed(3)
    net = models.create("liresnet-6l32w", (3, 32, 32), 10, epsilon=0.14).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, LiResBlock):
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.gamma.normal_(1, 0.3)
            if isinstance(m, InputShift):
                m.shift = -0.4914
    return net, torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(4))


def _model_and_inputs(which: str, limit: int):
    """The shipped 4C3F and MNIST test images, or :func:`_trained_looking_liresnet` (16 inputs)."""
    if which == "4c3f":
        return pretrained.load("mnist-4c3f-eps1.58"), load_dataset("mnist", "test", limit=limit)[0]
    return _trained_looking_liresnet()


def _off_by_one_percent(step):
    """A copy of ``step`` with every floating tensor (and a shift scalar) scaled by 1.01."""
    wrong = copy.deepcopy(step)
    with torch.no_grad():
        for t in [*wrong.parameters(), *wrong.buffers()]:
            if t.is_floating_point():
                t.mul_(1.01)
    if isinstance(wrong, InputShift):
        wrong.shift *= 1.01
    for cache in eval_caches(wrong):
        cache.clear()
    return wrong


@pytest.mark.parametrize("which", ["4c3f", "liresnet"])
def test_each_float64_step_is_the_float32_map(which):
    net, x = _model_and_inputs(which, 64)
    b = net._sound_bounds()
    steps64 = centre64.float64_steps(b.steps)
    h = x
    with torch.no_grad():
        for step, f64, lip in zip(b.steps, steps64, b.lips):
            shape = tuple(h.shape[1:])
            out32 = step(h)
            with accumulate.fused():
                out64 = f64(h.double())
            m = error_model_of(step, shape, torch.float32, lip)
            gap = (out32.double() - out64).flatten(1).norm(dim=1)
            allowed = m.rel * h.double().flatten(1).norm(dim=1) + m.abs
            assert bool((gap <= allowed * 1.001 + 1e-12).all()), type(step).__name__
            if m.rel > 0:  # a wrong map (tensors off by one part in 100) would show
                with accumulate.fused():
                    wrong = _off_by_one_percent(step).float64_map()(h.double())
                assert bool(((out32.double() - wrong).flatten(1).norm(dim=1) > allowed).any()), type(step).__name__
            h = out32


def test_a_float32_forward_adds_a_python_scalar_rounded_to_float32():
    """What InputShift.float64_map assumes: ``x + s`` on a float32 tensor adds ``fl32(s)``. With
    ``s = 2⁻²⁵ + 2⁻⁵⁰``, ``1 + fl32(s)`` is a tie that rounds to 1; ``1 + s`` would round up."""
    s = 2.0**-25 + 2.0**-50
    shift = InputShift(s)
    one = torch.ones(3)
    assert torch.equal(shift(one), one)
    assert float(shift.float64_map()(one.double())[0]) == 1 + 2.0**-25


def _chunked_margins(net, x, pred):
    with torch.no_grad():
        y = net.head(net.body(x)).double()  # eval mode: the certified program (chunked sums)
    return y.gather(1, pred[:, None]) - y


@pytest.mark.parametrize("which", ["4c3f", "liresnet"])
def test_its_margin_bounds_hold_for_the_certified_program(which):
    net, x = _model_and_inputs(which, 256)
    pred = net.certify(x, fast=False).pred
    margins, _ = net._float64_centre_pass(x)
    low, slope = margins.rows(pred)
    other = ~torch.nn.functional.one_hot(pred, 10).bool()
    at_x = _chunked_margins(net, x, pred)
    assert bool((at_x[other] >= low[other]).all())
    assert float((at_x[other] - low[other]).min()) < 0.05 * float(at_x[other].abs().median())  # not vacuous
    gen = torch.Generator().manual_seed(0)
    radius = net._float64_centre_radii(x, pred)
    for scale in (0.5, 0.99):
        d = torch.randn(x.shape, generator=gen)
        d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * (scale * radius).view(-1, 1, 1, 1).float()
        moved = _chunked_margins(net, x + d, pred)
        r = d.flatten(1).norm(dim=1).double()[:, None]
        assert bool((moved[other] >= (low - slope * r)[other] - 1e-9).all())
        certified = radius > 0
        assert certified.sum() > len(x) // 2 and bool(((moved > 0) | ~other)[certified].all())  # class kept


def test_certify_remeasures_near_eps_rows_around_a_float64_centre():
    net = pretrained.load("mnist-4c3f-eps1.58")
    x = load_dataset("mnist", "test", limit=2000)[0]
    chunked = net.certify(x, fast=False)
    exact = net.certify(x, arithmetic="exact")
    near = (exact.radius > chunked.radius) & (exact.radius > 0.5)
    eps = [float(r) * (1 - 1e-4) for r in exact.radius[near][:64]]
    fast = net.certify(x, recheck_at=eps)
    rows = near.nonzero()[:64, 0]
    assert bool((fast.pred[rows] == chunked.pred[rows]).all())
    assert bool((fast.radius[rows] >= chunked.radius[rows]).all())
    assert int((fast.radius[rows] > chunked.radius[rows]).sum()) > len(rows) // 2
    gain = (fast.radius[rows] - chunked.radius[rows]) / (exact.radius[rows] - chunked.radius[rows])
    assert float(gain.median()) > 0.3  # the centre's share of the allowance, about half, is gone


def test_the_certified_programs_rounding_stays_in_the_bound_of_a_cancelling_layer():
    """A 4096-term body layer whose terms cancel (weights ``[A, −A + 10⁻³B]`` on inputs ``[u, u]``):
    the float32 chunked outputs stray from the float64 centre by far more than the head's rounding,
    so a bound that took the ball's error from the float64 models (or dropped it) would fail."""
    from test_fused_pass import _cancelling_net

    net = _cancelling_net("body")
    g = torch.Generator().manual_seed(5)
    u = torch.rand(300, 2048, generator=g) * 100
    x = torch.cat([u, u], 1)
    with torch.no_grad():
        y32 = net.head(net.body(x)).double()
    pred = y32.argmax(1)
    margins, _ = net._float64_centre_pass(x)
    assert float((y32 - margins.y).abs().max()) > 100 * float(margins.err.max())  # the construction bites
    low, _ = margins.rows(pred)
    other = ~torch.nn.functional.one_hot(pred, 3).bool()
    at_x = y32.gather(1, pred[:, None]) - y32
    assert bool((at_x[other] >= low[other]).all())


@pytest.mark.parametrize("edit", ["in place", "through .data", "load_state_dict"])
def test_the_float64_weights_kept_with_the_bounds_follow_every_edit(edit):
    """The float64 copies of the weights are made once and kept with the bounds: an edit of the
    model after a certify must reach the next float64 centre (a cache not keyed on the map would
    certify the old weights)."""
    torch.manual_seed(0)
    net = models.create("2c2f", (1, 28, 28), 10, epsilon=0.3).eval()
    x = torch.rand(8, 1, 28, 28)
    before = net._float64_centre_pass(x)[0].y.clone()
    assert net._float64_centre_pass(x)[0].y.equal(before)  # reused while nothing changed
    linear = [m for m in net.body.modules() if isinstance(m, LipLinear)][0]
    new = linear.weight.detach() * 0.5
    with torch.no_grad():
        if edit == "in place":
            linear.weight.copy_(new)
        elif edit == "through .data":
            linear.weight.data.copy_(new)
        else:
            linear.load_state_dict({**linear.state_dict(), "weight": new})
    fresh = models.create("2c2f", (1, 28, 28), 10, epsilon=0.3).eval()
    fresh.load_state_dict(net.state_dict())
    after = net._float64_centre_pass(x)[0].y
    assert not after.equal(before)
    assert after.equal(fresh._float64_centre_pass(x)[0].y)
