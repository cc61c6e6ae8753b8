"""The norms the fused pass does not measure (issue 18): ``certify``'s first pass and the eval
forward read ‖activation‖ again only where it holds at most :data:`gloronet.gloro.MEASURE_NORMS_UP_TO`
times the input's elements, and bound the others from the step's error model
(:func:`gloronet.error_plan.propagated_norms`: ``offset + (lip + rel)ρ + abs``).

* the propagated bound holds for the activations the fused kernels compute, on every registered
  architecture, with large biases (the ``offset`` term: a zero input) and saturated inputs;
* the fused passes measure exactly the activations within the limit (always the input, the
  body's output and the one after an unmeasured one), the certified program's own passes measure
  every one;
* the step's own rounding (``rel``) counts: a dense row applied to its own direction computes past
  ``lip·‖a‖`` by rounding alone;
* the guard never vouches for a row whose values may overflow at ``x`` (a propagated bound holds
  only up to the first overflow);
* a missing input norm, or a model list that does not match the steps, is refused;
* of the activations within the limit the fused passes measure only the input and the output at
  once and defer the others (:class:`gloronet.gloro._Deferred`): measured later for some rows they
  give exactly the norms the pass would have measured, an activation changed in place since is
  left propagated, and the guard of those rows is then exactly the guard of the full measurement.
"""
from __future__ import annotations

import math

import pytest
import torch

import gloronet
from gloronet import error_plan, fp, kernels, pretrained, radius
from gloronet.data import load_dataset
from gloronet.gloro import MEASURE_NORMS_UP_TO, _Deferred, _run_steps
from gloronet.nn import accumulate

from test_fused_pass import ARCHITECTURES

pytestmark = pytest.mark.usefixtures("single_thread")


def _with_large_biases(net: gloronet.GloroNet) -> gloronet.GloroNet:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in net.body.modules():
            b = m._parameters.get("bias")
            if b is not None:
                b.copy_(3 * torch.randn(b.shape, generator=g))
    return net


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_propagated_bounds_hold_for_the_activations_the_fused_kernels_compute(name):
    torch.manual_seed(0)
    net = _with_large_biases(gloronet.models.create(name, (1, 28, 28), 10, 0.3)).eval()
    x = torch.cat([torch.zeros(1, 1, 28, 28), torch.ones(1, 1, 28, 28), torch.rand(6, 1, 28, 28)])
    bounds = net._sound_bounds()
    with torch.no_grad(), kernels.sound_kernels(), accumulate.fused():
        acts, h = [], x
        for step in bounds.steps:
            acts.append(h)
            h = step(h)
        acts.append(h)
        _, measured, shapes = _run_steps(x, bounds.steps, measure=True)
    sparse = [measured[0]] + [None] * (len(measured) - 2) + [measured[-1]]  # every step's bound propagated
    profile = net._profile(bounds, tuple(shapes))
    propagated = error_plan.propagated_norms(profile.fused, sparse)
    for s, (bound, a) in enumerate(zip(propagated, acts)):
        true = a.double().flatten(1).norm(dim=1)  # float64 norm of the float32 values: exact to ~1e-16
        assert bool((bound >= true * (1 + 1e-12)).all()), f"{name}: step {s} ({type(bounds.steps[min(s, len(acts) - 2)]).__name__})"
    first_affine = next(s for s, m in enumerate(profile.fused) if m.offset > 0)
    assert float(acts[first_affine + 1][0].double().norm()) > 1  # the zero input's output is the bias alone


@pytest.mark.parametrize("name", ["4c3f", "liresnet-6l32w"])
def test_the_sparse_pass_never_leaves_two_activations_in_a_row_unmeasured(name):
    """With every activation over the limit (``measure_up_to=0``), one in two changes of norm is
    still measured: a propagated bound never spans two steps, however deep the body."""
    torch.manual_seed(0)
    net = gloronet.models.create(name, (1, 28, 28), 10, 0.3).eval()
    steps = net._sound_bounds().steps
    with torch.no_grad(), kernels.sound_kernels(), accumulate.fused():
        _, norms, _ = _run_steps(torch.rand(2, 1, 28, 28), steps, measure=True, measure_up_to=0)
    fresh = [0] + [s + 1 for s, step in enumerate(steps) if not gloronet.nn.base.never_increases_norm(step)]
    decided = [norms[s] is not None for s in fresh]  # measured where the norm may have changed
    assert norms[0] is not None and norms[-1] is not None
    assert not any(not a and not b for a, b in zip(decided, decided[1:])), decided
    assert decided.count(False) >= 2  # the sparse pass does skip


