"""AOL, SLL and BRO layers (issue 20): bounds against exact singular values, forwards against a
direct float64 evaluation of the papers' equations, certificates under the rounding-search attack,
and no stale cache after an in-place edit.

Oracles are independent of the layers' own code paths: operators are materialised from the
applied weights (dense) or by impulses through ``F.conv2d`` (conv); Gram kernels by explicit
loops over shifts; transposes as explicit matrix transposes; norms by full float64 SVD.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import gloronet
from conftest import exact_norm, impulse_matrix, train_briefly
from gloronet.nn import (
    AOLConv2d,
    AOLLinear,
    BROLinear,
    Flatten,
    LipConv2d,
    LipLinear,
    MinMax,
    Sequential,
    SLLConv2d,
    SLLLinear,
)
import reference as ref
from gloronet import fp
from test_fp_attacks import _attack
from test_reference import _models_equal
from test_state import _uncached

pytestmark = pytest.mark.usefixtures("single_thread")
D64 = torch.float64


def _svd_max(a: torch.Tensor) -> float:
    return exact_norm(a.to(D64))


# ------------------------------------------------------------------ float64 references (the papers)
def _aol_dense_ref(w: torch.Tensor) -> torch.Tensor:
    """Prach & Lampert (ECCV 2022), Theorem 1: ``W diag(d)``, ``d_j = (Σ_i |WᵀW|_ij)^{-1/2}``."""
    w = w.to(D64)
    d = torch.stack([(w.t() @ w)[j].abs().sum() for j in range(w.shape[1])]).rsqrt()
    return w * d[None, :]


def _gram_kernel_loops(k: torch.Tensor) -> torch.Tensor:
    """``(KᵀK)_{ab}(s) = Σ_{o,v} K_{o,a}(v + s) K_{o,b}(v)`` by explicit loops over shifts (float64)."""
    k = k.to(D64)
    co, ci, kh, kw = k.shape
    out = torch.zeros(ci, ci, 2 * kh - 1, 2 * kw - 1, dtype=D64)
    for s1 in range(-(kh - 1), kh):
        for s2 in range(-(kw - 1), kw):
            for v1 in range(kh):
                for v2 in range(kw):
                    if 0 <= v1 + s1 < kh and 0 <= v2 + s2 < kw:
                        out[:, :, s1 + kh - 1, s2 + kw - 1] += k[:, :, v1 + s1, v2 + s2].t() @ k[:, :, v1, v2]
    return out


def _aol_conv_ref(k: torch.Tensor) -> torch.Tensor:
    """Prach & Lampert (ECCV 2022), Theorem 2: input channel ``a`` scaled by ``(Σ_{b,s} |(KᵀK)_{ab}(s)|)^{-1/2}``."""
    d = _gram_kernel_loops(k).abs().sum(dim=(1, 2, 3)).rsqrt()
    return k.to(D64) * d[None, :, None, None]


def _sll_c_ref(gram_abs: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Araujo et al. (ICLR 2023), Theorem 3: ``T_ii = Σ_j |G_ij| q_j / q_i`` (``q = exp(q_param)``), ``c = 2/T``."""
    qe = q.to(D64).exp()
    n = gram_abs.shape[0]
    t = torch.stack([sum(gram_abs[i, j] * qe[j] / qe[i] for j in range(n)) for i in range(n)])
    return 2.0 / t


def _conv_matrix(kernel: torch.Tensor, hw, pad: int) -> torch.Tensor:
    """Explicit float64 matrix of ``x ↦ F.conv2d(x, kernel, padding=pad)`` on ``hw`` inputs."""
    ci = kernel.shape[1]
    d = ci * hw[0] * hw[1]
    eye = torch.eye(d, dtype=D64).view(d, ci, *hw)
    return F.conv2d(eye, kernel.to(D64), padding=pad).reshape(d, -1).t()


