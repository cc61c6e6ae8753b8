"""What every study shares: a run directory opened for evaluation, its data, per-point
certificates, and the report files (:func:`gloronet.reports.write_report`).

Only public interfaces: :func:`gloronet.runs.open_run` (the model, the run's ``config.yaml``),
``log.csv``, :meth:`GloroNet.certify`, :mod:`gloronet.reports` and the atomic writers of
:mod:`gloronet.runs`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..reports import write_report
from ..runs import Run, open_run, write_bytes

__all__ = ["Run", "open_run", "steps", "certify_points", "vra", "write_report", "save_counterexamples", "pct"]

COUNTEREXAMPLES = "{name}-counterexamples.safetensors"


def steps(n: int, batch_size: int, desc: str, progress: bool):
    """Batch start indices ``0, b, 2b, ...`` with a progress bar (hidden unless ``progress``)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    return tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False)


@torch.no_grad()
def certify_points(run: Run, images: torch.Tensor, batch_size: int = 512, progress: bool = False,
                   desc: str = "certify") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-point ``(pred, radius)`` on the CPU from :meth:`GloroNet.certify` (sound radius)."""
    if len(images) == 0:
        raise ValueError("no images to certify (the dataset split is empty)")
    preds, radii = [], []
    for i in steps(len(images), batch_size, desc, progress):
        cert = run.net.certify(run.inputs(images[i : i + batch_size]))
        preds.append(cert.pred.cpu())
        radii.append(cert.radius.cpu())
    return torch.cat(preds), torch.cat(radii)


def vra(correct: torch.Tensor, radius: torch.Tensor, epsilon: float) -> float:
    """Verified-robust accuracy: correct and certified (``radius > ε``, as ``certify``)."""
    return float((correct & (radius > epsilon)).double().mean()) if len(correct) else 0.0


def save_counterexamples(report: dict, out_dir: str | Path, name: str) -> Path | None:
    """A study's soundness counterexamples (``report["_counterexamples"]``: tensors ``x``,
    ``x_adv``, ...) as ``<name>-counterexamples.safetensors``, atomically; None if there are none."""
    from safetensors.torch import save

    found = report.get("_counterexamples")
    if not found:
        return None
    path = Path(out_dir) / COUNTEREXAMPLES.format(name=name)
    flat = {k: v.detach().contiguous().cpu() for k, v in found.items()}
    write_bytes(path, save(flat))
    return path


def pct(v: float) -> str:
    return f"{100 * v:.2f}%"
