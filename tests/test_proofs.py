"""The proofs behind every returned bound (issue 19, item 4), against exact arithmetic.

* eigenvalue bounds never trust the eigensolver nor the factorisation: an eigensolver that
  answers low and a "Cholesky" that returns the factor of another matrix still give bounds ≥ the
  exact top eigenvalue (mpmath at 60 digits);
* the residual bound of a computed factor ≥ the exact residual (``fractions``), including a case
  where the computed residual is exactly 0 and only the product's rounding term is left;
* Gershgorin's fallback ≥ the exact top eigenvalue;
* ``abs_conv2d_norm_bound`` ≥ the exact ``Σ|w|`` when the tap sum is added in a legal
  worst order (the ``1 + γ_taps`` factor);
* ``LiResBlock.error_model``'s flush term ≥ its exact value when the float32 row sum of ``|R|``
  rounds down (``row_abs`` in float64).
"""
from __future__ import annotations

from fractions import Fraction

import mpmath
import pytest
import torch

from gloronet import bounds
from gloronet.bounds import eigen, nonneg
from gloronet.nn import LiResBlock
from gloronet.rounding import gamma, smallest_normal

pytestmark = pytest.mark.usefixtures("single_thread")
D = torch.float64


def _exact_top(g: torch.Tensor) -> mpmath.mpf:
    """The top eigenvalue of the Hermitian matrix of ``g``'s lower triangle (real diagonal), in
    60-digit arithmetic from the exact float64 entries."""
    n = g.shape[-1]
    with mpmath.workdps(60):
        a = mpmath.matrix(n, n)
        for i in range(n):
            for j in range(i + 1):
                v = complex(g[i, j])
                z = mpmath.mpc(v.real, v.imag) if g.is_complex() else mpmath.mpf(v.real)
                a[i, j] = z.real if i == j else z
                a[j, i] = a[i, i] if i == j else mpmath.conj(z)
        vals = mpmath.eighe(a, eigvals_only=True) if g.is_complex() else mpmath.eigsy(a, eigvals_only=True)
        return max(vals)


def _psd(n, seed, complex_=False):
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.complex128 if complex_ else D
    a = torch.randn(n, n + 3, generator=gen, dtype=dtype)
    return a @ a.mH


@pytest.mark.parametrize("complex_", [False, True])
def test_a_lying_eigensolver_cannot_lower_the_bound(monkeypatch, complex_):
    """The eigensolver's values are candidates only: answering 1e-3 low costs Cholesky attempts,
    never soundness (the old code added 1e-9·|θ| to them and returned that)."""
    g = _psd(12, 1, complex_)[None]
    exact = _exact_top(g[0])
    honest = eigen.eigensolver_bound(g, 0.0)
    real = torch.linalg.eigvalsh
    monkeypatch.setattr(torch.linalg, "eigvalsh", lambda t: real(t) * (1 - 1e-3))
    lying = eigen.eigensolver_bound(g, 0.0)
    assert mpmath.mpf(honest) >= exact and mpmath.mpf(lying) >= exact
    assert honest <= float(exact) * (1 + 1e-12)  # and tight with an honest eigensolver


@pytest.mark.parametrize("complex_", [False, True])
def test_a_factorisation_of_another_matrix_cannot_certify(monkeypatch, complex_):
    """``cholesky_ex`` replaced by one that returns (info 0) the factor of ``M + cI``: the
    certificate at a candidate below λ_max must not pass as a bound below λ_max (Higham's
    backward-error theorem, which the old code relied on, would have certified μ)."""
    g = _psd(40, 2, complex_)
    exact = _exact_top(g)
    lam = float(exact)
    mu = torch.tensor([lam * (1 - 1e-3)], dtype=D)
    real = torch.linalg.cholesky_ex

    def other_matrix(m, *a, **k):
        return real(m + 2e-3 * lam * torch.eye(m.shape[-1], dtype=m.dtype), *a, **k)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", other_matrix)
    dmax = eigen._diag_max(g[None])
    bound = float(eigen.cholesky_certificates(eigen._shifted(g[None], mu), mu, dmax, 0.0)[0])
    assert mpmath.mpf(bound) >= exact
    monkeypatch.setattr(eigen, "EIGH_WORK", 0)
    monkeypatch.setattr(eigen, "TAUS", (-1e-3,))
    assert mpmath.mpf(eigen.hermitian_max_bound(g[None], 0.0)) >= exact


