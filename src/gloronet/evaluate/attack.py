"""``gloronet attack``: an empirical check of the certificates.

Two attacks with the ensemble of :mod:`.pgd` on the model's own eval forward pass, in its dtype:

1. at ε against the label, on every test point, inside the image box [0, 1]: the *empirical robust
   accuracy* (correct, and no ``x'`` found with ``‖x' − x‖ ≤ ε`` on which the label is not strictly
   on top). It upper-bounds the true robust accuracy, as VRA lower-bounds it; their gap is what
   the certificates leave unproven (looseness of the bound plus weakness of the attack).
2. at each point's own certified radius ``r`` (every point with ``r > 0``), against the certified
   class, without the box (the certificate covers the whole ball): any ``x'`` with
   ``‖x' − x‖ < r`` (float64) on which the certified class is not strictly on top is a
   counterexample to the certificate — a soundness bug. So is a point certified at ε broken by
   attack 1.

Counterexamples are re-checked with a separate no-grad forward pass and saved (safetensors);
``gloronet attack`` then exits with status 1.
"""
from __future__ import annotations

import time

import torch

from .common import COUNTEREXAMPLES, Run, certify_points, pct, steps, vra
from .pgd import AttackConfig, ensemble, margin_score


def attack_points(run: Run, images: torch.Tensor, classes: torch.Tensor, radius: torch.Tensor, cfg: AttackConfig,
                  box, batch_size: int, progress: bool, desc: str):
    """Run the ensemble on every point; returns ``(x_adv, margin, distance, first_success,
    clean margin)`` with the margin score of ``classes`` re-measured by a no-grad forward pass and
    the distance in float64."""
    advs, margins, dists, first, clean = [], [], [], [], []
    for i in steps(len(images), batch_size, desc, progress):
        x = run.inputs(images[i : i + batch_size])
        j = classes[i : i + batch_size].to(run.device)
        res = ensemble(run.net, x, j, radius[i : i + batch_size].to(run.device), cfg, box=box)
        with torch.no_grad():
            margins.append(margin_score(run.net(res.x_adv), j).double().cpu())
            clean.append(margin_score(run.net(x), j).double().cpu())
        dists.append((res.x_adv.double() - x.double()).flatten(1).norm(dim=1).cpu())
        advs.append(res.x_adv.cpu())
        first += res.first_success
    return torch.cat(advs), torch.cat(margins), torch.cat(dists), first, torch.cat(clean)


def run_attack(run: Run, images: torch.Tensor, labels: torch.Tensor, cfg: AttackConfig, batch_size: int = 256,
               progress: bool = False) -> dict:
    """The report of ``gloronet attack`` on uint8 ``images`` (``_``-keys: per-point tensors for
    the plot and the counterexample file)."""
    start = time.perf_counter()
    eps = run.epsilon
    pred, radius = certify_points(run, images, progress=progress)
    correct = pred == labels
    certified = radius > eps

    at_eps = torch.full((len(images),), eps, dtype=torch.float64)
    x_eps, m_eps, d_eps, first_eps, _ = attack_points(run, images, labels, at_eps, cfg, (0.0, 1.0), batch_size, progress,
                                                      f"attack at ε={eps:g}")
    broken_eps = (m_eps >= 0) & (d_eps <= eps)
    robust = correct & ~broken_eps

    at_r = (radius > 0).nonzero()[:, 0]
    x_r, m_r, d_r, _, m_r0 = attack_points(run, images[at_r], pred[at_r], radius[at_r], cfg, None, batch_size, progress,
                                           "attack at each certified radius")
    broken_r = (m_r >= 0) & (d_r < radius[at_r])
    bad_eps = (broken_eps & certified & correct).nonzero()[:, 0]  # certified at ε, broken within ε
    bad = sorted(set(at_r[broken_r].tolist()) | set(bad_eps.tolist()))

    consumed = 1 - m_r / m_r0  # share of the clean margin the attack used up inside r (>= 1: broken)
    counts: dict[str, int] = {}
    for name in first_eps:
        if name:
            counts[name] = counts.get(name, 0) + 1
    report = {
        "n": len(images), "epsilon": eps, "dataset": run.dataset, "model": run.net.config,
        "attack": {"steps": cfg.steps, "pgd_restarts": cfg.restarts, "apgd_targets": cfg.targets, "seed": cfg.seed,
                   "ensemble": "PGD (margin) + APGD-CE + APGD-T (targeted DLR)", "box_at_eps": [0.0, 1.0],
                   "box_at_radius": None},
        "clean_accuracy": float(correct.double().mean()),
        "vra": vra(correct, radius, eps),
        "robust_accuracy": float(robust.double().mean()),
        "gap": float(robust.double().mean()) - vra(correct, radius, eps),
        "successes_by_attack": counts,
        "attacked_at_radius": len(at_r),
        "margin_consumed_max": float(consumed.max()) if len(consumed) else None,
        "broken_certified": len(bad),
        "counterexample_indices": bad,
        "seconds": time.perf_counter() - start,
        "_radius": radius, "_correct": correct, "_robust": robust, "_consumed": consumed,
    }
    if bad:
        at = {i: k for k, i in enumerate(at_r.tolist()) if broken_r[k]}
        adv = torch.stack([x_r[at[i]] if i in at else x_eps[i] for i in bad])
        x = run.inputs(images[bad]).cpu()
        report["_counterexamples"] = {"x": x, "x_adv": adv, "label": labels[bad], "pred": pred[bad], "radius": radius[bad],
                                      "distance": (adv.double() - x.double()).flatten(1).norm(dim=1)}
    return report


def markdown(report: dict, title: str) -> str:
    a = report["attack"]
    lines = [f"### {title}", "",
             f"n = {report['n']}, ε = {report['epsilon']:g}; ensemble {a['ensemble']}, {a['steps']} steps, "
             f"{a['pgd_restarts']} PGD restarts, {a['apgd_targets']} APGD-T targets.", "",
             "| clean accuracy | VRA (sound) | empirical robust accuracy | gap | certified points broken |",
             "|---:|---:|---:|---:|---:|",
             f"| {pct(report['clean_accuracy'])} | {pct(report['vra'])} | {pct(report['robust_accuracy'])} | "
             f"{100 * report['gap']:.2f} points | **{report['broken_certified']}** |", "",
             f"Attack at each point's own certified radius (no box): {report['attacked_at_radius']} points with radius > 0; "
             f"the attack used up at most {pct(report['margin_consumed_max'] or 0)} of a point's clean margin "
             "(100% would be a broken certificate)."]
    if report["broken_certified"]:
        lines += ["", f"**SOUNDNESS BUG: {report['broken_certified']} certified points broken** "
                      f"(indices {report['counterexample_indices'][:20]}); counterexamples in `{COUNTEREXAMPLES.format(name='attack')}`."]
    return "\n".join(lines) + "\n"
