"""Provable bounds of explicit matrices: ``‖A‖₂ = √λ_max(AAᴴ)`` with the rounding of forming ``AAᴴ``."""
from __future__ import annotations

import math

import torch

from ..rounding import gamma64, round_up, sqrt_up, up
from .eigen import hermitian_max_bound
from .float64 import as_float64, max_abs, pow2_scale
from .threads import _matmul, one_thread


@one_thread
def gram_norm_bound(a: torch.Tensor, start: torch.Tensor | None = None) -> float:
    """Provable upper bound of ``‖A‖₂`` for an explicit (batched: max over) matrix, in float64.

    ``‖A‖₂² = λ_max(A Aᴴ)``, taking the Gram matrix of the smaller side; ``A`` is first divided
    by a power of two (exact). Forming ``AAᴴ`` with ``q``-term inner products errs by
    ``≤ γ_q ‖A‖_F²`` in norm (``2γ_{q+64}`` also covers complex arithmetic and underflow).
    ``start`` (…, rows of ``A``): an approximate top left singular vector (a training iterate).
    """
    a = as_float64(a)
    if a.numel() == 0:
        return 0.0
    if not math.isfinite(max_abs(a)):
        return math.inf
    scale = pow2_scale(a)
    a = a / scale
    if a.shape[-2] > a.shape[-1]:
        if start is not None:  # left vectors of Aᵀ = Aᴴ-images of the left vectors of A
            start = (a.mH @ start.to(a).reshape(*a.shape[:-2], -1, 1)).squeeze(-1)
        a = a.mT
    fro = float(torch.linalg.vector_norm(a, dim=(-2, -1)).max()) ** 2 * (1 + 4 * gamma64(a.shape[-2] * a.shape[-1] + 4))
    err = up(2 * gamma64(a.shape[-1] + 64) * fro)
    return round_up(sqrt_up(hermitian_max_bound(_gram(a), err, start)) * scale)


def _gram(a: torch.Tensor, parts: int = 4) -> torch.Tensor:
    """``A Aᴴ`` from the products of its lower block triangle only (``parts`` row blocks; the
    upper blocks are conjugate transposes, so the result is exactly Hermitian): 5/8 of the work
    for 4 parts. Every entry is one inner product, as in ``A @ Aᴴ``."""
    rows = a.shape[-2]
    if rows < 256 * parts:
        return _matmul(a, a.mH)
    edges = [rows * k // parts for k in range(parts + 1)]
    g = a.new_empty(*a.shape[:-2], rows, rows)
    for r in range(parts):
        lo, hi = edges[r], edges[r + 1]
        g[..., lo:hi, : hi] = _matmul(a[..., lo:hi, :], a[..., :hi, :].mH)
        g[..., : lo, lo:hi] = g[..., lo:hi, : lo].mH
    return g


def dense_norm_bound(weight: torch.Tensor, start: torch.Tensor | None = None) -> float:
    """Provable upper bound of the spectral norm of a dense weight (exact up to rounding and the
    certificate margin ``τ``); ``start``: the layer's power-iteration iterate (output side)."""
    return gram_norm_bound(weight.detach().reshape(weight.shape[0], -1), start)
