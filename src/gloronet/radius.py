"""Certified radii that hold for the floating-point program, with directed rounding throughout.

Notation: body steps ``s = 0..S−1`` (the leaf layers, :func:`gloronet.nn.base.body_steps`), each
with two :class:`~gloronet.fp.ErrorModel` s: one of the program certified (the eval forward's
chunked sums, :mod:`gloronet.nn.accumulate`; ``rel_s``, ``abs_s``) and one of the pass that
measured the centre (usually the fused kernels, ``rel^c_s``, ``abs^c_s``; the same models when the
centre was computed by the certified program itself). ``ĉ_s`` is the activation entering step
``s`` in the pass ``certify`` ran at ``x`` (``ĉ_S`` enters the head), ``ρ̂_s ≥ ‖ĉ_s‖`` its
measured norm (or one propagated from ``ρ̂_{s−1}``: :func:`gloronet.error_plan.propagated_norms`);
``L_s`` the product of the Lipschitz bounds of the steps before ``s``. For any ``x'`` with
``‖x' − x‖ ≤ r`` and ``a_s(·)`` the exact, ``â_s(·)`` the certified program's activations:

* centre error ``‖ĉ_s − a_s(x)‖ ≤ Pc_s``:  ``Pc_{s+1} = lip_s Pc_s + rel^c_s ρ̂_s + abs^c_s``;
* the computed activation at ``x'`` lies within ``Pc_s + L_s r + Δ_s`` of ``ĉ_s`` where
  ``Δ_s ≥ ‖â_s(x') − a_s(x')‖``, so ``‖â_s(x')‖ ≤ ρ̂_s + Pc_s + P_s + (L_s + Q_s) r`` and
  ``Δ_s ≤ P_s + Q_s r`` with
  ``P_{s+1} = lip_s P_s + rel_s (ρ̂_s + Pc_s + P_s) + abs_s``,  ``Q_{s+1} = lip_s Q_s + rel_s (L_s + Q_s)``.

Head ``y_k = ⟨w_k, h⟩ + b_k``: with ``R_k = Σ_t |w_kt||ĉ_S,t| + |b_k|`` (measured at ``x``), the
computed logit at ``x'`` errs by ``≤ γ_d(R_k + ‖w_k‖‖â_S(x') − ĉ_S‖)`` (+ underflow terms), and
the logits used at ``x`` — the head re-evaluated in float64 for a float32 model, the centre pass's
own for a float64 one — by ``≤ γ_c R_k`` (``γ_c = γ⁶⁴_{n+1}``: any summation order). For the predicted ``j`` and any ``i``, the margin computed at
``x'`` is at least ``m_ji − D_ji (Pc_S + P_S + Q_S r) − E_j − E_i − K_ji r``, where ``m`` is the
margin at ``x``, ``D_ji ≥ ‖w_j − w_i‖``, ``K_ji = L D_ji`` and ``E_k`` the two head errors above
(they grow with ``r`` through ``‖â_S(x') − ĉ_S‖ ≤ Pc_S + P_S + (L + Q_S) r``). It stays positive
for ``r < low_ji / slope_ji`` (:class:`MarginBounds`); the radius is the minimum over ``i ≠ j``,
also capped where some intermediate value could overflow. With ``arithmetic="exact"`` every error
term is 0: the real-arithmetic test of the GloRo paper, ``r = min_i m_ji / K_ji`` on the computed
logits, for comparison with published numbers only.

All of this is evaluated in float64: non-negative sums and products are inflated by
:data:`gloronet.fp.INFLATE` and rounded up, subtractions and the final division rounded down.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import error_plan, fp
from .bounds import pow2_scales


def _up(t: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(t * fp.INFLATE, torch.full_like(t, math.inf))


def _down(t: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(t, torch.full_like(t, -math.inf))


@dataclass(frozen=True)
class Head:
    """The head ``y = W h + b`` exactly as applied (float64 copies) and its rounding constants.

    In the certified program each logit's terms are rounded at most ``depth`` times, so
    ``|ŷ_k − y_k(h)| ≤ γ_d(Σ_t|w_kt||h_t| + |b_k|) + (1+γ_d)λ(√n‖h‖ + ‖w_k‖₁ + 2(n+1))``
    (:func:`gloronet.fp.dot_product_model` per logit); ``fused_gamma`` is ``γ_{n+1}`` of one fused
    kernel call in the model's dtype. At ``x``, a float32 model's head is evaluated again in
    float64 from the computed ``ĉ_S`` (``reevaluate``; same bound with ``γ⁶⁴_{n+1}``, ``λ⁶⁴``); a
    float64 model's own logits (any summation order) are already that precise.
    """

    weight: torch.Tensor  # (C, n) float64
    abs_weight: torch.Tensor
    bias: torch.Tensor  # (C,) float64, zeros without a bias
    row_norm: torch.Tensor  # (C,) upper bounds of ‖w_k‖
    gamma: float  # γ_d in the model's dtype (the pass at x')
    fused_gamma: float  # γ_{n+1} in the model's dtype (one fused kernel call)
    lam_rel: float  # (1+γ)λ√n
    lam_abs: torch.Tensor  # (C,) (1+γ)λ(‖w_k‖₁ + 2(n+1))
    reevaluate: bool  # the logits at x come from a float64 re-evaluation (float32 models)
    centre_gamma: float  # the same three constants for the logits used at x
    centre_lam_rel: float
    centre_lam_abs: torch.Tensor
    peak_rel: float
    peak_abs: float
    guard_slope: torch.Tensor  # (C,) and (C,): the guard's E_k = guard_slope_k·‖ĥ‖ + guard_const_k
    guard_const: torch.Tensor  # (fused_may_differ)

    @staticmethod
    def build(weight: torch.Tensor, bias: torch.Tensor | None, depth: int, dtype: torch.dtype) -> "Head":
        w = weight.detach().to(torch.float64).cpu()
        n = w.shape[1]
        b = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.detach().to(torch.float64).cpu()
        a = w.abs()
        scale = pow2_scales(a.amax(dim=1))  # exact: no overflow or underflow in the row norms
        row_norm = _up((w / scale[:, None]).norm(dim=1) * scale)
        l1 = a.sum(dim=1)

        def constants(g: float, lam: float):
            return fp.up((1 + g) * lam * math.sqrt(n)), _up((1 + g) * lam * (l1 + 2 * (n + 1)))

        g = fp.gamma(depth, dtype)
        lam_rel, lam_abs = constants(g, fp.smallest_normal(dtype))
        reevaluate = dtype != torch.float64
        g_c = fp.gamma(n + 1, torch.float64)  # float64, any order: the re-evaluation or a float64 model's centre pass
        c_rel, c_abs = constants(g_c, fp.smallest_normal(torch.float64))
        g_f = fp.gamma(n + 1, dtype)
        both = fp.up(g_f + g)  # the fused head's and the certified head's rounding (fused_may_differ)
        return Head(
            weight=w, abs_weight=a, bias=b, row_norm=row_norm, gamma=g, fused_gamma=g_f,
            lam_rel=lam_rel, lam_abs=lam_abs,
            reevaluate=reevaluate, centre_gamma=g_c, centre_lam_rel=c_rel, centre_lam_abs=c_abs,
            peak_rel=fp.up((1 + g) * float(row_norm.max())),
            peak_abs=fp.up((1 + g) * (float(b.abs().max()) + fp.smallest_normal(dtype) * 2 * (n + 1))),
            guard_slope=_up(both * row_norm + 2 * fp.up(1 + g_f) * lam_rel),
            guard_const=_up(both * b.abs() + 2 * fp.up(1 + g_f) * lam_abs),
        )


@dataclass(frozen=True)
class Profile:
    """The data-independent part of the analysis of one model at one input shape and dtype."""

    models: tuple[fp.ErrorModel, ...]  # body steps, as the certified program runs them (chunked sums)
    fused: tuple[fp.ErrorModel, ...]  # the same steps run with fused kernels (accumulate.fused): the centre's
    # program of the fast pass, or of the float64 centre (gloronet.centre64; float64 models then)
    prefix_lip: tuple[float, ...]  # L_s for s = 0..S (prefix_lip[S] = L)
    q: tuple[float, ...]  # Q_s for s = 0..S
    head: Head
    threshold: float  # magnitudes below this cannot overflow
    peak_rel: tuple[float, ...]  # overflow coefficients of the body steps (the larger of the two programs'),
    peak_abs: tuple[float, ...]  # then the head
    peak_growth: tuple[float, ...]  # peak_rel_s (L_s + Q_s): how fast each overflow load grows with r
    plans: dict = field(default_factory=dict, compare=False, repr=False)  # body_errors' plans, by measured norms


def make_profile(models, head: Head, dtype, fused=None) -> Profile:
    """``fused``: the error models of the same steps run with fused kernels (default ``models``), in
    the dtype of the pass that computes the centre with them (float64 for :mod:`gloronet.centre64`)."""
    fused = tuple(models if fused is None else fused)
    if len(fused) != len(models) or any(c.lip != m.lip for c, m in zip(fused, models)):
        raise ValueError("make_profile: the fused pass must run the same steps with the same Lipschitz bounds")
    prefix, q = [1.0], [0.0]
    for m in models:
        q.append(fp.up(m.lip * q[-1] + m.rel * (prefix[-1] + q[-1])))
        prefix.append(math.nextafter(prefix[-1] * m.lip, math.inf))
    peak_rel = tuple(max(m.peak_rel, c.peak_rel) for m, c in zip(models, fused)) + (head.peak_rel,)
    peak_abs = tuple(max(m.peak_abs, c.peak_abs) for m, c in zip(models, fused)) + (head.peak_abs,)
    growth = tuple(fp.up(r * fp.up(lip + qq)) for r, lip, qq in zip(peak_rel, prefix, q))
    return Profile(tuple(models), fused, tuple(prefix), tuple(q), head, fp.overflow_threshold(dtype), peak_rel, peak_abs,
                   growth)


def body_errors(profile: Profile, norms: list, fused_centre: bool) -> error_plan.BodyErrors:
    """The module docstring's bounds at ``r = 0`` (float64, rounded up): ``delta = Pc_S + P_S``
    (B,) (the centre's error plus the certified program's error at ``x`` beyond it), ``ball =
    ρ̂_S + Pc_S + P_S`` (B,) and the overflow ``loads`` (B, S + 1) ``peak_rel_s·ball_s +
    peak_abs_s`` of the steps and the head, ``ball_s = ρ̂_s + Pc_s + P_s``. ``fused_centre``: the
    centre errors come from ``profile.fused``. ``norms`` (``ρ̂_s``, ``s = 0..S``) may miss entries
    (None) after the input: they are propagated by the centre pass's models
    (:func:`gloronet.error_plan.propagated_norms`). Evaluated as one affine map of the measured norms
    (:mod:`gloronet.error_plan`), planned once per profile and pattern of measured norms."""
    measured = tuple(n is not None for n in norms)
    device = norms[0].device
    key = (fused_centre, measured, device)
    plan = profile.plans.get(key)
    if plan is None:
        centre = profile.fused if fused_centre else profile.models
        plan = error_plan.plan(profile.models, centre, measured, profile.peak_rel, profile.peak_abs, device)
        profile.plans[key] = plan
    return plan(norms)


def fused_may_differ(profile: Profile, D: torch.Tensor, errors, logits: torch.Tensor) -> torch.Tensor:
    """(B,) True where the certified program's prediction at ``x`` may differ from ``argmax`` of
    ``logits``, the fused pass's logits at ``x``; ``errors`` is :func:`body_errors` of that pass
    (its norms, ``fused_centre=True``).

    At ``r = 0`` (:func:`body_errors` with the fused centre) the fused body output lies within
    ``Pc`` of the exact one and the certified program's within ``Pc + P`` of the fused one, so
    ``‖ĥ_F − ĥ_C‖ ≤ δ = Pc + P``. The two heads err from ``y(ĥ)`` by at most
    ``γ(‖w_k‖‖ĥ‖ + |b_k|) + (1+γ)λ(√n‖ĥ‖ + ‖w_k‖₁ + 2(n+1))`` each (``‖ĥ‖ ≤ ρ̂_S + δ`` for both;
    ``γ_F ≥ γ_C``), so the certified margin ``ŷ^C_j − ŷ^C_i ≥ ŷ^F_j − ŷ^F_i − D_ji δ − E_j − E_i``
    with ``E_k = (γ_F + γ_C)(‖w_k‖(ρ̂_S + δ) + |b_k|) + 2(1+γ_F)(λ-terms)``. Where that is positive
    for every ``i ≠ j = argmax ŷ^F``, the certified program predicts ``j`` strictly; elsewhere
    (and for non-finite values) the row is flagged. All of it holds only where neither program
    overflows at ``x``, so rows where :func:`_may_overflow` cannot rule that out are flagged too
    (a propagated norm, :func:`gloronet.error_plan.propagated_norms`, is itself a bound only up to
    the first overflow, which a later step such as ReLU may hide from the values measured after it)."""
    hd = profile.head
    y = logits.detach().to(torch.float64)
    dev = y.device
    delta, size = errors.delta.to(dev), errors.ball.to(dev)[:, None]  # ρ̂_S + Pc + P ≥ ‖ĥ‖ of both passes
    err = _up(torch.addcmul(hd.guard_const.to(dev), size, hd.guard_slope.to(dev)))  # (B, C) E_k
    pred = y.argmax(dim=1)
    idx = pred[:, None]
    need = _up(torch.addcmul(err.gather(1, idx) + err, D.to(dev)[pred], delta[:, None]))
    sure = (_down(y.gather(1, idx) - y) > need).scatter_(1, idx, True)
    return ~(sure.all(dim=1) & torch.isfinite(y).all(dim=1) & torch.isfinite(delta)) | _may_overflow(profile, errors)


def _may_overflow(profile: Profile, errors: error_plan.BodyErrors) -> torch.Tensor:
    """(B,) True unless every value either program computes at ``x`` provably stays finite: step
    ``s`` sees an input of norm ``≤ ball_s`` (:func:`body_errors`) and computes values of magnitude
    ``≤ peak_rel_s·ball_s + peak_abs_s`` (``errors.loads``, with the larger of its two programs'
    coefficients), below ``profile.threshold`` (step by step: each ball is a bound only if the steps
    before it did not overflow). NaN is flagged."""
    return ~(_down(profile.threshold - errors.loads) > 0).all(dim=1)


def _overflow_radius(loads: torch.Tensor, growth: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B,) largest ``r`` with ``loads + growth·r ≤ threshold`` in every column of ``loads`` (B, S)
    (``growth`` (S,) ≥ 0); rounded down, inf where nothing grows, 0 where there is no room (or NaN)."""
    room = _down(threshold - loads)
    r = torch.where(growth > 0, _down(room / growth), math.inf)
    return torch.where(room > 0, r, 0.0).amin(dim=1)


