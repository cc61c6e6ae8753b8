"""GloRo nets shipped inside the package, usable offline (the timm habit).

Each model is a directory ``gloronet/pretrained/models/<name>/`` laid out as a run directory of
``gloronet train`` — ``config.yaml`` (the recipe), ``model.json`` (architecture, ε, input range,
SHA-256 of the weights), ``model.safetensors`` — plus ``card.json``: the model card (recipe file,
gloronet commit, epochs, clean accuracy and VRA measured on the full test split with the
command that measured them, SHA-256). :func:`load` rebuilds the model and verifies its weights
against the hash (:func:`gloronet.runs.load_model`).

The MNIST and Fashion-MNIST test splits ship beside them (``pretrained/data/``, sources and
licences in its README), so ``gloronet certify mnist-4c3f-eps1.58`` needs no download at all.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .registry import MODELS_DIR, names, resolve  # noqa: F401  (public: where they live, which there are)


def _require(name: str) -> Path:
    path = resolve(name)
    if path is None:
        known = ", ".join(names()) or "none"
        raise ValueError(f"no pretrained model named {name!r}; shipped: {known}")
    return path


def card(name: str) -> dict:
    """The model card of ``name`` (see the module docstring)."""
    return json.loads((_require(name) / "card.json").read_text())


def available() -> list[dict]:
    """Every shipped model's card, by name."""
    return [card(n) for n in names()]


def load(name: str, map_location: str | torch.device = "cpu"):
    """The shipped model ``name`` as a :class:`gloronet.GloroNet` in eval mode, its weights
    verified against the SHA-256 of its ``model.json``."""
    from ..runs import load_model

    return load_model(_require(name), map_location=map_location)
