"""Input attributions and how concentrated they are.

Integrated gradients (Sundararajan, Taly & Yan, ICML 2017) of the logit ``z_c`` from a baseline
``b`` (black image by default)::

    IG(x)_k = (x − b)_k · ∫₀¹ ∂z_c(b + α(x − b)) / ∂x_k dα

approximated by the midpoint rule on ``steps`` points; completeness ``Σ_k IG_k = z_c(x) − z_c(b)``
holds up to the quadrature error (exactly for a linear model). Saliency is ``|∇_x z_c(x)|``.
Robust models are said to have more "perceptually aligned" attributions (Wang, Fredrikson &
Datta, ICML 2022). Simple summaries of a map ``|a|``: how concentrated it is (the share of the
total mass in the top 10% of input coordinates; the Gini coefficient) and how spatially coherent
(the correlation of ``|a|`` between horizontally and vertically adjacent pixels: near 0 for
pixel noise, near 1 for smooth regions).
"""
from __future__ import annotations

from typing import Callable

import torch


def _grad(forward: Callable, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(forward(x).gather(1, c[:, None]).sum(), x)
    return g


def integrated_gradients(forward: Callable, x: torch.Tensor, c: torch.Tensor, steps: int = 32,
                         baseline: torch.Tensor | None = None) -> torch.Tensor:
    """(B, ...) integrated gradients of logit ``c`` (B,) at ``x`` from ``baseline`` (default 0)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    b = torch.zeros_like(x) if baseline is None else baseline.expand_as(x)
    total = torch.zeros_like(x)
    for k in range(steps):
        alpha = (k + 0.5) / steps
        total += _grad(forward, b + alpha * (x - b), c)
    return (x - b) * total / steps


def saliency(forward: Callable, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``|∂z_c/∂x|`` (B, ...)."""
    return _grad(forward, x, c).abs()


def top_share(attr: torch.Tensor, fraction: float = 0.1) -> torch.Tensor:
    """(B,) share of ``Σ|attr|`` held by the top ``fraction`` of coordinates (uniform: ``fraction``)."""
    a = attr.detach().flatten(1).abs().double()
    k = max(1, round(fraction * a.shape[1]))
    return a.topk(k, dim=1).values.sum(1) / a.sum(1).clamp_min(1e-300)


def gini(attr: torch.Tensor) -> torch.Tensor:
    """(B,) Gini coefficient of ``|attr|``: 0 when spread evenly, → 1 when on one coordinate."""
    a = attr.detach().flatten(1).abs().double().sort(dim=1).values
    n = a.shape[1]
    rank = torch.arange(1, n + 1, dtype=torch.float64, device=a.device)
    return ((2 * rank - n - 1) * a).sum(1) / (n * a.sum(1).clamp_min(1e-300))


def neighbour_correlation(attr: torch.Tensor) -> torch.Tensor:
    """(B,) Pearson correlation of ``|attr|`` (summed over channels) between adjacent pixels,
    over all horizontal and vertical neighbour pairs of each image (B, C, H, W)."""
    a = attr.detach().abs().double().sum(1)
    pairs = [(a[:, :, :-1], a[:, :, 1:]), (a[:, :-1, :], a[:, 1:, :])]
    u = torch.cat([p.flatten(1) for p, _ in pairs], 1)
    v = torch.cat([q.flatten(1) for _, q in pairs], 1)
    u, v = u - u.mean(1, keepdim=True), v - v.mean(1, keepdim=True)
    return (u * v).sum(1) / (u.norm(dim=1) * v.norm(dim=1)).clamp_min(1e-300)