def test_the_fused_passes_measure_exactly_the_activations_within_the_limit(monkeypatch):
    torch.manual_seed(0)
    net = gloronet.models.create("4c3f", (1, 28, 28), 10, 1.58).eval()
    x = torch.rand(4, 1, 28, 28)
    sizes: list[int] = []
    original = fp.norm_upper
    monkeypatch.setattr(fp, "norm_upper", lambda h: sizes.append(math.prod(h.shape[1:])) or original(h))
    limit = MEASURE_NORMS_UP_TO * 784
    with torch.no_grad(), kernels.sound_kernels():
        acts, h = [], x
        for step in net._sound_bounds().steps:
            h = step(h)
            acts.append(math.prod(h.shape[1:]))
    assert max(acts) > limit  # the 4C3F's first convolution output (32×28×28) is over the limit
    for run in (lambda: net(x), lambda: net._margin_pass(x, "float", fused=True)):
        sizes.clear()
        run()
        assert sizes and max(sizes) <= limit and sizes[0] == 784 and sizes[-1] == acts[-1], sizes
    sizes.clear()
    net._margin_pass(x, "float", fused=False)  # the certified program's own pass: every norm measured
    assert max(sizes) == max(acts)


def test_propagation_refuses_a_missing_input_norm_or_a_model_list_of_another_length():
    m = fp.ErrorModel(lip=1.0)
    with pytest.raises(ValueError, match="input's norm"):
        error_plan.propagated_norms([m], [None, torch.ones(2)])
    with pytest.raises(ValueError, match="one model per step"):
        error_plan.propagated_norms([m, m], [torch.ones(2), None])


def test_the_steps_own_rounding_counts_where_the_lipschitz_bound_is_attained():
    """A 4096-term dense row applied to its own direction attains its Lipschitz bound (``lip`` is
    within 1e-12 of ‖w‖), so the computed output passes ``lip·‖a‖`` whenever the float32 sum rounds
    up: only the step's ``rel`` term covers it."""
    from gloronet.nn import LipLinear
    from gloronet.nn.base import error_model_of, lipschitz_bound_of

    g = torch.Generator().manual_seed(1)
    past, checked = 0, 0
    for _ in range(24):
        layer = LipLinear(4096, 1, bias=False).eval()
        with torch.no_grad():
            layer.weight.copy_(torch.rand(1, 4096, generator=g) + 0.5)
        lip = lipschitz_bound_of(layer)
        a = layer.weight.detach().clone()
        rho = torch.nextafter(a.double().norm(dim=1), torch.tensor(math.inf, dtype=torch.float64))  # ≥ ‖a‖, tight
        with torch.no_grad(), kernels.sound_kernels(), accumulate.fused():
            out = layer(a).double().norm(dim=1)
            model = error_model_of(layer, (4096,), torch.float32, lip)
        bound = error_plan.propagated_norms([model], [rho, None])[1]
        assert bool((bound >= out).all())
        past += int((out > lip * rho).sum())
        checked += 1
    assert checked == 24 and past > 0  # the construction bites: without rel the bound would fail


def test_rows_whose_values_may_overflow_are_never_vouched_for():
    """A propagated norm is a bound only up to the first overflow (which a ReLU after it can hide
    from every norm measured later), so the guard flags a row unless every step's values provably
    stay below the overflow threshold at ``x``."""
    net = pretrained.load("mnist-2c2f-eps0.3")
    x = load_dataset("mnist", "test", limit=16)[0]
    bounds = net._sound_bounds()
    with torch.no_grad(), kernels.sound_kernels(), accumulate.fused():
        h, norms, shapes = _run_steps(x, bounds.steps, measure=True)
        logits = net.head(h)
    profile = net._profile(bounds, tuple(shapes))
    errors = radius.body_errors(profile, norms, fused_centre=True)
    assert not bool(radius._may_overflow(profile, errors).any())
    base = radius.fused_may_differ(profile, bounds.D, errors, logits)
    sure = (~base).nonzero()[:, 0]
    assert len(sure) >= 2
    loads = errors.loads.clone()
    loads[sure[0], 1] = profile.threshold  # the values the second step computes may reach the threshold
    loads[sure[1], -2] = math.nan
    huge = errors._replace(loads=loads)
    flagged = radius._may_overflow(profile, huge)
    assert flagged.nonzero()[:, 0].tolist() == sorted(sure[:2].tolist())
    # only the loads changed (the margin test itself still passes): the range check alone flags them
    assert radius.fused_may_differ(profile, bounds.D, huge, logits).equal(base | flagged)
    # the loads cover the input of every step, not just the measured ends: one intermediate norm
    # as long as the threshold is enough
    for s in range(1, len(norms) - 1):
        big = [n.clone() for n in norms]
        big[s][sure[0]] = profile.threshold / profile.peak_rel[s] if profile.peak_rel[s] > 0 else math.inf
        assert radius._may_overflow(profile, radius.body_errors(profile, big, fused_centre=True)).nonzero()[:, 0].tolist() == [
            int(sure[0])], s


