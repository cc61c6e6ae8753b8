"""Provable operator-norm bounds against exact singular values.

Oracle: the layer's explicit matrix, built by feeding impulses through the layer's own forward
(float64 copy, bias subtracted), and its spectral norm from a full SVD. Nothing here uses
``bounds.conv2d_explicit_matrix`` or ``bounds.conv2d_adjoint`` as an oracle.
Soundness (bound >= exact) is asserted with no tolerance at all.
"""
from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from conftest import exact_norm, impulse_matrix, power_norm
from gloronet import bounds
from gloronet.nn import LipConv2d, LipLinear

pytestmark = pytest.mark.usefixtures("single_thread")

TIGHT = 1.05  # DESIGN.md: a bound is <= 1.05x the true operator norm
EXACT_TIGHT = 1.0001  # exact paths (SVD / explicit Gram) are exact up to the rounding allowance


# --------------------------------------------------------------------------- case generation
def _conv_cases():
    """Every (kernel, stride, padding, groups) combination, each with its own odd/even, square or
    rectangular input size in 5..16 and a few channels (seeded, so reproducible)."""
    rng = random.Random(1234)
    cases = []
    for k, s, p, g in itertools.product([1, 2, 3, 4, 5], [1, 2, 3], ["same", "valid", 1, 2], [1, 2]):
        h = rng.randint(max(5, k), 16)
        w = h if rng.random() < 0.6 else rng.randint(max(5, k), 16)
        cin = g * rng.randint(1, 2)
        cout = g * rng.randint(1, 3)
        cases.append((k, s, p, g, cin, cout, (h, w)))
    return cases


CONV_CASES = _conv_cases()


def _random_conv(k, s, p, g, cin, cout, hw, seed, bias=True):
    gen = torch.Generator().manual_seed(seed)
    layer = LipConv2d(cin, cout, k, stride=s, padding=p, groups=g, bias=bias, input_size=hw)
    scale = math.exp(float(torch.randn((), generator=gen)))  # random scale: norms far from 1
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * scale)
        if bias:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen))
    return layer


def _conv_exact(layer):
    return exact_norm(impulse_matrix(layer, (layer.in_channels, *layer.input_hw)))


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "k{}s{}p{}g{}_{}to{}_{}x{}".format(*c[:6], *c[6]))
def test_conv_bound_sound_and_tight(case):
    """LipConv2d.lipschitz_bound() >= exact norm (no tolerance) and <= 1.05x it; the FFT bound is
    sound too; forcing either path through ``exact_max_dim`` keeps soundness, and the explicit path
    is exact up to rounding."""
    k, s, p, g, cin, cout, hw = case
    layer = _random_conv(*case, seed=CONV_CASES.index(case))
    exact = _conv_exact(layer)
    assert exact > 0
    bound = layer.lipschitz_bound()
    assert bound >= exact
    assert bound <= TIGHT * exact

    pads = layer.pads(hw)
    fft = bounds.conv2d_fft_bound(layer.weight, hw, s, pads, g)
    assert fft >= exact
    forced_fft = bounds.conv2d_norm_bound(layer.weight, hw, s, pads, g, exact_max_dim=0)
    assert forced_fft >= exact
    assert forced_fft == pytest.approx(fft, rel=1e-12)
    forced_exact = bounds.conv2d_norm_bound(layer.weight, hw, s, pads, g, exact_max_dim=10**9)
    assert exact <= forced_exact <= EXACT_TIGHT * exact


def test_conv_output_geometry_matches_torch():
    """'same' padding gives ceil(n/s) outputs (TensorFlow convention); int/valid padding match
    torch's own conv2d output size; output_hw agrees with the actual forward."""
    for k, s, p, g, cin, cout, hw in CONV_CASES:
        layer = LipConv2d(cin, cout, k, stride=s, padding=p, groups=g, input_size=hw)
        out = layer(torch.zeros(1, cin, *hw))
        assert tuple(out.shape[-2:]) == layer.output_hw(hw)
        if p == "same":
            assert tuple(out.shape[-2:]) == (math.ceil(hw[0] / s), math.ceil(hw[1] / s))
        else:
            pp = 0 if p == "valid" else p
            ref = F.conv2d(torch.zeros(1, cin, *hw), layer.weight, stride=s, padding=pp, groups=g)
            assert out.shape == ref.shape


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("n", [14, 16])
@pytest.mark.parametrize("p", ["same", "valid", 1])
def test_fft_bound_tightness_on_large_maps(k, n, p):
    """Stride-1 circular (FFT) bound on 14x14+ maps: sound, exact for 1x1 kernels, within 2% for
    k <= 2, and its excess shrinks with the map, ``fft/exact - 1 <= 0.5 (k-1)/n`` (measured worst:
    ~0.4 (k-1)/n; k=5 on 14x14 'valid' reaches +11%, so the FFT path alone is NOT within 1% of
    exact at 14x14 for k >= 3)."""
    layer = _random_conv(k, 1, p, 1, 2, 2, (n, n), seed=100 * k + n + (7 if p == "same" else 0))
    exact = _conv_exact(layer)
    fft = bounds.conv2d_fft_bound(layer.weight, (n, n), 1, layer.pads((n, n)), 1)
    assert fft >= exact
    assert fft / exact - 1 <= 0.5 * (k - 1) / n + 1e-6
    if k <= 2:
        assert fft <= 1.02 * exact


