"""``LipLinear``: a dense layer that knows its Lipschitz estimate and provable bound.

Estimate: warm-started power iteration on ``W`` (one step per training call).
Bound: ``‖W‖₂`` from the exact eigenvalue of the Gram matrix in float64, rounded up.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..bounds import dense_norm_bound, power_iteration_dense
from .base import LipschitzModule


class LipLinear(LipschitzModule):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, power_iters: int = 1):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.power_iters = int(power_iters)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.orthogonal_(self.weight)
        u = torch.randn(out_features)
        self.register_buffer("power_u", u / u.norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects {self.in_features} input features, got shape {tuple(x.shape)}")
        return F.linear(x, self.weight, self.bias)

    def lipschitz(self, n_iter: int | None = None) -> torch.Tensor:
        """Differentiable estimate (from below) of ``‖W‖₂``."""
        n = self.power_iters if n_iter is None and self.training else (n_iter or 0)
        return power_iteration_dense(self.weight, self.power_u, n)

    def lipschitz_bound(self) -> float:
        return dense_norm_bound(self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