def _exact_residual_fro(m: torch.Tensor, factor: torch.Tensor) -> Fraction:
    """``‖L Lᵀ − M‖_F²`` exactly (real matrices; M from its lower triangle)."""
    n = m.shape[-1]
    L = [[Fraction(float(factor[i, k])) for k in range(n)] for i in range(n)]
    total = Fraction(0)
    for i in range(n):
        for j in range(n):
            lo, hi = max(i, j), min(i, j)
            e = sum(L[i][k] * L[j][k] for k in range(n)) - Fraction(float(m[lo, hi]))
            total += e * e
    return total


def test_residual_bound_covers_the_exact_residual_even_when_the_computed_one_is_zero():
    """``M := fl(L Lᵀ)`` makes the computed residual exactly 0: only the product-rounding term
    ``γ_n‖L‖_F²`` is left, and it must cover the exact residual (dropping it certifies 0)."""
    gen = torch.Generator().manual_seed(3)
    n = 9
    factor = torch.tril(torch.rand(n, n, generator=gen, dtype=D) + 0.5)
    factor = factor + torch.tril(torch.full((n, n), 1e-9, dtype=D)) * torch.rand(n, n, generator=gen, dtype=D)
    m = torch.tril(factor @ factor.T)
    assert torch.equal(torch.tril(eigen._lower_product(factor[None])[0]), m)  # the computed residual is 0
    exact2 = _exact_residual_fro(m, factor)
    assert exact2 > 0  # the product did round
    delta = Fraction(float(eigen.residual_bound(m[None], factor[None])[0]))
    assert delta * delta >= exact2
    other = m.clone()
    other[3, 1] += 1e-6  # a residual the computed difference sees
    delta = Fraction(float(eigen.residual_bound(other[None], factor[None])[0]))
    assert delta * delta >= _exact_residual_fro(other, factor)


@pytest.mark.parametrize("complex_", [False, True])
def test_gershgorin_fallback_is_a_bound(monkeypatch, complex_):
    """Every factorisation breaking down leaves Gershgorin's discs: still ≥ λ_max."""
    g = _psd(10, 4, complex_)[None]
    real = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda m, *a, **k: (real(m)[0], torch.ones(m.shape[0], dtype=torch.int32)))
    bound = eigen.eigensolver_bound(g, 0.0)
    assert bound == eigen.gershgorin_bound(g, 0.0)
    assert mpmath.mpf(bound) >= _exact_top(g[0])


def test_abs_conv_bound_allows_for_a_tap_sum_rounded_down(monkeypatch):
    """A legal worst summation order (largest first, sequentially) loses 255 half-ulps of the
    taps; the exact ``Σ|w|`` (the sup over input sizes of ‖|A|‖₂ for one channel) must still be
    covered: that is the ``1 + γ_taps`` factor."""
    w = torch.full((1, 1, 16, 16), 2.0**-53 * (1 - 2.0**-10), dtype=D)
    w[0, 0, 0, 0] = 1.0

    from test_fp import _worst_order_sum

    def largest_first(t):
        return _worst_order_sum(t.flatten(-2))

    monkeypatch.setattr(nonneg, "_tap_sum", largest_first)
    assert float(largest_first(w)) == 1.0  # every small tap was rounded away
    exact = sum((Fraction(float(v)) for v in w.flatten()), Fraction(0))
    assert Fraction(bounds.abs_conv2d_norm_bound(w, 1)) >= exact


