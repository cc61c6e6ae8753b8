"""Certified radii that hold for the floating-point program, with directed rounding throughout.

Notation: body steps ``s = 0..S−1`` (the leaf layers, :func:`gloronet.nn.base.body_steps`), each
with an :class:`~gloronet.fp.ErrorModel`; ``ĉ_s`` the activation entering step ``s`` in the pass
``certify`` ran at ``x`` (``ĉ_S`` enters the head), ``ρ̂_s ≥ ‖ĉ_s‖`` its measured norm;
``L_s`` the product of the Lipschitz bounds of the steps before ``s``. For any ``x'`` with
``‖x' − x‖ ≤ r`` and ``a_s(·)`` the exact, ``â_s(·)`` the computed activations:

* centre error ``‖ĉ_s − a_s(x)‖ ≤ Pc_s``:  ``Pc_{s+1} = lip_s Pc_s + rel_s ρ̂_s + abs_s``;
* the computed activation at ``x'`` lies within ``Pc_s + L_s r + Δ_s`` of ``ĉ_s`` where
  ``Δ_s ≥ ‖â_s(x') − a_s(x')‖``, so ``‖â_s(x')‖ ≤ ρ̂_s + Pc_s + P_s + (L_s + Q_s) r`` and
  ``Δ_s ≤ P_s + Q_s r`` with
  ``P_{s+1} = lip_s P_s + rel_s (ρ̂_s + Pc_s + P_s) + abs_s``,  ``Q_{s+1} = lip_s Q_s + rel_s (L_s + Q_s)``.

Head ``y_k = ⟨w_k, h⟩ + b_k`` (``n``-term sums): ``|ŷ_k − y_k(ĥ)| ≤ hrel_k ‖ĥ‖ + habs_k``. For the
predicted ``j`` and any ``i``, the computed margin at ``x'`` is at least
``m̂_ji − E^c_ji − K_ji r − E_ji(r)``, where ``m̂`` is the margin computed at ``x``,
``E^c_ji = D_ji Pc_S + (hrel_j + hrel_i) ρ̂_S + habs_j + habs_i`` (error at the centre) and
``E_ji(r) = D_ji (P_S + Q_S r) + (hrel_j + hrel_i)(ρ̂_S + Pc_S + P_S + (L + Q_S) r) + habs_j + habs_i``
(error at ``x'``), ``D_ji ≥ ‖w_j − w_i‖``, ``K_ji = L D_ji``. It stays positive for

    r < (m̂_ji − E^c_ji − E_ji(0)) / (K_ji + D_ji Q_S + (hrel_j + hrel_i)(L + Q_S)),

and the radius is the minimum over ``i ≠ j`` — also capped where some intermediate value could
overflow. With ``arithmetic="exact"`` every error term is 0: the real-arithmetic test of the
GloRo paper, ``r = min_i m̂_ji / K_ji``, for comparison with published numbers only.

All of this is evaluated in float64: non-negative sums and products are inflated by
:data:`gloronet.fp.INFLATE` and rounded up, subtractions and the final division rounded down.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import fp


def _up(t: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(t * fp.INFLATE, torch.full_like(t, math.inf))


def _down(t: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(t, torch.full_like(t, -math.inf))


@dataclass(frozen=True)
class Head:
    """The head ``y = W h + b`` exactly as applied (float64 copies) and its rounding constants.

    In the model's pass each logit's terms are rounded at most ``depth`` times, so
    ``|ŷ_k − y_k(h)| ≤ γ_d(Σ_t|w_kt||h_t| + |b_k|) + (1+γ_d)λ(√n‖h‖ + ‖w_k‖₁ + 2(n+1))``
    (:func:`gloronet.fp.dot_product_model` per logit). ``certify`` also re-evaluates the head at
    ``x`` in float64 from the computed ``ĉ_S``: error ``≤ γ⁶⁴_{n+1}(Σ_t|w_kt||ĉ_t| + |b_k|)``.
    """

    weight: torch.Tensor  # (C, n) float64
    abs_weight: torch.Tensor
    bias: torch.Tensor  # (C,) float64, zeros without a bias
    row_norm: torch.Tensor  # (C,) upper bounds of ‖w_k‖
    gamma: float  # γ_d in the model's dtype
    gamma_ref: float  # γ_{n+1} in float64
    lam_rel: float  # (1+γ)λ√n
    lam_abs: torch.Tensor  # (C,) (1+γ)λ(‖w_k‖₁ + 2(n+1))
    peak_rel: float
    peak_abs: float

    @staticmethod
    def build(weight: torch.Tensor, bias: torch.Tensor | None, depth: int, dtype: torch.dtype) -> "Head":
        w = weight.detach().to(torch.float64).cpu()
        n = w.shape[1]
        b = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.detach().to(torch.float64).cpu()
        g, lam = fp.gamma(depth, dtype), fp.smallest_normal(dtype)
        row_norm = _up(w.norm(dim=1))
        a = w.abs()
        return Head(
            weight=w, abs_weight=a, bias=b, row_norm=row_norm, gamma=g, gamma_ref=fp.gamma(n + 1, torch.float64),
            lam_rel=fp.up((1 + g) * lam * math.sqrt(n)), lam_abs=_up((1 + g) * lam * (a.sum(dim=1) + 2 * (n + 1))),
            peak_rel=fp.up((1 + g) * float(row_norm.max())),
            peak_abs=fp.up((1 + g) * (float(b.abs().max()) + lam * 2 * (n + 1))),
        )


@dataclass(frozen=True)
class Profile:
    """The data-independent part of the analysis of one model at one input shape and dtype."""

    models: tuple[fp.ErrorModel, ...]  # body steps
    prefix_lip: tuple[float, ...]  # L_s for s = 0..S (prefix_lip[S] = L)
    q: tuple[float, ...]  # Q_s for s = 0..S
    head: Head
    threshold: float  # magnitudes below this cannot overflow


def make_profile(models, head: Head, dtype) -> Profile:
    prefix, q = [1.0], [0.0]
    for m in models:
        q.append(fp.up(m.lip * q[-1] + m.rel * (prefix[-1] + q[-1])))
        prefix.append(math.nextafter(prefix[-1] * m.lip, math.inf))
    return Profile(tuple(models), tuple(prefix), tuple(q), head, fp.overflow_threshold(dtype))


def _overflow_radius(peak_rel: float, peak_abs: float, rho0: torch.Tensor, slope: float, threshold: float) -> torch.Tensor:
    """Largest ``r`` with ``peak_rel·(rho0 + slope·r) + peak_abs ≤ threshold`` (rounded down; inf if none binds)."""
    room = _down(threshold - _up(peak_abs + peak_rel * rho0))
    grow = _up(torch.full_like(rho0, peak_rel * slope))
    r = torch.where(grow > 0, _down(room / grow), torch.full_like(room, math.inf))
    return torch.where(room > 0, r, torch.zeros_like(r))


def certified_radii(
    logits: torch.Tensor,
    K: torch.Tensor,
    D: torch.Tensor,
    profile: Profile | None,
    norms: list[torch.Tensor] | None = None,
    head_input: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pred, radius)`` (B,) for the logits the model computed; ``profile=None`` for exact arithmetic.

    ``norms[s]`` (B,) bounds ``‖ĉ_s‖`` for ``s = 0..S``, ``head_input`` is ``ĉ_S`` (see the module
    docstring). Ties, NaN and infinite values give radius 0.
    """
    y = logits.detach().to(torch.float64)
    B, C = y.shape
    dev = y.device
    pred = y.argmax(dim=1)
    own = torch.nn.functional.one_hot(pred, C).bool()
    Kj = K.to(dev)[pred]
    if profile is None:
        num, slope = _down(y.gather(1, pred[:, None]) - y), Kj
        cap = torch.full((B,), math.inf, dtype=torch.float64, device=dev)
    else:
        pc = torch.zeros(B, dtype=torch.float64, device=dev)
        p = torch.zeros_like(pc)
        cap = torch.full_like(pc, math.inf)
        for s, m in enumerate(profile.models):
            rho = norms[s].to(dev)
            ball0 = rho + pc + p
            grow = profile.prefix_lip[s] + profile.q[s]
            cap = torch.minimum(cap, _overflow_radius(m.peak_rel, m.peak_abs, ball0, grow, profile.threshold))
            pc, p = _up(m.lip * pc + m.rel * rho + m.abs), _up(m.lip * p + m.rel * ball0 + m.abs)
        hd = profile.head
        rho = norms[-1].to(dev)
        grow = profile.prefix_lip[-1] + profile.q[-1]  # ‖â_S(x') − ĉ_S‖ ≤ pc + p + grow·r
        cap = torch.minimum(cap, _overflow_radius(hd.peak_rel, hd.peak_abs, rho + pc + p, grow, profile.threshold))
        h = head_input.detach().flatten(1).to(torch.float64)
        w, b, row = hd.weight.to(dev), hd.bias.to(dev), hd.row_norm.to(dev)
        reach = _up(h.abs() @ hd.abs_weight.to(dev).t() + b.abs())  # (B, C) Σ|w_kt||ĉ_t| + |b_k|
        y_ref = h @ w.t() + b  # the head at x again, in float64
        e_ref = _up(hd.gamma_ref * reach)
        e_ball = _up(hd.gamma * (reach + row * (pc + p)[:, None]) + hd.lam_rel * (rho + pc + p)[:, None] + hd.lam_abs.to(dev))
        pair = lambda t: t.gather(1, pred[:, None]) + t  # noqa: E731  (value at j + value at i)
        Dj = D.to(dev)[pred]
        margins = _down(y_ref.gather(1, pred[:, None]) - y_ref)
        num = _down(margins - _up(Dj * (pc + p)[:, None] + pair(e_ref) + pair(e_ball)))
        slope = _up(Kj + Dj * profile.q[-1] + (hd.gamma * pair(row[None, :].expand(B, C)) + 2 * hd.lam_rel) * grow)
    ratio = torch.where(
        slope > 0,
        _down(num / slope).nan_to_num(nan=0.0, posinf=torch.finfo(torch.float64).max),
        torch.where(num > 0, math.inf, 0.0),
    )
    radius = ratio.masked_fill(own, math.inf).amin(dim=1).clamp_min(0.0)
    radius = torch.minimum(radius, cap)
    return pred, torch.where(torch.isnan(radius), torch.zeros_like(radius), radius)
