"""The IEEE-754 rounding model every bound rests on, and upward-rounded evaluation of bounds.

``fl(a∘b) = (a∘b)(1+δ)``, ``|δ| ≤ u`` (round to nearest; ``u = 2⁻²⁴`` / ``2⁻⁵³`` for float32 /
float64); a term rounded ``n`` times carries ``1 + θ_n`` with ``|θ_n| ≤ γ_n = n·u/(1 − n·u)``
(Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., §2.2, Lemma 3.1). Shared by
:mod:`gloronet.fp` (forward errors of the network) and :mod:`gloronet.bounds` (operator norms),
which import it and never each other's rounding helpers.
"""
from __future__ import annotations

import math

import torch

# Error bounds are non-negative polynomials of non-negative float64 numbers; evaluated in float64
# with at most 2²⁰ operations on any path their relative error is < 2²⁰·2⁻⁵³ < 2⁻³⁰ (Higham
# Lemma 3.1), so multiplying by INFLATE (and rounding up once more) makes every one an upper bound.
INFLATE = 1.0 + 2.0**-30


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u``: 2⁻²⁴ for float32, 2⁻⁵³ for float64 (the only dtypes certification accepts)."""
    if dtype == torch.float32:
        return 2.0**-24
    if dtype == torch.float64:
        return 2.0**-53
    raise ValueError(f"floating-point error bounds are defined for float32 and float64, got {dtype}")


def smallest_normal(dtype: torch.dtype) -> float:
    """``λ``: the largest error one flushed (FTZ) result or operand (DAZ) can introduce."""
    unit_roundoff(dtype)  # validates the dtype
    return float(torch.finfo(dtype).tiny)


def gamma(n: int, dtype: torch.dtype) -> float:
    """``γ_n = n·u / (1 − n·u)`` rounded up (inf when ``n·u ≥ 1/2``: no useful bound)."""
    u = unit_roundoff(dtype)
    nu = n * u  # exact: a power of two times an integer < 2⁵³
    if nu >= 0.5:
        return math.inf
    return math.nextafter(math.nextafter(nu / (1.0 - nu), math.inf) * INFLATE, math.inf)


def gamma64(n: int) -> float:
    """``γ_n`` of float64 (the arithmetic of the bounds), rounded up."""
    return gamma(int(n), torch.float64)


def up(x: float) -> float:
    """An upper bound of a non-negative error polynomial evaluated in float64 (see INFLATE)."""
    return math.nextafter(float(x) * INFLATE, math.inf)


def round_up(x: float) -> float:
    """The next float above ``x`` (so a correctly-rounded result becomes an upper bound)."""
    return math.nextafter(float(x), math.inf)


def mul_up(*factors: float) -> float:
    """Product of non-negative floats, rounded upwards after every multiplication."""
    out = 1.0
    for f in factors:
        if f < 0 or math.isnan(f):
            raise ValueError(f"bounds must be non-negative, got {f}")
        out = round_up(out * f)
    return out


def sqrt_up(x: float) -> float:
    """An upper bound of ``√x`` (correctly rounded, then up; inf stays inf)."""
    return round_up(math.sqrt(x)) if math.isfinite(x) else math.inf


def norm_upper_from(computed: torch.Tensor, d: int, dtype: torch.dtype) -> torch.Tensor:
    """Upper bounds (float64, before the final upward rounding) of exact 2-norms of ``d``-term
    vectors (real entries; a complex entry counts as 2) from ``torch.linalg.vector_norm`` in
    ``dtype``: the ``d`` squares summed in any order and a square root err by ``≤ γ_{d+2}``
    relative, the squares that underflow by ``≤ 2dλ``, so ``‖h‖ ≤ computed·(1 + 2γ_{d+2}) + 2√(dλ)``."""
    return computed.to(torch.float64) * (1 + 2 * gamma(d + 2, dtype)) + 2 * math.sqrt(d * smallest_normal(dtype))


def up_tensor(t: torch.Tensor) -> torch.Tensor:
    """Elementwise :func:`up`."""
    return torch.nextafter(t * INFLATE, torch.full_like(t, math.inf))
