"""Atomic checkpoints: weights as safetensors, everything needed to rebuild as JSON.

A run directory holds ``model.safetensors`` + ``model.json`` (architecture, its arguments, ε:
enough to rebuild with :func:`load_model` alone) and ``state.pt`` (optimizer, epoch, log) for
``--resume``. Every file is written to a temporary name and renamed, so a crash never leaves a
half-written checkpoint.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from . import models
from .gloro import GloroNet


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename it over ``path`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def save_model(run_dir: str | Path, net: GloroNet, extra: dict | None = None) -> None:
    """``model.safetensors`` and ``model.json`` in ``run_dir``."""
    if net.config is None:
        raise ValueError("this GloroNet was not built by gloronet.models.create, so it cannot be rebuilt from a checkpoint")
    run_dir = Path(run_dir)
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    atomic_write(run_dir / "model.safetensors", lambda tmp: save_file(state, tmp))
    write_json(run_dir / "model.json", {"model": net.config, "epsilon": net.epsilon, **(extra or {})})


def load_model(run_dir: str | Path, map_location: str | torch.device = "cpu") -> GloroNet:
    """Rebuild a GloroNet from ``model.json`` and load ``model.safetensors``."""
    run_dir = Path(run_dir)
    meta_path, weights_path = run_dir / "model.json", run_dir / "model.safetensors"
    for p in (meta_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: is {run_dir} a gloronet run directory (written by `gloronet train`)?")
    meta = json.loads(meta_path.read_text())
    cfg = dict(meta["model"])
    net = models.create(cfg.pop("name"), cfg.pop("in_shape"), cfg.pop("num_classes"), meta["epsilon"], **cfg)
    net.load_state_dict(load_file(str(weights_path), device=str(map_location)))
    return net.to(map_location)


def save_state(run_dir: str | Path, state: dict) -> None:
    atomic_write(Path(run_dir) / "state.pt", lambda tmp: torch.save(state, tmp))


def load_state(run_dir: str | Path, map_location="cpu") -> dict:
    path = Path(run_dir) / "state.pt"
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: {path} not found")
    return torch.load(path, map_location=map_location, weights_only=False)
