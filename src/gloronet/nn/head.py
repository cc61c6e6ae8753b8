"""``LLNLinear``: the last-layer-normalised head (Singla, Singla & Feizi, "Improved deterministic
l2 robustness on CIFAR-10 and CIFAR-100", ICLR 2022).

Logits ``y_i = ⟨w_i / ‖w_i‖, x⟩ + b_i``. The normalised matrix is derived from ``w``
(:meth:`derive_weight`); in eval mode it is computed once and the forward pass, the pairwise
constants ``‖ŵ_j − ŵ_i‖ ≤ 2`` and the error model all read that same tensor.
"""
from __future__ import annotations

import torch

from .linear import LipLinear


class LLNLinear(LipLinear):
    def derive_weight(self) -> torch.Tensor:
        """The row-normalised weight ``ŵ_i = w_i / ‖w_i‖``."""
        return self.weight / self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
