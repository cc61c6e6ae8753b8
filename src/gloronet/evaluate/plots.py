"""Every figure of the studies (matplotlib, optional: ``pip install gloronet[plot]``).

Each ``plot_*(report, path, title="")`` draws from a study's report dict (its ``_``-keys hold the
per-point tensors) under ``title`` (the command, model, dataset and run), writes a PNG atomically
and returns ``True`` — or ``False`` when matplotlib is missing.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from ..runs import atomic_write
from .common import vra
from .degrade import efficacy_upper_bound


def _figure(draw):
    """``draw(plt, report) -> figure`` becomes ``plot(report, path) -> bool`` (PNG, atomic)."""

    @functools.wraps(draw)
    def plot(report, path: str | Path, title: str = "") -> bool:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return False
        fig = draw(plt, report)
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
        plt.close(fig)
        return True

    return plot


def _vra_curve(radius: torch.Tensor, correct: torch.Tensor, top: float, n: int = 200):
    grid = torch.linspace(0, top, n, dtype=torch.float64)
    return grid.numpy(), [100 * vra(correct, radius, float(e)) for e in grid]


@_figure
def plot_attack(plt, report: dict):
    """VRA over ε with the empirical robust accuracy at ε; how close the attack at each certified
    radius came (margin score < 0: the certificate held)."""
    eps = report["epsilon"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(*_vra_curve(report["_radius"], report["_correct"], 3 * eps), label="VRA (sound certificate)")
    a.scatter([eps], [100 * report["robust_accuracy"]], c="tab:red", zorder=3, label="empirical robust accuracy (attack)")
    a.axhline(100 * report["clean_accuracy"], ls=":", c="gray", label="clean accuracy")
    a.axvline(eps, ls="--", c="gray")
    a.set(xlabel="ε (L2)", ylabel="%", ylim=(0, 100), title=f"certified vs attacked, n = {report['n']}")
    a.legend(fontsize=8)
    used = report["_consumed"]
    if len(used):
        b.hist(100 * used.clamp(0, 1.2).numpy(), bins=40, color="tab:green")
    b.axvline(100, c="tab:red", ls="--", label="broken certificate (≥ 100%)")
    b.set(xlabel="% of the clean margin used up inside the certified radius", ylabel="points",
          title=f"attack at each certified radius: {report['broken_certified']} broken")
    b.legend(fontsize=8)
    return fig


@_figure
def plot_degrade(plt, reports: dict[str, dict]):
    """VRA over ε and the degradation upper bound ``1 − VRA(2ε)/VRA(ε)`` over ε for each model,
    with the measured attack success at the target ε."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    eps = next(iter(reports.values()))["epsilon"]
    for k, (name, r) in enumerate(reports.items()):
        color = f"C{k}"
        grid, curve = _vra_curve(r["_radius"], r["_correct"], 3 * eps)
        a.plot(grid, curve, c=color, label=name)
        r_ok = r["_radius"][r["_correct"]]
        g = torch.linspace(eps / 20, 2 * eps, 100, dtype=torch.float64)
        bound = [100 * efficacy_upper_bound(r_ok, float(e)) for e in g]
        b.plot(g.numpy(), bound, c=color, label=f"{name}: upper bound")
        b.scatter([eps], [100 * r["fraction_degraded"]], c=color, marker="x", s=60, zorder=3, label=f"{name}: attack")
    for ax in (a, b):
        ax.axvline(eps, ls="--", c="gray", label=f"ε = {eps:g} (certified)")
    a.axvline(2 * eps, ls=":", c="gray", label=f"2ε = {2 * eps:g} (immune to degradation)")
    a.set(xlabel="ε (L2)", ylabel="VRA (%)", ylim=(0, 100), title="verified-robust accuracy")
    b.set(xlabel="ε (L2)", ylabel="% of certified points", ylim=(0, 100), title="degradation: points an attacker can make rejected")
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    return fig