def test_fft_bound_tight_on_cifar_sized_map():
    """On a 32x32 map (k=3, 'same', 8 channels) the FFT bound is within 1% of the true norm
    (oracle: float64 power iteration with an autograd adjoint, a lower bound of the truth)."""
    layer = _random_conv(3, 1, "same", 1, 8, 8, (32, 32), seed=5)
    est = power_norm(layer, (8, 32, 32), iters=150)
    fft = bounds.conv2d_fft_bound(layer.weight, (32, 32), 1, layer.pads((32, 32)), 1)
    bound = layer.lipschitz_bound()  # d = 8192 > EXACT_MAX_DIM: the FFT path is the chosen one
    assert bound == pytest.approx(fft, rel=1e-12)
    assert fft >= est
    assert fft <= 1.01 * est


def test_grouped_conv_on_small_map_is_tight():
    """A grouped conv (64 channels, 16 groups, k=5, 8x8, 'same'): the block-diagonal operator's
    exact norm is the max over per-group blocks (each 256x256, fed with impulses through the
    layer's forward); the chosen bound must be within 1.05x of it."""
    layer = _random_conv(5, 1, "same", 16, 64, 64, (8, 8), seed=0, bias=False)
    lay = layer.double()
    exact = 0.0
    with torch.no_grad():
        for g in range(16):
            eye = torch.eye(4 * 64, dtype=torch.float64).view(256, 4, 8, 8)
            x = torch.zeros(256, 64, 8, 8, dtype=torch.float64)
            x[:, 4 * g : 4 * g + 4] = eye
            a = lay(x)[:, 4 * g : 4 * g + 4].reshape(256, -1)
            exact = max(exact, exact_norm(a))
    layer = layer.float()
    bound = layer.lipschitz_bound()
    assert bound >= exact
    assert bound <= TIGHT * exact


def test_ungrouped_conv_just_above_exact_max_dim_is_tight():
    """LipConv2d(33, 33, 5, 'same') at 8x8 (orthogonal init, as built by the models): the chosen
    bound must be within 1.05x of the exact norm (full SVD of the 2112x2112 impulse matrix)."""
    torch.manual_seed(0)
    layer = LipConv2d(33, 33, 5, padding="same", bias=False, input_size=(8, 8))
    exact = _conv_exact(layer)
    bound = layer.lipschitz_bound()
    assert bound >= exact
    assert bound <= TIGHT * exact


# --------------------------------------------------------------------------- dense
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (7, 3), (64, 64), (100, 30), (10, 513)])
def test_dense_bound_vs_svd(shape):
    """LipLinear bound is >= the SVD norm (no tolerance) and <= 1.0001x it, including a
    rank-deficient matrix and random scales."""
    gen = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    for trial in range(3):
        layer = LipLinear(shape[1], shape[0])
        w = torch.randn(shape, generator=gen) * math.exp(3 * float(torch.randn((), generator=gen)))
        if trial == 2 and min(shape) > 1:
            w[:, 0] = 0.0
            w = w @ torch.diag(torch.rand(shape[1], generator=gen))
            w[-1] = w[0]  # duplicate row: rank deficient
        with torch.no_grad():
            layer.weight.copy_(w)
        exact = exact_norm(impulse_matrix(layer, (shape[1],)))
        assert exact == pytest.approx(exact_norm(layer.weight.detach().double()), rel=1e-12)
        bound = layer.lipschitz_bound()
        assert exact <= bound <= EXACT_TIGHT * exact


