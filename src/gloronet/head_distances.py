"""Provable upper bounds of the head's pairwise row distances ``‖w_j − w_i‖₂`` (the factor of
``K_ji = L·‖w_j − w_i‖``, Leino et al. ICML 2021), in float64, for any summation order.

Two evaluations, chosen by the work ``C²·D``:

- **differences** (small heads): each difference vector exactly, divided by its own power of two
  so no square underflows; a ``D``-term sum of squares errs by ≤ ``D·u`` relative (``GRAM_SLACK``).
  Tight to the last bits, but ``C²·D`` memory traffic: 125 s for an ImageNet head (1000 × 2048)
  on one CPU core.
- **Gram** (large heads): ``‖w_i − w_j‖² = s_i + s_j − 2g_ij`` from one GEMM ``G = WWᵀ`` and the
  row squares ``s``, with a rigorous allowance (Higham, *Accuracy and Stability*, §3.1): after
  an exact power-of-two scaling of ``W`` (largest entry in ``[1, 2)``), any summation order gives
  ``|ĝ_ij − g_ij| ≤ γ_D Σ_k|w_ik||w_jk| + Dμ ≤ γ_D √(s_i s_j) + Dμ`` (Cauchy–Schwarz; ``μ = 2⁻¹⁰²²``
  covers products that underflow, flushed or gradual) and ``ŝ_i ≥ (1 − γ_D)s_i − Dμ``. With
  ``a_i = (ŝ_i + Dμ)/(1 − γ_D) ≥ s_i``::

      ‖w_i − w_j‖² ≤ t_ij = a_i + a_j − 2ĝ_ij + 2γ_D √(a_i a_j) + 2Dμ,

  and ``t`` itself is evaluated with a few roundings, each ≤ ``u`` times the sum of its terms'
  magnitudes ``m_ij``, so ``t̂ + 32u·m̂`` bounds it; the square root is rounded up, and the
  triangle inequality ``√a_i + √a_j`` caps it. Near-identical rows lose ≈ ``√(γ_D)·‖w‖`` of
  tightness (≈ 1e-6 relative for D = 2048); other pairs ≈ ``γ_D`` relative.
"""
from __future__ import annotations

import math

import torch

from .bounds import GRAM_SLACK, pow2_scales

GRAM_WORK = 1 << 26  # C²·D above which the Gram evaluation is used
U = 2.0**-53
MU = 2.0**-1022  # smallest normal float64: the absolute error of an underflowing product
TINY = 2.0**-1074  # smallest subnormal: the most an exact power-of-two division can lose


def pairwise_row_distances_bound(w: torch.Tensor, gram_work: int = GRAM_WORK) -> torch.Tensor:
    """Provable upper bounds of ``‖w_j − w_i‖₂`` in float64 (C, C), diagonal 0 (module docstring)."""
    w = w.detach().to(torch.float64).cpu()
    c, d = w.shape
    if c * c * d <= gram_work or not bool(torch.isfinite(w).all()):
        out = _by_differences(w)
    else:
        out = _by_gram(w)
    out.fill_diagonal_(0.0)
    return out


def _up(t: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(t, torch.full_like(t, math.inf))


def _by_differences(w: torch.Tensor) -> torch.Tensor:
    """Differences of float32 values are exact in float64 (of float64 values: 2u relative, inside
    ``GRAM_SLACK``); each difference vector is divided by its own power of two ``s`` (exact) so that
    no square underflows; the square root is rounded up."""
    c, d = w.shape
    out = torch.empty(c, c, dtype=torch.float64)
    rows = max(1, (1 << 24) // max(1, c * d))
    for start in range(0, c, rows):
        diff = w[start : start + rows, None, :] - w[None, :, :]
        peak = diff.abs().amax(dim=-1, keepdim=True)
        scale = pow2_scales(peak)
        norm = _up(((diff / scale) ** 2).sum(dim=-1).mul(1 + GRAM_SLACK).sqrt())
        out[start : start + rows] = norm * scale.squeeze(-1)  # × 2^k: exact (or inf)
    return out


def _by_gram(w: torch.Tensor) -> torch.Tensor:
    c, d = w.shape
    scale = float(pow2_scales(w.abs().amax().reshape(1))[0])
    w = w / scale  # exact, except entries that become subnormal: each moves by ≤ TINY
    gamma = d * U / (1 - d * U)
    a = (w * w).sum(dim=1).add(d * MU).mul((1 + 8 * U) / (1 - gamma))  # ≥ s_i (two roundings inside 8u)
    g = w @ w.t()
    r = a.sqrt().mul(1 + 2 * U)  # ≥ √a_i
    p = torch.outer(r, r).mul(1 + 2 * U)  # ≥ √(a_i a_j)
    ai, aj = a[:, None], a[None, :]
    t = ai + aj - 2 * g + (2 * gamma) * p + 2 * d * MU
    m = ai + aj + 2 * g.abs() + (2 + 2 * gamma) * p + 2 * d * MU
    bound = _up(torch.clamp_min(t + (32 * U) * m, 0).sqrt())
    bound = torch.minimum(bound, _up((r[:, None] + r[None, :]) * (1 + 2 * U)))
    if scale > 1:  # entries that lost bits in the division: each row moved by ≤ √D·TINY
        bound = _up(bound + 2 * math.sqrt(d) * TINY)
    return bound * scale
