"""``LLNLinear``: the last-layer-normalised head (Singla, Singla & Feizi, "Improved deterministic
l2 robustness on CIFAR-10 and CIFAR-100", ICLR 2022).

Logits ``y_i = ⟨w_i / ‖w_i‖, x⟩ + b_i``. GloroNet reads the normalised rows through
``head_weight()``, so the pairwise constants ``‖ŵ_j − ŵ_i‖ ≤ 2`` use exactly the matrix that
the forward pass multiplies by.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..bounds import dense_norm_bound, power_iteration_dense
from .linear import LipLinear


class LLNLinear(LipLinear):
    def head_weight(self) -> torch.Tensor:
        """The row-normalised weight ``ŵ_i = w_i / ‖w_i‖`` used in the forward pass."""
        return self.weight / self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"LLNLinear expects {self.in_features} input features, got shape {tuple(x.shape)}")
        return F.linear(x, self.head_weight(), self.bias)

    def lipschitz(self, n_iter: int | None = None) -> torch.Tensor:
        n = self.power_iters if n_iter is None and self.training else (n_iter or 0)
        return power_iteration_dense(self.head_weight(), self.power_u, n)

    def lipschitz_bound(self) -> float:
        return dense_norm_bound(self.head_weight().detach())