@pytest.mark.parametrize("kind", ["dense", "conv_k3s1", "conv_k4s2", "conv_fft"])
def test_single_tiny_weight(kind):
    """A layer whose only non-zero weight is 1e-5 has bound >= that weight (the exact norm) and
    not absurdly more (TF gloro regression: tiny weights must not be rounded to a 0 bound)."""
    if kind == "dense":
        layer = LipLinear(5, 4, bias=False)
        in_shape = (5,)
    else:
        k, s = (3, 1) if kind != "conv_k4s2" else (4, 2)
        c, n = (2, 9) if kind != "conv_fft" else (16, 16)  # 16*16*16 > EXACT_MAX_DIM: FFT path
        layer = LipConv2d(c, c, k, stride=s, padding="same", bias=False, input_size=(n, n))
        in_shape = (c, n, n)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight.view(-1)[layer.weight.numel() // 2 + 1] = 1e-5
    w = float(layer.weight.detach().abs().max())  # 1e-5 as stored in float32
    exact = exact_norm(impulse_matrix(layer, in_shape)) if kind != "conv_fft" else w
    assert exact == pytest.approx(w, rel=1e-12)
    bound = layer.lipschitz_bound()
    assert bound >= w
    assert bound <= 1.0001 * w


def test_negative_weights_give_positive_bound():
    """Negating (or negatively scaling) the weights leaves the norm unchanged: positive bound,
    equal to the bound of the positive weights, still >= exact."""
    conv = _random_conv(3, 2, "same", 1, 3, 4, (9, 9), seed=3)
    dense = LipLinear(6, 4)
    for layer, in_shape in [(conv, (3, 9, 9)), (dense, (6,))]:
        b0 = layer.lipschitz_bound()
        with torch.no_grad():
            layer.weight.mul_(-2.0)
        b1 = layer.lipschitz_bound()
        assert b1 > 0
        assert b1 == pytest.approx(2 * b0, rel=1e-9)
        assert b1 >= exact_norm(impulse_matrix(layer, in_shape))
    with torch.no_grad():
        dense.weight.copy_(-3.0 * torch.eye(4, 6))
    assert 3.0 <= dense.lipschitz_bound() <= 3.0 * EXACT_TIGHT


def test_non_finite_weights_give_infinite_bound():
    """NaN/Inf weights never produce a finite bound (dense, conv on both paths)."""
    for bad in (math.nan, math.inf):
        dense = LipLinear(4, 3)
        conv = LipConv2d(2, 2, 3, input_size=(6, 6))
        with torch.no_grad():
            dense.weight[1, 2] = bad
            conv.weight[0, 1, 1, 1] = bad
        assert dense.lipschitz_bound() == math.inf
        assert conv.lipschitz_bound() == math.inf
        for emd in (0, 10**9):
            assert bounds.conv2d_norm_bound(conv.weight, (6, 6), 1, conv.pads((6, 6)), exact_max_dim=emd) == math.inf


def test_dense_bound_no_underflow_float64():
    """Soundness for float64 weights of tiny magnitude (certify accepts float64 models)."""
    layer = LipLinear(300, 300, bias=False).double()
    with torch.no_grad():
        layer.weight.fill_(5e-163)
    true = 300 * 5e-163  # rank one: ‖1·1ᵀ‖ = n
    assert true <= layer.lipschitz_bound() <= 1.0001 * true


def test_head_distances_no_underflow_float64():
    """Tiny float64 head rows: the pairwise bound must not underflow to 0 (K = 0 would certify
    every prediction at any radius)."""
    from gloronet.gloro import pairwise_row_distances_bound

    w = torch.tensor([[1e-170, 0.0], [0.0, 3e-170]], dtype=torch.float64)
    d = pairwise_row_distances_bound(w)
    true = math.hypot(1e-170, 3e-170)
    assert true <= d[0, 1] <= true * 1.0001 and d[0, 1] == d[1, 0] and d[0, 0] == 0


# --------------------------------------------------------------------------- adjoint
@pytest.mark.parametrize("case", CONV_CASES[::3], ids=lambda c: "k{}s{}p{}g{}".format(*c[:4]))
def test_conv2d_adjoint_is_adjoint(case):
    """<A x, y> == <x, Aᵀ y> in float64 for random x, y (A = conv2d_apply, Aᵀ = conv2d_adjoint),
    and Aᵀ y agrees with autograd's vector-Jacobian product."""
    k, s, p, g, cin, cout, hw = case
    layer = _random_conv(*case, seed=11)
    w = layer.weight.detach().double()
    pads = layer.pads(hw)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, cin, *hw, dtype=torch.float64, generator=gen).requires_grad_(True)
    ax = bounds.conv2d_apply(x, w, s, pads, g)
    y = torch.randn(ax.shape, dtype=torch.float64, generator=gen)
    aty = bounds.conv2d_adjoint(y, w, hw, s, pads, g)
    assert aty.shape == x.shape
    lhs, rhs = float((ax.detach() * y).sum()), float((x.detach() * aty).sum())
    assert lhs == pytest.approx(rhs, rel=1e-12, abs=1e-12)
    (vjp,) = torch.autograd.grad(ax, x, grad_outputs=y)
    torch.testing.assert_close(aty, vjp, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- power iteration
def test_power_iteration_converges_from_below():
    """After many iterations the conv and dense estimates are <= exact*(1+1e-5) and >= 0.999 exact;
    the estimate is never a bound (it approaches from below), both with n_iter=300 in eval mode
    and with repeated lipschitz() calls in train mode."""
    conv = _random_conv(3, 2, "same", 1, 3, 4, (10, 9), seed=21)
    dense = LipLinear(20, 12)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(12, 20, generator=torch.Generator().manual_seed(2)))
    for layer, in_shape in [(conv, (3, 10, 9)), (dense, (20,))]:
        exact = exact_norm(impulse_matrix(layer, in_shape))
        layer.eval()
        first = float(layer.lipschitz().detach())  # n_iter=0 in eval mode: no update
        assert first <= exact * (1 + 1e-5)
        est = float(layer.lipschitz(n_iter=300).detach())
        assert 0.999 * exact <= est <= exact * (1 + 1e-5)
        assert float(layer.lipschitz().detach()) == pytest.approx(est, rel=1e-6)  # iterate was kept
    conv2 = _random_conv(4, 1, 1, 2, 4, 4, (7, 8), seed=22)
    exact = exact_norm(impulse_matrix(conv2, (4, 7, 8)))
    conv2.train()
    for _ in range(300):
        est = float(conv2.lipschitz().detach())
        assert est <= exact * (1 + 1e-5)
    assert est >= 0.999 * exact


