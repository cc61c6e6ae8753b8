"""``Sequential``: ``nn.Sequential`` whose Lipschitz bound is the product of its layers' bounds.

For a composition ``f = f_n ∘ … ∘ f_1``, ``Lip(f) ≤ Π Lip(f_i)`` (products rounded upwards);
certification walks its layers one by one (``sequential_parts``).
"""
from __future__ import annotations

import torch
from torch import nn

from .base import lipschitz_bound_of, lipschitz_estimate_of


class Sequential(nn.Sequential):
    def sequential_parts(self) -> list[nn.Module]:
        return list(self)

    def lipschitz(self) -> torch.Tensor:
        out = None
        for m in self:
            k = lipschitz_estimate_of(m)
            out = k if out is None else out * k.to(out.device)
        return torch.ones(()) if out is None else out

    def lipschitz_bound(self) -> float:
        return lipschitz_bound_of(self)
