"""Provable bounds of ``‖|W|‖₂`` (entrywise absolute values), for the floating-point error models."""
from __future__ import annotations

import math

import torch

from ..rounding import gamma64, mul_up, round_up
from .circular import _space_to_depth_kernel
from .dense import gram_norm_bound
from .float64 import as_float64, max_abs, pow2_scale
from .threads import one_thread


def _gram_times(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``Gv = Aᵀ(Av)`` in float64, products summed in any order (the caller allows for it)."""
    return a.t() @ (a @ v)


@one_thread
def nonneg_norm_bound(m: torch.Tensor, iters: int = 30) -> float:
    """Provable upper bound of ``‖M‖₂`` for an entrywise non-negative matrix ``M`` (m × n).

    Collatz–Wielandt: for ``G = MᵀM ≥ 0`` and any ``v > 0``, ``λ_max(G) ≤ max_i (Gv)_i / v_i``
    (Horn & Johnson, *Matrix Analysis*, Cor. 8.1.31); power iteration from ``v = 1`` tightens it.
    ``Gv`` is a sum of non-negative products, so its float64 value errs by at most ``γ_{m+n}``
    relative; that and the division's rounding are covered by the inflation below. ``M`` is
    first scaled by a power of two (exact) against underflow. O(iters·m·n), no eigensolver.
    """
    a = as_float64(m).reshape(m.shape[0], -1)
    if bool((a < 0).any()):
        raise ValueError("nonneg_norm_bound needs an entrywise non-negative matrix")
    if not math.isfinite(max_abs(a)):
        return math.inf
    if a.numel() == 0 or not bool((a > 0).any()):
        return 0.0
    scale = pow2_scale(a)
    a = a / scale
    v = torch.ones(a.shape[1], dtype=torch.float64, device=a.device)
    best = math.inf
    for _ in range(iters):
        g = _gram_times(a, v)
        best = min(best, float((g / v).max()))
        v = (g / g.max()).clamp_min(1e-150)  # stays strictly positive
    rel = 2.0 ** -52 * (a.shape[0] + a.shape[1] + 8)
    return round_up(round_up(math.sqrt(round_up(best * (1 + rel)))) * scale)


@one_thread
def _tap_sum(w: torch.Tensor) -> torch.Tensor:
    """``Σ_v w[:, :, v]`` over the taps, in float64 (any order: the caller allows for it)."""
    return w.sum(dim=(-2, -1))


@one_thread
def abs_conv2d_norm_bound(weight: torch.Tensor, stride: int, groups: int = 1) -> float:
    """Provable upper bound of ``‖|A|‖₂`` for a zero-padded convolution ``A`` (any input size).

    Every entry of ``A``'s matrix is one kernel entry or 0, so ``|A|`` is the same convolution
    with kernel ``|w|``. Rewritten at stride 1 on the space-to-depth input (kernel ``|w'|``,
    :func:`_space_to_depth_kernel`), it is a restriction of the circular convolution, whose norm
    is ``max_ω ‖K̂(ω)‖₂``; for a non-negative kernel ``|K̂(ω)| ≤ K̂(0)`` entrywise, and the
    spectral norm is monotone on non-negative matrices, so ``‖|A|‖₂ ≤ ‖Σ_v |w'[:, :, v]|‖₂``.
    The float64 sum of ``t`` non-negative taps may round down, by at most a factor ``1/(1 + γ_t)``
    (Higham Lemma 3.1), hence ``(1 + γ_t)·‖fl(Σ_v |w'_v|)‖₂``. Grouped convolutions are block
    diagonal: the largest group's bound.
    """
    w = as_float64(weight).abs()
    co_g = w.shape[0] // groups
    bound = 0.0
    for g in range(groups):
        taps = _space_to_depth_kernel(w[g * co_g : (g + 1) * co_g], stride)
        t = taps.shape[-2] * taps.shape[-1]
        bound = max(bound, mul_up(gram_norm_bound(_tap_sum(taps)), round_up(1 + gamma64(t))))
    return bound
