"""White-box attacks in an L2 ball, shared by ``gloronet attack`` and ``gloronet degrade``.

Every attack maximises the *margin score* of a class ``j`` at ``x' = x + δ``, ``‖δ‖₂ ≤ ρ``
(``ρ`` per example)::

    s(x') = max_{i≠j} z_i(x') − z_j(x'),     z = forward(x')

``s ≥ 0`` means ``j`` is no longer strictly on top (a tie counts). ``forward`` is the caller's:
the model's logits for the certificate check, the logits plus ``ε·K_j·`` (the GloRo bottom logit:
``s ≥ 0`` iff the model abstains) for the degradation attack. The ensemble follows AutoAttack's
white-box part (Croce & Hein, ICML 2020), for per-example radii:

- PGD on ``s`` (Madry et al. 2018; the CW margin loss), normalised-gradient steps of
  ``2.5ρ/steps``, restart 0 from ``x``, the others from random points in the ball;
- APGD-CE: APGD on the cross-entropy of ``j`` — step size ``2ρ`` halved at checkpoints
  ``p₀ = 0, p₁ = 0.22, p_{k+1} = p_k + max(p_k − p_{k−1} − 0.03, 0.06)`` when fewer than 75% of
  the steps since the last checkpoint increased the loss, or the step was not halved last time and
  the best loss did not improve; momentum 0.75; restart from the best point on each halving;
- APGD-T: APGD on the targeted DLR loss ``−(z_j − z_t)/(z_π1 − (z_π3 + z_π4)/2)`` for the
  ``targets`` runner-up classes ``t`` of the clean point (the targeted margin ``z_t − z_j`` when
  there are fewer than 4 classes).

Each attack keeps, per example, the iterate with the highest ``s`` seen (every iterate is
checked). Later attacks skip examples already at ``s ≥ 0``. Iterates stay in the ball after
rounding (:func:`project`) and, with ``box=(lo, hi)``, in the box (clipping a point towards an
in-box ``x`` never lengthens ``δ``). Callers re-check every result in float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

Forward = Callable[[torch.Tensor], torch.Tensor]
SHRINK = 1 - 1e-6  # keep iterates strictly inside the ball


@dataclass
class AttackConfig:
    steps: int = 100  # iterations per attack run
    restarts: int = 2  # PGD runs (the first from x itself)
    targets: int = 3  # APGD-T target classes
    seed: int = 0

    def validate(self) -> "AttackConfig":
        if self.steps < 1 or self.restarts < 0 or self.targets < 0:
            raise ValueError(f"attack steps must be >= 1, restarts and targets >= 0; got {self}")
        return self


def margin_score(z: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """``max_{i≠j} z_i − z_j`` per row (masked by index)."""
    own = z.gather(1, j[:, None])[:, 0]
    return z.scatter(1, j[:, None], -math.inf).amax(1) - own


def _view(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (x.dim() - 1)))


def _norm(d: torch.Tensor) -> torch.Tensor:
    return d.flatten(1).norm(dim=1)


def _unit(g: torch.Tensor) -> torch.Tensor:
    return g / _view(_norm(g).clamp_min(1e-30), g)


def project(x: torch.Tensor, x_adv: torch.Tensor, radius: torch.Tensor, box: tuple[float, float] | None) -> torch.Tensor:
    """The point of the ball ``‖x' − x‖ ≤ ρ`` (then the box) closest along ``x_adv − x``, such that
    the rounded result is still inside: the step is scaled in float64 to
    ``ρ·SHRINK − 2u(‖x‖ + ρ)`` (rounding ``x + δ`` to the model's dtype moves it by at most
    ``u·‖x + δ‖``)."""
    x64 = x.double()
    d = x_adv.double() - x64
    u = torch.finfo(x.dtype).eps / 2
    rho = (radius.double() * SHRINK - 2 * u * (_norm(x64) + radius.double())).clamp_min(0.0)
    d = d * _view(torch.clamp(rho / _norm(d).clamp_min(1e-300), max=1.0), d)
    out = (x64 + d).to(x.dtype)
    return out.clamp(*box) if box is not None else out


def _random_start(x, radius, box, gen):
    d = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
    u = torch.rand(len(x), generator=gen, dtype=x.dtype).to(x.device)
    return project(x, x + _unit(d) * _view(radius.to(x.dtype) * u, x), radius, box)


def _eval(forward: Forward, x_adv: torch.Tensor, j: torch.Tensor, loss: Callable | None):
    """``(score, loss, grad of loss)`` at ``x_adv`` (one forward/backward pass)."""
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        z = forward(x_adv)
        value = loss(z, j) if loss is not None else margin_score(z, j)
        (g,) = torch.autograd.grad(value.sum(), x_adv)
    return margin_score(z.detach(), j), value.detach(), g


class _Best:
    """Per example: the highest score seen and the iterate that had it."""

    def __init__(self, x: torch.Tensor):
        self.score = torch.full((len(x),), -math.inf, dtype=torch.float64, device=x.device)
        self.x = x.clone()

    def update(self, score: torch.Tensor, x_adv: torch.Tensor) -> None:
        better = score.double() > self.score
        self.score = torch.where(better, score.double(), self.score)
        self.x[better] = x_adv.detach()[better]


def pgd(forward: Forward, x, j, radius, steps: int, box=None, start=None) -> _Best:
    """PGD ascent on the margin score ``s`` from ``start`` (default: ``x``)."""
    best = _Best(x)
    alpha = _view(2.5 * radius.to(x.dtype) / steps, x)
    x_adv = x.clone() if start is None else start
    for _ in range(steps):
        score, _, g = _eval(forward, x_adv, j, None)
        best.update(score, x_adv)
        x_adv = project(x, x_adv.detach() + alpha * _unit(g), radius, box)
    with torch.no_grad():
        best.update(margin_score(forward(x_adv), j), x_adv)
    return best


def apgd_checkpoints(steps: int) -> list[int]:
    """Iterations at which APGD may halve its step (Croce & Hein 2020, §3.2)."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    its = {math.ceil(round(q * steps, 9)) for q in p[1:]}  # round: 0.22 + 0.19 is 0.41000000000000003
    return sorted(i for i in its if i < steps)


