"""What every study shares: a run directory opened for evaluation, its data, per-point
certificates, and the report files ``<name>.json`` / ``<name>.md`` / ``<name>.png``.

Only public interfaces: :func:`gloronet.checkpoint.load_model`, the run's ``config.yaml`` and
``log.csv``, :meth:`GloroNet.certify` and the atomic writers of :mod:`gloronet.checkpoint`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml
from tqdm.auto import tqdm

from .. import data
from ..checkpoint import atomic_write, load_model, write_json
from ..gloro import GloroNet, check_epsilon

COUNTEREXAMPLES = "{name}-counterexamples.safetensors"


@dataclass
class Run:
    """A trained run opened for evaluation: the model in eval mode (parameters frozen), its
    recipe (``config``, ``{}`` when the run has none) and where its data comes from."""

    path: Path
    net: GloroNet
    config: dict
    dataset: str
    data_dir: str | None
    device: torch.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    @property
    def epsilon(self) -> float:
        return self.net.epsilon

    def load(self, split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images uint8 (N, C, H, W) on the CPU, labels (N,))``: the first ``limit`` of ``split``."""
        return data.load_dataset(self.dataset, split, self.data_dir, limit, dtype=torch.uint8)

    def training_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training images the run was trained on (the first ``train_limit``, if it had one)."""
        return self.load("train", self.config.get("train_limit"))

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 pixels -> the model's dtype on its device, in [0, 1] (what training fed it)."""
        return images.to(self.device).to(self.dtype).div_(255)


def open_run(path: str | Path, device: str = "auto", dataset: str | None = None, data_dir: str | None = None,
             epsilon: float | None = None) -> Run:
    """Load ``model.json`` / ``model.safetensors`` and ``config.yaml`` of a run directory.

    Raises ``FileNotFoundError`` (not a run directory) or ``ValueError`` (no dataset named, bad ε)
    with a message naming the problem.
    """
    from ..train import resolve_device  # the same device rule as training

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {path} not found")
    dev = resolve_device(device)
    net = load_model(path, map_location=dev).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    cfg_path = path / "config.yaml"
    cfg = (yaml.safe_load(cfg_path.read_text()) or {}) if cfg_path.exists() else {}
    dataset = dataset or cfg.get("dataset")
    if not dataset:
        raise ValueError(f"{path} has no config.yaml naming its dataset: pass --dataset")
    if epsilon is not None:
        net.epsilon = check_epsilon(epsilon)
        if net.epsilon == 0:
            raise ValueError("epsilon must be > 0")
    return Run(path, net, cfg, dataset, data_dir or cfg.get("data_dir"), dev)


def steps(n: int, batch_size: int, desc: str, progress: bool):
    """Batch start indices ``0, b, 2b, ...`` with a progress bar (hidden unless ``progress``)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    return tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False)


@torch.no_grad()
def certify_points(run: Run, images: torch.Tensor, batch_size: int = 512, progress: bool = False,
                   desc: str = "certify") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-point ``(pred, radius)`` on the CPU from :meth:`GloroNet.certify` (sound radius)."""
    preds, radii = [], []
    for i in steps(len(images), batch_size, desc, progress):
        cert = run.net.certify(run.inputs(images[i : i + batch_size]))
        preds.append(cert.pred.cpu())
        radii.append(cert.radius.cpu())
    return torch.cat(preds), torch.cat(radii)


def vra(correct: torch.Tensor, radius: torch.Tensor, epsilon: float) -> float:
    """Verified-robust accuracy: correct and certified (``radius > ε``, as ``certify``)."""
    return float((correct & (radius > epsilon)).double().mean()) if len(correct) else 0.0


def write_outputs(out_dir: str | Path, name: str, report: dict, markdown: str,
                  plot: Callable[[Path], bool] | None = None) -> dict[str, Path]:
    """``<name>.json`` (keys starting with ``_`` left out), ``<name>.md`` and, when ``plot``
    draws one (matplotlib installed), ``<name>.png`` — each written atomically."""
    out = Path(out_dir)
    write_json(out / f"{name}.json", {k: v for k, v in report.items() if not k.startswith("_")})
    atomic_write(out / f"{name}.md", lambda tmp: Path(tmp).write_text(markdown))
    paths = {"json": out / f"{name}.json", "markdown": out / f"{name}.md"}
    if plot is not None and plot(out / f"{name}.png"):
        paths["plot"] = out / f"{name}.png"
    return paths


def save_counterexamples(report: dict, out_dir: str | Path, name: str) -> Path | None:
    """A study's soundness counterexamples (``report["_counterexamples"]``: tensors ``x``,
    ``x_adv``, ...) as ``<name>-counterexamples.safetensors``, atomically; None if there are none."""
    from safetensors.torch import save_file

    found = report.get("_counterexamples")
    if not found:
        return None
    path = Path(out_dir) / COUNTEREXAMPLES.format(name=name)
    flat = {k: v.detach().contiguous().cpu() for k, v in found.items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp))
    return path


def pct(v: float) -> str:
    return f"{100 * v:.2f}%"