def test_liresblock_flush_term_uses_an_exact_enough_row_sum():
    """A residual kernel whose float32 row sum of ``|R|`` rounds down (2²⁵ + 1 → 2²⁵ in any
    order): the error model's flush term must still be ≥ its exact value
    ``(1 + γ_d)·λ·√m·(1 + Σ|R_row| + 2(n + 2))`` (no shift, no activation: that is all of ``abs``)."""
    block = LiResBlock(2, (4, 8), depth=1, centering=False, activation=False)
    with torch.no_grad():
        block.weight.zero_()
        block.weight[0, 0, 0, 0] = 2.0**25
        block.weight[0, 1, 2, 2] = 1.0
        block.gamma.fill_(1.0)
        block.bias.zero_()
    r = block.applied_residual_kernel()
    assert float(r.abs().flatten(1).sum(dim=1).max()) == 2.0**25  # float32 lost the 1
    block.eval()
    model = block.error_model((2, 4, 8), torch.float32, block.lipschitz_bound())
    n = 2 * 9
    from gloronet.nn import accumulate
    depth = accumulate.rounding_depth(n, 2, bias=False) + 2
    u = Fraction(1, 2**24)
    g = depth * u / (1 - depth * u)
    lam = Fraction(smallest_normal(torch.float32))
    exact = (1 + g) * lam * 8 * (1 + Fraction(2**25 + 1) + 2 * (n + 2))  # √m = √(2·4·8) = 8
    assert gamma(depth, torch.float32) >= float(g)
    assert Fraction(model.abs) >= exact


# --------------------------------------------------------------------------- allowances pinned to their theorems
def test_cholesky_certificate_adds_every_allowance():
    """With a factor whose residual is exactly 0, the certificate is still ``μ`` plus the rounding
    of the shifted diagonal ``u(|μ| + dmax)`` (here 1.5 ulps of μ) plus the Gram allowance ``err``."""
    m = torch.tensor([[[4.0]]], dtype=D)
    factor = torch.tensor([[[2.0]]], dtype=D)  # LLᵀ = M exactly
    mu, dmax = torch.tensor([2.0**60], dtype=D), torch.tensor([2.0**61], dtype=D)
    bound = Fraction(float(eigen.certify_factors(m, factor, mu, dmax, 0.0)[0]))
    assert bound >= Fraction(2**60) + Fraction(2**60 + 2**61, 2**53)
    bound = Fraction(float(eigen.certify_factors(m, factor, mu, torch.zeros(1, dtype=D), 1e6)[0]))
    assert bound >= Fraction(2**60) + Fraction(2**60, 2**53) + Fraction(1e6)


def _captured_err(monkeypatch, module, call, name="hermitian_max_bound"):
    """The allowance ``err`` a bound hands to the eigenvalue proof (``name(g, [canvas,] err, …)``)."""
    seen = []
    real = getattr(module, name)

    def spy(*args, **kw):
        seen.append(args[-1] if name == "_frequency_batch_bound" else args[1])
        return real(*args, **kw)

    monkeypatch.setattr(module, name, spy)
    call()
    return seen[0]


