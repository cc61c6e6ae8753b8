"""The body's error recursion as one affine map of the measured norms (gloronet.error_plan).

The plan must dominate the recursion of gloronet.radius (module docstring) evaluated in exact
rational arithmetic, for any models, any pattern of measured / propagated norms and any norms,
and stay within rounding of it; infinities and NaNs must come out as +inf (nothing certifies).
"""
from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
import torch

from gloronet import error_plan, fp


def _model(rng: random.Random) -> fp.ErrorModel:
    def pick():
        return rng.choice([0.0, rng.uniform(0, 1e-6), rng.uniform(0, 1e-3), rng.uniform(0.1, 3.0), rng.uniform(1, 50)])

    return fp.ErrorModel(lip=rng.uniform(0.2, 3.0), rel=pick(), abs=pick(), offset=pick(),
                         peak_rel=rng.uniform(0.5, 4.0), peak_abs=pick())


def _exact(models, centre, norms, peak_rel, peak_abs):
    """(delta, ball, load) of the recursion in exact arithmetic; None norms are propagated."""
    F = Fraction
    rho, pc, p, balls = F(norms[0]), F(0), F(0), []
    for s, (m, c) in enumerate(zip(models, centre)):
        ball = rho + pc + p
        balls.append(ball)
        pc, p = F(c.lip) * pc + F(c.rel) * rho + F(c.abs), F(m.lip) * p + F(m.rel) * ball + F(m.abs)
        nxt = norms[s + 1]
        rho = F(nxt) if nxt is not None else F(c.offset) + (F(c.lip) + F(c.rel)) * rho + F(c.abs)
    balls.append(rho + pc + p)
    loads = [F(r) * b + F(a) for r, a, b in zip(peak_rel, peak_abs, balls)]
    return pc + p, balls[-1], loads


@pytest.mark.parametrize("seed", range(12))
def test_the_plan_dominates_the_exact_recursion_and_stays_within_rounding_of_it(seed):
    rng = random.Random(seed)
    steps = rng.randint(1, 9)
    models = [_model(rng) for _ in range(steps)]
    centre = [fp.ErrorModel(lip=m.lip, rel=m.rel * rng.uniform(1, 20), abs=m.abs * rng.uniform(1, 5), offset=m.offset,
                            peak_rel=m.peak_rel, peak_abs=m.peak_abs) for m in models]
    measured = (True, *(rng.random() < 0.5 for _ in range(steps - 1)), rng.random() < 0.8)
    peak_rel = [rng.uniform(0.5, 4.0) for _ in range(steps + 1)]
    peak_abs = [rng.uniform(0, 1) for _ in range(steps + 1)]
    rows = [[rng.choice([0.0, rng.uniform(0, 1e-3), rng.uniform(0.5, 100.0)]) for _ in range(steps + 1)] for _ in range(6)]
    norms = [torch.tensor([r[s] for r in rows], dtype=torch.float64) if measured[s] else None for s in range(steps + 1)]
    out = error_plan.plan(models, centre, measured, peak_rel, peak_abs, "cpu")(norms)
    for b, row in enumerate(rows):
        exact = _exact(models, centre, [v if measured[s] else None for s, v in enumerate(row)], peak_rel, peak_abs)
        got = [float(out.delta[b]), float(out.ball[b]), *out.loads[b].tolist()]
        for k, (value, want) in enumerate(zip(got, [exact[0], exact[1], *exact[2]])):
            assert Fraction(value) >= want, (k, b)
            assert value <= float(want) * (1 + 1e-6) + 1e-300, (k, b)


