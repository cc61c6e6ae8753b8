"""An independent reference of the floating-point-sound certificate, in 60-digit arithmetic.

Written from the statements in the docstrings of ``gloronet.fp``, ``gloronet.radius`` and the
layers (Higham's ``γ_n``, the per-layer error models, their composition, the propagation through
the body and the head, the margins and radii), never calling the code under test: inputs are
taken as the exact values of their floats, every sum and product below is exact at 60 digits
(float64 products have ≤ 106 significant bits), square roots carry a relative error ≤ 1e-58.
``γ_n = n·u/(1 − n·u)`` is exact (a rational). Norms of explicit operators come from float64
SVDs (relative error ~1e-15: the only inexact inputs, used by the end-to-end comparisons only).

A library quantity that is an upper bound must be ``≥`` its reference ("never tighter") and at
most a stated factor above it ("never looser"); lower bounds (margins, radii) the other way.
"""
from __future__ import annotations

from dataclasses import dataclass

import mpmath
import torch
from mpmath import mpf

mpmath.mp.dps = 60
EXACT = mpf(1) - mpf(10) ** -50  # "≥ reference" allows this much for the 60-digit square roots


def u_of(dtype) -> mpf:
    return mpf(2) ** (-24 if dtype == torch.float32 else -53)


def lam_of(dtype) -> mpf:
    return mpf(float(torch.finfo(dtype).tiny))


def gamma(n, dtype) -> mpf:
    """``γ_n = n·u/(1 − n·u)``, exact (inf from n·u ≥ 1/2, as the library)."""
    nu = n * u_of(dtype)
    return mpmath.inf if nu >= mpf(1) / 2 else nu / (1 - nu)


def exact(t) -> list:
    """The exact values of a tensor's floats, as nested lists of mpf."""
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().to(torch.float64).tolist()
    if isinstance(t, list):
        return [exact(v) for v in t]
    return mpf(t)


def norm(v) -> mpf:
    return mpmath.sqrt(sum(x * x for x in _flat(v)))


def _flat(v):
    if isinstance(v, list):
        for x in v:
            yield from _flat(x)
    else:
        yield v


@dataclass
class Model:
    """The reference's error model of one layer (the six numbers of ``fp.ErrorModel``)."""

    lip: mpf
    rel: mpf = mpf(0)
    abs: mpf = mpf(0)
    offset: mpf = mpf(0)
    peak_rel: mpf = mpf(1)
    peak_abs: mpf = mpf(0)

    def then(self, nxt: "Model") -> "Model":
        """``nxt ∘ self``: ``‖ψ̂(φ̂(a)) − ψ(φ(a))‖ ≤ L_ψ‖φ̂(a) − φ(a)‖ + rel_ψ‖φ̂(a)‖ + abs_ψ`` with
        ``‖φ̂(a)‖ ≤ offset + (lip + rel)‖a‖ + abs``; peaks add."""
        return Model(
            lip=self.lip * nxt.lip,
            rel=nxt.lip * self.rel + nxt.rel * (self.lip + self.rel),
            abs=nxt.lip * self.abs + nxt.rel * (self.offset + self.abs) + nxt.abs,
            offset=nxt.offset + nxt.lip * self.offset,
            peak_rel=self.peak_rel + nxt.peak_rel * (self.lip + self.rel),
            peak_abs=self.peak_abs + nxt.peak_rel * (self.offset + self.abs) + nxt.peak_abs,
        )

    @staticmethod
    def of(m) -> "Model":
        return Model(*(mpf(getattr(m, k)) for k in ("lip", "rel", "abs", "offset", "peak_rel", "peak_abs")))