def apgd(forward: Forward, x, j, radius, loss: Callable, steps: int, box=None, gen=None) -> _Best:
    """APGD (Croce & Hein 2020, Algorithm 1, L2) ascending ``loss(z, j)``; tracks the score ``s``."""
    best = _Best(x)
    r = _view(radius.to(x.dtype), x)
    eta = 2 * r.clone()
    checks = set(apgd_checkpoints(steps))
    x_cur = _random_start(x, radius, box, gen)
    score, value, g = _eval(forward, x_cur, j, loss)
    best.update(score, x_cur)
    x_max, l_max, g_max = x_cur.clone(), value.clone(), g.clone()
    x_prev = x_cur.clone()
    increases = torch.zeros(len(x), device=x.device)
    l_max_at_check, halved_at_check = l_max.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)
    last_check, prev_value = 0, value
    for k in range(steps):
        a = 0.75 if k > 0 else 1.0
        z_step = project(x, x_cur + eta * _unit(g), radius, box)
        x_next = project(x, x_cur + a * (z_step - x_cur) + (1 - a) * (x_cur - x_prev), radius, box)
        x_prev, x_cur = x_cur, x_next
        score, value, g = _eval(forward, x_cur, j, loss)
        best.update(score, x_cur)
        increases += (value > prev_value).float()
        prev_value = value
        better = value > l_max
        l_max = torch.where(better, value, l_max)
        x_max[better], g_max[better] = x_cur[better], g[better]
        if k + 1 in checks:
            window = k + 1 - last_check
            halve = (increases < 0.75 * window) | (~halved_at_check & (l_max <= l_max_at_check))
            eta = torch.where(_view(halve, x), eta / 2, eta)
            x_cur = torch.where(_view(halve, x), x_max, x_cur)
            g = torch.where(_view(halve, x), g_max, g)
            halved_at_check, l_max_at_check = halve, l_max.clone()
            increases.zero_()
            last_check = k + 1
    return best


def ce_loss(z: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(z.float() if z.dtype in (torch.float16, torch.bfloat16) else z, j, reduction="none")


def dlr_targeted(t: torch.Tensor) -> Callable:
    """Targeted DLR loss towards classes ``t`` (Croce & Hein 2020, eq. 7); the targeted margin
    ``z_t − z_j`` for fewer than 4 classes."""

    def loss(z: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        diff = z.gather(1, t[:, None])[:, 0] - z.gather(1, j[:, None])[:, 0]
        if z.shape[1] < 4:
            return diff
        s = z.sort(dim=1, descending=True).values
        return diff / (s[:, 0] - 0.5 * (s[:, 2] + s[:, 3])).clamp_min(1e-12)

    return loss


@dataclass
class EnsembleResult:
    score: torch.Tensor  # (B,) float64: best margin score found (>= 0: j not strictly on top)
    x_adv: torch.Tensor  # (B, ...) the iterate that had it
    first_success: list[str]  # per example: the attack that first reached s >= 0 ("" if none)


def ensemble(model: Forward, x: torch.Tensor, j: torch.Tensor, radius: torch.Tensor, cfg: AttackConfig,
             box: tuple[float, float] | None = None, offset: torch.Tensor | None = None) -> EnsembleResult:
    """PGD restarts, APGD-CE, then APGD-T on each of ``cfg.targets`` runner-up classes (module
    docstring) against ``z = model(x') + offset`` (``offset`` (B, C), e.g. ``ε·K[j]``); each attack
    runs only on the examples not yet at ``s ≥ 0``."""
    cfg.validate()
    gen = torch.Generator().manual_seed(cfg.seed)

    def forward_on(idx):
        if offset is None:
            return model
        off = offset[idx].to(x.dtype)
        return lambda xa: model(xa) + off

    with torch.no_grad():
        z0 = forward_on(slice(None))(x)
    runner_up = z0.scatter(1, j[:, None], -math.inf).argsort(dim=1, descending=True)
    runs: list[tuple[str, Callable]] = []
    for r in range(cfg.restarts):
        runs.append((f"pgd-{r}", lambda f, xs, js, rs, idx, r=r: pgd(
            f, xs, js, rs, cfg.steps, box, start=None if r == 0 else _random_start(xs, rs, box, gen))))
    runs.append(("apgd-ce", lambda f, xs, js, rs, idx: apgd(f, xs, js, rs, ce_loss, cfg.steps, box, gen)))
    for t in range(min(cfg.targets, z0.shape[1] - 1)):
        runs.append((f"apgd-t{t + 1}", lambda f, xs, js, rs, idx, t=t: apgd(
            f, xs, js, rs, dlr_targeted(runner_up[idx, t]), cfg.steps, box, gen)))
    best = _Best(x)
    best.update(margin_score(z0, j), x)
    first = ["clean" if s >= 0 else "" for s in best.score.tolist()]
    for name, run in runs:
        idx = (best.score < 0).nonzero()[:, 0]
        if len(idx) == 0:
            break
        out = run(forward_on(idx), x[idx], j[idx], radius[idx], idx)
        improved = out.score > best.score[idx]
        best.score[idx] = torch.where(improved, out.score, best.score[idx])
        best.x[idx[improved]] = out.x[improved]
        for i in idx[out.score >= 0].tolist():
            first[i] = first[i] or name
    return EnsembleResult(best.score, best.x, first)
