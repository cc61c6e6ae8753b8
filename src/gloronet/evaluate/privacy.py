"""``gloronet privacy``: membership inference against a trained model.

Threshold attacks (Yeom et al., CSF 2018): an example is called a *member* of the training set
when its score is at least a threshold ``t``. Scores, higher = "more member-like":

- ``loss``: ``−CE(z, y)`` (needs the label);
- ``confidence``: the largest softmax probability (label-free);
- ``radius``: the certified radius of the prediction (label-free; GloRo's own output).

On a balanced set of ``n`` training members (drawn from the examples the run trained on) and
``n`` held-out test non-members, sweeping ``t`` gives the ROC curve; reported are ROC AUC (the
probability that a random member outscores a random non-member, ties ½ — Mann-Whitney), the
membership advantage ``max_t (TPR − FPR)`` (Yeom et al.) and the TPR at 0.1% and 1% FPR
(Carlini et al., "Membership Inference Attacks From First Principles", S&P 2022). Comparing with a
non-robust twin (same architecture and data, ``loss: standard``) shows what robust training does
to privacy.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .common import Run, pct, steps

SCORES = ("loss", "confidence", "radius")
FPRS = (0.001, 0.01)


def roc_curve(members: torch.Tensor, nonmembers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fpr, tpr)`` float64 at every distinct threshold, from (0, 0) to (1, 1); tied scores move
    together (one point per distinct value)."""
    scores = torch.cat([members, nonmembers]).double()
    is_member = torch.cat([torch.ones(len(members)), torch.zeros(len(nonmembers))]).double()
    order = scores.argsort(descending=True, stable=True)
    scores, is_member = scores[order], is_member[order]
    tp, fp = is_member.cumsum(0), (1 - is_member).cumsum(0)
    last = torch.ones(len(scores), dtype=torch.bool)
    last[:-1] = scores[1:] != scores[:-1]  # the last of each run of equal scores
    zero = torch.zeros(1, dtype=torch.float64)
    fpr = torch.cat([zero, fp[last] / max(len(nonmembers), 1)])
    tpr = torch.cat([zero, tp[last] / max(len(members), 1)])
    return fpr, tpr


def roc_auc(fpr: torch.Tensor, tpr: torch.Tensor) -> float:
    """Area under the ROC curve (trapezoids: equals the Mann-Whitney statistic with ties ½)."""
    return float(torch.trapezoid(tpr, fpr))


def tpr_at_fpr(fpr: torch.Tensor, tpr: torch.Tensor, alpha: float) -> float:
    """The largest TPR of a threshold whose FPR is at most ``alpha``."""
    ok = fpr <= alpha + 1e-12
    return float(tpr[ok].max())


def attack_metrics(fpr: torch.Tensor, tpr: torch.Tensor) -> dict:
    """AUC, advantage and TPR at low FPR of a threshold attack, from its ROC curve."""
    return {"auc": roc_auc(fpr, tpr), "advantage": float((tpr - fpr).max()),
            **{f"tpr_at_{100 * a:g}%_fpr": tpr_at_fpr(fpr, tpr, a) for a in FPRS}}


@torch.no_grad()
def membership_scores(run: Run, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512,
                      progress: bool = False) -> dict[str, torch.Tensor]:
    """Per-example scores (see the module docstring) from one certifying pass."""
    out = {name: [] for name in SCORES}
    for i in steps(len(images), batch_size, "scores", progress):
        cert = run.net.certify(run.inputs(images[i : i + batch_size]))
        z, y = cert.logits.cpu(), labels[i : i + batch_size]
        out["loss"].append(-F.cross_entropy(z, y, reduction="none"))
        out["confidence"].append(z.softmax(dim=1).amax(dim=1))
        out["radius"].append(cert.radius.cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def balanced_sample(run: Run, n: int | None, seed: int) -> tuple[tuple, tuple, int]:
    """``((member images, labels), (non-member images, labels), n)``: ``n`` random examples of
    the run's training set and ``n`` of the test split (``n`` capped by both)."""
    x_tr, y_tr = run.training_set()
    x_te, y_te = run.load("test")
    n = min(n or 1000, len(x_tr), len(x_te))
    gen = torch.Generator().manual_seed(seed)
    i_tr = torch.randperm(len(x_tr), generator=gen)[:n]
    i_te = torch.randperm(len(x_te), generator=gen)[:n]
    return (x_tr[i_tr], y_tr[i_tr]), (x_te[i_te], y_te[i_te]), n


def study(run: Run, members, nonmembers, progress: bool = False) -> tuple[dict, dict]:
    """``(metrics, ROC curves)`` of every score for one model."""
    s_in = membership_scores(run, *members, progress=progress)
    s_out = membership_scores(run, *nonmembers, progress=progress)
    rocs = {k: roc_curve(s_in[k], s_out[k]) for k in SCORES}
    return {"train_loss": float(-s_in["loss"].mean()), "test_loss": float(-s_out["loss"].mean()),
            "attacks": {k: attack_metrics(*rocs[k]) for k in SCORES}}, rocs


def run_privacy(run: Run, twin: Run | None, limit: int | None, seed: int = 0, progress: bool = False) -> dict:
    """Membership inference on the run (and its twin, on the same examples)."""
    start = time.perf_counter()
    if twin is not None:
        _check_twin(run, twin)
    members, nonmembers, n = balanced_sample(run, limit, seed)
    models, rocs = {}, {}
    for name, r in [("robust", run), ("twin", twin)]:
        if r is not None:
            models[name], rocs[name] = study(r, members, nonmembers, progress)
    return {"n_members": n, "n_nonmembers": n, "seed": seed, "dataset": run.dataset, "epsilon": run.epsilon,
            "models": models, "twin_run": str(twin.path) if twin else None, "seconds": time.perf_counter() - start,
            "_roc": rocs}


def _check_twin(run: Run, twin: Run) -> None:
    for key in ("dataset", "train_limit"):
        a, b = run.config.get(key), twin.config.get(key)
        if a != b:
            raise ValueError(f"the twin {twin.path} was trained with {key}={b!r}, the run with {key}={a!r}: "
                             "members must be members of both")


def markdown(report: dict, title: str) -> str:
    lines = [f"### {title}", "",
             f"{report['n_members']} training members vs {report['n_nonmembers']} held-out test non-members "
             f"(seed {report['seed']}); threshold attacks on each score.", "",
             "| model | score | ROC AUC | advantage | TPR @ 0.1% FPR | TPR @ 1% FPR |", "|---|---|---:|---:|---:|---:|"]
    for m, v in report["models"].items():
        for k, a in v["attacks"].items():
            lines.append(f"| {m} | {k} | {a['auc']:.4f} | {a['advantage']:.4f} | {pct(a['tpr_at_0.1%_fpr'])} | "
                         f"{pct(a['tpr_at_1%_fpr'])} |")
    lines += ["", "| model | mean train loss (members) | mean test loss (non-members) |", "|---|---:|---:|"]
    lines += [f"| {m} | {v['train_loss']:.4f} | {v['test_loss']:.4f} |" for m, v in report["models"].items()]
    return "\n".join(lines) + "\n"
