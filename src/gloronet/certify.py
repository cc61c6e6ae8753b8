"""Dataset-level certification: clean accuracy, verified-robust accuracy (VRA) at many ε,
certified-radius statistics, and JSON / Markdown / PNG reports.

Only the sound bound is used (``GloroNet.certify``). One forward pass per batch gives each
example's certified radius ``r`` (rounded down; by default valid for the floating-point forward
pass itself); an example counts towards VRA at ε iff it is classified correctly and ``r > ε`` —
exactly ``certify(x, ε).certified``.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .gloro import GloroNet
from .relaxed import certified_k, make_relaxation
from .reports import write_report
from .runs import atomic_write, check_finite


@torch.no_grad()
def certify_dataset(
    net: GloroNet,
    images: torch.Tensor,
    labels: torch.Tensor,
    epsilons: Sequence[float] = (),
    batch_size: int = 512,
    device: str | torch.device | None = None,
    progress: bool = False,
    arithmetic: str = "float",
    top_k: int | None = None,
    affinity=None,
) -> dict:
    """Certify ``images`` (N, C, H, W) with labels (N,); returns a report dict.

    ``images`` are uint8 pixels (divided by 255 here) or floats in the model's
    :attr:`~gloronet.GloroNet.input_range` (``[0, 1]`` for models trained by gloronet): floats
    outside it, e.g. 0..255, and models with NaN / Inf weights are refused (``ValueError``).

    ``arithmetic``: ``"float"`` (sound for the floating-point forward pass) or ``"exact"`` (the
    GloRo paper's real-arithmetic test), as :meth:`gloronet.GloroNet.certify`. With ``top_k`` /
    ``affinity`` the report also holds the relaxed metrics (:func:`relaxed_metrics`); the ordinary
    VRA comes from the same pass (the ``k = 1`` radius is the ordinary radius).
    """
    if images.dim() != 4 or labels.shape != (len(images),):
        raise ValueError(f"need images (N, C, H, W) and labels (N,), got {tuple(images.shape)} and {tuple(labels.shape)}")
    if len(images) == 0:
        raise ValueError("certify_dataset: no images to certify (the dataset split is empty)")
    device = torch.device(device) if device is not None else next(net.parameters()).device
    check_finite(net)
    problem = net.out_of_range(images) if images.is_floating_point() else None
    if problem:
        raise ValueError(f"certify_dataset: {problem}")
    start = time.perf_counter()
    K = net.lipschitz_constant()
    bound_seconds = time.perf_counter() - start
    relax = make_relaxation(net.num_classes, top_k, affinity)
    eps_all = sorted({float(net.epsilon), *map(float, epsilons)})
    radii, correct, sets = [], [], []
    batches = range(0, len(images), batch_size)
    for i in tqdm(batches, desc="certify", disable=not progress, leave=False):
        x = images[i : i + batch_size].to(device)
        if not x.is_floating_point():
            x = x.float().div_(255)
        y = labels[i : i + batch_size].cpu()
        if relax is None:
            cert = net.certify(x, arithmetic=arithmetic, recheck_at=eps_all)  # every reported ε as sharp as without `fast`
            radius, pred = cert.radius.cpu(), cert.pred.cpu()
        else:
            cert = net.certify(x, arithmetic=arithmetic, top_k=relax.top_k, affinity=relax.groups)
            radius, pred = cert.radii[:, 0].cpu(), cert.classes[:, 0].cpu()
            sets.append((cert.radii.cpu(), cert.classes.cpu(), cert.groups_of_k.cpu()))
        radii.append(radius)
        correct.append(pred == y)
    radius, correct = torch.cat(radii), torch.cat(correct)
    vra = {e: float((correct & (radius > e)).double().mean()) for e in eps_all}
    r_ok = radius[correct]
    finite = r_ok[torch.isfinite(r_ok)]
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    return {
        "n": len(images),
        "epsilon": float(net.epsilon),
        "arithmetic": arithmetic,
        "clean_accuracy": float(correct.double().mean()),
        "vra": {f"{e:g}": v for e, v in vra.items()},
        "lipschitz_bound": net.lipschitz_bound(),
        "bound_seconds": bound_seconds,
        "seconds": time.perf_counter() - start,
        "radius_correct": {
            "mean": float(finite.mean()) if len(finite) else 0.0,
            "quantiles": dict(zip(["p10", "p25", "p50", "p75", "p90"], finite.quantile(q).tolist())) if len(finite) else {},
        },
        "K_max": float(K.max()),
        **({} if relax is None else {"relaxed": relaxed_metrics(relax, *map(torch.cat, zip(*sets)), labels.cpu(), eps_all)}),
        "_radius": radius,
        "_correct": correct,
    }


def relaxed_metrics(relax, radii: torch.Tensor, classes: torch.Tensor, groups_of_k: torch.Tensor,
                    labels: torch.Tensor, epsilons) -> dict:
    """RTK / affinity metrics (Leino & Fredrikson 2021) from per-example radii of each ``k``:
    relaxed VRA at each ε (the label lies in the certified top-k set), rejection rate (no k
    certified), the distribution of certified k at each ε, and clean top-k accuracy."""
    in_set = torch.cumsum(classes == labels[:, None], dim=1) > 0  # (N, K): label ∈ S_k
    out = {"kind": relax.kind, "top_k": relax.top_k, "vra": {}, "rejection": {}, "k_counts": {},
           "top_k_accuracy": {str(k + 1): float(in_set[:, k].double().mean()) for k in range(relax.top_k)}}
    for e in epsilons:
        k, _ = certified_k(radii, groups_of_k, e)
        hit = (k > 0) & in_set.gather(1, (k - 1).clamp_min(0)[:, None])[:, 0]
        out["vra"][f"{e:g}"] = float(hit.double().mean())
        out["rejection"][f"{e:g}"] = float((k == 0).double().mean())
        out["k_counts"][f"{e:g}"] = torch.bincount(k, minlength=relax.top_k + 1).tolist()
    if relax.groups is not None:
        out["groups"] = [list(g) for g in relax.groups]
    return out


def markdown_table(report: dict, title: str = "") -> str:
    sound = "sound for the floating-point forward pass" if report.get("arithmetic", "float") == "float" else (
        "real-arithmetic test, rounding ignored")
    lines = [f"### {title}\n" if title else "", f"clean accuracy: **{100 * report['clean_accuracy']:.2f}%** "
             f"(n = {report['n']}, Lipschitz bound of the body {report['lipschitz_bound']:.4g}; "
             f"certificates {sound})", "",
             "| ε | VRA |", "|---:|---:|"]
    for eps, v in report["vra"].items():
        mark = " (target)" if math.isclose(float(eps), report["epsilon"]) else ""
        lines.append(f"| {eps}{mark} | {100 * v:.2f}% |")
    rel = report.get("relaxed")
    if rel:
        name = "affinity" if rel["kind"] == "affinity" else f"RTK (K = {rel['top_k']})"
        lines += ["", f"{name}: the label lies in the certified top-k set; k = 0 is a rejection. Clean top-k accuracy: "
                  + ", ".join(f"top-{k} {100 * v:.2f}%" for k, v in rel["top_k_accuracy"].items()), "",
                  f"| ε | VRA | {name} VRA | rejected | certified k = 0, 1, …, {rel['top_k']} |", "|---:|---:|---:|---:|---|"]
        for eps, v in rel["vra"].items():
            counts = " / ".join(str(c) for c in rel["k_counts"][eps])
            lines.append(f"| {eps} | {100 * report['vra'][eps]:.2f}% | {100 * v:.2f}% | {100 * rel['rejection'][eps]:.2f}% | {counts} |")
    return "\n".join(lines).lstrip("\n") + "\n"


def plot_report(report: dict, path: str | Path, title: str = "") -> bool:
    """VRA-vs-ε curve, certified-radius histogram (and, for relaxed certificates, the distribution of
    certified k) as PNG, under ``title``; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    radius, correct = report["_radius"], report["_correct"]
    top = max(2.0 * report["epsilon"], float(report["radius_correct"]["quantiles"].get("p90", 0.0)), 1e-6)
    grid = torch.linspace(0, top, 200, dtype=torch.float64)
    curve = [(correct & (radius > e)).double().mean().item() for e in grid]
    rel = report.get("relaxed")
    fig, axes = plt.subplots(1, 3 if rel else 2, figsize=(15 if rel else 10, 3.8))
    a, b = axes[0], axes[1]
    a.plot(grid.numpy(), [100 * c for c in curve])
    a.axvline(report["epsilon"], ls="--", c="gray", label=f"target ε = {report['epsilon']:g}")
    a.set(xlabel="ε (L2)", ylabel="VRA (%)", title="verified-robust accuracy", ylim=(0, 100))
    a.legend()
    r = radius[correct & torch.isfinite(radius)]
    b.hist(r.numpy(), bins=40, color="tab:green")
    b.axvline(report["epsilon"], ls="--", c="gray")
    b.set(xlabel="certified radius (correct examples)", ylabel="count", title="certified radii")
    if rel:
        counts = rel["k_counts"][f"{report['epsilon']:g}"]
        axes[2].bar(range(len(counts)), counts, color="tab:purple")
        axes[2].set(xlabel="certified k (0 = rejected)", ylabel="count", xticks=range(len(counts)),
                    title=f"certified top-k set size at ε = {report['epsilon']:g}")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return True


def write_reports(report: dict, out_dir: str | Path, title: str = "", name: str = "certify") -> dict:
    """``<name>.json``, ``<name>.md`` and ``<name>.png`` in ``out_dir`` (atomically; no PNG without
    matplotlib); returns their paths."""
    return write_report(out_dir, name, report, markdown_table(report, title), lambda p: plot_report(report, p, title))
