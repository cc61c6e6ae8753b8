"""Certified largest eigenvalues of Hermitian matrices: every returned number is a proof, and no
proof trusts how LAPACK / cuSOLVER computed an eigenvalue or a factorisation.

``G`` is the Hermitian matrix of the lower triangle of a computed float64 (complex128) matrix —
what the eigensolver and Cholesky read, the imaginary parts of the diagonal ignored — and the
caller bounds ``‖G − H‖₂ ≤ err``.

The proof (:func:`certify_factors`; Rump, "Verification of positive definiteness", BIT 2006, made
independent of the factorisation algorithm). For a shift ``μ`` form ``M = fl(μI − G)`` (the
off-diagonal negated exactly, the diagonal rounded once: ``|Δ_D| ≤ u(|μ| + dmax)``,
``dmax = max|g_ii|``) and factor ``M ≈ LLᴴ`` by any algorithm — blocked, recursive, with
inverted diagonal blocks: the proof never asks. Then measure the residual in float64: with
``Ê = fl(fl(LLᴴ) − M)`` on the lower triangle, ``‖LLᴴ − M‖₂ ≤ ‖LLᴴ − M‖_F ≤ √2‖tril(LLᴴ − M)‖_F``
and ``|LLᴴ − fl(LLᴴ)| ≤ γ_c|L||Lᴴ|`` (inner products of length ``n``: ``γ_c = γ_n``, complex
``2γ_{2n+2}``; Higham, *Accuracy and Stability*, Lemmas 3.1, 3.5), ``‖|L||Lᴴ|‖_F ≤ ‖L‖_F²``:

    ``δ = √2(1 + γ₁)‖tril Ê‖_F + γ_c‖L‖_F² + 4n²λ``      (norms rounded up; ``λ`` underflow)

``LLᴴ ⪰ 0`` for ANY ``L``, so ``λ_min(M) ≥ −δ`` and ``λ_max(H) ≤ μ + δ + u(|μ| + dmax) + err``
(the allowance inflated as an error polynomial, :data:`~gloronet.rounding.INFLATE`, the sum with
``μ`` rounded up once).

Candidates ``μ`` (never trusted): Lanczos estimates ``θ(1 + τ)`` (``TAUS``), or the eigensolver's
top eigenvalue raised by a few rounding units, ``θ + s(n+2)u(|θ| + dmax)`` for ``s`` in
``SLACKS``. What no certificate proves falls back to Gershgorin's discs (:func:`gershgorin_bound`:
always a bound, loose).
"""
from __future__ import annotations

import math

import torch

from ..rounding import gamma64, norm_upper_from, round_up, smallest_normal, up, up_tensor
from .estimates import _random_like, lanczos_max
from .threads import _matmul, one_thread

U = 2.0**-53
EIGH_WORK = 2**24  # batch·n³ up to which the eigensolver's values are the candidates outright
TAUS = (2.0**-20, 2.0**-15, 2.0**-10, 2.0**-5)  # single matrices: tried in turn from a Lanczos estimate
SLACKS = (4.0, 2.0**8, 2.0**16, 2.0**24, 2.0**32)  # eigensolver candidates: θ + s(n+2)u(|θ| + dmax)


def _up(t: torch.Tensor) -> torch.Tensor:
    """:func:`~gloronet.rounding.up_tensor`, NaN (from a non-finite factor) made inf: no bound."""
    return up_tensor(t.nan_to_num(nan=math.inf))


@one_thread
def _top_eigenvalue(g: torch.Tensor) -> float:
    """``max_b`` of the eigensolver's top eigenvalue (a candidate, not a bound)."""
    return float(torch.linalg.eigvalsh(g)[..., -1].max())


