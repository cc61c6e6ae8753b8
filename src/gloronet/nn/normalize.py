"""Per-channel input normalisation ``(x − μ)/σ`` inside the model.

ε is measured in the units the model receives, so this layer's Lipschitz constant
``1 / min σ`` is part of the network's bound (DESIGN.md, "What a GloRo net is").
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..bounds import round_up
from .base import LipschitzModule


class Normalize(LipschitzModule):
    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        std_t = torch.as_tensor(std, dtype=torch.float32)
        if (std_t <= 0).any() or not torch.isfinite(std_t).all():
            raise ValueError(f"Normalize needs positive finite std, got {list(std)}")
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def lipschitz(self) -> torch.Tensor:
        return 1.0 / self.std.min()

    def lipschitz_bound(self) -> float:
        return round_up(1.0 / float(self.std.min()))  # correctly rounded, then up
