"""Float64 copies of weights for the bounds, and exact power-of-two scalings.

Every bound is computed in float64 on :func:`compute_device`; weights are first divided by a power
of two (exact) so that the largest entry is in ``[1, 2)``: no square underflows to a "bound" below
the true norm, and nothing overflows.
"""
from __future__ import annotations

import math

import torch

GRAM_SLACK = 1e-8  # a D-term float64 sum of squares errs by ≤ γ_D ≤ GRAM_SLACK for D ≤ 9·10⁷


def compute_device(t: torch.Tensor) -> torch.device:
    """Where bounds of ``t`` are computed: its own device (MPS has no float64: the CPU there)."""
    return torch.device("cpu") if t.device.type == "mps" else t.device


def as_float64(t: torch.Tensor) -> torch.Tensor:
    """A detached float64 (complex128) copy of ``t`` on :func:`compute_device` (exact for
    float32/float64 inputs)."""
    dtype = torch.complex128 if t.is_complex() else torch.float64
    return t.detach().to(device=compute_device(t), dtype=dtype)

def pow2_scales(peak: torch.Tensor) -> torch.Tensor:
    """Elementwise power of two ``s`` with ``peak / s ∈ [1, 2)`` (1 where ``peak`` is 0 or not finite).

    Dividing by ``s`` is exact, and keeps squares of tiny weights from underflowing to zero
    (which would make a "bound" smaller than the true norm).
    """
    ok = (peak > 0) & torch.isfinite(peak)
    exponent = torch.frexp(torch.where(ok, peak, torch.ones_like(peak))).exponent - 1
    return torch.where(ok, torch.ldexp(torch.ones_like(peak), exponent), torch.ones_like(peak))


def max_abs(t: torch.Tensor) -> float:
    """``max|t|`` as a float (0 for an empty ``t``; NaN or inf if ``t`` holds one), in one pass."""
    return float(torch.linalg.vector_norm(t, ord=math.inf)) if t.numel() else 0.0


def pow2_scale(t: torch.Tensor) -> float:
    """:func:`pow2_scales` of ``max|t|`` as a float (1.0 for an empty, all-zero or non-finite ``t``)."""
    top = max_abs(t)
    return math.ldexp(1.0, math.frexp(top)[1] - 1) if top > 0 and math.isfinite(top) else 1.0
