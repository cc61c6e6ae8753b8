"""The body's error recursion (:mod:`gloronet.radius`) as ONE affine map of the measured norms.

Every bound :func:`gloronet.radius.body_errors` returns — ``delta = Pc_S + P_S`` (the centre's
error plus the certified program's), the ball ``ρ̂_S + Pc_S + P_S`` around the head's input and
the overflow loads ``peak_rel_s·ball_s + peak_abs_s`` of the steps and the head, with
``ball_s = ρ̂_s + Pc_s + P_s`` — is a non-negative linear combination of the activation norms
the pass measured, plus a constant:

* a norm the pass did not measure is propagated from the one before by the model of the pass
  that computed it, ``ρ̂_{s+1} ≤ (offset + abs) + up(lip + rel)·ρ̂_s`` (:func:`propagation`);
* ``Pc_{s+1} = lip^c Pc_s + rel^c ρ̂_s + abs^c`` and ``P_{s+1} = lip P_s + rel·ball_s + abs`` are
  linear in them.

:func:`plan` folds the recursion into coefficients once per profile, rounding every operation up
(all quantities are non-negative and the recursion is monotone, so the affine form dominates it
in exact arithmetic). At run time ``M`` multiply-adds of the measured norms with those
coefficients (a matrix product, summed in order) give every bound of a batch; its terms are
non-negative, so its relative error is at most ``γ_{2M+1}`` (float64), far inside
:data:`gloronet.fp.INFLATE`, and its underflows at most ``(M + 1)·2⁻¹⁰⁷⁴``, added before the final
upward rounding. A NaN (``0·∞``: an infinite norm or
coefficient) becomes ``∞``: nothing certifies from it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import fp

_SUBNORMAL = 2.0**-1074


def propagation(model: fp.ErrorModel) -> tuple[float, float]:
    """``(scale, const)`` with ``‖φ̂(a)‖ ≤ const + scale·‖a‖`` for the computed step ``φ̂``:
    ``‖φ(0)‖ + ‖φ(a) − φ(0)‖ + ‖φ̂(a) − φ(a)‖ ≤ offset + lip‖a‖ + rel‖a‖ + abs``."""
    return fp.up(model.lip + model.rel), fp.up(model.offset + model.abs)


def _comb(terms, const: float = 0.0) -> list[float]:
    """``Σ c·v + const`` of affine forms ``v`` (lists, the constant last) with non-negative ``c``,
    every component rounded up."""
    size = len(terms[0][1])
    out = [fp.up(sum(c * v[k] for c, v in terms)) for k in range(size)]
    out[-1] = fp.up(out[-1] + const)
    return out


class BodyErrors(NamedTuple):
    """(B,) float64 upper bounds at ``r = 0`` (see the module docstring)."""

    delta: torch.Tensor  # Pc_S + P_S
    ball: torch.Tensor  # ρ̂_S + Pc_S + P_S
    loads: torch.Tensor  # (B, S + 1): peak_rel_s·ball_s + peak_abs_s, the S steps and the head


@dataclass(frozen=True)
class ErrorPlan:
    """:class:`BodyErrors` from the norms a pass measured (the entries of ``measured``), as
    ``norms @ coef + const`` rounded up."""

    measured: tuple[int, ...]  # the steps s whose input norm the pass measured (s = S: the output)
    coef: torch.Tensor  # (M, S + 3) float64: columns delta, ball, the S + 1 loads
    const: torch.Tensor  # (S + 3,) float64

    def __call__(self, norms) -> BodyErrors:
        out = _evaluate(self.measured, self.coef, self.const, norms)
        return BodyErrors(out[:, 0], out[:, 1], out[:, 2:])


def _evaluate(measured: tuple[int, ...], coef: torch.Tensor, const: torch.Tensor, norms) -> torch.Tensor:
    """(B, K) upper bounds of ``norms[measured] @ coef + const`` (the module docstring's rounding)."""
    out = const.expand(len(norms[measured[0]]), -1).clone()
    for k, s in enumerate(measured):  # a sum of M non-negative products per entry, in order
        out.addcmul_(norms[s].to(coef)[:, None], coef[k])
    tiny = (len(measured) + 2) * _SUBNORMAL  # the products' underflow (exact: a subnormal)
    return torch.nextafter(out * fp.INFLATE + tiny, out.new_tensor(math.inf)).nan_to_num_(nan=math.inf, posinf=math.inf)


def _table(forms, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(coef (M, K), const (K,))`` of K affine forms (lists, the constant last)."""
    table = torch.tensor(forms, dtype=torch.float64, device=device).t()  # (M + 1, K)
    return table[:-1].contiguous(), table[-1].contiguous()


def _norm_forms(centre_models, measured: tuple[bool, ...]) -> tuple[list[int], list[list[float]]]:
    """``(index, forms)``: the steps whose norm was measured, and ``ρ̂_s`` (``s = 0..S``) as affine
    forms of those norms — a measured one itself, any other propagated from the one before by the
    model of the step that computed it (:func:`propagation`)."""
    if len(measured) != len(centre_models) + 1 or not measured[0]:
        raise ValueError("error plan: one model per step, one flag per norm, and the input's norm measured")
    index = [s for s, m in enumerate(measured) if m]
    basis = lambda j: [1.0 if k == j else 0.0 for k in range(len(index) + 1)]  # noqa: E731
    forms = [basis(0)]
    for s, c in enumerate(centre_models):
        if measured[s + 1]:
            forms.append(basis(index.index(s + 1)))
        else:
            scale, const = propagation(c)
            forms.append(_comb([(scale, forms[-1])], const))
    return index, forms


def propagated_norms(centre_models, norms: list) -> list[torch.Tensor]:
    """``norms`` (``ρ̂_s``, ``s = 0..S``; None where not measured) with every entry an upper bound:
    the forms :func:`plan` reads, evaluated (measured ones come back inflated by one rounding).
    ``centre_models``: the error models of the pass that computed the activations. Sound wherever
    those models hold, i.e. up to the first overflow: the guard's overflow check and the radius cap
    of :mod:`gloronet.radius` check that against the loads built from these same forms."""
    index, forms = _norm_forms(centre_models, tuple(n is not None for n in norms))
    coef, const = _table(forms, norms[0].device)
    return list(_evaluate(tuple(index), coef, const, norms).t())


def plan(models, centre_models, measured: tuple[bool, ...], peak_rel, peak_abs, device) -> ErrorPlan:
    """The :class:`ErrorPlan` of a body whose steps run as ``models`` (the certified program) and
    whose centre was computed with ``centre_models``, for a pass that measured the input norm of
    step ``s`` where ``measured[s]`` (``s = 0..S``; the norms it did not measure are propagated
    by ``centre_models``, the kernels that computed those activations); ``peak_rel`` /
    ``peak_abs``: the overflow coefficients of the ``S`` steps and the head."""
    steps = len(models)
    if len(centre_models) != steps or len(peak_rel) != steps + 1 or len(peak_abs) != steps + 1:
        raise ValueError("error plan: one model per step and overflow coefficients for every step and the head")
    index, rhos = _norm_forms(centre_models, measured)
    zero = [0.0] * (len(index) + 1)
    pc, p, balls = zero, zero, []
    for m, c, rho in zip(models, centre_models, rhos):
        ball = _comb([(1.0, rho), (1.0, pc), (1.0, p)])
        balls.append(ball)
        pc = _comb([(c.lip, pc), (c.rel, rho)], c.abs)
        p = _comb([(m.lip, p), (m.rel, ball)], m.abs)
    balls.append(_comb([(1.0, rhos[-1]), (1.0, pc), (1.0, p)]))
    delta = _comb([(1.0, pc), (1.0, p)])
    loads = [_comb([(r, ball)], a) for r, a, ball in zip(peak_rel, peak_abs, balls)]
    return ErrorPlan(tuple(index), *_table([delta, balls[-1], *loads], device))
