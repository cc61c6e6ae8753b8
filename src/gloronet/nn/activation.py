"""MinMax activation (Anil, Lucas & Grosse, "Sorting out Lipschitz function approximation", ICML 2019).

Channels are split into halves ``(a, b)`` and mapped to ``(max(a, b), min(a, b))``: a
permutation of each pair, so the map is 1-Lipschitz in L2 (and gradient-norm preserving).
Comparisons round nothing (only a flushed subnormal can err, by ``≤ λ``).
"""
from __future__ import annotations

import math

import torch

from .. import fp
from .base import LipschitzModule


class MinMax(LipschitzModule):
    norm_nonincreasing = True  # a permutation of each pair (a flushed subnormal only shrinks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] % 2:
            raise ValueError(f"MinMax needs an even number of channels in dim 1, got shape {tuple(x.shape)}")
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)

    def lipschitz(self) -> torch.Tensor:
        return torch.ones(())

    def lipschitz_bound(self) -> float:
        return 1.0

    def error_model(self, in_shape, dtype, lip: float) -> fp.ErrorModel:
        return fp.elementwise_model(lip, math.prod(in_shape), dtype)
