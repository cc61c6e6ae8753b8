"""``LipLinear``: a dense layer that knows its Lipschitz estimate, provable bound and fp error.

Estimate: warm-started power iteration on ``W`` (one step per training call).
Bound: ``‖W‖₂`` from the exact eigenvalue of the Gram matrix in float64, rounded up.
Rounding: in eval mode every output is summed in chunks (:mod:`gloronet.nn.accumulate`), each
term rounded at most ``d ≈ n/16`` times, so ``‖ŷ − y‖ ≤ γ_d(‖|W|‖₂‖x‖ + ‖b‖)``
(:func:`gloronet.fp.dot_product_model`).

Subclasses whose weight is *derived* from the parameters (``LLNLinear``) override
:meth:`derive_weight`; in eval mode the forward pass, the bound and the error model then all
read one cached tensor (:class:`gloronet.nn.state.EvalCache`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import fp
from ..bounds import dense_norm_bound, power_iteration_dense
from . import accumulate
from .base import EvalCache, LipschitzModule
from .derived import DerivedWeight


class LipLinear(DerivedWeight, LipschitzModule):
    iterate_buffers = ("power_u",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, power_iters: int = 1):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.power_iters = int(power_iters)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.orthogonal_(self.weight)
        u = torch.randn(out_features)
        self.register_buffer("power_u", u / u.norm())
        self._eval_weight = EvalCache()

    head_weight = DerivedWeight.forward_weight  # what GloroNet's training estimate of K reads

    # -- forward, estimate, bound, rounding --------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects {self.in_features} input features, got shape {tuple(x.shape)}")
        if self.training:
            return F.linear(x, self.forward_weight(), self.bias)
        return accumulate.linear(x, self._applied_weight(), self.bias)

    def float64_map(self):
        """This layer's eval map in float64 (:mod:`gloronet.centre64`): the applied weight and the
        bias, cast exactly, summed as the eval forward sums them."""
        w, b = self.applied_float64()
        return lambda h: accumulate.linear(h, w, b)

    def rounding_depth(self) -> int:
        """Most roundings a term of an eval-mode output passes through."""
        return accumulate.rounding_depth(self.in_features, self.in_features, self.bias is not None)

    def lipschitz(self, n_iter: int | None = None) -> torch.Tensor:
        """Differentiable estimate (from below) of ``‖W‖₂``."""
        n = self.power_iters if n_iter is None and self.training else (n_iter or 0)
        return power_iteration_dense(self.forward_weight(), self.power_u, n)

    def lipschitz_bound(self) -> float:
        return dense_norm_bound(self._applied_weight())

    def error_model(self, in_shape, dtype, lip: float) -> fp.ErrorModel:
        positions = 1
        for s in in_shape[:-1]:  # F.linear applies W to every leading position
            positions *= s
        return fp.affine_error_model(self._applied_weight(), self.bias, lip, dtype, positions, depth=self.rounding_depth())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
