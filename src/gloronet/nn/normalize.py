"""Per-channel input normalisation ``(x − μ)/σ`` inside the model.

ε is measured in the units the model receives, so this layer's Lipschitz constant
``1 / min |σ|`` is part of the network's bound (DESIGN.md, "What a GloRo net is"). The constructor
refuses a non-positive σ, but ``load_state_dict`` or an in-place edit can still put one there:
the bound then uses ``|σ|`` (a negative σ flips signs, an isometry) and is infinite for σ = 0,
so nothing certifies.

Rounding: ``fl(fl(x − μ)/σ)`` errs by ``≤ γ₂ |x − μ| / |σ|`` per element.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .. import fp
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
        return 1.0 / self.std.abs().min()

    def _min_abs_std(self) -> float:
        s = self.std.detach().abs()
        return float(s.min()) if torch.isfinite(s).all() else 0.0

    def lipschitz_bound(self) -> float:
        s = self._min_abs_std()
        return round_up(1.0 / s) if s > 0 else math.inf  # correctly rounded, then up

    def error_model(self, in_shape, dtype, lip: float) -> fp.ErrorModel:
        numel = math.prod(in_shape)
        mean = self.mean.detach().to(torch.float64).cpu()
        std = self.std.detach().to(torch.float64).cpu().abs()
        if not (torch.isfinite(mean).all() and bool((std > 0).all()) and torch.isfinite(std).all()):
            return fp.ErrorModel(lip=math.inf, rel=math.inf, abs=math.inf, offset=math.inf, peak_rel=math.inf)
        per_channel = torch.broadcast_to(mean / std, (1, *in_shape))  # φ(0) = −μ/σ at every pixel
        inv = 1.0 / float(std.min())
        g, lam = fp.gamma(2, dtype), fp.smallest_normal(dtype)
        offset = float(per_channel.norm())
        return fp.ErrorModel(
            lip=lip,
            rel=fp.up(g * inv),
            abs=fp.up(g * offset + 2 * lam * math.sqrt(numel) * (1 + inv)),
            offset=fp.up(offset),
            peak_rel=fp.up((1 + g) * max(1.0, inv)),
            peak_abs=fp.up((1 + g) * float(mean.abs().max()) * max(1.0, inv)),
        )