def _sll_dense_ref(layer: SLLLinear, x: torch.Tensor) -> torch.Tensor:
    """``x − 2 W T⁻¹ σ(Wᵀx + b)`` (paper's notation: our ``weight`` is their ``Wᵀ``)."""
    w, b = layer.weight.detach().to(D64), layer.bias.detach().to(D64)
    c = _sll_c_ref((w @ w.t()).abs(), layer.q.detach())
    return x.to(D64) - (c * torch.relu(x.to(D64) @ w.t() + b)) @ w


def _sll_conv_ref(layer: SLLConv2d, x: torch.Tensor) -> torch.Tensor:
    """The same with the explicit convolution matrix ``A`` and its transpose; ``|AAᵀ|`` summed over
    the Gram kernel's shifts for ``T``."""
    w, b = layer.weight.detach(), layer.bias.detach().to(D64)
    hw, inner = layer.input_hw, layer.inner
    a = _conv_matrix(w, hw, layer.kernel_size // 2)
    gk = _gram_kernel_loops(w.transpose(0, 1))  # Gram kernel over the inner channels
    c = _sll_c_ref(gk.abs().sum(dim=(2, 3)), layer.q.detach())
    c_full = c.repeat_interleave(hw[0] * hw[1])
    b_full = b.repeat_interleave(hw[0] * hw[1])
    xf = x.to(D64).flatten(1)
    return (xf - (c_full * torch.relu(xf @ a.t() + b_full)) @ a).view_as(x)


def _bro_ref(v: torch.Tensor, out: int, inp: int) -> torch.Tensor:
    """Lai et al. (ICML 2025), BRO: ``I − 2V(VᵀV + εI)⁻¹Vᵀ`` (explicit inverse; ε as the reference code)."""
    v = v.to(D64)
    s = v.t() @ v
    s = s + 1e-5 * s.diagonal().mean() * torch.eye(s.shape[0], dtype=D64)
    return (torch.eye(v.shape[0], dtype=D64) - 2 * v @ torch.linalg.inv(s) @ v.t())[:out, :inp]


# ------------------------------------------------------------------ (a) bounds vs exact SVD
DENSE = [
    ("aol-12-8", lambda: AOLLinear(12, 8)),
    ("aol-8-12", lambda: AOLLinear(8, 12)),
    ("bro-10", lambda: BROLinear(10, 10)),
    ("bro-12-7", lambda: BROLinear(12, 7, rank=3)),
    ("bro-6-10", lambda: BROLinear(6, 10)),
]


@pytest.mark.parametrize("make", [m for _, m in DENSE], ids=[i for i, _ in DENSE])
def test_dense_bound_covers_the_applied_weight_and_is_tight(make):
    torch.manual_seed(0)
    layer = make().eval()
    w = layer.applied_weight()
    x = torch.randn(5, layer.in_features)
    assert torch.equal(layer(x), gloronet.nn.accumulate.linear(x, w, layer.bias))  # the forward applies w
    exact, bound = _svd_max(w), layer.lipschitz_bound()
    assert exact <= bound <= 1.05 * exact
    assert exact <= 1 + 1e-5  # the papers' guarantee, up to float32 rounding


CONVS = [  # (kernel, stride, padding, input size)
    (3, 1, "same", (6, 6)),
    (4, 2, "same", (7, 7)),
    (2, 1, "same", (5, 5)),
    (3, 1, "valid", (6, 5)),
    (3, 2, 1, (6, 6)),
]


@pytest.mark.parametrize("init", ["orthogonal", "orthogonal_center"])
@pytest.mark.parametrize("k,s,pad,hw", CONVS, ids=[f"k{k}s{s}-{p}-{hw[0]}x{hw[1]}" for k, s, p, hw in CONVS])
def test_aol_conv_bound_covers_the_applied_kernel_and_is_tight(k, s, pad, hw, init):
    torch.manual_seed(1)
    layer = AOLConv2d(3, 4, k, stride=s, padding=pad, input_size=hw, init=init).eval()
    twin = LipConv2d(3, 4, k, stride=s, padding=pad, input_size=hw).eval()
    with torch.no_grad():
        twin.weight.copy_(layer.applied_weight())
        twin.bias.copy_(layer.bias)
    x = torch.randn(2, 3, *hw)
    assert torch.equal(layer(x), twin(x))  # the forward convolves with the applied kernel
    exact, bound = _svd_max(impulse_matrix(twin, (3, *hw))), layer.lipschitz_bound()
    assert exact <= bound <= 1.05 * exact
    assert exact <= 1 + 1e-5


class _Loose(SLLLinear):
    """``c`` 1.7x too large: μ > 2, so the bound must exceed 1 (and is attained at ``D = I``)."""

    def compute_scales(self):
        return 1.7 * super().compute_scales()


class _LooseConv(SLLConv2d):
    """4x (T over-estimates a zero-padded 4x4 map's Gram more than a dense one's)."""

    def compute_scales(self):
        return 4.0 * super().compute_scales()


def _sll_operators(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, c)``: the inner linear map (explicit, float64) and the scales per inner coordinate."""
    c = layer.applied_scales().to(D64)
    if isinstance(layer, SLLLinear):
        return layer.weight.detach().to(D64), c
    hw = layer.input_hw
    return _conv_matrix(layer.weight.detach(), hw, layer.kernel_size // 2), c.repeat_interleave(hw[0] * hw[1])


SLLS = [
    ("dense", lambda: SLLLinear(8, 6)),
    ("dense-wide", lambda: SLLLinear(5, 9)),
    ("dense-loose", lambda: _Loose(8, 6)),
    ("conv", lambda: SLLConv2d(2, (4, 5), inner=3)),
    ("conv-k5", lambda: SLLConv2d(2, (5, 5), inner=2, kernel_size=5)),
    ("conv-loose", lambda: _LooseConv(2, (4, 4), inner=3)),
]


@pytest.mark.parametrize("make", [m for _, m in SLLS], ids=[i for i, _ in SLLS])
def test_sll_bound_covers_every_activation_pattern(make):
    """``sup_D ‖I − Aᵀ C D A‖`` over diagonal ``D ∈ [0, 1]``: vertices and random interior points."""
    torch.manual_seed(2)
    layer = make().eval()
    a, c = _sll_operators(layer)
    n = a.shape[0]
    bound = layer.lipschitz_bound()
    g = torch.Generator().manual_seed(0)
    patterns = [torch.ones(n, dtype=D64), torch.zeros(n, dtype=D64)]
    patterns += [(torch.rand(n, generator=g, dtype=D64) < 0.5).to(D64) for _ in range(6)]
    patterns += [torch.rand(n, generator=g, dtype=D64) for _ in range(6)]
    norms = [_svd_max(torch.eye(a.shape[1], dtype=D64) - a.t() @ ((c * d)[:, None] * a)) for d in patterns]
    assert max(norms) <= bound * (1 + 1e-12)  # the float64 SVD oracle itself errs by ~1e-16
    assert bound <= 1.0 + 1e-9 or bound <= 1.001 * norms[0]  # 1, or attained at D = I (tight)
    if isinstance(layer, (_Loose, _LooseConv)):
        assert bound > 1.3  # the loose variants are not bounded by "1 by construction"


# ------------------------------------------------------------------ (b) forward = the papers' equations
def test_sll_bound_formulas_in_exact_arithmetic():
    """``_lip_from_mu(‖B‖) ≥ max(1, ‖B‖² − 1)`` (and within 1e-12 of it), and the allowance for
    forming ``B̃ = fl(fl(√c)·W)`` in float64 covers two roundings: ``B̃ = B(1 + θ₂)``,
    ``|B − B̃| = |θ₂|/|1 + θ₂|·|B̃| ≤ γ₂/(1 − γ₂)·|B̃|``, ``γ₂ = 2u/(1 − 2u)``, ``u = 2⁻⁵³`` — checked
    with Fractions (the factor moves the bound by ~1e-16, below what an SVD oracle can see)."""
    from fractions import Fraction

    from gloronet.nn.sll import _lip_from_mu, _rounding_factor

    for nb in (0.5, 1.0, 1.2, 2**0.5, 1.5, 1.7, 3.0):
        exact = max(Fraction(1), Fraction(nb) ** 2 - 1)
        got = _lip_from_mu(nb)
        assert exact <= Fraction(got) <= exact * (1 + Fraction(1, 10**12)), nb
    u = Fraction(1, 2**53)
    g2 = 2 * u / (1 - 2 * u)
    assert g2 / (1 - g2) <= Fraction(_rounding_factor()) <= 2 * g2


def test_aol_dense_forward_matches_theorem_1():
    torch.manual_seed(3)
    layer = AOLLinear(9, 7)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(4, 9)
    ref = x.to(D64) @ _aol_dense_ref(layer.weight.detach()).t() + layer.bias.detach().to(D64)
    for mode in (True, False):
        layer.train(mode)
        torch.testing.assert_close(layer(x).to(D64), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k,s,pad,hw", CONVS[:3], ids=["k3s1", "k4s2", "k2s1"])
def test_aol_conv_forward_matches_theorem_2(k, s, pad, hw):
    torch.manual_seed(4)
    layer = AOLConv2d(3, 5, k, stride=s, padding=pad, input_size=hw, init="orthogonal")
    x = torch.randn(2, 3, *hw)
    ref = F.conv2d(F.pad(x.to(D64), layer.pads(hw)), _aol_conv_ref(layer.weight.detach()), layer.bias.detach().to(D64),
                   stride=s)
    for mode in (True, False):
        layer.train(mode)
        torch.testing.assert_close(layer(x).to(D64), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [lambda: SLLLinear(7, 5), lambda: SLLConv2d(2, (4, 5), inner=3)], ids=["dense", "conv"])
def test_sll_forward_matches_theorem_3(make):
    torch.manual_seed(5)
    layer = make()
    with torch.no_grad():
        layer.bias.normal_()
        layer.q.normal_()
    dense = isinstance(layer, SLLLinear)
    x = torch.randn(3, 7) if dense else torch.randn(3, 2, 4, 5)
    ref = _sll_dense_ref(layer, x) if dense else _sll_conv_ref(layer, x)
    for mode in (True, False):
        layer.train(mode)
        torch.testing.assert_close(layer(x).to(D64), ref, rtol=1e-5, atol=1e-5)


def test_sll_conv_with_one_channel_sums_taps_where_winograd_would_run(monkeypatch):
    """On builds that send 1-channel 3×3 convolutions to Winograd the block sums taps itself; the
    map is the same (Theorem 3's equation)."""
    torch.manual_seed(16)
    layer = SLLConv2d(1, (4, 5), inner=1).eval()
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(3, 1, 4, 5)
    monkeypatch.setattr(gloronet.kernels, "winograd_depthwise_build", lambda arch=None: True)
    calls = []
    taps = gloronet.nn.depthwise.conv2d_taps
    monkeypatch.setattr(gloronet.nn.depthwise, "conv2d_taps", lambda *a: calls.append(1) or taps(*a))
    torch.testing.assert_close(layer(x).to(D64), _sll_conv_ref(layer, x), rtol=1e-5, atol=1e-5)
    assert len(calls) == 2  # both convolutions of the block


@pytest.mark.parametrize("inp,out", [(8, 8), (10, 6), (5, 9)])
def test_bro_forward_matches_the_block_reflector(inp, out):
    torch.manual_seed(6)
    layer = BROLinear(inp, out, rank=3)
    x = torch.randn(4, inp)
    w = _bro_ref(layer.reflector.detach(), out, inp)
    for mode in (True, False):
        layer.train(mode)
        torch.testing.assert_close(layer(x).to(D64), x.to(D64) @ w.t(), rtol=1e-5, atol=1e-5)
    if inp == out:  # orthogonal up to ε = 1e-5 relative
        s = torch.linalg.svdvals(w)
        assert float(s.min()) > 1 - 1e-3 and float(s.max()) <= 1 + 1e-12


@pytest.mark.parametrize("make", [lambda: SLLLinear(16, 12), lambda: SLLConv2d(3, (6, 6), inner=4)], ids=["dense", "conv"])
def test_sll_rounding_within_its_error_model(make):
    """``‖φ̂(x) − φ(x)‖ ≤ rel·‖x‖ + abs`` with ``φ`` evaluated in float64 on the same ``W``, ``c``."""
    torch.manual_seed(7)
    layer = make().eval()
    with torch.no_grad():
        layer.bias.normal_()
    shape = (16,) if isinstance(layer, SLLLinear) else (3, 6, 6)
    model = layer.error_model(shape, torch.float32, layer.lipschitz_bound())
    a, c = _sll_operators(layer)
    b = layer.bias.detach().to(D64)
    if not isinstance(layer, SLLLinear):
        b = b.repeat_interleave(36)
    x = torch.randn(64, *shape) * 10
    xf = x.to(D64).flatten(1)
    exact = xf - (c * torch.relu(xf @ a.t() + b)) @ a
    with torch.no_grad():
        err = (layer(x).to(D64).flatten(1) - exact).norm(dim=1)
    allowed = model.rel * xf.norm(dim=1) + model.abs
    assert bool((err <= allowed).all()) and float((err / allowed).max()) > 1e-3  # sound, not vacuous


def test_aol_conv_starts_as_a_centred_orthogonal_map():
    """berndprach/AOL's default init: the rescaling is 1 and the layer an isometry of pixels."""
    torch.manual_seed(17)
    layer = AOLConv2d(3, 5, 3, input_size=(5, 5)).eval()
    torch.testing.assert_close(layer.applied_weight(), layer.weight.detach())
    a = impulse_matrix(layer, (3, 5, 5))
    torch.testing.assert_close(a.t() @ a, torch.eye(75, dtype=D64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_scale_and_residual_models_against_the_reference(dtype):
    """``fp.scale_model`` / ``fp.residual_model`` against their derivations in exact arithmetic
    (tests/reference.py): ``fl(c a) = c a(1 + δ) + η``; ``fl(a − ĝ) = (a − ĝ)(1 + δ) + η`` with
    ``‖a − ĝ‖ ≤ (1 + L + rel)‖a‖ + offset + abs``."""
    mpf, u, lam = ref.mpf, ref.u_of(dtype), ref.lam_of(dtype)
    _models_equal(fp.scale_model(0.75, 40, dtype),
                  ref.Model(lip=mpf(0.75), rel=u * mpf(0.75), abs=lam * ref.mpmath.sqrt(40),
                            peak_rel=(1 + u) * mpf(0.75), peak_abs=lam))
    branch = fp.ErrorModel(lip=1.7, rel=3e-6, abs=2e-9, offset=0.4, peak_rel=5.0, peak_abs=0.3)
    b = ref.Model.of(branch)
    grow = b.lip + b.rel
    _models_equal(fp.residual_model(branch, 1.02, 30, dtype),
                  ref.Model(lip=mpf(1.02), rel=b.rel + u * (1 + grow), abs=b.abs + u * (b.offset + b.abs) + lam * ref.mpmath.sqrt(30),
                            offset=b.offset, peak_rel=b.peak_rel + (1 + u) * (1 + grow),
                            peak_abs=b.peak_abs + (1 + u) * (b.offset + b.abs) + lam))


def test_training_paths_are_differentiable():
    torch.manual_seed(8)
    for layer, x in [(AOLLinear(6, 4), torch.randn(3, 6)), (AOLConv2d(2, 3, 3, input_size=(4, 4)), torch.randn(2, 2, 4, 4)),
                     (BROLinear(6, 6), torch.randn(3, 6)), (SLLLinear(6), torch.randn(3, 6)),
                     (SLLConv2d(2, (4, 4)), torch.randn(2, 2, 4, 4))]:
        layer.train()
        (layer(x).square().sum() + layer.lipschitz()).backward()
        grads = [p.grad for p in layer.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), type(layer).__name__
        assert any(float(g.abs().max()) > 0 for g in grads)


# ------------------------------------------------------------------ (c) certificates under attack
def _family_net(seed: int) -> gloronet.GloroNet:
    torch.manual_seed(seed)
    body = Sequential(
        SLLConv2d(2, (6, 6), inner=4),
        AOLConv2d(2, 4, 3, stride=2, input_size=(6, 6)),
        MinMax(),
        Flatten(),
        SLLLinear(36, 24),
        BROLinear(36, 16),
        MinMax(),
        AOLLinear(16, 12),
        MinMax(),
    )
    net = gloronet.GloroNet(body, LipLinear(12, 3), epsilon=0.05)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (SLLConv2d, SLLLinear)):
                m.bias.normal_(0, 0.3)
    return net.eval()


def attack_briefly_trained(net, understate) -> None:
    """Train ``net`` (2×6×6 inputs, 3 classes) briefly on a learnable rule, certify, and attack the
    certified points with the rounding search: no flip inside a float radius. Then ``understate()``
    (a mutant: bounds 100x too small) must let the same attack find flips, so it can see a wrong bound."""
    gen = torch.Generator().manual_seed(10)
    data = torch.randn(256, 2, 6, 6, generator=gen)
    labels = (data.flatten(1) @ torch.randn(72, 3, generator=gen)).argmax(1)  # a learnable rule
    train_briefly(net, data, labels, steps=30, batch=32, lr=1e-2, gen=gen)
    x = torch.randn(24, 2, 6, 6, generator=gen)
    cert = net.certify(x)
    res = _attack(net, x, cert, seed=1, ulp_moves=40, singles=2, max_points=6)
    assert res.points > 0 and res.candidates > 0, "vacuous: no certified point was attacked"
    assert not res.flips, res.describe()

    understate()
    mutant = _uncached(net)
    bad = mutant.certify(x)
    assert float(bad.radius.max()) > 100 * float(cert.radius.max())
    res_bad = _attack(mutant, x, bad, seed=1, ulp_moves=10, singles=1, max_points=4)
    assert res_bad.flips, "the attack cannot see a 100x understated bound"


def test_certified_points_survive_the_rounding_search(monkeypatch):
    """No certified point of a net of all three families flips; SLL bounds understated 100x do."""
    def understate():
        monkeypatch.setattr(SLLConv2d, "_bound", lambda self: 0.01)
        monkeypatch.setattr(SLLLinear, "_bound", lambda self: 0.01)

    attack_briefly_trained(_family_net(9), understate)


def test_float64_models_recompute_their_weights_and_certify():
    """``.double()`` drops the cached float32 weights / scales: the float64 model derives its own,
    bounds them, and certifies about as much (its rounding allowance is smaller)."""
    net = _family_net(18)
    x = torch.randn(16, 2, 6, 6, generator=torch.Generator().manual_seed(19))
    r32 = net.certify(x).radius
    net64 = copy.deepcopy(net).double()
    r64 = net64.certify(x.double()).radius
    assert net64.body[0].applied_scales().dtype == D64 and net64.body[1].applied_weight().dtype == D64
    assert bool((r32 > 0).any()) and bool(torch.isfinite(r64).all())
    assert bool((r64 >= r32 * (1 - 1e-4)).all())  # less rounding to allow for in float64


# ------------------------------------------------------------------ (d) edits after certifying
@pytest.mark.parametrize("edit", ["aol-conv", "aol-dense", "sll-conv", "sll-dense-q", "bro"])
def test_in_place_edits_after_certifying_are_seen(edit):
    net = _family_net(11)
    x = torch.randn(6, 2, 6, 6, generator=torch.Generator().manual_seed(12))
    before = net.lipschitz_bound()
    net.certify(x)
    body = net.body
    target = {"aol-conv": body[1].weight, "aol-dense": body[7].weight, "sll-conv": body[0].weight,
              "sll-dense-q": body[4].q, "bro": body[5].reflector}[edit]
    with torch.no_grad():
        target[0].mul_(3.0).add_(0.5)
    fresh = _uncached(net)
    assert torch.equal(net(x), fresh(x))
    after = net.lipschitz_bound()
    assert after == fresh.lipschitz_bound()
    if edit.startswith(("aol", "bro")):
        assert after != before  # the bound is the applied weight's, so it moves with it
    assert torch.equal(net.certify(x).radius, fresh.certify(x).radius)


@pytest.mark.parametrize("make,accessor", [
    (lambda: AOLLinear(6, 4), "applied_weight"), (lambda: AOLConv2d(2, 3, 3, input_size=(4, 4)), "applied_weight"),
    (lambda: BROLinear(6, 6), "applied_weight"), (lambda: SLLLinear(6), "applied_scales"),
    (lambda: SLLConv2d(2, (4, 4)), "applied_scales")], ids=["aol", "aol-conv", "bro", "sll", "sll-conv"])
def test_public_accessors_hand_out_copies(make, accessor):
    torch.manual_seed(20)
    layer = make().eval()
    x = torch.randn(3, 6) if isinstance(layer, (AOLLinear, BROLinear, SLLLinear)) else torch.randn(3, 2, 4, 4)
    before, bound = layer(x), layer.lipschitz_bound()
    getattr(layer, accessor)().mul_(5.0)
    assert torch.equal(layer(x), before) and layer.lipschitz_bound() == bound


def test_an_sll_blocks_bound_follows_its_input_size():
    """The memoised bound is keyed on the whole state: a new ``input_hw`` is a new operator."""
    torch.manual_seed(15)
    layer = _LooseConv(2, (3, 3), inner=2).eval()
    small = layer.lipschitz_bound()
    layer.input_hw = (7, 7)
    fresh = _LooseConv(2, (7, 7), inner=2).eval()
    fresh.load_state_dict(layer.state_dict())
    assert layer.lipschitz_bound() == fresh.lipschitz_bound() != small


def test_a_stale_sll_scale_would_be_caught():
    """Scaling ``W`` in place keeps the fresh ``c·W²`` (bound 1) but a stale ``c`` with the new ``W``
    would make ``μ`` 4x: the layer must recompute ``c`` (forward equals a fresh copy's)."""
    torch.manual_seed(13)
    layer = SLLLinear(6, 4).eval()
    x = torch.randn(5, 6)
    layer(x), layer.lipschitz_bound()
    c_old = layer.applied_scales()
    with torch.no_grad():
        layer.weight.mul_(2.0)
    assert torch.equal(layer(x), copy.deepcopy(layer)(x))
    assert layer.lipschitz_bound() <= 1 + 1e-6  # a stale c would give μ ≈ 4·2, a bound ≈ 7
    torch.testing.assert_close(layer.applied_scales(), c_old / 4)


# ------------------------------------------------------------------ registry
@pytest.mark.parametrize("name,shape", [("aol-mnist", (1, 28, 28)), ("sll-mnist", (1, 28, 28)),
                                        ("aol-small", (3, 32, 32)), ("sll-small", (3, 32, 32))])
def test_registered_families_build_and_certify(name, shape):
    torch.manual_seed(14)
    net = gloronet.models.create(name, shape, 10, 1.58).eval()
    kinds = {type(m) for m in net.modules()}
    assert kinds & ({AOLConv2d, AOLLinear} if name.startswith("aol") else {SLLConv2d, SLLLinear})
    x = torch.rand(2, *shape)
    assert net(x).shape == (2, 10)
    if name.endswith("mnist"):  # the CIFAR-shaped bounds take seconds: built and run only
        bound = net.lipschitz_bound()
        assert 0 < bound < math.inf
        cert = net.certify(x)
        assert bool(torch.isfinite(cert.radius).all())