def test_power_iteration_gradient_matches_top_singular_pair():
    """d sigma / dW of the converged estimate equals the gradient of u1ᵀ A(W) v1 (u1, v1 the top
    singular vectors of the explicit matrix): for a dense layer that is u1 v1ᵀ; for a conv the
    oracle is autograd through an impulse-built A(W)."""
    gen = torch.Generator().manual_seed(7)
    dense = LipLinear(9, 6)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(6, 9, generator=gen))
    dense.eval()
    dense.lipschitz(n_iter=300)
    est = dense.lipschitz(n_iter=1)
    (g,) = torch.autograd.grad(est, dense.weight)
    u, s, vh = torch.linalg.svd(dense.weight.detach().double())
    oracle = torch.outer(u[:, 0], vh[0])
    assert torch.isfinite(g).all()
    cos = F.cosine_similarity(g.double().flatten(), oracle.flatten(), dim=0).abs()
    assert cos > 0.9999
    torch.testing.assert_close(g.double().abs(), oracle.abs(), rtol=1e-3, atol=1e-4)

    conv = _random_conv(3, 2, "same", 1, 2, 3, (7, 7), seed=8)
    conv.eval()
    conv.lipschitz(n_iter=400)
    est = conv.lipschitz(n_iter=1)
    (g,) = torch.autograd.grad(est, conv.weight)
    w = conv.weight.detach().double().requires_grad_(True)
    eye = torch.eye(2 * 49, dtype=torch.float64).view(98, 2, 7, 7)
    a = F.conv2d(F.pad(eye, conv.pads((7, 7))), w, stride=2).reshape(98, -1).t()
    u, s, vh = torch.linalg.svd(a.detach())
    (oracle,) = torch.autograd.grad(u[:, 0] @ a @ vh[0], w)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    cos = F.cosine_similarity(g.double().flatten(), oracle.flatten(), dim=0).abs()
    assert cos > 0.999


# --------------------------------------------------------------------------- rounding
def _floats(rng, n):
    out = [0.0, 1.0, 5e-324, 2.2250738585072014e-308, 1e308, 0.1, 1 / 3]
    for _ in range(n):
        out.append(math.ldexp(rng.random() + 0.5, rng.randint(-60, 60)))
    return out


def test_round_up_and_mul_up_round_upwards():
    """round_up(x) > x; mul_up's result is >= the exact rational product (fractions.Fraction)
    and within one ulp per factor of it; invalid factors raise."""
    rng = random.Random(0)
    xs = _floats(rng, 300)
    for x in xs:
        assert bounds.round_up(x) > x
        assert Fraction(bounds.round_up(x)) > Fraction(x)
    assert bounds.round_up(math.inf) == math.inf
    for _ in range(400):
        fs = [rng.choice(xs[7:]) for _ in range(rng.randint(1, 6))]
        exact = Fraction(1)
        for f in fs:
            exact *= Fraction(f)
        got = bounds.mul_up(*fs)
        assert Fraction(got) >= exact
        assert Fraction(got) <= exact * Fraction(1 + 2**-51) ** len(fs)
    # products of exactly representable values are still rounded strictly up, never down
    assert bounds.mul_up(0.1, 0.1, 0.1) >= float(Fraction(0.1) ** 3)
    assert bounds.mul_up() == 1.0
    assert bounds.mul_up(math.inf, 2.0) == math.inf
    for bad in (-1.0, -1e-300, math.nan):
        with pytest.raises(ValueError):
            bounds.mul_up(1.0, bad)