def test_the_plan_reads_the_centre_models_for_the_centre_and_for_propagated_norms():
    """Swapping the certified program's and the centre's models changes the result: each is read
    where it belongs (a plan built from one set only would pass the test above for some seeds)."""
    loose = fp.ErrorModel(lip=1.0, rel=1e-2, abs=1e-3, offset=0.5)
    tight = fp.ErrorModel(lip=1.0, rel=1e-6, abs=0.0, offset=0.5)
    norms = [torch.tensor([3.0], dtype=torch.float64), None, torch.tensor([2.0], dtype=torch.float64)]
    peaks = [1.0, 1.0, 1.0]
    a = error_plan.plan([tight, tight], [loose, loose], (True, False, True), peaks, peaks, "cpu")(norms)
    b = error_plan.plan([loose, loose], [tight, tight], (True, False, True), peaks, peaks, "cpu")(norms)
    for got, ref in zip((a, b), ((tight, tight), (loose, loose))):
        want = _exact(ref[0:2], [loose, loose] if ref[0] is tight else [tight, tight], [3.0, None, 2.0], peaks, peaks)
        for value, w in zip([float(got.delta[0]), float(got.ball[0]), *got.loads[0].tolist()], [want[0], want[1], *want[2]]):
            assert Fraction(value) >= w and value <= float(w) * (1 + 1e-6)
    assert float(a.delta[0]) != float(b.delta[0])


def test_infinite_or_nan_inputs_and_models_give_inf_never_nan():
    good = fp.ErrorModel(lip=1.0, rel=1e-3, abs=1e-4, offset=0.1)
    bad = fp.ErrorModel(lip=1.0, rel=math.nan)  # NaN weights: read as an infinite bound
    peaks = [1.0, 1.0, 1.0]
    norms = [torch.tensor([1.0, math.inf, 0.0], dtype=torch.float64), None, torch.tensor([1.0, 1.0, math.nan], dtype=torch.float64)]
    out = error_plan.plan([good, good], [good, good], (True, False, True), peaks, peaks, "cpu")(norms)
    for t in out:
        assert not bool(t.isnan().any())
        assert bool(t[0].isfinite().all()) and bool(t[1:].isinf().all())
    out = error_plan.plan([good, bad], [good, good], (True, False, True), peaks, peaks, "cpu")(norms)
    assert out.delta.isinf().all() and not out.delta.isnan().any()


def test_a_plan_refuses_an_unmeasured_input_and_mismatched_lengths():
    m = fp.ErrorModel(lip=1.0)
    with pytest.raises(ValueError, match="input's norm measured"):
        error_plan.plan([m], [m], (False, True), [1.0, 1.0], [0.0, 0.0], "cpu")
    with pytest.raises(ValueError):
        error_plan.plan([m], [m, m], (True, True), [1.0, 1.0], [0.0, 0.0], "cpu")
    with pytest.raises(ValueError):
        error_plan.plan([m], [m], (True, True), [1.0], [0.0], "cpu")


def test_products_that_underflow_are_covered():
    """Norms so small that their products with the coefficients are subnormal: each product may
    lose half a subnormal ulp, beyond any relative slack, and the plan must still dominate."""
    rng = random.Random(7)
    models = [fp.ErrorModel(lip=rng.uniform(0.3, 0.9), rel=rng.uniform(0.3, 0.9), abs=0.0, offset=0.0) for _ in range(4)]
    measured = (True, True, True, True, True)
    peaks = [rng.uniform(0.3, 0.9) for _ in range(5)]
    zeros = [0.0] * 5
    rows = [[rng.uniform(1e-321, 1e-320) for _ in range(5)] for _ in range(400)]
    norms = [torch.tensor([r[s] for r in rows], dtype=torch.float64) for s in range(5)]
    out = error_plan.plan(models, models, measured, peaks, zeros, "cpu")(norms)
    for b, row in enumerate(rows):
        exact = _exact(models, models, row, peaks, zeros)
        got = [float(out.delta[b]), float(out.ball[b]), *out.loads[b].tolist()]
        for k, (value, want) in enumerate(zip(got, [exact[0], exact[1], *exact[2]])):
            assert Fraction(value) >= want, (k, b)
