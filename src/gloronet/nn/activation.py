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


class _MinMaxFunction(torch.autograd.Function):
    """MinMax with a one-mask backward: the forward values are ``torch.maximum`` / ``torch.minimum``
    (identical to the no-grad path); the backward routes each output gradient to the input that was
    chosen (``a ≥ b`` picks ``a`` for the max), a subgradient also at ties. Autograd's own
    ``maximum`` / ``minimum`` backward compares twice per element and splits ties, at ~3x the cost."""

    @staticmethod
    def forward(ctx, x):
        a, b = x.chunk(2, dim=1)
        a_wins = a >= b
        ctx.save_for_backward(a_wins)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)

    @staticmethod
    def backward(ctx, grad):
        (a_wins,) = ctx.saved_tensors
        g_max, g_min = grad.chunk(2, dim=1)
        return torch.cat([torch.where(a_wins, g_max, g_min), torch.where(a_wins, g_min, g_max)], dim=1)


class MinMax(LipschitzModule):
    norm_nonincreasing = True  # a permutation of each pair (a flushed subnormal only shrinks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] % 2:
            raise ValueError(f"MinMax needs an even number of channels in dim 1, got shape {tuple(x.shape)}")
        if torch.is_grad_enabled() and x.requires_grad:
            return _MinMaxFunction.apply(x)
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)

    def lipschitz(self) -> torch.Tensor:
        return torch.ones(())

    def lipschitz_bound(self) -> float:
        return 1.0

    def error_model(self, in_shape, dtype, lip: float) -> fp.ErrorModel:
        return fp.elementwise_model(lip, math.prod(in_shape), dtype)