@_figure
def plot_privacy(plt, report: dict):
    """ROC curves of the membership-inference attacks, linear and log-log (low-FPR regime)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    styles = {"robust": "-", "twin": "--"}
    for m, rocs in report["_roc"].items():
        for k, (score, (fpr, tpr)) in enumerate(rocs.items()):
            auc = report["models"][m]["attacks"][score]["auc"]
            for ax in axes:
                ax.plot(fpr.numpy(), tpr.numpy(), styles.get(m, "-"), c=f"C{k}", label=f"{m}, {score} (AUC {auc:.3f})")
    for ax in axes:
        ax.plot([0, 1], [0, 1], c="gray", lw=0.8)
        ax.set(xlabel="false positive rate", ylabel="true positive rate")
    lo = 1 / max(report["n_nonmembers"], 1)
    axes[0].set(title="membership inference ROC")
    axes[1].set(xscale="log", yscale="log", xlim=(lo, 1), ylim=(lo, 1), title="log scale (low FPR)")
    axes[0].legend(fontsize=7)
    return fig


@_figure
def plot_overfit(plt, report: dict):
    """Train-subset and test accuracy / VRA over epochs and their gaps; without per-epoch logs
    (a run trained without ``train_vra_subset``) the final model's numbers and gaps as bars."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, c, style in (("robust", report["curves"], "-"), ("twin", report.get("twin_curves"), "--")):
        if not c:
            continue
        ep = c["epoch"]
        for k, (col, label) in enumerate((("train_subset_acc", "train acc"), ("test_acc", "test acc"),
                                          ("train_subset_vra", "train VRA"), ("test_vra", "test VRA"))):
            a.plot(ep, [100 * v for v in c[col]], style, c=f"C{k}", label=f"{name}: {label}")
        b.plot(ep, [100 * (p - q) for p, q in zip(c["train_subset_acc"], c["test_acc"])], style, c="C0", label=f"{name}: acc gap")
        b.plot(ep, [100 * (p - q) for p, q in zip(c["train_subset_vra"], c["test_vra"])], style, c="C2", label=f"{name}: VRA gap")
    subtitle = f"(ε = {report['epsilon']:g})"
    if report["curves"]:
        a.set(xlabel="epoch", title=f"train subset vs test {subtitle}")
        b.set(xlabel="epoch")
    else:  # no per-epoch numbers in log.csv: the final model's, as bars
        names = list(report["final"])
        for k, key in enumerate(("train_acc", "test_acc", "train_vra", "test_vra")):
            a.bar([i + 0.2 * k for i in range(len(names))], [100 * report["final"][n][key] for n in names], 0.2,
                  color=f"C{k}", label=key.replace("_", " ").replace("vra", "VRA"))
        for k, key in enumerate(("acc_gap", "vra_gap")):
            b.bar([i + 0.3 * k for i in range(len(names))], [100 * report["final"][n][key] for n in names], 0.3,
                  color=("C0", "C2")[k], label=key.replace("_", " ").replace("vra", "VRA"))
        a.set_xticks([i + 0.3 for i in range(len(names))], names)
        b.set_xticks([i + 0.15 for i in range(len(names))], names)
        a.set(title=f"final model, first {report['n']} train / test images {subtitle}")
    a.set(ylabel="%", ylim=(0, 100))
    b.axhline(0, c="gray", lw=0.8)
    b.set(ylabel="train − test (points)", title="generalisation gaps")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    return fig


@_figure
def plot_attributions(plt, report: dict):
    """One grid: a column per image; the image, then a row per map (``|attribution|`` summed over
    channels, each map on its own colour scale)."""
    grid = report["_grid"]
    n, maps = len(grid["images"]), grid["maps"]
    fig, axes = plt.subplots(1 + len(maps), n, figsize=(1.6 * n, 1.7 * (1 + len(maps))), squeeze=False)
    for c in range(n):
        img = grid["images"][c]
        axes[0, c].imshow(img.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if img.shape[0] == 1 else None)
        label = int(grid["labels"][c])
        names = grid.get("class_names")
        axes[0, c].set_title(names[label] if names else f"class {label}", fontsize=8)
        for r, (name, m) in enumerate(maps.items(), start=1):
            axes[r, c].imshow(m[c].abs().sum(0).numpy(), cmap="inferno")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for r, name in enumerate(maps, start=1):
        axes[r, 0].set_ylabel(name, fontsize=8)
    return fig


@_figure
def plot_tightness(plt, report: dict):
    """Per-layer sound bound vs empirical lower bound; distribution of ``‖∇m‖ / K``."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    rows = report["layers"] + [{"layer": "body", "type": "", **report["body"]}]
    labels = [f"{r['layer']} {r['type']}".strip() for r in rows]
    xs = range(len(rows))
    a.bar([x - 0.2 for x in xs], [r["bound"] for r in rows], 0.4, label="sound bound")
    a.bar([x + 0.2 for x in xs], [r["lower"] for r in rows], 0.4, label="empirical lower bound")
    a.set_xticks(list(xs), labels, rotation=45, ha="right", fontsize=7)
    a.set(yscale="log", ylabel="Lipschitz constant", title="per layer and whole body")
    a.legend(fontsize=8)
    sl = report["_slopes"]
    b.hist(sl["all"].numpy(), bins=40, alpha=0.6, density=True, label="all pairs i ≠ j")
    b.hist(sl["binding"].numpy(), bins=40, alpha=0.6, density=True, label="binding class i*")
    b.axvline(1, c="tab:red", ls="--")
    b.set(xlabel="‖∇(f_j − f_i)(x)‖ / K_ji", ylabel="density", title="margin slope at data vs its certified bound")
    b.legend(fontsize=8)
    return fig