def test_gram_allowances_cover_the_theorems(monkeypatch):
    """The allowance each Gram matrix is formed with covers Higham's bound on its rounding
    (``γ_q·‖|A|‖²``, q-term inner products), computed here in exact arithmetic from the weights:
    dense ``AAᵀ`` (``‖|A|‖² ≤ ‖A‖_F²``), the explicit conv Gram (``‖|A|‖₁‖|A|‖_∞``), the circular
    Gram kernel (``taps·‖w‖_F²``). Dropping an allowance makes the proof certify the computed
    matrix only."""
    from gloronet.bounds import circular, conv_explicit, dense

    g = torch.Generator().manual_seed(21)
    a = torch.randn(7, 30, generator=g, dtype=D)
    err = _captured_err(monkeypatch, dense, lambda: bounds.gram_norm_bound(a))
    scale = Fraction(bounds.pow2_scale(a))
    fro = sum(Fraction(float(v)) ** 2 for v in a.flatten()) / scale**2
    q = 30
    assert Fraction(err) >= Fraction(q, 2**53 - q) * fro
    w = torch.randn(3, 2, 3, 3, generator=g, dtype=D)
    s = Fraction(bounds.pow2_scale(w))
    _, err = conv_explicit.conv2d_explicit_gram(w / float(s), (5, 5), 1, (1, 1, 1, 1))
    rows = max(sum(abs(Fraction(float(v))) for v in w[o].flatten()) for o in range(3)) / s
    cols = max(sum(abs(Fraction(float(v))) for v in w[:, c].flatten()) for c in range(2)) / s
    output_side = 3 * 25 < 2 * 25  # the Gram of the smaller side: here the input side, summing over c_out
    c_summed = 2 if output_side else 3
    gam = lambda n: Fraction(n, 2**53 - n)  # noqa: E731
    assert Fraction(err) >= gam(c_summed + 9) * rows * cols
    err = _captured_err(monkeypatch, circular, lambda: bounds.circular_conv_bound(w, (8, 8)), "_frequency_batch_bound")
    w2 = w / float(s) if w.shape[1] <= w.shape[0] else (w / float(s)).transpose(0, 1)
    fro_w = sum(Fraction(float(v)) ** 2 for v in w2.flatten())
    assert Fraction(err) >= gam(w2.shape[0] + 9) * 9 * fro_w


def test_circular_bound_proves_the_candidate_frequency_too(monkeypatch):
    """The frequency whose eigenvalue is the candidate must be proved as well: with an
    eigensolver answering 1% low, the certificates of the other frequencies (at θ(1 + τ)) no
    longer cover it. Exact reference: SVDs of the kernel's 2-D DFT at every frequency."""
    from gloronet.bounds import circular

    w = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(22), dtype=D)
    canvas = (8, 8)
    khat = torch.fft.fft2(w, s=canvas)  # (m, n, N1, N2): K̂(ω) = Σ_v w_v e^{-2πi⟨ω,v⟩/N}
    exact = float(torch.linalg.svdvals(khat.permute(2, 3, 0, 1)).max())
    monkeypatch.setattr(eigen, "EIGH_WORK", 0)  # the frequency-batch path
    real = torch.linalg.eigvalsh
    monkeypatch.setattr(torch.linalg, "eigvalsh", lambda t: real(t) * 0.99)
    assert circular.TAU < 0.01
    assert bounds.circular_conv_bound(w, canvas) >= exact * (1 - 1e-12)


def test_collatz_wielandt_bound_covers_products_rounded_down(monkeypatch):
    """``Gv`` computed as low as the model allows (``(1 − γ_{m+n})`` times its value, every sum
    rounded down) on a rank-one matrix, where the Collatz–Wielandt ratio reaches ``λ_max``
    exactly: the bound must still be ≥ the exact norm ``‖u‖‖v‖``."""
    u = torch.rand(40, generator=torch.Generator().manual_seed(23), dtype=D) + 0.5
    v = torch.rand(60, generator=torch.Generator().manual_seed(24), dtype=D) + 0.5
    a = torch.outer(u, v)
    g = float(Fraction(100, 2**53 - 100))  # γ_{m+n}
    real = nonneg._gram_times
    monkeypatch.setattr(nonneg, "_gram_times", lambda m, x: real(m, x) * (1 - g))
    with mpmath.workdps(60):  # nearly rank one: ‖A‖₂ = ‖A‖_F up to ~1e-32 relative
        exact = mpmath.sqrt(mpmath.fsum(mpmath.mpf(float(x)) ** 2 for x in a.flatten()))
        assert mpmath.mpf(bounds.nonneg_norm_bound(a)) >= exact * (1 - mpmath.mpf(10) ** -25)
