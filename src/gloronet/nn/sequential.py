"""``Sequential``: ``nn.Sequential`` whose Lipschitz bound is the product of its layers' bounds.

For a composition ``f = f_n ∘ … ∘ f_1``, ``Lip(f) ≤ Π Lip(f_i)`` (products rounded upwards).
"""
from __future__ import annotations

import torch
from torch import nn

from ..bounds import mul_up
from .base import lipschitz_bound_of, lipschitz_estimate_of


class Sequential(nn.Sequential):
    def lipschitz(self) -> torch.Tensor:
        out = None
        for m in self:
            k = lipschitz_estimate_of(m)
            out = k if out is None else out * k.to(out.device)
        return torch.ones(()) if out is None else out

    def lipschitz_bound(self) -> float:
        return mul_up(*(lipschitz_bound_of(m) for m in self))