def dot_product(lip, depth, n_terms, abs_weight_norm, row_abs_sum, out_numel, dtype, bias_norm=0, bias_max=0) -> Model:
    """An affine layer whose outputs are ``n``-term sums rounded ``d`` times per term:
    ``|e_k| ≤ γ_d(Σ|w||a| + |b|) + (1+γ_d)λ(Σ_t|w_kt| + ‖a‖_∞√n + 2n)`` per output, in L2 over
    ``m`` outputs with ``‖|W|‖₂``."""
    g, lam, m = gamma(depth, dtype), lam_of(dtype), mpf(out_numel)
    W, row, bn, bmax, n = (mpf(v) for v in (abs_weight_norm, row_abs_sum, bias_norm, bias_max, n_terms))
    return Model(
        lip=mpf(lip),
        rel=g * W + (1 + g) * lam * mpmath.sqrt(m) * mpmath.sqrt(n),
        abs=g * bn + (1 + g) * lam * mpmath.sqrt(m) * (row + 2 * n),
        offset=bn,
        peak_rel=(1 + g) * W,
        peak_abs=(1 + g) * (bmax + lam * (row + 2 * n)),
    )


def elementwise(lip, numel, dtype) -> Model:
    """Comparisons (max / min / ReLU): exact but for a flushed subnormal, ``≤ λ`` each."""
    return Model(lip=mpf(lip), abs=lam_of(dtype) * mpmath.sqrt(numel))


# --------------------------------------------------------------------------- the head and the margins
@dataclass
class Head:
    w: list  # C × n exact
    b: list
    row_norm: list
    gamma: mpf
    lam_rel: mpf
    lam_abs: list
    centre_gamma: mpf
    centre_lam_rel: mpf
    centre_lam_abs: list
    peak_rel: mpf
    peak_abs: mpf


def head(weight, bias, depth, dtype) -> Head:
    """``y = Wh + b``: at x' each logit errs by ``γ_d(Σ|w||h| + |b|) + (1+γ_d)λ(√n‖h‖ + ‖w_k‖₁ +
    2(n+1))``; at x the float64 re-evaluation (float32 models) by the same with ``γ⁶⁴_{n+1}``,
    ``λ⁶⁴``, or the model's own logits (float64 models)."""
    w = exact(weight)
    n = len(w[0])
    b = exact(bias) if bias is not None else [mpf(0)] * len(w)
    l1 = [sum(abs(v) for v in row) for row in w]
    g, lam = gamma(depth, dtype), lam_of(dtype)
    f64 = dtype == torch.float64
    gc = g if f64 else gamma(n + 1, torch.float64)
    lamc = lam if f64 else lam_of(torch.float64)
    row_norm = [norm(row) for row in w]
    return Head(
        w=w, b=b, row_norm=row_norm, gamma=g, lam_rel=(1 + g) * lam * mpmath.sqrt(n),
        lam_abs=[(1 + g) * lam * (a + 2 * (n + 1)) for a in l1], centre_gamma=gc,
        centre_lam_rel=(1 + gc) * lamc * mpmath.sqrt(n), centre_lam_abs=[(1 + gc) * lamc * (a + 2 * (n + 1)) for a in l1],
        peak_rel=(1 + g) * max(row_norm), peak_abs=(1 + g) * (max(abs(v) for v in b) + lam * 2 * (n + 1)),
    )


@dataclass
class Margins:
    """Per example: ``(low, slope)`` for every ordered pair of classes, and the overflow cap."""

    low: list  # B × C × C
    slope: list
    cap: list  # B
    scale: list  # B × C × C: the sum of the magnitudes of the terms of ``low``


def overflow_radius(peak_rel, peak_abs, balls, slopes, threshold) -> mpf:
    """Largest ``r`` with ``peak_rel_s(ball_s + slope_s r) + peak_abs_s ≤ threshold`` for all ``s``."""
    r = mpmath.inf
    for pr, pa, ball, sl in zip(peak_rel, peak_abs, balls, slopes):
        room = threshold - (pa + pr * ball)
        grow = pr * sl
        r = min(r, (room / grow if grow > 0 else mpmath.inf) if room > 0 else mpf(0))
    return r


