"""Operator-norm *estimates*: warm-started power iteration (training) and Lanczos (candidates).

``‖A v‖`` with ``‖v‖ = 1`` is a lower bound of ``‖A‖₂``; it converges to it from below, so it is
NOT a bound. Differentiable, cheap, used in the training loss (Leino et al., "Globally-Robust
Neural Networks", ICML 2021, §4); Lanczos values only choose the candidates that
:mod:`gloronet.bounds.eigen` then proves.
"""
from __future__ import annotations

from typing import Callable

import torch

from .geometry import Padding, conv2d_adjoint, conv2d_apply

LANCZOS_STEPS = 64


def _fp32(t: torch.Tensor):
    """Lipschitz computations stay in full precision even inside an AMP autocast region."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def _normalize(v: torch.Tensor) -> torch.Tensor:
    return v / v.flatten().norm().clamp_min(1e-30)


def power_iteration_dense(weight: torch.Tensor, u: torch.Tensor, n_iter: int = 1):
    """Warm-started power iteration for a matrix ``W`` (out × in).

    Updates the left iterate ``u`` (out,) in place (no gradient) and returns the differentiable
    estimate ``σ = uᵀ W v`` with ``v = Wᵀu/‖Wᵀu‖`` — a lower bound of ``‖W‖₂`` (Miyato et al.,
    "Spectral Normalization for GANs", ICLR 2018).
    """
    with _fp32(weight), torch.no_grad():
        w = weight.detach().to(u.dtype)
        for _ in range(n_iter):
            v = _normalize(w.t() @ u)
            u.copy_(_normalize(w @ v))
        v = _normalize(w.t() @ u)
    with _fp32(weight):  # clone: the buffer is updated in place by later calls (autograd-safe)
        return torch.dot(u.to(weight.dtype).clone(), weight @ v.to(weight.dtype))


def power_iteration_conv2d(weight, v, stride: int, padding: Padding, groups: int = 1, n_iter: int = 1):
    """Warm-started power iteration for the convolution operator on inputs shaped like ``v``.

    ``v`` (1, C, H, W) is the right-singular-vector iterate, updated in place without gradient.
    Returns the differentiable estimate ``‖A v‖`` (``‖v‖ = 1``), a lower bound of ``‖A‖₂``.
    """
    hw = v.shape[-2:]
    with _fp32(weight), torch.no_grad():
        w = weight.detach().to(v.dtype)
        for _ in range(n_iter):
            u = _normalize(conv2d_apply(v, w, stride, padding, groups))
            v.copy_(_normalize(conv2d_adjoint(u, w, hw, stride, padding, groups)))
    with _fp32(weight):  # clone: the buffer is updated in place by later calls (autograd-safe)
        return conv2d_apply(v.to(weight.dtype).clone(), weight, stride, padding, groups).flatten().norm()


def lanczos_max(apply: Callable, v0: torch.Tensor, steps: int = LANCZOS_STEPS, tol: float = 2.0**-24) -> torch.Tensor:
    """Lanczos estimates (B,) float64 of ``λ_max`` of ``B`` Hermitian operators at once.

    ``apply`` maps (B, d) to (B, d); ``v0`` (B, d) holds the start vectors. Full
    re-orthogonalisation (twice, Parlett); an operator whose Krylov residual falls to rounding level
    (an invariant subspace in working precision, e.g. a near-identity Gram matrix) stops iterating;
    all stop when the largest Ritz values move by less than ``tol`` (relative) over 4 steps. In
    exact arithmetic every Ritz value lies in the spectrum's hull, so these are estimates from
    below: they choose candidates, they never bound anything.
    """
    b, d = v0.shape
    steps = max(1, min(steps, d))
    floor = 64 * torch.finfo(v0.dtype).eps
    basis = v0.new_zeros(steps, b, d)
    alpha = torch.zeros(b, steps, dtype=torch.float64, device=v0.device)
    beta = torch.zeros(b, steps, dtype=torch.float64, device=v0.device)
    v = v0 / v0.norm(dim=1, keepdim=True).clamp_min(1e-30)
    live = torch.ones(b, dtype=torch.bool, device=v0.device)
    prev = None
    for j in range(steps):
        basis[j] = v
        w = apply(v)
        alpha[:, j] = (v.conj() * w).sum(dim=1).real.to(torch.float64)
        for _ in range(2):
            w = w - torch.einsum("jb,jbd->bd", torch.einsum("jbd,bd->jb", basis[: j + 1].conj(), w), basis[: j + 1])
        nb = w.norm(dim=1).to(torch.float64)
        live &= nb > floor * alpha[:, : j + 1].abs().amax(dim=1)
        done = j + 1 == steps or not bool(live.any())
        if done or (j + 1) % 4 == 0:
            t = torch.diag_embed(alpha[:, : j + 1]) + torch.diag_embed(beta[:, :j], 1) + torch.diag_embed(beta[:, :j], -1)
            theta = torch.linalg.eigvalsh(t)[:, -1]
            if done or (prev is not None and bool(((theta - prev).abs() <= tol * theta.abs()).all())):
                return theta
            prev = theta
        beta[:, j] = torch.where(live, nb, torch.zeros_like(nb))
        v = torch.where(live[:, None], w / nb.clamp_min(1e-300).to(w.dtype)[:, None], torch.zeros_like(w))
    raise AssertionError("unreachable")


def _random_like(shape, t: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Reproducible standard normal numbers on ``t``'s device, in ``t``'s dtype."""
    gen = torch.Generator(device=t.device).manual_seed(seed)
    return torch.randn(shape, generator=gen, device=t.device, dtype=t.dtype)