def _deferred_pass(net, x):
    """``(full norms, deferred norms, deferred, shapes, logits)`` of the fused pass with and without deferral."""
    steps = net._sound_bounds().steps
    deferred = _Deferred()
    with torch.no_grad(), kernels.sound_kernels(), accumulate.fused():
        _, full, shapes = _run_steps(x, steps, measure=True, measure_up_to=MEASURE_NORMS_UP_TO)
        h, lazy, _ = _run_steps(x, steps, measure=True, measure_up_to=MEASURE_NORMS_UP_TO, deferred=deferred)
        logits = net.head(h)
    return full, lazy, deferred, shapes, logits


def test_deferred_norms_measured_later_are_those_the_pass_would_have_measured():
    torch.manual_seed(0)
    net = gloronet.models.create("4c3f", (1, 28, 28), 10, 1.58).eval()
    x = torch.rand(6, 1, 28, 28)
    full, lazy, deferred, _, _ = _deferred_pass(net, x)
    assert len(deferred) >= 1 and lazy[0] is not None and lazy[-1] is not None
    assert [n is None for n in lazy].count(True) > [n is None for n in full].count(True)  # something was deferred
    kept = {s: a for positions, a, _ in deferred for s in positions}
    for rows in (torch.arange(6), torch.tensor([4, 1])):
        got = deferred.norms_of(lazy, rows)
        for s, (a, b) in enumerate(zip(got, full)):
            assert (a is None) == (b is None)
            if a is not None:  # the same measurement (up to the order of the reduction), an upper bound
                torch.testing.assert_close(a, b[rows], rtol=1e-6, atol=0)
                if s in kept:
                    assert bool((a >= kept[s][rows].double().flatten(1).norm(dim=1)).all())


def test_an_activation_changed_in_place_after_the_pass_is_left_propagated():
    a = torch.ones(3, 4)
    deferred = _Deferred([([1, 2], a, a._version)])
    norms = [torch.ones(3, dtype=torch.float64), None, None, torch.ones(3, dtype=torch.float64)]
    assert deferred.norms_of(norms, torch.tensor([0, 2]))[1] is not None
    a.mul_(0.5)  # the values the pass used are gone
    got = deferred.norms_of(norms, torch.tensor([0, 2]))
    assert got[1] is None and got[2] is None and torch.equal(got[0], norms[0][[0, 2]])


def test_the_guard_of_the_rows_measured_again_is_that_of_the_full_measurement():
    """Deferring only loosens the first guard (a superset of rows flagged); measured again, those
    rows get exactly the verdict of the fully measured pass."""
    net = pretrained.load("mnist-4c3f-eps1.58")
    x = load_dataset("mnist", "test", limit=1024)[0]
    full, lazy, deferred, shapes, logits = _deferred_pass(net, x)
    bounds = net._sound_bounds()
    profile = net._profile(bounds, tuple(shapes))
    exact = radius.fused_may_differ(profile, bounds.D, radius.body_errors(profile, full, fused_centre=True), logits)
    cheap = radius.fused_may_differ(profile, bounds.D, radius.body_errors(profile, lazy, fused_centre=True), logits)
    assert bool((cheap | ~exact).all())  # never vouches for a row the full measurement flags
    assert int(cheap.sum()) > int(exact.sum()) > 0  # the construction bites: deferral loosens, some rows flagged
    rows = cheap.nonzero()[:, 0]
    fine = radius.body_errors(profile, deferred.norms_of(lazy, rows), fused_centre=True)
    assert torch.equal(radius.fused_may_differ(profile, bounds.D, fine, logits[rows]), exact[rows])


def test_clear_rows_measure_only_the_input_and_the_output(monkeypatch):
    net = pretrained.load("mnist-2c2f-eps0.3")
    x = load_dataset("mnist", "test", limit=64)[0]
    sizes: list[tuple[int, int]] = []
    original = fp.norm_upper
    monkeypatch.setattr(fp, "norm_upper", lambda h: sizes.append(tuple(h.flatten(1).shape)) or original(h))
    with torch.no_grad():
        out = net(x)
    unsure_rows = [n for n, d in sizes[2:]]
    assert sizes[:2] == [(64, 784), (64, 100)], sizes  # the input, then the body's output
    assert all(n < 64 for n in unsure_rows), sizes  # anything else: measured for a few rows only
    assert torch.equal(out.argmax(1), net.certify(x, fast=False).pred)
