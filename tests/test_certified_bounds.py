"""The fast bound machinery against exact singular values: Cholesky certificates, Lanczos
candidates, the Gram kernel of a convolution, explicit Gram matrices, and every path forced.

Oracles as in test_bounds.py: explicit operators from impulses fed through the layer's own forward
(float64), norms from a full SVD, per-frequency matrices from ``torch.fft`` of the kernel. The
same checks run on every available device (the CPU here; a GPU where one is present), with the
computation required to stay on that device. Soundness is asserted with no tolerance at all.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import exact_norm, impulse_matrix
from gloronet import bounds
from gloronet.nn import LipConv2d, LipLinear
from gloronet.nn.orthogonal import ChordLinear, ChordMLP
from gloronet.nn.residual import LiResBlock
from test_bounds import CONV_CASES, EXACT_TIGHT, TIGHT, _conv_exact, _random_conv

pytestmark = pytest.mark.usefixtures("single_thread")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CANDIDATE = (1 + bounds.TAU) ** 0.5 * (1 + 1e-8)  # what a Cholesky certificate may add on a batch


@pytest.fixture
def certified(monkeypatch):
    """Every λ_max through Lanczos + Cholesky (no eigensolver shortcut for small problems)."""
    monkeypatch.setattr(bounds.eigen, "EIGH_WORK", 0)


def _psd(n, seed, complex_=False, spread=1.0, top_gap=0.0):
    """A random Hermitian PSD matrix with eigenvalues in [1 − spread, 1] (+ a top one at 1 + gap)."""
    g = torch.Generator().manual_seed(seed)
    dtype = torch.complex128 if complex_ else torch.float64
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=dtype))
    lam = 1 - spread * torch.rand(n, generator=g, dtype=torch.float64)
    lam[0] = 1 + top_gap
    return (q * lam.to(dtype)) @ q.mH


# --------------------------------------------------------------------------- certificates
@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("n,spread", [(40, 1.0), (130, 1e-6), (130, 0.0)])
def test_cholesky_certificate_sound_at_the_edge(complex_, n, spread):
    """μ a hair below, at and above λ_max: whenever the factorisation of μI − G runs to completion,
    the certified bound (residual-based) is ≥ λ_max, and it passes once μ exceeds λ_max by a
    relative 1e-9 — then within 1e-12 of μ."""
    g = _psd(n, seed=n, complex_=complex_, spread=spread)
    g = (g + g.mH) / 2
    lam = float(torch.linalg.eigvalsh(g)[-1])
    dmax = torch.tensor([float(g.diagonal().real.abs().max())], dtype=torch.float64)
    passed = []
    for rel in (-1e-6, -1e-9, -1e-12, -1e-14, 0.0, 1e-14, 1e-12, 1e-9, 1e-6):
        mu = torch.tensor([lam * (1 + rel)], dtype=torch.float64)
        bound = float(bounds.eigen.cholesky_certificates(bounds.eigen._shifted(g[None], mu), mu, dmax, 0.0)[0])
        if math.isfinite(bound):  # below λ_max a passing factor has a residual ≥ λ_max − μ
            assert lam <= bound and (rel <= 0 or bound <= float(mu) * (1 + 1e-12))
        passed.append(math.isfinite(bound))
    assert passed[0] is False and all(passed[-2:])


def test_hermitian_max_bound_every_fallback(monkeypatch):
    """Candidates far too low (every certificate breaks down) end in the eigensolver; candidates
    right give the same number up to the margin; both ≥ λ_max; a batch takes the max."""
    gs = torch.stack([_psd(60, s, spread=0.5, top_gap=0.1 * s) for s in range(3)])
    lam = float(torch.linalg.eigvalsh(gs)[:, -1].max())
    eig = bounds.hermitian_max_bound(gs, 0.0)  # small: eigensolver
    monkeypatch.setattr(bounds.eigen, "EIGH_WORK", 0)
    cert = bounds.hermitian_max_bound(gs, 0.0)
    monkeypatch.setattr(bounds.eigen, "TAUS", (-0.5, -0.25))
    fallback = bounds.hermitian_max_bound(gs, 0.0)
    assert lam <= eig <= lam * (1 + 1e-8)
    assert lam <= cert <= lam * (1 + 1e-5)
    assert fallback == pytest.approx(eig, rel=1e-12) and fallback >= lam


def test_lanczos_estimates_from_below():
    """Lanczos estimates never exceed λ_max (beyond rounding) and converge for a separated top;
    a near-identity operator (the Gram matrix of an orthogonal layer) does not blow up."""
    g = torch.stack([_psd(300, 1, spread=0.9, top_gap=0.05), _psd(300, 2, spread=1e-7)])
    lam = torch.linalg.eigvalsh(g)[:, -1]
    v0 = torch.randn(2, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    theta = bounds.lanczos_max(lambda v: (g @ v.unsqueeze(-1)).squeeze(-1), v0)
    assert (theta <= lam * (1 + 1e-12)).all()
    assert (theta >= lam * (1 - 1e-7)).all()  # a separated and a clustered top
    near_identity = torch.eye(200) + 1e-7 * torch.randn(200, 200, generator=torch.Generator().manual_seed(3))
    near_identity = ((near_identity + near_identity.T) / 2).float()  # float32: residuals at rounding level
    est = bounds.lanczos_max(lambda v: (near_identity @ v.unsqueeze(-1)).squeeze(-1), torch.randn(1, 200))
    top = float(torch.linalg.eigvalsh(near_identity.double())[-1])
    assert abs(float(est) - top) < 1e-5


# --------------------------------------------------------------------------- Gram matrices
@pytest.mark.parametrize("k,n1,n2", [(1, 5, 5), (2, 6, 7), (3, 18, 18), (3, 9, 12)])
def test_frequency_grams_equal_fft_products(k, n1, n2):
    """``G(ω)`` from the Gram kernel equals ``K̂(ω)ᴴK̂(ω)`` from ``torch.fft`` of the kernel at every
    frequency of the half-spectrum (entrywise, to rounding)."""
    g = torch.Generator().manual_seed(k)
    w = torch.randn(5, 4, k, k, generator=g, dtype=torch.float64)
    c = bounds.gram_kernel(w)
    freqs = torch.arange(n1 * (n2 // 2 + 1))
    grams = bounds.frequency_grams(c, (n1, n2), freqs)
    spec = torch.fft.rfft2(w, s=(n1, n2)).permute(2, 3, 0, 1).reshape(-1, 5, 4)
    ref = spec.mH @ spec
    scale = float((w * w).sum()) * k * k
    assert (grams - ref).abs().max() <= 1e-13 * scale


@pytest.mark.parametrize("case", CONV_CASES[::2], ids=lambda c: "k{}s{}p{}g{}_{}to{}_{}x{}".format(*c[:6], *c[6]))
def test_explicit_gram_matches_impulses(case):
    """``conv2d_explicit_gram`` (gathers of tap-pair products) has the spectrum of ``AᵀA`` / ``AAᵀ``
    of the impulse-built operator, within its own allowance."""
    k, s, p, g, cin, cout, hw = case
    layer = _random_conv(k, s, p, 1, cin // g, cout // g, hw, seed=7)
    a = impulse_matrix(layer, (layer.in_channels, *hw))
    ref = a @ a.T if a.shape[0] < a.shape[1] else a.T @ a
    gram, err = bounds.conv2d_explicit_gram(layer.weight, hw, s, layer.pads(hw))
    assert gram.shape == ref.shape
    diff = (torch.linalg.eigvalsh(gram) - torch.linalg.eigvalsh(ref)).abs().max()
    assert diff <= err + 1e-13 * float(ref.abs().max())
    assert err <= 1e-10 * float(torch.linalg.eigvalsh(ref)[-1])


# --------------------------------------------------------------------------- forced paths
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "k{}s{}p{}g{}_{}to{}_{}x{}".format(*c[:6], *c[6]))
def test_conv_bound_certified_paths(case, certified):
    """The checks of test_conv_bound_sound_and_tight with every eigenvalue certified by Cholesky:
    the chosen bound, the forced explicit path (≤ 1.0001x exact) and the forced FFT path (within
    the candidate margin of the eigensolver's FFT bound)."""
    k, s, p, g, cin, cout, hw = case
    layer = _random_conv(*case, seed=CONV_CASES.index(case))
    exact = _conv_exact(layer)
    bound = layer.lipschitz_bound()
    assert exact <= bound <= TIGHT * exact
    pads = layer.pads(hw)
    forced_exact = bounds.conv2d_norm_bound(layer.weight, hw, s, pads, g, exact_max_dim=10**9)
    assert exact <= forced_exact <= EXACT_TIGHT * exact
    fft = bounds.conv2d_fft_bound(layer.weight, hw, s, pads, g)
    assert fft >= exact
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bounds.eigen, "EIGH_WORK", 2**60)
        eig_fft = bounds.conv2d_fft_bound(layer.weight, hw, s, pads, g)
    assert eig_fft * (1 - 1e-8) <= fft <= eig_fft * CANDIDATE


