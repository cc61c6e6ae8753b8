"""Floating-point forward-error bounds: how far the network that runs can be from the exact one.

A GloRo certificate promises something about the prediction the library *computes*. Lipschitz
bounds describe the exact real-valued network ``φ``; the program evaluates ``φ̂`` in the model's
dtype. This module bounds ``‖φ̂(a) − φ(a)‖₂`` per layer (Higham, *Accuracy and Stability of
Numerical Algorithms*, 2nd ed., §2.2, §3.1; Jin, Ohrimenko & Rubinstein, "Getting a-Round
Guarantees", 2022; Murray, "Lipschitz-Based Robustness Certification Under Floating-Point
Execution", 2026).

Model of arithmetic (what :func:`gloronet.kernels.sound_kernels` enforces where it can, see README):

* IEEE 754 binary32 / binary64 in the model's dtype, round to nearest: ``fl(a∘b) = (a∘b)(1+δ)``,
  ``|δ| ≤ u`` (``u = 2⁻²⁴`` / ``2⁻⁵³``); fused multiply-add and wider accumulators allowed.
* Underflow, gradual or flushed (FTZ/DAZ): every operation may in addition err by at most the
  smallest normal number ``λ`` times the size of an operand it flushes (covered by the ``λ`` terms).
* Every output of a dense layer or convolution is a sum of the products ``w_t·a_t`` (and the
  bias) in ANY order, blocking or split: a term that passes through ``d`` roundings carries a
  factor ``1 + θ_d``, ``|θ_d| ≤ γ_d = d·u/(1 − d·u)``, so the error of an ``n``-term dot product
  is ``≤ γ_n Σ|w_t||a_t|`` (Higham Lemma 3.1 and eq. (3.5)). No Winograd / FFT convolution
  algorithms, no reduced-precision inner products (TF32, bf16): these do not sum products.

In L2 over the outputs this gives ``‖e‖ ≤ γ_n ‖|W||a|‖ ≤ γ_n ‖|W|‖₂ ‖a‖``, where ``‖|W|‖₂`` is
the norm of the entrywise absolute value of the layer's matrix (``gloronet.bounds``).

Each layer reports an :class:`ErrorModel`; models compose (:meth:`ErrorModel.then`), and
:mod:`gloronet.radius` turns them, with the actual activation norms of the pass at ``x``, into the
error margin every certificate must clear.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .bounds import nonneg_norm_bound, pow2_scales
from .kernels import no_autocast, sound_kernels  # noqa: F401  (fp.sound_kernels: the kernels assumed)
from .rounding import INFLATE, gamma, norm_upper_from, smallest_normal, unit_roundoff, up  # noqa: F401  (fp.gamma, fp.up, ...)


def overflow_threshold(dtype: torch.dtype) -> float:
    """Magnitudes below this never overflow in ``dtype`` (half the largest finite value)."""
    return float(torch.finfo(dtype).max) / 2


@dataclass(frozen=True)
class ErrorModel:
    """What a layer ``φ`` (computed as ``φ̂``) guarantees, for every float input ``a``:

    * ``‖φ(a) − φ(b)‖ ≤ lip·‖a − b‖``                   (exact map; ``lip`` = its Lipschitz bound)
    * ``‖φ̂(a) − φ(a)‖ ≤ rel·‖a‖ + abs``                 (rounding of this layer alone)
    * ``‖φ(0)‖ ≤ offset``                                (so ``‖φ̂(a)‖ ≤ offset + lip‖a‖ + error``)
    * every value computed on the way ``≤ peak_rel·‖a‖ + peak_abs`` in magnitude (overflow check)
    """

    lip: float
    rel: float = 0.0
    abs: float = 0.0
    offset: float = 0.0
    peak_rel: float = 1.0
    peak_abs: float = 0.0

    def __post_init__(self):
        for name in ("lip", "rel", "abs", "offset", "peak_rel", "peak_abs"):
            v = float(getattr(self, name))
            if math.isnan(v):  # from NaN weights: no bound at all, so nothing will certify
                v = math.inf
            if v < 0:
                raise ValueError(f"ErrorModel.{name} must be >= 0, got {v}")
            object.__setattr__(self, name, v)

    def then(self, nxt: "ErrorModel") -> "ErrorModel":
        """The model of ``nxt ∘ self``. With ``ρ₁ = offset + (lip + rel)ρ + abs`` (bound on the
        computed intermediate), ``‖ψ̂(φ̂(a)) − ψ(φ(a))‖ ≤ L_ψ‖φ̂(a) − φ(a)‖ + rel_ψ ρ₁ + abs_ψ``.
        Peaks add (a sum of non-negative bounds dominates their maximum)."""
        return ErrorModel(
            lip=up(self.lip * nxt.lip),
            rel=up(nxt.lip * self.rel + nxt.rel * (self.lip + self.rel)),
            abs=up(nxt.lip * self.abs + nxt.rel * (self.offset + self.abs) + nxt.abs),
            offset=up(nxt.offset + nxt.lip * self.offset),
            peak_rel=up(self.peak_rel + nxt.peak_rel * (self.lip + self.rel)),
            peak_abs=up(self.peak_abs + nxt.peak_rel * (self.offset + self.abs) + nxt.peak_abs),
        )


def exact_model(lip: float = 1.0) -> ErrorModel:
    """A layer that only moves values (reshape, permutation, padding, copy): no rounding at all."""
    return ErrorModel(lip=lip)


def elementwise_model(lip: float, numel: int, dtype: torch.dtype) -> ErrorModel:
    """Comparisons such as max/min/ReLU: exact, except that a flushed subnormal errs by ``≤ λ``."""
    return ErrorModel(lip=lip, abs=up(smallest_normal(dtype) * math.sqrt(numel)))


def dot_product_model(
    lip: float,
    depth: int,
    n_terms: int,
    abs_weight_norm: float,
    row_abs_sum: float,
    out_numel: int,
    dtype: torch.dtype,
    bias_norm: float = 0.0,
    bias_max: float = 0.0,
) -> ErrorModel:
    """An affine layer whose every output is ``Σ_t w_t a_t (+ b)`` with each term rounded at most
    ``depth`` times (``n_terms`` for an unknown summation order; less for the chunked sums of
    :mod:`gloronet.nn.accumulate`).

    Args:
        lip: Lipschitz bound of the exact map (``‖W‖₂`` bound).
        depth: most roundings any product or the bias passes through.
        n_terms: number of terms per output, the bias counted (for the flushed-subnormal terms).
        abs_weight_norm: upper bound of ``‖|W|‖₂`` (entrywise absolute value of the operator).
        row_abs_sum: upper bound of ``max_k Σ_t |W_kt|`` (for the flushed-subnormal terms).
        out_numel: number of outputs ``m`` (per example).
        bias_norm, bias_max: ``‖b‖₂`` over all outputs, and ``max |b|``.

    Per output ``|e_k| ≤ γ_d (Σ_t |W_kt||a_t| + |b_k|) + (1+γ_d)λ(Σ_t|W_kt| + ‖a‖_∞ √n + 2n)``
    (``d`` = depth); in L2: ``‖e‖ ≤ γ_d(‖|W|‖₂‖a‖ + ‖b‖) + (1+γ_d)λ√m(row_abs_sum + √n‖a‖ + 2n)``.
    """
    g = gamma(depth, dtype)
    lam = smallest_normal(dtype)
    sqrt_m = math.sqrt(out_numel)
    return ErrorModel(
        lip=lip,
        rel=up(g * abs_weight_norm + (1 + g) * lam * sqrt_m * math.sqrt(n_terms)),
        abs=up(g * bias_norm + (1 + g) * lam * sqrt_m * (row_abs_sum + 2 * n_terms)),
        offset=up(bias_norm),
        peak_rel=up((1 + g) * abs_weight_norm),
        peak_abs=up((1 + g) * (bias_max + lam * (row_abs_sum + 2 * n_terms))),
    )


def affine_error_model(
    rows: torch.Tensor,
    bias: torch.Tensor | None,
    lip: float,
    dtype: torch.dtype,
    positions: int = 1,
    abs_weight_norm: float | None = None,
    depth: int | None = None,
) -> ErrorModel:
    """:func:`dot_product_model` of a layer whose outputs are ``rows @ patch (+ bias)``.

    ``rows`` (m × n): one row of weights per output channel; the layer applies them at
    ``positions`` places (pixels for a convolution, patches, leading dims for ``F.linear``).
    ``abs_weight_norm`` bounds ``‖|A|‖₂`` of the whole operator; by default ``‖|rows|‖₂``, exact
    when the positions see disjoint inputs (dense layers, non-overlapping patches). ``depth``:
    rounding depth of the kernel (default ``n + 1``: any summation order).
    """
    w = rows.detach().to(torch.float64).cpu()
    a = w.abs()
    b = None if bias is None else bias.detach().to(torch.float64).cpu()
    n_terms = w.shape[1] + (b is not None)
    return dot_product_model(
        lip,
        depth=n_terms if depth is None else depth,
        n_terms=n_terms,
        abs_weight_norm=nonneg_norm_bound(a) if abs_weight_norm is None else abs_weight_norm,
        row_abs_sum=float(a.sum(dim=1).max()),
        out_numel=w.shape[0] * positions,
        dtype=dtype,
        bias_norm=0.0 if b is None else float(b.norm()) * math.sqrt(positions),
        bias_max=0.0 if b is None else float(b.abs().max()),
    )


def scale_model(scale_max: float, numel: int, dtype: torch.dtype) -> ErrorModel:
    """``a ↦ c ⊙ a`` for a fixed vector ``c`` with ``|c| ≤ scale_max``, one multiplication per
    element: ``fl(c_i a_i) = c_i a_i (1 + δ) + η``, ``|δ| ≤ u``, ``|η| ≤ λ`` (a flushed result); a
    subnormal ``c_i`` that a denormals-are-zero unit reads as 0 errs by ``|c_i a_i| ≤ λ|a_i|``, so
    ``‖error‖ ≤ (u·scale_max + λ)‖a‖ + λ√n``."""
    u, lam = unit_roundoff(dtype), smallest_normal(dtype)
    return ErrorModel(
        lip=scale_max,
        rel=up(u * scale_max + lam),
        abs=up(lam * math.sqrt(numel)),
        peak_rel=up((1 + u) * scale_max),
        peak_abs=lam,
    )


def residual_model(branch: ErrorModel, lip: float, numel: int, dtype: torch.dtype) -> ErrorModel:
    """``a ↦ a ± g(a)`` computed as ``fl(a ± ĝ(a))``, ``branch`` the model of ``g`` and ``lip`` a
    bound of the whole map's Lipschitz constant (not ``1 + L_g``: proven by the layer).

    ``‖fl(a ± ĝ) − (a ± g)‖ ≤ ‖ĝ − g‖ + u‖a ± ĝ‖ + λ√n`` and ``‖a ± ĝ‖ ≤ ‖a‖ + offset_g +
    (L_g + rel_g)‖a‖ + abs_g``; ``‖φ(0)‖ = ‖g(0)‖ ≤ offset_g``; the output's entries are at most
    ``(1 + u)‖a ± ĝ‖ + λ``, and peaks add."""
    u, lam = unit_roundoff(dtype), smallest_normal(dtype)
    grow = branch.lip + branch.rel
    return ErrorModel(
        lip=lip,
        rel=up(branch.rel + u * (1 + grow)),
        abs=up(branch.abs + u * (branch.offset + branch.abs) + lam * math.sqrt(numel)),
        offset=branch.offset,
        peak_rel=up(branch.peak_rel + (1 + u) * (1 + grow)),
        peak_abs=up(branch.peak_abs + (1 + u) * (branch.offset + branch.abs) + lam),
    )


def compose(models) -> ErrorModel:
    """``models[-1] ∘ … ∘ models[0]`` (the identity for an empty list)."""
    models = list(models)
    out = models[0] if models else exact_model(1.0)
    for m in models[1:]:
        out = out.then(m)
    return out


# --------------------------------------------------------------------------- per-example norms
def norm_upper(h: torch.Tensor) -> torch.Tensor:
    """(B,) float64 upper bounds of ``‖h_b‖₂`` (rounding of the norm itself accounted for).

    ``torch.linalg.vector_norm`` sums the ``d`` squares in some order in at least ``h``'s precision
    and takes the square root: relative error ``≤ γ_{d+2}``, plus ``≤ 2dλ`` in the sum of squares
    that underflow, so ``‖h‖ ≤ computed·(1 + 2γ_{d+2}) + 2√(dλ)``. Rows whose squares overflow
    are measured again in float64, divided by a power of two (exact); a non-finite entry gives
    ``inf`` (nothing certifies).
    """
    flat = h.detach().flatten(1)
    d = flat.shape[1]
    if gamma(d + 2, flat.dtype) >= 0.25:  # no useful bound from a float32 reduction this long: widen first (exact)
        flat = flat.to(torch.float64)
    bound = norm_upper_from(torch.linalg.vector_norm(flat, dim=1), d, flat.dtype)
    bad = ~torch.isfinite(bound)
    if bad.any():
        rows = flat[bad].to(torch.float64)
        scale = pow2_scales(rows.abs().amax(dim=1))
        again = norm_upper_from(torch.linalg.vector_norm(rows / scale[:, None], dim=1), d, torch.float64) * scale
        bound[bad] = torch.where(torch.isfinite(rows).all(dim=1), again, math.inf)
    return torch.nextafter(bound * INFLATE, torch.full_like(bound, math.inf))