@dataclass
class MarginBounds:
    """For every example ``b`` and classes ``a``, ``c``: at every ``x'`` with ``‖x' − x‖ ≤ r`` and
    ``r ≤ cap[b]``, the margin the model computes satisfies ``ŷ_a(x') − ŷ_c(x') ≥ low − slope·r``,
    with ``(low, slope) = self.rows(a)[b, c]`` (computed one row per example on demand: the full
    (B, C, C) tensors would not fit for 1000 classes)."""

    y: torch.Tensor  # (B, C) float64 logits at x: the model's (exact mode) or the float64 head
    K: torch.Tensor  # (C, C)
    D: torch.Tensor | None = None  # (C, C); None in exact mode
    body_err: torch.Tensor | None = None  # (B,) pc + p: body error at x and at x' (r = 0 part)
    body_slope: float = 0.0  # Q_S
    grow: float = 0.0  # L + Q_S
    err: torch.Tensor | None = None  # (B, C) e_ref + e_ball per class (r = 0 part)
    row_slope: torch.Tensor | None = None  # (C,) γ‖w_k‖ + λ√n per class: its growth with r
    cap: torch.Tensor | None = None  # (B,)

    def rows(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(low, slope)`` (B, C) for the pairs ``(a[b], c)``, ``c`` = every class."""
        y = self.y
        idx = a[:, None]
        margins = _down(y.gather(1, idx) - y)
        Ka = self.K.to(y.device)[a]
        if self.D is None:
            return margins, Ka
        Da = self.D.to(y.device)[a]
        pair = lambda t: t.gather(1, idx) + t  # noqa: E731  (value at a + value at c)
        low = _down(margins - _up(Da * self.body_err[:, None] + pair(self.err)))
        slope = _up(Ka + Da * self.body_slope + pair(self.row_slope.to(y.device)[None, :].expand_as(y)) * self.grow)
        return low, slope


def margin_bounds(
    logits: torch.Tensor,
    K: torch.Tensor,
    D: torch.Tensor,
    profile: Profile | None,
    norms: list[torch.Tensor] | None = None,
    head_input: torch.Tensor | None = None,
    fused_centre: bool = False,
    errors=None,
) -> MarginBounds:
    """The :class:`MarginBounds` of one batch; ``profile=None`` for exact arithmetic (the computed
    logits, no rounding allowance). ``norms[s]`` (B,) bounds ``‖ĉ_s‖`` for ``s = 0..S`` and
    ``head_input`` is ``ĉ_S`` (see the module docstring); ``fused_centre``: the centre was computed
    with fused kernels (its errors from ``profile.fused``), else by the certified program;
    ``errors``: :func:`body_errors` of the same, if already computed."""
    y = logits.detach().to(torch.float64)
    B, dev = y.shape[0], y.device
    if profile is None:
        return MarginBounds(y=y, K=K, cap=torch.full((B,), math.inf, dtype=torch.float64, device=dev))
    if errors is None:
        errors = body_errors(profile, [None if n is None else n.to(dev) for n in norms], fused_centre)
    delta, ball = errors.delta.to(dev), errors.ball.to(dev)  # Pc + P and ρ̂_S + Pc + P
    hd = profile.head
    rho = norms[-1].to(dev)
    grow = profile.prefix_lip[-1] + profile.q[-1]  # ‖â_S(x') − ĉ_S‖ ≤ pc + p + grow·r
    growth = torch.tensor(profile.peak_growth, dtype=torch.float64, device=dev)  # each load grows by ≤ growth·r
    cap = _overflow_radius(errors.loads.to(dev), growth, profile.threshold)
    h = head_input.detach().flatten(1).to(torch.float64)
    w, b, row = hd.weight.to(dev), hd.bias.to(dev), hd.row_norm.to(dev)
    reach = _up(h.abs() @ hd.abs_weight.to(dev).t() + b.abs())  # (B, C) Σ|w_kt||ĉ_t| + |b_k|
    y_centre = h @ w.t() + b if hd.reevaluate else y  # float32 models: the head at x again, in float64
    e_centre = hd.centre_gamma * reach + hd.centre_lam_rel * rho[:, None] + hd.centre_lam_abs.to(dev)
    e_ball = hd.gamma * (reach + row * delta[:, None]) + hd.lam_rel * ball[:, None] + hd.lam_abs.to(dev)
    return MarginBounds(
        y=y_centre, K=K, D=D, body_err=delta, body_slope=profile.q[-1], grow=grow, err=_up(e_centre + e_ball),
        row_slope=_up(hd.gamma * row + hd.lam_rel), cap=cap,
    )


def radius_from_rows(low: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """``low / slope`` rounded down (0 where ``low ≤ 0`` or NaN; inf where ``slope = 0 < low``)."""
    ratio = torch.where(
        slope > 0,
        _down(low / slope).nan_to_num(nan=0.0, posinf=torch.finfo(torch.float64).max),
        torch.where((low > 0) & (slope == 0), math.inf, 0.0),  # a NaN slope never certifies
    )
    return ratio.clamp_min(0.0).nan_to_num(nan=0.0)


def certified_radii(bounds: MarginBounds, pred: torch.Tensor) -> torch.Tensor:
    """(B,) radius within which ``pred`` stays strictly first: ``min_{c ≠ pred} low/slope``,
    capped where an intermediate value could overflow. Ties, NaN and inf give 0."""
    low, slope = bounds.rows(pred)
    own = torch.nn.functional.one_hot(pred, low.shape[1]).bool()
    radius = radius_from_rows(low, slope).masked_fill(own, math.inf).amin(dim=1)
    return torch.minimum(radius, bounds.cap)
