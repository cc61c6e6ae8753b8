"""The certificate's formulas pinned against an independent reference in 60-digit arithmetic
(tests/reference.py), both ways: every library upper bound is ≥ its reference and at most a
stated factor above it; every lower bound (margins, radii) the other way (issue 19, item 5).

Part A feeds the library's formula code and the reference the same float inputs, in
constructions where each term of each formula dominates in turn (so dropping or weakening any
term, constant or rounding direction shows). Part B certifies small networks of every layer type
and compares the radii with the reference's, built from SVDs of the explicit operators and the
exact norms of the computed activations.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import reference as ref
from conftest import impulse_matrix
from gloronet import GloroNet, fp, kernels, radius, relaxed, rounding
from gloronet.gloro import pairwise_row_distances_bound
from gloronet.models.liresnet import InputShift
from gloronet.nn import (
    CholeskyOrthConv2d,
    CholeskyOrthLinear,
    ChordLinear,
    ChordMLP,
    Flatten,
    InvertibleDownsampling,
    LiResStack,
    LipConv2d,
    LipLinear,
    LLNLinear,
    MinMax,
    Normalize,
    Sequential,
    accumulate,
)
from gloronet.nn.base import body_steps

pytestmark = pytest.mark.usefixtures("single_thread")
mpf = ref.mpf
F32, F64 = torch.float32, torch.float64
LOOSE = 1 + 2.0**-26  # formula code may exceed its exact value by INFLATE and a few roundings


def _upper(lib, exact, factor=LOOSE, slack=1e-300):
    """``lib`` is an upper bound of ``exact``, and not looser than ``factor``."""
    lib = mpf(float(lib))
    assert lib >= exact * ref.EXACT, (float(lib), float(exact))
    assert lib <= exact * factor + slack, (float(lib), float(exact))


def _lower(lib, exact, factor=LOOSE):
    """``lib`` is a lower bound of ``exact`` (a non-negative quantity), not looser than ``factor``."""
    lib = mpf(float(lib))
    assert lib <= exact / ref.EXACT, (float(lib), float(exact))
    assert lib >= exact / factor - mpf(10) ** -300, (float(lib), float(exact))


def _models_equal(lib: fp.ErrorModel, r: ref.Model, factor=LOOSE, slack=1e-300):
    for k in ("lip", "rel", "abs", "offset", "peak_rel", "peak_abs"):
        _upper(getattr(lib, k), getattr(r, k), factor, slack)


# =========================================================================== Part A: formulas
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("n", [1, 2, 7, 100, 4097, 2**20, 2**22])
def test_gamma(dtype, n):
    exact = ref.gamma(n, dtype)
    if exact == ref.mpmath.inf:
        assert math.isinf(rounding.gamma(n, dtype))
    else:
        _upper(rounding.gamma(n, dtype), exact)


def test_directed_rounding_helpers_bound_exact_values():
    """``round_up``, ``mul_up``, ``sqrt_up`` and the bounds built on them, at inputs where rounding
    to nearest goes DOWN (checked here), so that a helper rounding to nearest would fail."""
    from fractions import Fraction

    from gloronet.bounds import mul_up, round_up
    from gloronet.nn import Normalize
    from gloronet.rounding import sqrt_up

    a, b = 1.0565513677268088, 1.0848719951589216
    assert Fraction(a * b) < Fraction(a) * Fraction(b)  # the product rounds down
    assert Fraction(mul_up(a, b)) >= Fraction(a) * Fraction(b)
    x = 3.2079099672055698
    assert Fraction(math.sqrt(x)) ** 2 < Fraction(x)  # the root rounds down
    assert Fraction(sqrt_up(x)) ** 2 >= Fraction(x)
    assert Fraction(1 / 3.0) < Fraction(1, 3) and Fraction(round_up(1 / 3.0)) > Fraction(1, 3)
    assert Fraction(Normalize([0.0], [3.0]).lipschitz_bound()) >= Fraction(1, 3)  # 1/σ rounds down


def test_error_polynomials_are_inflated_over_their_evaluation_rounding():
    """``ErrorModel.then`` at inputs where the float64 evaluation of ``abs`` lands more than one
    ulp below its exact value (found by search; checked here): INFLATE (not one upward step) is
    what keeps it an upper bound."""
    first = fp.ErrorModel(lip=1.9398399758364362, rel=6.227633767112016, offset=9.119980324331118, abs=3.323598488136059)
    second = fp.ErrorModel(lip=3.393432573118453, rel=2.352535081428195, offset=1.4727596271488845, abs=12.09883093021923)
    plain = second.lip * first.abs + second.rel * (first.offset + first.abs) + second.abs
    want = ref.Model.of(first).then(ref.Model.of(second))
    assert mpf(math.nextafter(plain, math.inf)) < want.abs  # one upward step is not enough here
    _upper(first.then(second).abs, want.abs)


def test_norm_bound_covers_the_worst_rounding_the_model_allows(monkeypatch):
    """A float32 vector norm may come out as low as ``(1 − γ_{d+2})`` times the exact one (every
    square and sum rounded down): ``norm_upper`` must still cover it, i.e. divide by ``1 − γ``
    (``1 + 2γ``), not multiply by ``1 + γ`` (short by ``γ²`` ≈ 6e-8 at d = 4096)."""
    h = torch.randn(2, 4096, generator=torch.Generator().manual_seed(13))
    d = h.shape[1]
    exact = [ref.norm(ref.exact(h[b])) for b in range(2)]
    g = ref.gamma(d + 2, F32)
    worst = torch.tensor([float(e * (1 - g)) for e in exact], dtype=F32)  # the lowest value allowed
    monkeypatch.setattr(torch.linalg, "vector_norm", lambda t, dim=None: worst.to(t.dtype))
    got = fp.norm_upper(h)
    for b in range(2):
        assert mpf(float(got[b])) >= exact[b]


DOT_CASES = {
    "all terms": dict(lip=1.5, depth=40, n_terms=33, abs_weight_norm=2.5, row_abs_sum=3.0, out_numel=16, bias_norm=7.0, bias_max=2.0),
    "flush only": dict(lip=1.0, depth=9, n_terms=9, abs_weight_norm=0.0, row_abs_sum=0.0, out_numel=4, bias_norm=0.0, bias_max=0.0),
    "bias dominates": dict(lip=1.0, depth=9, n_terms=9, abs_weight_norm=0.0, row_abs_sum=0.0, out_numel=4, bias_norm=1e30, bias_max=1e30),
    "row sum dominates the flush": dict(lip=1.0, depth=5, n_terms=4, abs_weight_norm=0.0, row_abs_sum=1e25, out_numel=9, bias_norm=0.0, bias_max=0.0),
    "long sum": dict(lip=3.0, depth=2**21, n_terms=2**21, abs_weight_norm=1.0, row_abs_sum=1.0, out_numel=1, bias_norm=1.0, bias_max=1.0),
}


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("case", list(DOT_CASES), ids=str)
def test_dot_product_model(dtype, case):
    args = DOT_CASES[case]
    _models_equal(fp.dot_product_model(dtype=dtype, **args), ref.dot_product(dtype=dtype, **args))


def _random_models(seed, k, zero=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        v = (10.0 ** (6 * torch.rand(6, generator=g, dtype=F64) - 3)).tolist()
        if zero is not None:
            v[zero] = 0.0
        out.append(fp.ErrorModel(*v))
    return out


@pytest.mark.parametrize("zero", [None, 0, 1, 2, 3, 4, 5], ids=lambda z: f"zero-{z}")
def test_error_model_composition(zero):
    """``then`` and ``compose`` against the reference composition, each field once made 0 so that
    the terms it multiplies vanish and the others dominate."""
    models = _random_models(11 + (zero or 0), 5, zero)
    got = fp.compose(models)
    want = ref.Model.of(models[0])
    for m in models[1:]:
        want = want.then(ref.Model.of(m))
    _models_equal(got, want, factor=1 + 2.0**-24)
    _models_equal(models[0].then(models[1]), ref.Model.of(models[0]).then(ref.Model.of(models[1])))


@pytest.mark.parametrize("dtype", [F32, F64])
def test_elementwise_and_exact_models(dtype):
    _models_equal(fp.elementwise_model(1.0, 49, dtype), ref.elementwise(1, 49, dtype))
    _models_equal(fp.exact_model(2.5), ref.Model(lip=mpf(2.5)))


@pytest.mark.parametrize("abs_norm", [3.25, 0.0], ids=["all-terms", "flush-terms-dominate"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("positions", [1, 9])
def test_affine_error_model_wiring(bias, positions, abs_norm):
    """Terms per output (bias counted), outputs × positions, the bias over every position."""
    g = torch.Generator().manual_seed(5)
    rows = torch.randn(6, 10, generator=g)
    b = 1e3 * torch.randn(6, generator=g) if bias else None
    got = fp.affine_error_model(rows, b, 2.0, F32, positions, abs_weight_norm=abs_norm, depth=7)
    w = ref.exact(rows)
    bn = ref.norm(ref.exact(b)) * ref.mpmath.sqrt(positions) if bias else 0
    bmax = max(abs(v) for v in ref.exact(b)) if bias else 0
    want = ref.dot_product(2.0, 7, 10 + bias, abs_norm, max(sum(abs(v) for v in r) for r in w), 6 * positions, F32, bn, bmax)
    _models_equal(got, want)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_norm_upper(dtype):
    g = torch.Generator().manual_seed(6)
    rows = [torch.randn(4, 300, generator=g), 1e-25 * torch.randn(4, 300, generator=g), torch.full((1, 50), 3.0)]
    if dtype == F32:
        rows.append(torch.full((2, 40), 3e30))  # squares overflow float32: measured again in float64
    for h in rows:
        h = h.to(dtype)
        got = fp.norm_upper(h)
        d = h.shape[1]
        loose = (1 + 3 * ref.gamma(d + 2, dtype)) * LOOSE  # computed ≤ (1 + γ)·exact, then × (1 + 2γ), inflated
        for b in range(h.shape[0]):
            exact = ref.norm(ref.exact(h[b]))
            _upper(got[b], exact, factor=loose, slack=3 * ref.mpmath.sqrt(d * ref.lam_of(dtype)))


# --------------------------------------------------------------------------- radius.py
def test_radius_from_rows():
    g = torch.Generator().manual_seed(7)
    low = torch.cat([torch.randn(200, generator=g, dtype=F64), torch.tensor([0.0, -0.0, 1.0, 1.0, math.nan, 1.0, -1.0])])
    slope = torch.cat([torch.rand(200, generator=g, dtype=F64) * 10, torch.tensor([1.0, 1.0, 0.0, math.inf, 1.0, math.nan, 0.0])])
    got = radius.radius_from_rows(low, slope)
    for lo, sl, r in zip(low.tolist(), slope.tolist(), got.tolist()):
        if math.isnan(lo) or math.isnan(sl):
            assert r == 0.0
            continue
        _check_radius(r, ref.ratio(mpf(lo), mpf(sl)), factor=1 + 2.0**-50)


def _exact_overflow(peak_rel, peak_abs, rho0, slope, threshold):
    return [ref.overflow_radius([mpf(v) for v in peak_rel], [mpf(v) for v in peak_abs], [mpf(rho0[s][b]) for s in range(len(rho0))],
                                [mpf(v) for v in slope], mpf(threshold)) for b in range(len(rho0[0]))]


@pytest.mark.parametrize("dominant", ["peak_rel", "peak_abs"])
def test_overflow_radius(dominant):
    g = torch.Generator().manual_seed(8)
    S, B = 4, 6
    peak_rel = (10.0 ** (4 * torch.rand(S, generator=g, dtype=F64))).tolist()
    peak_abs = (10.0 ** (4 * torch.rand(S, generator=g, dtype=F64))).tolist()
    if dominant == "peak_abs":  # the constant part of the peaks takes most of the room
        peak_rel = [v * 1e-6 for v in peak_rel]
        peak_abs = [5e15 + v for v in peak_abs]
    rho0 = (10.0 ** (8 * torch.rand(S, B, generator=g, dtype=F64))).tolist()
    rho0[1][2] = 1e40  # no room at all for example 2 (elsewhere peaks stay below 1e12 ≪ the threshold)
    slope = [1.0, 0.0, 3.0, 7.5]
    col = lambda v: torch.tensor(v, dtype=F64)[:, None]  # noqa: E731
    loads = radius._up(col(peak_abs) + col(peak_rel) * torch.tensor(rho0, dtype=F64)).t()  # (B, S), as error_plan builds them
    got = radius._overflow_radius(loads, radius._up(col(peak_rel) * col(slope))[:, 0], 1e16)
    for r, want in zip(got.tolist(), _exact_overflow(peak_rel, peak_abs, rho0, slope, 1e16)):
        _check_radius(r, want, factor=1 + 2.0**-27)


# the regimes of margin_bounds: which term is made to dominate
REGIMES = {
    "balanced": dict(rel=1e-6, abs=1e-3, bias=1.0, h=1.0, dtype=F32),
    "body rel dominates (pc, p, Q)": dict(rel=0.05, abs=0.0, bias=0.0, h=1.0, dtype=F32),
    "body abs dominates": dict(rel=0.0, abs=10.0, bias=0.0, h=1.0, dtype=F32),
    "head reach dominates": dict(rel=0.0, abs=0.0, bias=1e7, h=1e3, dtype=F32),
    "flush terms dominate": dict(rel=0.0, abs=0.0, bias=0.0, h=1e-36, dtype=F32),
    "float64 model": dict(rel=1e-9, abs=1e-9, bias=1e3, h=1.0, dtype=F64),
    "overflow cap binds": dict(rel=1e-6, abs=0.0, bias=0.0, h=1.0, dtype=F32, peak=2e37),
}


def _margin_case(regime, seed=9, S=3, C=5, n=7, B=4):
    """Library and reference inputs of margin_bounds: a profile of S random models, a head,
    computed head inputs and logits, norms, D and K."""
    cfg = REGIMES[regime]
    dtype = cfg["dtype"]
    g = torch.Generator().manual_seed(seed)
    models = []
    for _ in range(S):
        lip = float(0.5 + torch.rand(1, generator=g))
        models.append(fp.ErrorModel(lip=lip, rel=cfg["rel"] * float(torch.rand(1, generator=g)), abs=cfg["abs"] * float(torch.rand(1, generator=g)),
                                    offset=1.0, peak_rel=cfg.get("peak", 2.0), peak_abs=1.0))
    w = torch.randn(C, n, generator=g, dtype=dtype)
    b = cfg["bias"] * torch.randn(C, generator=g, dtype=dtype)
    depth = n + 1
    hd = radius.Head.build(w, b, depth, dtype)
    profile = radius.make_profile(models, hd, dtype)
    h = (cfg["h"] * torch.randn(B, n, generator=g)).to(dtype)
    y = (h @ w.t() + b).to(dtype)  # the model's logits (any values: the bounds only use y_centre)
    norms = [fp.norm_upper(h) * (1 + s) for s in range(S)] + [fp.norm_upper(h)]
    D = pairwise_row_distances_bound(w)
    L = 1.0
    for m in models:
        L = math.nextafter(L * m.lip, math.inf)
    K = torch.nextafter(D * L, torch.full_like(D, math.inf))
    K.fill_diagonal_(0.0)
    return models, hd, profile, dtype, norms, h, y, w, b, depth, D, K


@pytest.mark.parametrize("regime", list(REGIMES), ids=str)
def test_margin_bounds_and_radii(regime):
    """``MarginBounds.rows`` (low, slope), the cap and the radii of GloRo and top-k certificates
    against the reference built from the same inputs; the float64 re-evaluation of the head is
    within the centre allowance of the exact logits."""
    models, hd, profile, dtype, norms, h, y, w, b, depth, D, K = _margin_case(regime)
    mb = radius.margin_bounds(y, K, D, profile, norms, h)
    rhead = ref.head(w, b, depth, dtype)
    for k in ("gamma", "lam_rel", "centre_gamma", "centre_lam_rel", "peak_rel", "peak_abs"):
        _upper(getattr(hd, k), getattr(rhead, k), factor=1 + 2.0**-24)
    for k in range(len(w)):
        _upper(hd.row_norm[k], rhead.row_norm[k])
        _upper(hd.lam_abs[k], rhead.lam_abs[k], factor=1 + 2.0**-24)
        _upper(hd.centre_lam_abs[k], rhead.centre_lam_abs[k], factor=1 + 2.0**-24)
    y_centre = ref.exact(mb.y)
    hx = ref.exact(h)
    for bi in range(len(hx)):  # the logits used at x are within the centre allowance
        for k in range(len(w)):
            exact_logit = sum(a * c for a, c in zip(rhead.w[k], hx[bi])) + rhead.b[k]
            reach = sum(abs(a) * abs(c) for a, c in zip(rhead.w[k], hx[bi])) + abs(rhead.b[k])
            assert abs(y_centre[bi][k] - exact_logit) <= rhead.centre_gamma * reach + rhead.centre_lam_rel * ref.norm(hx[bi]) + rhead.centre_lam_abs[k]
    want = ref.margins([ref.Model.of(m) for m in models], rhead, dtype, [ref.exact(t) for t in norms], hx, y_centre,
                       ref.exact(D), ref.exact(K))
    C = len(w)
    tol = mpf(2) ** -24  # what the upward-rounded evaluation of the terms may cost, relative to their size
    for a in range(C):
        low, slope = mb.rows(torch.full((len(hx),), a))
        for bi in range(len(hx)):
            for c in range(C):
                wl, ws = want.low[bi][a][c], want.slope[bi][a][c]
                assert mpf(float(low[bi, c])) <= wl + abs(wl) * (1 - ref.EXACT)
                assert mpf(float(low[bi, c])) >= wl - tol * want.scale[bi][a][c] - mpf(10) ** -300
                _upper(slope[bi, c], ws, factor=1 + tol)
    for bi in range(len(hx)):
        _check_radius(mb.cap[bi], want.cap[bi], loose=want.cap[bi] / (1 + tol))
    pred = mb.y.argmax(dim=1)
    radii = radius.certified_radii(mb, pred)
    for bi in range(len(hx)):
        _check_radius(radii[bi], ref.radius(want, bi, int(pred[bi])), ref.radius(want, bi, int(pred[bi]), tol))
    if regime == "overflow cap binds":  # the construction does what its name says
        uncapped = [min(ref.ratio(want.low[bi][int(pred[bi])][c], want.slope[bi][int(pred[bi])][c])
                        for c in range(C) if c != int(pred[bi])) for bi in range(len(hx))]
        assert any(want.cap[bi] < uncapped[bi] for bi in range(len(hx)))
    relax = relaxed.make_relaxation(C, top_k=3)
    cert = relaxed.certify_relaxed(mb, y, relax, 0.0, "float")
    for bi in range(len(hx)):
        order = torch.sort(y[bi].double(), descending=True, stable=True).indices.tolist()
        assert cert.classes[bi].tolist() == order[:3]
        tight, loose = ref.top_k_radii(want, bi, order, 3), ref.top_k_radii(want, bi, order, 3, tol)
        for k in range(3):
            _check_radius(cert.radii[bi, k], tight[k], loose[k])


def _check_radius(lib, want, loose=None, factor=None):
    """``lib`` is a lower bound of the radius ``want`` and at least ``loose`` (or ``want/factor``);
    radius 0 and "no constraint" (inf: the largest float) are matched exactly."""
    lib = mpf(float(lib))
    if want == 0:
        assert lib == 0
    elif want == ref.mpmath.inf:
        assert lib >= torch.finfo(F64).max
    else:
        assert lib <= want / ref.EXACT, (float(lib), float(want))
        floor = want / factor if factor is not None else loose
        assert lib >= floor - mpf(10) ** -300, (float(lib), float(want), float(floor))


def test_a_radius_equal_to_epsilon_never_certifies():
    """``certified`` / ``k`` need ``radius > ε`` strictly (GloRo and the relaxed certificates)."""
    radii = torch.tensor([[0.5, 0.25], [0.5, 0.5]], dtype=F64)
    groups = torch.full((2, 2), -1)
    k, _ = relaxed.certified_k(radii, groups, 0.5)
    assert k.tolist() == [0, 0]
    k, _ = relaxed.certified_k(radii, groups, 0.25)
    assert k.tolist() == [1, 2]


def test_exact_mode_margins_are_the_computed_ones():
    g = torch.Generator().manual_seed(10)
    y = torch.randn(3, 4, generator=g)
    K = torch.rand(4, 4, generator=g, dtype=F64)
    mb = radius.margin_bounds(y, K, K, None)
    low, slope = mb.rows(torch.tensor([0, 1, 2]))
    ye = ref.exact(y)
    for bi, a in enumerate([0, 1, 2]):
        for c in range(4):
            assert mpf(float(low[bi, c])) <= ye[bi][a] - ye[bi][c]
            assert float(slope[bi, c]) == float(K[a, c])


def test_pairwise_row_distances():
    g = torch.Generator().manual_seed(12)
    for w in [torch.randn(5, 9, generator=g), 1e-38 * torch.randn(4, 6, generator=g), 1e30 * torch.randn(3, 5, generator=g)]:
        D = pairwise_row_distances_bound(w)
        we = ref.exact(w)
        for i in range(len(we)):
            for j in range(len(we)):
                want = ref.norm([a - c for a, c in zip(we[i], we[j])])
                if i == j:
                    assert float(D[i, j]) == 0.0
                else:
                    _upper(D[i, j], want, factor=1 + 1e-7)


def test_pairwise_row_distances_allow_for_a_sum_of_squares_rounded_down():
    """Rows differing by ``[1, t, …, t]`` with ``t² = 2⁻⁵⁴`` (below half an ulp of 1): summed with
    1 in the same accumulator the squares are rounded away, ~2 ulps of the root here; the bound
    (``GRAM_SLACK``) must still cover the exact distance."""
    d = 4096
    w = torch.zeros(2, d, dtype=F64)
    w[0, 0], w[0, 1:] = 1.0, 2.0**-27
    exact = ref.mpmath.sqrt(1 + (d - 1) * mpf(2) ** -54)
    lossy = ref.mpmath.sqrt(mpf(float((w[0] ** 2).sum())))
    if lossy >= exact * (1 - mpf(2) ** -52):
        pytest.skip("this torch sums the squares without losing the small ones: nothing to cover")
    _upper(pairwise_row_distances_bound(w)[0, 1], exact, factor=1 + 1e-7)


def test_pairwise_constants_are_products_rounded_up():
    """``K_ji ≥ L·D_ji`` exactly for the library's own ``L`` and ``D`` (products that round down
    to nearest occur among these pairs: checked)."""
    from fractions import Fraction

    torch.manual_seed(14)
    net = GloroNet(Sequential(Flatten(), LipLinear(6, 8), MinMax()), LipLinear(8, 7), 0.1)
    L, K = net.lipschitz_bound(), net.lipschitz_constant()
    D = pairwise_row_distances_bound(net.head.applied_weight())
    down = 0
    for i in range(7):
        for j in range(7):
            if i != j:
                exact = Fraction(L) * Fraction(float(D[i, j]))
                assert Fraction(float(K[i, j])) >= exact
                down += Fraction(L * float(D[i, j])) < exact
    assert down > 0


def test_liresblock_error_model_formula():
    """``LiResBlock.error_model`` against its docstring's formula (reference arithmetic) with the
    library's own ``‖|R|‖`` bound as input: products rounded ``d + 2`` times, the skip twice, the
    shift once, the flush terms; then MinMax."""
    from gloronet.bounds import abs_conv2d_norm_bound
    from gloronet.nn import LiResBlock

    torch.manual_seed(15)
    block = LiResBlock(4, (5, 5), depth=2)
    with torch.no_grad():
        block.weight.mul_(20.0)
        block.bias.copy_(torch.randn(4))
        block.running_mean.copy_(torch.randn(4))
    block.eval()
    lip = block.lipschitz_bound()
    got = block.error_model((4, 5, 5), F32, lip)
    r = block.applied_residual_kernel()
    a_r = mpf(abs_conv2d_norm_bound(r, 1))
    n = 4 * 9
    depth = accumulate.rounding_depth(n, 4, bias=False) + 2
    shift = ref.exact(block.shift().detach())
    offset = ref.norm(shift) * ref.mpmath.sqrt(25)
    row_abs = 1 + max(sum(abs(v) for v in ref._flat(ref.exact(r[o]))) for o in range(4))
    gn, g2, g1, lam = ref.gamma(depth, F32), ref.gamma(2, F32), ref.gamma(1, F32), ref.lam_of(F32)
    sqrt_m = ref.mpmath.sqrt(100)
    want = ref.Model(lip=mpf(lip), rel=gn * a_r + g2 + (1 + gn) * lam * sqrt_m * ref.mpmath.sqrt(n + 2),
                     abs=g1 * offset + (1 + gn) * lam * sqrt_m * (row_abs + 2 * (n + 2)), offset=offset,
                     peak_rel=(1 + gn) * (1 + a_r), peak_abs=(1 + gn) * (max(abs(v) for v in shift) + lam * (row_abs + 2 * (n + 2))))
    _models_equal(got, want.then(ref.elementwise(1, 100, F32)))


# =========================================================================== Part B: networks
def _svd_norm(a: torch.Tensor) -> mpf:
    return mpf(float(torch.linalg.matrix_norm(a.to(F64), 2)))


def _affine_ref(A, bias, positions, depth, n_terms, dtype, rows=None) -> ref.Model:
    """An affine layer from its explicit operator ``A`` (d_out × d_in): lip and ``‖|A|‖`` by SVD."""
    rows = A if rows is None else rows
    b = ref.exact(bias) if bias is not None else [mpf(0)]
    bn = ref.norm(b) * ref.mpmath.sqrt(positions)
    bmax = max(abs(v) for v in b)
    row = max(sum(abs(v) for v in r) for r in ref.exact(rows))
    return ref.dot_product(_svd_norm(A), depth, n_terms, _svd_norm(A.abs()), row, A.shape[0], dtype, bn, bmax)


def _layer_ref(layer, in_shape, dtype) -> ref.Model:
    """The reference error model of one leaf layer (from the layer's docstring formula)."""
    if isinstance(layer, (Flatten, InvertibleDownsampling, nn.Identity)):
        return ref.Model(lip=mpf(1))
    numel = math.prod(in_shape)
    if isinstance(layer, (MinMax, nn.ReLU)):
        return ref.elementwise(1, numel, dtype)
    if isinstance(layer, LipConv2d):
        A = impulse_matrix(layer, in_shape)
        ho, wo = layer.output_hw(in_shape[-2:])
        n = layer.weight[0].numel()
        bias = layer.bias is not None
        depth = accumulate.rounding_depth(n, layer.weight.shape[1], bias) if layer.groups == 1 else n + bias
        return _affine_ref(A, layer.bias, ho * wo, depth, n + bias, dtype, rows=layer.weight.flatten(1))
    if isinstance(layer, CholeskyOrthConv2d):
        A = impulse_matrix(layer, in_shape)
        ho, wo = layer.output_hw(in_shape[-2:])
        M = layer.produced_weight()
        depth = accumulate.rounding_depth(M.shape[1], layer.in_channels, layer.bias is not None)
        model = _affine_ref(A, layer.bias, ho * wo, depth, M.shape[1] + (layer.bias is not None), dtype, rows=M)
        model.lip = _svd_norm(M)  # patches are disjoint: the operator's norm is ‖M‖ (A is its restriction)
        return model
    if isinstance(layer, ChordMLP):
        model = None
        for w, b in zip(layer.produced_weight().unbind(0), layer.bias.unbind(0)):
            depth = accumulate.rounding_depth(layer.features, layer.features, True)
            step = _affine_ref(w, b, 1, depth, layer.features + 1, dtype).then(ref.elementwise(1, numel, dtype))
            model = step if model is None else model.then(step)
        return model
    if isinstance(layer, LipLinear) or isinstance(layer, (CholeskyOrthLinear,)):
        w = layer.applied_weight() if isinstance(layer, LipLinear) else layer.produced_weight()
        bias = layer.bias is not None
        depth = accumulate.rounding_depth(w.shape[1], w.shape[1], bias)
        return _affine_ref(w, layer.bias, math.prod(in_shape[:-1]), depth, w.shape[1] + bias, dtype)
    if isinstance(layer, Normalize):
        mean, std = ref.exact(layer.mean.flatten()), [abs(v) for v in ref.exact(layer.std.flatten())]
        c, hw = in_shape[0], math.prod(in_shape[1:])
        inv = 1 / min(std)
        offset = ref.mpmath.sqrt(sum((mean[i] / std[i]) ** 2 for i in range(c)) * hw)
        g2, lam = ref.gamma(2, dtype), ref.lam_of(dtype)
        return ref.Model(lip=inv, rel=g2 * inv, abs=g2 * offset + 2 * lam * ref.mpmath.sqrt(numel) * (1 + inv), offset=offset,
                         peak_rel=(1 + g2) * max(1, inv), peak_abs=(1 + g2) * max(abs(v) for v in mean) * max(1, inv))
    if isinstance(layer, InputShift):
        u, root, s = ref.u_of(dtype), ref.mpmath.sqrt(numel), abs(mpf(layer.shift))
        offset = s * (1 + u) * root
        return ref.Model(lip=mpf(1), rel=u, abs=u * offset + 2 * ref.lam_of(dtype) * root, offset=offset, peak_rel=1 + u,
                         peak_abs=(1 + u) * s * (1 + u))
    if type(layer).__name__ == "LiResBlock":
        r = layer.applied_residual_kernel()
        k, width = layer.kernel_size, layer.width
        full = type(layer)(width, layer.input_hw, layer.depth, k, centering=False, activation=False).double()
        A = impulse_matrix(_Conv(r.double() + full._identity(r.double()), layer.pads), in_shape)
        absA = impulse_matrix(_Conv(r.double().abs(), layer.pads), in_shape)
        n = width * k * k
        depth = accumulate.rounding_depth(n, width, False) + 2
        hw = math.prod(in_shape[1:])
        shift = ref.exact(layer.shift().detach())
        offset = ref.norm(shift) * ref.mpmath.sqrt(hw)
        a_r = _svd_norm(absA)
        row_abs = 1 + max(sum(abs(v) for v in ref._flat(ref.exact(r[o])))for o in range(width))
        gn, g2, g1, lam = ref.gamma(depth, dtype), ref.gamma(2, dtype), ref.gamma(1, dtype), ref.lam_of(dtype)
        sqrt_m = ref.mpmath.sqrt(numel)
        model = ref.Model(lip=_svd_norm(A), rel=gn * a_r + g2 + (1 + gn) * lam * sqrt_m * ref.mpmath.sqrt(n + 2),
                          abs=g1 * offset + (1 + gn) * lam * sqrt_m * (row_abs + 2 * (n + 2)), offset=offset,
                          peak_rel=(1 + gn) * (1 + a_r), peak_abs=(1 + gn) * (max(abs(v) for v in shift) + lam * (row_abs + 2 * (n + 2))))
        return model.then(ref.elementwise(1, numel, dtype)) if isinstance(layer.act, MinMax) else model
    raise TypeError(f"no reference for {type(layer).__name__}")


class _Conv(nn.Module):
    """A bias-free zero-padded stride-1 convolution (for impulse matrices of kernels)."""

    def __init__(self, kernel, pads):
        super().__init__()
        self.kernel, self.pads = kernel, pads

    def forward(self, x):
        return torch.nn.functional.conv2d(torch.nn.functional.pad(x, self.pads), self.kernel.to(x.dtype))


def _reference_radii(net: GloroNet, x: torch.Tensor, top_k: int = 2):
    """Radii of the GloRo and top-k certificates from the reference: its error models, the exact
    norms of the activations the sound forward pass computes, the exact logits at x."""
    dtype = next(net.parameters()).dtype
    steps = body_steps(net.body)
    acts = []
    with torch.no_grad(), kernels.sound_kernels():
        a = x.to(dtype)
        for s in steps:
            acts.append(a)
            a = s(a)
        acts.append(a)
    models, lip = [], mpf(1)
    for s, a in zip(steps, acts):
        m = _layer_ref(s, tuple(a.shape[1:]), dtype)
        models.append(m)
        lip *= m.lip
    hw = net.head.applied_weight() if isinstance(net.head, LipLinear) else net.head.weight
    bias = net.head.bias
    depth = net.head.rounding_depth()
    rhead = ref.head(hw, bias, depth, dtype)
    h = ref.exact(acts[-1].flatten(1))
    norms = [[ref.norm(ref.exact(t[b])) for b in range(len(x))] for t in acts]
    if dtype == F64:  # the model's own logits at x, with their rounding allowance (as certify)
        with torch.no_grad(), kernels.sound_kernels():
            y_centre = ref.exact(net.head(acts[-1]))
    else:  # the exact logits at x: no centre error
        y_centre = [[sum(wv * hv for wv, hv in zip(rhead.w[k], h[b])) + rhead.b[k] for k in range(len(rhead.w))]
                    for b in range(len(h))]
        rhead.centre_gamma = rhead.centre_lam_rel = mpf(0)
        rhead.centre_lam_abs = [mpf(0)] * len(rhead.w)
    C = len(rhead.w)
    D = [[ref.norm([a - c for a, c in zip(rhead.w[i], rhead.w[j])]) for j in range(C)] for i in range(C)]
    K = [[lip * D[i][j] for j in range(C)] for i in range(C)]
    mg = ref.margins(models, rhead, dtype, norms, h, y_centre, D, K)
    return mg


def _net(kind: str, dtype=F32):
    torch.manual_seed({"dense": 0, "conv": 1, "residual": 2, "chord": 3, "huge-bias": 4}[kind])
    if kind in ("dense", "huge-bias"):
        body = Sequential(Flatten(), LipLinear(12, 10), MinMax(), LipLinear(10, 8), nn.ReLU())
        head = LipLinear(8, 4)
        if kind == "huge-bias":  # a common offset far above the margins: rounding of the logits dominates
            big = 1e4 if dtype == F32 else 1e12
            with torch.no_grad():
                for lay in (body[1], body[3]):
                    lay.bias.copy_(10 * torch.randn(lay.bias.shape))
                head.bias.copy_(big + torch.randn(head.bias.shape))
        shape = (3, 2, 2)
    elif kind == "conv":
        body = Sequential(Normalize([0.1, 0.2], [0.5, 2.0]), InputShift(-0.25), LipConv2d(2, 4, 3, input_size=(6, 6)), MinMax(),
                          LipConv2d(4, 4, 3, stride=2, groups=2, input_size=(6, 6)), InvertibleDownsampling(1), Flatten(), LipLinear(36, 6))
        head = LLNLinear(6, 4)
        shape = (2, 6, 6)
    elif kind == "residual":
        body = Sequential(LiResStack(2, 2, (4, 4)), CholeskyOrthConv2d(2, 6, 2), Flatten(), LipLinear(24, 6))
        head = LipLinear(6, 3)
        shape = (2, 4, 4)
    else:
        body = Sequential(Flatten(), CholeskyOrthLinear(8, 6), ChordMLP(6, 2), ChordLinear(6, depth=2), MinMax())
        head = LipLinear(6, 3)
        shape = (2, 2, 2)
    net = GloroNet(body, head, 0.1).to(dtype).eval()
    with torch.no_grad():  # leave the training-time init: weights of a "trained" scale
        for p in net.parameters():
            if p.dim() > 1:
                p.mul_(1.5)
    return net, shape


# how much looser than the reference each network's radii may be: the library bounds ‖A‖ by a
# certified eigenvalue (~1e-7 loose) and, for convolutions, ‖|A|‖ by its circular norm at
# frequency 0 (looser, in the rounding terms only, which cost these radii 1e-5 to 3e-3)
NETS = {("dense", F32): 1e-6, ("conv", F32): 3e-4, ("residual", F32): 2e-4, ("chord", F32): 1e-6,
        ("huge-bias", F32): 1e-6, ("huge-bias", F64): 1e-6}


@pytest.mark.parametrize("kind,dtype", list(NETS), ids=lambda v: str(v).replace("torch.", ""))
def test_network_radii_against_the_reference(kind, dtype):
    """Every layer type in a small network: ``certify`` never certifies more than the reference
    (radius ≤ the reference's) and never less than the reference over ``1 + NETS[...]``, a margin
    smaller than what rounding costs them (so a dropped or inflated term shows); the same for the
    top-2 certificate."""
    net, shape = _net(kind, dtype)
    x = torch.rand(6, *shape, generator=torch.Generator().manual_seed(1))
    cert = net.certify(x, fast=False)  # the reference analyses the certified (chunked) program's own pass
    fast = net.certify(x)  # a fused centre: never more, a little less
    top = net.certify(x, top_k=2)
    mg = _reference_radii(net, x)
    factor = 1 + mpf(NETS[(kind, dtype)])
    for b in range(len(x)):
        want = ref.radius(mg, b, int(cert.pred[b]))
        got = float(cert.radius[b])
        assert mpf(got) <= want * (1 + mpf(10) ** -9), (b, got, float(want))
        assert mpf(float(fast.radius[b])) <= want * (1 + mpf(10) ** -9), (b, float(fast.radius[b]), float(want))
        assert mpf(got) >= want / factor, (b, got, float(want))
        order = torch.sort(cert.logits[b], descending=True, stable=True).indices.tolist()
        for k, r in enumerate(ref.top_k_radii(mg, b, order, 2)):
            g = float(top.radii[b, k])
            assert mpf(g) <= r * (1 + mpf(10) ** -9) and mpf(g) >= r / factor, (b, k, g, float(r))
    exact = net.certify(x, arithmetic="exact").radius
    assert bool((cert.radius > 0).any())  # the comparison is not vacuous ...
    assert bool((cert.radius < exact / (1 + 2 * float(NETS[(kind, dtype)]))).any())  # ... and rounding matters more than the slack