def test_fft_batch_candidate_breakdowns(monkeypatch):
    """A candidate far below the maximum: most per-frequency certificates break down and go to the
    eigensolver, and the bound still equals the eigensolver's (a 16x16 map, FFT path)."""
    layer = _random_conv(3, 1, "same", 1, 4, 4, (16, 16), seed=9)
    pads = layer.pads((16, 16))
    monkeypatch.setattr(bounds.eigen, "EIGH_WORK", 2**60)
    eig_fft = bounds.conv2d_fft_bound(layer.weight, (16, 16), 1, pads)
    monkeypatch.setattr(bounds.eigen, "EIGH_WORK", 0)
    monkeypatch.setattr(bounds.circular, "TAU", -0.5)
    monkeypatch.setattr(bounds.circular, "CHUNK", 16 * 7)  # several chunks: θ rises along the way
    solved, eigvalsh = [], torch.linalg.eigvalsh
    monkeypatch.setattr(torch.linalg, "eigvalsh", lambda g: solved.append(g.shape[0]) or eigvalsh(g))
    low = bounds.conv2d_fft_bound(layer.weight, (16, 16), 1, pads)
    assert len(solved) > 2 and sum(solved) > 10  # breakdowns in several chunks went to the eigensolver
    assert low == pytest.approx(eig_fft, rel=1e-12)
    assert low >= _conv_exact(layer)


