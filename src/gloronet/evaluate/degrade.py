"""``gloronet degrade``: degradation (denial-of-service) attacks on certification.

Mangal, Leino, Wang, Pasareanu & Fredrikson, "Degradation Attacks on Certifiably Robust Neural
Networks" (TMLR 2023; code: ravimangal/degradation-attacks). A GloRo net rejects (⊥) a point it
cannot certify at ε. An attacker who moves a correctly classified, certified point ``x`` by
``‖δ‖ ≤ ε`` cannot change its label (the certificate), but may make the model *abstain* on
``x' = x + δ`` — a false alarm on an input whose whole ε-ball shares one label.

The attack maximises the GloRo abstention score with the sound pairwise constants ``K``::

    g(x') = max_{i≠j} (z_i(x') + ε·K_ji) − z_j(x')     (j = the certified class of x)

(``g ≥ 0``: the bottom logit wins) with the ensemble of :mod:`.pgd` in ``[0, 1]``, and counts a
success when ``certify(x', ε)`` — the sound check a deployed model runs — rejects ``x'``.

Upper bound. Margins are ``K``-Lipschitz, so ``r(x') ≥ r(x) − ‖δ‖`` (exact arithmetic): a point
with ``r(x) > 2ε`` cannot be degraded. Among certified points the attack succeeds on at most

    1 − P(r > 2ε) / P(r > ε)

(over the correctly classified points, the population attacked). Defence: train for 2ε and keep
certifying at ε (``degradation_defense: true`` in a recipe); VRA at 2ε is then the fraction of
points *provably* immune. The floating-point-sound radius is not exactly 1-Lipschitz in ``x``
(its rounding allowance depends on the point), so the report counts degraded points with
``r > 2ε`` separately (expected 0).
"""
from __future__ import annotations

import time

import torch

from .common import Run, certify_points, pct, steps, vra
from .pgd import AttackConfig, ensemble


def efficacy_upper_bound(radius: torch.Tensor, epsilon: float) -> float:
    """``1 − P(r > 2ε)/P(r > ε)``: the largest fraction of points certified at ε that an
    ε-perturbation can make the model reject (0 when nothing is certified)."""
    at_eps = int((radius > epsilon).sum())
    return 1.0 - int((radius > 2 * epsilon).sum()) / at_eps if at_eps else 0.0


def run_degrade(run: Run, images: torch.Tensor, labels: torch.Tensor, cfg: AttackConfig, batch_size: int = 256,
                progress: bool = False) -> dict:
    """Degradation attack on every correctly classified point of uint8 ``images`` certified at ε
    (report dict; ``_``-keys hold per-point tensors for the plot and any counterexamples)."""
    start = time.perf_counter()
    eps = run.epsilon
    pred, radius = certify_points(run, images, progress=progress)
    correct = pred == labels
    target = (correct & (radius > eps)).nonzero()[:, 0]
    K = run.net.lipschitz_constant()  # sound, float64
    rejected = torch.zeros(len(target), dtype=torch.bool)
    flipped = torch.zeros(len(target), dtype=torch.bool)
    x_adv = []
    for i in steps(len(target), batch_size, f"degrade at ε={eps:g}", progress):
        idx = target[i : i + batch_size]
        x = run.inputs(images[idx])
        j = pred[idx].to(run.device)
        res = ensemble(run.net, x, j, torch.full((len(idx),), eps, dtype=torch.float64, device=run.device), cfg,
                       box=(0.0, 1.0), offset=(eps * K[pred[idx]]).to(run.device))
        inside = (res.x_adv.double() - x.double()).flatten(1).norm(dim=1) <= eps
        cert = run.net.certify(res.x_adv, eps)
        rejected[i : i + len(idx)] = (~cert.certified & inside).cpu()
        flipped[i : i + len(idx)] = ((cert.pred != j) & inside).cpu()
        x_adv.append(res.x_adv.cpu())
    n_target = len(target)
    r_ok = radius[correct]
    report = {
        "n": len(images), "epsilon": eps, "dataset": run.dataset, "model": run.net.config,
        "attack": {"steps": cfg.steps, "pgd_restarts": cfg.restarts, "apgd_targets": cfg.targets, "seed": cfg.seed,
                   "objective": "max_i (z_i + eps*K_ji) - z_j (GloRo abstention)", "box": [0.0, 1.0]},
        "trained_for_2eps": bool(run.config.get("degradation_defense", False)),
        "clean_accuracy": float(correct.double().mean()),
        "vra": vra(correct, radius, eps),
        "vra_after_attack": (n_target - int(rejected.sum())) / len(images) if len(images) else 0.0,
        "attacked": n_target,
        "degraded": int(rejected.sum()),
        "fraction_degraded": int(rejected.sum()) / n_target if n_target else 0.0,
        "upper_bound": efficacy_upper_bound(r_ok, eps),
        "vra_2eps": vra(correct, radius, 2 * eps),
        "degraded_with_radius_above_2eps": int((rejected & (radius[target] > 2 * eps)).sum()),
        "label_changed": int(flipped.sum()),
        "seconds": time.perf_counter() - start,
        "_radius": radius, "_correct": correct,
    }
    if flipped.any():  # a label changed within ε of a certified point: a soundness bug
        bad = target[flipped]
        report["_counterexamples"] = {"x": run.inputs(images[bad]).cpu(), "x_adv": torch.cat(x_adv)[flipped],
                                      "label": labels[bad], "pred": pred[bad], "radius": radius[bad]}
    return report


def markdown(reports: dict[str, dict], title: str) -> str:
    """One row per model (e.g. the run and its 2ε-trained defended twin)."""
    first = next(iter(reports.values()))
    a = first["attack"]
    lines = [f"### {title}", "",
             f"n = {first['n']}, ε = {first['epsilon']:g}; attack: {a['objective']}, PGD ({a['pgd_restarts']} restarts) + "
             f"APGD-CE + APGD-T ({a['apgd_targets']} targets), {a['steps']} steps, in [0, 1]; success = sound `certify` rejects.", "",
             "| model | clean acc | VRA @ ε | VRA @ ε after attack | certified points degraded | upper bound 1 − P(r>2ε)/P(r>ε) "
             "| VRA @ 2ε (provably immune) | degraded with r > 2ε | label changed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in reports.items():
        lines.append(f"| {name} | {pct(r['clean_accuracy'])} | {pct(r['vra'])} | {pct(r['vra_after_attack'])} | "
                     f"{pct(r['fraction_degraded'])} ({r['degraded']}/{r['attacked']}) | {pct(r['upper_bound'])} | "
                     f"{pct(r['vra_2eps'])} | {r['degraded_with_radius_above_2eps']} | {r['label_changed']} |")
    if any(r["label_changed"] for r in reports.values()):
        lines += ["", "**SOUNDNESS BUG: a certified point changed its label within ε.**"]
    return "\n".join(lines) + "\n"