def margins(models, hd: Head, dtype, norms, h, y_centre, D, K) -> Margins:
    """The margin bounds of :mod:`gloronet.radius` (module docstring): body errors at x and in the
    ball, the head's errors, the overflow cap. ``norms[s]`` bound the computed activations at x
    (``S + 1`` entries per example), ``h`` is the computed head input, ``y_centre`` the logits used
    at x (the library's float64 head re-evaluation, or the model's own logits)."""
    prefix, q = [mpf(1)], [mpf(0)]
    for m in models:
        q.append(m.lip * q[-1] + m.rel * (prefix[-1] + q[-1]))
        prefix.append(prefix[-1] * m.lip)
    threshold = mpf(float(torch.finfo(dtype).max)) / 2
    C = len(hd.w)
    out = Margins([], [], [], [])
    for bi in range(len(h)):
        pc = p = mpf(0)
        balls = []
        for s, m in enumerate(models):
            rho = norms[s][bi]
            balls.append(rho + pc + p)
            pc, p = m.lip * pc + m.rel * rho + m.abs, m.lip * p + m.rel * balls[-1] + m.abs
        rho = norms[-1][bi]
        balls.append(rho + pc + p)
        grow = prefix[-1] + q[-1]
        cap = overflow_radius([m.peak_rel for m in models] + [hd.peak_rel], [m.peak_abs for m in models] + [hd.peak_abs],
                              balls, [a + b for a, b in zip(prefix, q)], threshold)
        reach = [sum(abs(wt) * abs(ht) for wt, ht in zip(hd.w[k], h[bi])) + abs(hd.b[k]) for k in range(C)]
        e_c = [hd.centre_gamma * reach[k] + hd.centre_lam_rel * rho + hd.centre_lam_abs[k] for k in range(C)]
        e_b = [hd.gamma * (reach[k] + hd.row_norm[k] * (pc + p)) + hd.lam_rel * (rho + pc + p) + hd.lam_abs[k] for k in range(C)]
        err = [e_c[k] + e_b[k] for k in range(C)]
        row_slope = [hd.gamma * hd.row_norm[k] + hd.lam_rel for k in range(C)]
        y = y_centre[bi]
        out.low.append([[y[a] - y[c] - D[a][c] * (pc + p) - (err[a] + err[c]) for c in range(C)] for a in range(C)])
        out.scale.append([[abs(y[a] - y[c]) + D[a][c] * (pc + p) + err[a] + err[c] for c in range(C)] for a in range(C)])
        out.slope.append([[K[a][c] + D[a][c] * q[-1] + (row_slope[a] + row_slope[c]) * grow for c in range(C)] for a in range(C)])
        out.cap.append(cap)
    return out


def ratio(low, slope) -> mpf:
    """``low/slope`` as a radius: 0 when ``low ≤ 0``, inf when ``slope = 0 < low``."""
    if low <= 0:
        return mpf(0)
    return mpmath.inf if slope == 0 else low / slope


def radius(mg: Margins, b: int, pred: int, loose: mpf = mpf(0)) -> mpf:
    """The certified radius of example ``b`` for class ``pred``: ``min_{c≠pred} low/slope``, capped.
    With ``loose`` > 0: the same with ``low`` lowered by ``loose`` times its terms' size, ``slope``
    and the cap loosened by ``1 + loose`` (what upward-rounded evaluation may cost)."""
    C = len(mg.low[b])
    r = min(ratio(mg.low[b][pred][c] - loose * mg.scale[b][pred][c], mg.slope[b][pred][c] * (1 + loose))
            for c in range(C) if c != pred)
    return min(r, mg.cap[b] / (1 + loose))


def top_k_radii(mg: Margins, b: int, order: list, K: int, loose: mpf = mpf(0)) -> list:
    """``radii[k−1] = min_{i ∈ S_k, j ∉ S_k} low_ij/slope_ij`` (capped), ``S_k`` = the first k of
    ``order``; ``loose`` as in :func:`radius`."""
    out = []
    for k in range(1, K + 1):
        inside, outside = order[:k], order[k:]
        r = min((ratio(mg.low[b][i][j] - loose * mg.scale[b][i][j], mg.slope[b][i][j] * (1 + loose))
                 for i in inside for j in outside), default=mpmath.inf)
        out.append(min(r, mg.cap[b] / (1 + loose)))
    return out