@pytest.mark.parametrize("kind", ["dense", "conv_exact", "conv_fft"])
def test_tiny_weight_certified(kind, certified):
    """The tiny-weight regression (a 0 bound must never appear) through the certified paths."""
    if kind == "dense":
        layer = LipLinear(300, 200, bias=False)
    else:
        c, n = (2, 9) if kind == "conv_exact" else (16, 16)
        layer = LipConv2d(c, c, 3, padding="same", bias=False, input_size=(n, n))
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight.view(-1)[layer.weight.numel() // 2 + 1] = 1e-5
    w = float(layer.weight.detach().abs().max())
    assert w <= layer.lipschitz_bound() <= (CANDIDATE if kind == "conv_fft" else 1.0001) * w


def test_orthogonal_and_residual_layers_certified(certified):
    """CHORD matrices (σ ≈ 1, clustered: the hardest case for a candidate) and a LiResBlock on a
    16x16 map (FFT path) through the certified paths, against exact singular values."""
    torch.manual_seed(0)
    chord = ChordLinear(300, depth=4).eval()
    sigma = float(torch.linalg.svdvals(chord.produced_weight().double()).max())
    assert sigma <= chord.lipschitz_bound() <= sigma * (1 + 1e-5)
    mlp = ChordMLP(200, 3).eval()
    sig = torch.linalg.svdvals(mlp.produced_weight().double()).amax(dim=1)
    assert all(s <= b <= s * (1 + 1e-5) for s, b in zip(sig.tolist(), mlp._matrix_bounds()))
    block = LiResBlock(4, (16, 16), depth=4, activation=False)
    with torch.no_grad():
        block.weight.normal_(0, 0.3)
    block.double().eval()
    exact = exact_norm(impulse_matrix(block, (4, 16, 16)))
    assert exact <= block.lipschitz_bound() <= TIGHT * exact


# --------------------------------------------------------------------------- devices
def _case(name):
    """(layer, exact norm): float32 weights (float64 for the LiResBlock, whose applied kernel is
    derived), exact norms from float64 impulses / singular values of the matrix applied."""
    torch.manual_seed(0)
    if name == "block_fft":
        layer = LiResBlock(4, (12, 12), depth=4, activation=False)
        with torch.no_grad():
            layer.weight.normal_(0, 0.3)
        layer.double().eval()
        return layer, exact_norm(impulse_matrix(layer, (4, 12, 12)))
    if name == "dense":
        layer = LipLinear(300, 200)
        return layer, exact_norm(layer.weight.detach())
    if name == "chord":
        layer = ChordLinear(64, depth=2).eval()
        return layer, exact_norm(layer.produced_weight())
    args = {"conv_exact": (3, 2, "same", 1, 3, 4, (9, 9)), "conv_fft": (3, 1, "same", 1, 4, 4, (14, 14)),
            "conv_grouped": (4, 2, 1, 2, 4, 6, (12, 12))}[name]
    layer = _random_conv(*args, seed=len(name))
    return layer, _conv_exact(layer)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("force", [False, True], ids=["auto", "certified"])
@pytest.mark.parametrize("name", ["conv_exact", "conv_fft", "conv_grouped", "dense", "chord", "block_fft"])
def test_bounds_where_the_model_lives(device, force, name, monkeypatch):
    """Each layer's bound computed on ``device`` — every eigensolver / factorisation input stays
    there — is ≥ the exact norm (float64 oracle) and within 1.05x of it, and agrees with the
    computation on the CPU. ``*_fft`` layers are sent down the circular (FFT) path."""
    if force:
        monkeypatch.setattr(bounds.eigen, "EIGH_WORK", 0)
    if name.endswith("_fft"):
        monkeypatch.setattr(bounds.conv, "EXACT_MAX_DIM", 0)
    layer, exact = _case(name)
    cpu_bound = layer.lipschitz_bound()
    layer = layer.to(device)
    seen = []
    for fn in ("eigvalsh", "cholesky_ex"):
        orig = getattr(torch.linalg, fn)

        def spy(x, *a, _orig=orig, **k):
            seen.append(x.device.type)
            return _orig(x, *a, **k)

        monkeypatch.setattr(torch.linalg, fn, spy)
    bound = layer.lipschitz_bound()
    assert seen and set(seen) == {torch.device(device).type}
    assert exact <= bound <= TIGHT * exact
    assert bound == pytest.approx(cpu_bound, rel=1e-6)
