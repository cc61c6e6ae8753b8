"""BRO dense layer: block reflector orthogonal weights (Lai et al., "Enhancing Certified Robustness
via Block Reflector Orthogonal Layers and Logit Annealing Loss", ICML 2025; code: ntuaislab/BRONet,
``BROLinear`` in lipconvnet/models/layers/bro.py).

For ``V`` (n × k), ``n = max(in, out)``::

    W = I − 2 V (VᵀV + εI)⁻¹ Vᵀ,     ε = 10⁻⁵ · mean diag(VᵀV)   (as the reference)

With ``ε = 0`` this is the block reflector (symmetric, orthogonal); with ``ε > 0`` its eigenvalues
are ``1`` and ``1 − 2σᵢ²/(σᵢ² + ε) ∈ (−1, 1]``, so ``‖W‖₂ ≤ 1`` in exact arithmetic. The layer
multiplies by ``W[:out, :in]`` (a block of an orthogonal matrix for non-square layers). The solve is
done in floating point, so the bound is :func:`gloronet.bounds.dense_norm_bound` of the weight
actually applied (a derived weight of :class:`~gloronet.nn.linear.LipLinear`: cached in eval mode
and read by the forward pass, the bound and the error model alike) — never "1 by construction".

BRO *convolutions* (defined in the Fourier domain) are not implemented.
"""
from __future__ import annotations

import torch
from torch import nn

from .linear import LipLinear

BRO_EPS = 1e-5


def block_reflector(v: torch.Tensor, eps: float = BRO_EPS) -> torch.Tensor:
    """``I − 2 V (VᵀV + ε·mean diag(VᵀV)·I)⁻¹ Vᵀ`` for ``V`` (n × k), differentiable."""
    sigma = v.mT @ v
    shift = eps * sigma.diagonal().mean()
    eye_k = torch.eye(sigma.shape[0], dtype=v.dtype, device=v.device)
    eye_n = torch.eye(v.shape[0], dtype=v.dtype, device=v.device)
    return eye_n - 2.0 * v @ torch.linalg.solve(sigma + shift * eye_k, v.mT)


class BROLinear(LipLinear):
    """Dense layer ``y = W[:out, :in] x + b`` with ``W`` the block reflector of ``V`` (n × rank);
    ``rank`` defaults to ``n // 2`` (the reference's ``mask_level = 0.5``)."""

    def __init__(self, in_features: int, out_features: int, rank: int | None = None, bias: bool = True,
                 power_iters: int = 1):
        super().__init__(in_features, out_features, bias, power_iters)
        n = max(self.in_features, self.out_features)
        self.rank = int(max(1, n // 2) if rank is None else rank)
        if not 1 <= self.rank <= n:
            raise ValueError(f"rank must be in [1, {n}], got {rank}")
        del self.weight  # the parameter is V
        self.reflector = nn.Parameter(nn.init.orthogonal_(torch.empty(n, self.rank)))

    def derive_weight(self) -> torch.Tensor:
        v = self.reflector if self.reflector.dtype in (torch.float32, torch.float64) else self.reflector.float()
        with torch.autocast(device_type=v.device.type, enabled=False):  # the solve needs fp32 at least
            return block_reflector(v)[: self.out_features, : self.in_features]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank}"
