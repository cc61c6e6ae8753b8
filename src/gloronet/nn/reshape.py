"""Permutations of coordinates: isometries (L2 Lipschitz constant exactly 1) that round nothing."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import fp
from .base import LipschitzModule


class _Isometry(LipschitzModule):
    norm_nonincreasing = True

    def lipschitz(self) -> torch.Tensor:
        return torch.ones(())

    def lipschitz_bound(self) -> float:
        return 1.0

    def error_model(self, in_shape, dtype, lip: float) -> fp.ErrorModel:
        return fp.exact_model(lip)


class Flatten(_Isometry):
    """``(B, ...) -> (B, prod(...))``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


class InvertibleDownsampling(_Isometry):
    """Space-to-depth (``pixel_unshuffle``): ``(B, C, H, W) -> (B, C·f², H/f, W/f)``."""

    def __init__(self, factor: int = 2):
        super().__init__()
        self.factor = int(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"InvertibleDownsampling({self.factor}) needs H and W divisible by {self.factor}, got {tuple(x.shape)}")
        return F.pixel_unshuffle(x, self.factor)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"