def _shifted(g: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """``fl(μ_b I − g_b)``: off-diagonal entries negated (exact), the diagonal rounded once."""
    m = torch.neg(g)
    m.diagonal(dim1=-2, dim2=-1).add_(mu.to(m.dtype)[:, None])
    return m


def _diag_max(g: torch.Tensor) -> torch.Tensor:
    """(B,) ``max_i |Re g_ii|`` (the same for ``G`` and ``−G``)."""
    return g.diagonal(dim1=-2, dim2=-1).real.abs().amax(dim=-1)


def _lower_product(factor: torch.Tensor, parts: int = 4) -> torch.Tensor:
    """``L Lᴴ`` on and below the diagonal for lower-triangular ``L`` (above it: anything), by block
    rows: block row ``r`` needs the first ``hi_r`` columns only (the rest of ``L`` is zero there),
    ~47% of a full product for 4 parts. Every entry is one inner product of at most ``n`` terms."""
    n = factor.shape[-1]
    if n < 32 * parts:
        return _matmul(factor, factor.mH)
    edges = [n * k // parts for k in range(parts + 1)]
    out = factor.new_empty(factor.shape)
    for lo, hi in zip(edges[:-1], edges[1:]):
        out[..., lo:hi, :hi] = _matmul(factor[..., lo:hi, :hi], factor[..., :hi, :hi].mH)
    return out


def residual_bound(m: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """(B,) ``δ_b ≥ ‖L_b L_bᴴ − M_b‖₂`` for the Hermitian ``M_b`` of the lower triangle of ``m``
    (real diagonal) and any computed lower-triangular ``factor`` (see the module docstring).
    ``‖L‖_F² = tr LLᴴ`` comes from the computed diagonal: ``n``-term sums of non-negative
    products, each within ``γ_n``, summed again (``γ_n``): ``≤ Σ_i fl(LLᴴ)_ii · (1 + 4γ_n)``."""
    n = m.shape[-1]
    complex_ = m.is_complex()
    e = _lower_product(factor)
    diag = e.diagonal(dim1=-2, dim2=-1).real
    fro_l2 = diag.sum(dim=-1) * (1 + 4 * gamma64(n)) + 2 * n * n * smallest_normal(torch.float64)
    e.sub_(m).tril_()
    if complex_:  # Cholesky reads the real part of the diagonal only; (LLᴴ)_ii is real too
        e.diagonal(dim1=-2, dim2=-1).imag.zero_()
    squares = (2 if complex_ else 1) * n * (n + 1) // 2
    fro_e = norm_upper_from(torch.linalg.vector_norm(e, dim=(-2, -1)), squares, torch.float64)
    g_c = 2 * gamma64(2 * n + 2) if complex_ else gamma64(n)
    lam = smallest_normal(torch.float64)
    return _up(math.sqrt(2) * (1 + gamma64(1)) * fro_e + g_c * fro_l2 + 4 * n * n * lam)


def certify_factors(m: torch.Tensor, factor: torch.Tensor, mu: torch.Tensor, dmax: torch.Tensor, err: float) -> torch.Tensor:
    """(B,) upper bounds of ``λ_max(H_b)`` from ``m = fl(μ_b I − G_b)`` and a computed factor of it
    (inf where the residual is not finite)."""
    allowance = _up(residual_bound(m, factor) + U * (mu.abs() + dmax) + err)
    return torch.nextafter(mu + allowance, torch.full_like(mu, math.inf)).nan_to_num(nan=math.inf)


def cholesky_certificates(m: torch.Tensor, mu: torch.Tensor, dmax: torch.Tensor, err: float) -> torch.Tensor:
    """(B,) :func:`certify_factors` of Cholesky factors of ``m = fl(μ_b I − G_b)``; inf where the
    factorisation breaks down."""
    factor, info = torch.linalg.cholesky_ex(m)
    out = torch.full((m.shape[0],), math.inf, dtype=torch.float64, device=m.device)
    ok = info == 0
    if bool(ok.any()):
        out[ok] = certify_factors(m[ok], factor[ok], mu[ok], dmax[ok], err)
    return out


def gershgorin_bound(g: torch.Tensor, err: float) -> float:
    """``max_b λ_max(H_b) ≤ max_{b,i} (Re g_ii + Σ_{j≠i}|g_ij|) + err`` over the Hermitian matrices of
    the lower triangles (Gershgorin): sums of ``n`` moduli err by ``≤ γ_{n+4}``, the final sum by
    ``u`` of its terms' size."""
    n = g.shape[-1]
    lower = torch.tril(g, -1).abs()
    radius = (lower.sum(dim=-1) + lower.sum(dim=-2)) * (1 + gamma64(n + 4))
    centre = g.diagonal(dim1=-2, dim2=-1).real
    top = centre + radius + 2 * U * (centre.abs() + radius)
    return round_up(float(top.max()) + up(err)) if top.numel() else up(err)


def candidates_bound(g: torch.Tensor, theta: torch.Tensor, err: float) -> float:
    """``max_b λ_max(H_b)`` proved from candidates ``θ_b`` (e.g. the eigensolver's top eigenvalues):
    Cholesky certificates at ``θ + s(n+2)u(|θ| + dmax)`` for ``s`` in ``SLACKS``, Gershgorin for
    the matrices none proves."""
    n = g.shape[-1]
    theta = theta.to(torch.float64)
    dmax = _diag_max(g)
    best, pending = 0.0, torch.arange(g.shape[0], device=g.device)
    for s in SLACKS:
        t = theta[pending]
        mu = t + s * (n + 2) * U * (t.abs() + dmax[pending])
        bounds = cholesky_certificates(_shifted(g[pending], mu), mu, dmax[pending], err)
        ok = torch.isfinite(bounds)
        if bool(ok.any()):
            best = max(best, float(bounds[ok].max()))
        pending = pending[~ok]
        if pending.numel() == 0:
            return best
    return max(best, gershgorin_bound(g[pending], err))


@one_thread
def eigensolver_bound(g: torch.Tensor, err: float) -> float:
    """:func:`candidates_bound` with the eigensolver's top eigenvalues as the candidates."""
    return candidates_bound(g, torch.linalg.eigvalsh(g)[..., -1], err)


@one_thread
def hermitian_max_bound(g: torch.Tensor, err: float, start: torch.Tensor | None = None) -> float:
    """Provable upper bound of ``max_b λ_max(H_b)`` for Hermitian ``H_b`` given finite float64
    (complex128) matrices ``g`` (…, n, n) with ``‖g_b − H_b‖₂ ≤ err`` (lower triangles are read).

    :func:`eigensolver_bound` for ``batch·n³ ≤ EIGH_WORK``. Otherwise Lanczos estimates ``θ_b``
    (from ``start`` (…, n) if given, else a fixed random vector), raised to ``max_i g_ii`` (a lower
    bound too), and Cholesky certificates at ``θ_b(1 + τ)`` for ``τ`` in ``TAUS``. When only a
    larger ``τ`` passes, the factor ``L`` of ``μI − G`` it produced refines the estimate:
    shift-and-invert Lanczos (``λ_max(G) = μ − 1/λ_max((μI − G)⁻¹)``, two triangular solves per
    step, converging fast because ``μ`` sits just above ``λ_max``), then one more certificate at
    the refined ``θ(1 + τ₀)``. What no certificate covers goes to :func:`eigensolver_bound`.
    """
    n = g.shape[-1]
    g = g.reshape(-1, n, n)
    if g.numel() == 0:
        return up(err)
    if g.shape[0] * n**3 <= EIGH_WORK:
        return eigensolver_bound(g, err)
    diag = g.diagonal(dim1=-2, dim2=-1).real
    dmax = _diag_max(g)
    v0 = _random_like((g.shape[0], n), g)
    if start is not None:
        s = start.detach().reshape(-1, n).to(g)
        v0 = s / s.norm(dim=1, keepdim=True).clamp_min(1e-30) + 1e-3 * v0 / math.sqrt(n)
    theta = lanczos_max(lambda v: (g @ v.unsqueeze(-1)).squeeze(-1), v0)
    theta = torch.maximum(theta.to(torch.float64), diag.amax(dim=1))
    best, pending = 0.0, torch.arange(g.shape[0], device=g.device)
    for tau in TAUS:
        mu = theta[pending] * (1 + tau)
        gp = g if len(pending) == len(g) else g[pending]
        m = _shifted(gp, mu)
        factor, info = torch.linalg.cholesky_ex(m)
        ok = info == 0
        if bool(ok.any()):
            keep = (lambda t: t) if bool(ok.all()) else (lambda t: t[ok])  # noqa: E731  (no copies when all pass)
            mu_ok, m_ok, f_ok, g_ok = keep(mu), keep(m), keep(factor), keep(gp)
            del m, factor
            if tau != TAUS[0]:  # refine from the factor, certify again at the tight margin
                nu = lanczos_max(lambda v: torch.cholesky_solve(v.unsqueeze(-1), f_ok).squeeze(-1),
                                 _random_like((len(mu_ok), n), f_ok), steps=24, tol=2.0**-30)
                refined = torch.where(nu > 0, mu_ok - 1 / nu, mu_ok) * (1 + TAUS[0])
                m_ref = _shifted(g_ok, refined)
                f_ref, info_ref = torch.linalg.cholesky_ex(m_ref)
                tighter = (refined < mu_ok) & (info_ref == 0)
                if bool(tighter.all()):
                    mu_ok, m_ok, f_ok = refined, m_ref, f_ref
                elif bool(tighter.any()):
                    mu_ok = torch.where(tighter, refined, mu_ok)
                    m_ok[tighter], f_ok[tighter] = m_ref[tighter], f_ref[tighter]
            bounds = certify_factors(m_ok, f_ok, mu_ok, keep(dmax[pending]), err)
            proved = torch.isfinite(bounds)
            if bool(proved.any()):
                best = max(best, float(bounds[proved].max()))
            ok[ok.clone()] = proved
        pending = pending[~ok]
        if pending.numel() == 0:
            return best
    return max(best, eigensolver_bound(g[pending], err))
