"""Certified largest eigenvalues of Hermitian matrices: every returned number is a proof.

Small problems by a symmetric eigensolver; otherwise a candidate ``μ = θ(1 + τ)`` is *proved*
≥ ``λ_max`` by a floating-point Cholesky factorisation of ``μI − G`` that runs to completion
(Rump, "Verification of positive definiteness", BIT 2006). See :func:`hermitian_max_bound`.
"""
from __future__ import annotations

import math

import torch

from ..rounding import gamma64, up
from .estimates import _random_like, lanczos_max
from .threads import one_thread

REL_SLACK = 1e-9
U = 2.0**-53
EIGH_WORK = 2**24  # batch·n³ up to which the eigensolver is used outright (exact, and cheap)
TAUS = (2.0**-20, 2.0**-15, 2.0**-10, 2.0**-5)  # single matrices: tried in turn from a Lanczos estimate


@one_thread
def _top_eigenvalue(g: torch.Tensor) -> float:
    """``max_b λ_max(g_b)`` from the symmetric eigensolver (lower triangles are read)."""
    return float(torch.linalg.eigvalsh(g)[..., -1].max())


def _eig_bound(lam: float, err: float) -> float:
    """``λ_max(H)`` from the eigensolver's top eigenvalue ``lam`` of the computed matrix."""
    return up(lam + REL_SLACK * abs(lam) + err)


def _cholesky_passes(g: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the floating-point Cholesky factorisation of ``μ_b I − g_b`` ran to completion."""
    return torch.linalg.cholesky_ex(_shifted(g, mu)).info == 0


def _cholesky_bound(mu: float, n: int, dmax: float, err: float) -> float:
    """``λ_max(H)`` once Cholesky of ``M = fl(μI − G)`` (n × n) ran to completion.

    ``M = μI − G + Δ_D`` (the diagonal rounds once: ``|Δ_D| ≤ u(μ + dmax)``, ``dmax = max|G_ii|``);
    ``RᴴR = M + ΔM`` with ``‖ΔM‖₂ ≤ γ̃‖R‖_F² ≤ γ̃/(1 − γ̃)·tr M`` and ``tr M ≤ n(μ + dmax)(1 + u)``
    (every pivot, hence every ``M_ii``, is positive). So ``μI − G ⪰ −(μ + dmax)(2nγ̃ + u)·I`` and
    ``λ_max(H) ≤ μ + (μ + dmax)(2nγ̃ + u) + err``.
    """
    return up(mu + (mu + dmax) * (2 * n * gamma64(8 * (n + 2)) + U) + err)


@one_thread
def hermitian_max_bound(g: torch.Tensor, err: float, start: torch.Tensor | None = None) -> float:
    """Provable upper bound of ``max_b λ_max(H_b)`` for Hermitian ``H_b`` given finite float64
    (complex128) matrices ``g`` (…, n, n) with ``‖g_b − H_b‖₂ ≤ err`` (lower triangles are read).

    Eigensolver for ``batch·n³ ≤ EIGH_WORK``. Otherwise Lanczos estimates ``θ_b`` (from ``start``
    (…, n) if given, else a fixed random vector), raised to ``max_i g_ii`` (a lower bound too), and
    Cholesky certificates at ``θ_b(1 + τ)`` for ``τ`` in ``TAUS`` (:func:`_cholesky_bound`). When
    only a larger ``τ`` passes, the factor ``L`` of ``μI − G`` it produced refines the estimate:
    shift-and-invert Lanczos (``λ_max(G) = μ − 1/λ_max((μI − G)⁻¹)``, two triangular solves per
    step, converging fast because ``μ`` sits just above ``λ_max``), then one more certificate at
    the refined ``θ(1 + τ₀)``. What no certificate covers goes to the eigensolver.
    """
    n = g.shape[-1]
    g = g.reshape(-1, n, n)
    if g.numel() == 0:
        return up(err)
    if g.shape[0] * n**3 <= EIGH_WORK:
        return _eig_bound(_top_eigenvalue(g), err)
    diag = g.diagonal(dim1=-2, dim2=-1).real
    dmax = float(diag.abs().max())
    v0 = _random_like((g.shape[0], n), g)
    if start is not None:
        s = start.detach().reshape(-1, n).to(g)
        v0 = s / s.norm(dim=1, keepdim=True).clamp_min(1e-30) + 1e-3 * v0 / math.sqrt(n)
    theta = lanczos_max(lambda v: (g @ v.unsqueeze(-1)).squeeze(-1), v0)
    theta = torch.maximum(theta.to(torch.float64), diag.amax(dim=1))
    best, pending = 0.0, torch.arange(g.shape[0], device=g.device)
    for tau in TAUS:
        mu = theta[pending] * (1 + tau)
        gp = g[pending]
        factor, info = torch.linalg.cholesky_ex(_shifted(gp, mu))
        ok = info == 0
        if bool(ok.any()):
            mu_ok = mu[ok]
            if tau != TAUS[0]:  # refine from the factor, certify again at the tight margin
                lf = factor[ok]
                nu = lanczos_max(lambda v: torch.cholesky_solve(v.unsqueeze(-1), lf).squeeze(-1),
                                 _random_like((len(mu_ok), n), lf), steps=24, tol=2.0**-30)
                refined = torch.where(nu > 0, mu_ok - 1 / nu, mu_ok) * (1 + TAUS[0])
                tighter = (refined < mu_ok) & (torch.linalg.cholesky_ex(_shifted(gp[ok], refined)).info == 0)
                mu_ok = torch.where(tighter, refined, mu_ok)
            best = max(best, _cholesky_bound(float(mu_ok.max()), n, dmax, err))
        pending = pending[~ok]
        if pending.numel() == 0:
            return best
    return max(best, _eig_bound(_top_eigenvalue(g[pending]), err))


def _shifted(g: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """``fl(μ_b I − g_b)``: off-diagonal entries negated (exact), the diagonal rounded once."""
    m = torch.neg(g)
    m.diagonal(dim1=-2, dim2=-1).add_(mu.to(m.dtype)[:, None])
    return m
