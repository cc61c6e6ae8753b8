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

from .checkpoint import atomic_write, write_json
from .gloro import GloroNet


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
) -> dict:
    """Certify ``images`` (N, C, H, W) in [0, 1] with labels (N,); returns a report dict.

    ``arithmetic``: ``"float"`` (sound for the floating-point forward pass) or ``"exact"`` (the
    GloRo paper's real-arithmetic test), as :meth:`gloronet.GloroNet.certify`.
    """
    if images.dim() != 4 or labels.shape != (len(images),):
        raise ValueError(f"need images (N, C, H, W) and labels (N,), got {tuple(images.shape)} and {tuple(labels.shape)}")
    device = torch.device(device) if device is not None else next(net.parameters()).device
    start = time.perf_counter()
    K = net.lipschitz_constant()
    bound_seconds = time.perf_counter() - start
    radii, correct = [], []
    batches = range(0, len(images), batch_size)
    for i in tqdm(batches, desc="certify", disable=not progress, leave=False):
        x = images[i : i + batch_size].to(device)
        if not x.is_floating_point():
            x = x.float().div_(255)
        cert = net.certify(x, arithmetic=arithmetic)
        radii.append(cert.radius.cpu())
        correct.append((cert.pred.cpu() == labels[i : i + batch_size].cpu()))
    radius, correct = torch.cat(radii), torch.cat(correct)
    eps_all = sorted({float(net.epsilon), *map(float, epsilons)})
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
        "_radius": radius,
        "_correct": correct,
    }


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
    return "\n".join(lines).lstrip("\n") + "\n"


def plot_report(report: dict, path: str | Path) -> bool:
    """VRA-vs-ε curve and certified-radius histogram as PNG; False if matplotlib is missing."""
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
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(grid.numpy(), [100 * c for c in curve])
    a.axvline(report["epsilon"], ls="--", c="gray", label=f"target ε = {report['epsilon']:g}")
    a.set(xlabel="ε (L2)", ylabel="VRA (%)", title="verified-robust accuracy", ylim=(0, 100))
    a.legend()
    r = radius[correct & torch.isfinite(radius)]
    b.hist(r.numpy(), bins=40, color="tab:green")
    b.axvline(report["epsilon"], ls="--", c="gray")
    b.set(xlabel="certified radius (correct examples)", ylabel="count", title="certified radii")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return True


def write_reports(report: dict, out_dir: str | Path, title: str = "") -> dict:
    """``certify.json``, ``certify.md`` and ``certify.png`` in ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    write_json(out_dir / "certify.json", public)
    md = markdown_table(report, title)
    atomic_write(out_dir / "certify.md", lambda tmp: Path(tmp).write_text(md))
    paths = {"json": out_dir / "certify.json", "markdown": out_dir / "certify.md"}
    if plot_report(report, out_dir / "certify.png"):
        paths["plot"] = out_dir / "certify.png"
    return paths
