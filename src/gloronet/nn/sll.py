"""SLL, SDP-based Lipschitz layers (Araujo, Havens, Delattre, Allauzen & Hu, "A Unified Algebraic
Perspective on Lipschitz Neural Networks", ICLR 2023, Thm 3; code: araujoalexandre/Lipschitz-SLL-Networks).

The residual block (here ``W`` is the inner map, inner × features, or a conv kernel)::

    φ(x) = x − Wᵀ C σ(W x + b),     C = diag(c),  c = 2 / T,
    T_i = Σ_j |W Wᵀ|_ij q_j / q_i,  q = exp(q_param)            (dense; conv: the Gram kernel)

with ``σ`` = ReLU. In exact arithmetic ``T ⪰ W Wᵀ`` and φ is 1-Lipschitz. ``c`` is computed in
floating point, so the bound is proven for the ``c`` actually used (cached in eval mode,
:class:`~gloronet.nn.state.EvalCache`), with ``W`` the parameter itself:

**Bound (tight, proven).** For inputs ``x, y`` ReLU's secant slopes lie in ``[0, 1]``:
``σ(Wx + b) − σ(Wy + b) = D W(x − y)`` with ``D`` diagonal, ``0 ⪯ D ⪯ I``. Hence
``φ(x) − φ(y) = (I − M)(x − y)``, ``M = Wᵀ C^{½} D C^{½} W = Bᵀ D B`` with ``B = C^{½} W``
(``c ≥ 0`` checked; diagonal matrices commute). ``M`` is symmetric and ``0 ⪯ M ⪯ BᵀB``, so the
eigenvalues of ``I − M`` lie in ``[1 − μ, 1]``, ``μ = ‖B‖₂²``, and

    Lip(φ) ≤ max(1, μ − 1)

(attained for ``μ ≥ 2`` at ``D = I``; = 1 when ``T ⪰ WWᵀ`` holds for the computed ``c``).
``‖B‖₂`` is bounded by :func:`gloronet.bounds.dense_norm_bound` / ``conv2d_norm_bound`` (at the
block's input size, 'same' zero padding, stride 1) of ``B̃ = fl(fl(√c)·W)`` formed in float64,
plus ``‖B − B̃‖ ≤ γ₂/(1 − γ₂)·‖|B̃|‖₂ + λ·(size term)`` (two roundings per entry, and any
underflow; ``‖|B̃|‖₂`` by :func:`gloronet.bounds.nonneg_norm_bound` /
:func:`gloronet.bounds.abs_conv2d_norm_bound`). The conv block's ``Wᵀ`` is the stride-1
convolution with the flipped, transposed kernel and the same symmetric padding — exactly the
adjoint of ``conv(·, W)`` for odd kernels, where the output size equals the input size.

**Rounding.** ``fl(x − ĝ(x))`` with ``ĝ`` = affine (chunked sums) → ReLU → ``c ⊙`` (one
multiplication) → affine without bias: composed :class:`gloronet.fp.ErrorModel` s, then
:func:`gloronet.fp.residual_model` (the subtraction); the branch's own Lipschitz factors use
``‖W‖₂`` bounds and ``max c``.

Estimate (training): the constant 1 (the exact block is 1-Lipschitz when ``T`` is exact).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import fp
from ..bounds import (
    abs_conv2d_norm_bound,
    as_float64,
    conv2d_norm_bound,
    dense_norm_bound,
    nonneg_norm_bound,
)
from ..rounding import gamma64, mul_up, round_up, smallest_normal, up
from . import accumulate, depthwise
from .base import EvalCache, LipschitzModule


def sll_dense_scales(weight: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(inner,) ``c = 2/T``, ``T_i = Σ_j |WWᵀ|_ij q_j/q_i`` for ``W`` (inner × features), ``q = exp(q_param)``."""
    gram = (weight @ weight.mT).abs()
    return 2.0 / _weighted_row_sums(gram, q)


def sll_conv_scales(kernel: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(inner,) ``c = 2/T`` for a kernel (inner, C, k, k): ``|WWᵀ|`` summed over the Gram kernel's shifts."""
    k = kernel.shape[-1]
    gram = F.conv2d(kernel, kernel, padding=k - 1).abs().sum(dim=(2, 3))  # (inner, inner)
    return 2.0 / _weighted_row_sums(gram, q)


def _weighted_row_sums(gram: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``Σ_j gram_ij e^{q_j − q_i}`` (never 0: a zero row gives an infinite ``c`` times a zero column)."""
    return (gram * torch.exp(q[None, :] - q[:, None])).sum(dim=1).clamp_min(1e-30)


def _sound_conv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, pads) -> torch.Tensor:
    """The eval-mode stride-1 convolution, as ``LipConv2d`` runs it: chunked sums, or tap sums
    where this build would use Winograd (one input channel, 3×3)."""
    if depthwise.needs_taps(w.shape[1], w.shape, 1, 1):
        return depthwise.conv2d_taps(x, w, bias, pads)
    return accumulate.conv2d(x, w, bias, 1, pads)


def _lip_from_mu(norm_b: float) -> float:
    """``max(1, μ − 1)`` rounded up, ``μ = norm_b²`` (see the module docstring)."""
    if not math.isfinite(norm_b):
        return math.inf
    mu = mul_up(norm_b, norm_b)
    return max(1.0, round_up(mu - 1.0))


def _rounding_factor() -> float:
    """``γ₂/(1 − γ₂)`` in float64, rounded up: ``|B − fl(fl(√c)·W)| ≤`` this ``·|fl(fl(√c)·W)|``."""
    g = gamma64(2)
    return up(g / (1.0 - g))


class _SLLBase(LipschitzModule):
    """Shared: parameters, the cached scales ``c`` and the residual error model."""

    def __init__(self, weight: torch.Tensor, bias: bool):
        super().__init__()
        inner = weight.shape[0]
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(inner)) if bias else None
        self.q = nn.Parameter(torch.zeros(inner))
        self._eval_scales = EvalCache()

    def compute_scales(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def scales(self) -> torch.Tensor:
        """``c`` as the forward pass uses it: differentiable in training, cached in eval mode."""
        return self.compute_scales() if self.training else self._applied_scales()

    def _applied_scales(self) -> torch.Tensor:
        return self._eval_scales.get(self, self.compute_scales)

    def applied_scales(self) -> torch.Tensor:
        """A copy of the eval-mode ``c`` (editing it cannot change the map behind its bound)."""
        return self._applied_scales().clone()

    def _apply(self, fn, *args, **kwargs):  # .to(), .double(): drop the cached scales
        self._eval_scales.clear()
        return super()._apply(fn, *args, **kwargs)

    def _scaled_weight64(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(B̃, c)`` in float64: ``B̃ = fl(fl(√c)·W)`` (rows scaled), or None if ``c`` is not finite
        and ``≥ 0`` (then nothing is proven)."""
        c = as_float64(self._applied_scales())
        if not bool(torch.isfinite(c).all()) or bool((c < 0).any()):
            return None
        w = as_float64(self.weight)
        return c.sqrt().view(-1, *([1] * (w.dim() - 1))) * w, c

    def lipschitz(self, n_iter: int | None = None) -> torch.Tensor:
        """Training estimate: 1 (the exact block's constant when ``T ⪰ WWᵀ``)."""
        return torch.ones((), dtype=self.weight.dtype, device=self.weight.device)

    def lipschitz_bound(self) -> float:
        self._applied_scales()
        return self._eval_scales.remember(self, "bound", self._bound)

    def _bound(self) -> float:  # pragma: no cover - interface
        raise NotImplementedError

    def _max_scale(self) -> float:
        c = self._applied_scales().detach()
        return round_up(float(c.abs().max())) if c.numel() else 0.0

    def _residual(self, models: list[fp.ErrorModel], lip: float, numel: int, dtype) -> fp.ErrorModel:
        return fp.residual_model(fp.compose(models), lip, numel, dtype)


class SLLLinear(_SLLBase):
    """Dense SLL block on ``features`` inputs, inner width ``inner`` (default ``features``)."""

    def __init__(self, features: int, inner: int | None = None, bias: bool = True):
        inner = int(features if inner is None else inner)
        w = torch.empty(inner, int(features))
        nn.init.xavier_normal_(w)
        super().__init__(w, bias)
        self.features, self.inner = int(features), inner

    def compute_scales(self) -> torch.Tensor:
        return sll_dense_scales(self.weight, self.q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.features:
            raise ValueError(f"SLLLinear expects {self.features} input features, got shape {tuple(x.shape)}")
        w = self.weight
        if self.training:
            h = F.relu(F.linear(x, w, self.bias)) * self.scales()
            return x - F.linear(h, w.mT)
        h = F.relu(accumulate.linear(x, w.detach(), self.bias)) * self._applied_scales()
        return x - accumulate.linear(h, w.detach().mT, None)

    def _bound(self) -> float:
        scaled = self._scaled_weight64()
        if scaled is None:
            return math.inf
        b, _ = scaled
        err = mul_up(_rounding_factor(), nonneg_norm_bound(b.abs())) + smallest_normal(torch.float64) * math.sqrt(b.numel())
        return _lip_from_mu(round_up(dense_norm_bound(b) + up(err)))

    def _norm_w(self) -> float:
        return self._eval_scales.remember(self, "norm_w", lambda: dense_norm_bound(self.weight))

    def error_model(self, in_shape, dtype, lip: float) -> fp.ErrorModel:
        positions = math.prod(in_shape[:-1])
        w = self.weight.detach()
        nw = self._norm_w()
        numel_in, numel_mid = positions * self.features, positions * self.inner
        models = [
            fp.affine_error_model(w, self.bias, nw, dtype, positions,
                                  depth=accumulate.rounding_depth(self.features, self.features, self.bias is not None)),
            fp.elementwise_model(1.0, numel_mid, dtype),  # ReLU
            fp.scale_model(self._max_scale(), numel_mid, dtype),
            fp.affine_error_model(w.mT, None, nw, dtype, positions,
                                  depth=accumulate.rounding_depth(self.inner, self.inner, False)),
        ]
        return self._residual(models, lip, numel_in, dtype)

    def extra_repr(self) -> str:
        return f"features={self.features}, inner={self.inner}, bias={self.bias is not None}"


class SLLConv2d(_SLLBase):
    """Convolutional SLL block: ``x − convᵀ(c ⊙ ReLU(conv(x, W) + b))``, stride 1, odd kernel,
    'same' zero padding, at a fixed ``input_size`` (its bound depends on it)."""

    def __init__(self, channels: int, input_size: int | Sequence[int], inner: int | None = None,
                 kernel_size: int = 3, bias: bool = True):
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd ('same' padding, transposed conv = adjoint), got {kernel_size}")
        inner = int(channels if inner is None else inner)
        w = torch.empty(inner, int(channels), kernel_size, kernel_size)
        nn.init.xavier_normal_(w)
        super().__init__(w, bias)
        self.channels, self.inner, self.kernel_size = int(channels), inner, int(kernel_size)
        hw = (input_size, input_size) if isinstance(input_size, int) else tuple(int(s) for s in input_size)
        if len(hw) != 2 or min(hw) < 1:
            raise ValueError(f"input_size must be (H, W) > 0, got {input_size}")
        self.input_hw = hw

    @property
    def pads(self) -> tuple[int, int, int, int]:
        p = self.kernel_size // 2
        return p, p, p, p

    def compute_scales(self) -> torch.Tensor:
        return sll_conv_scales(self.weight, self.q)

    def adjoint_kernel(self, w: torch.Tensor) -> torch.Tensor:
        """The kernel of ``conv(·, W)ᵀ``: flipped, in/out channels swapped (same padding)."""
        return w.flip(-2, -1).transpose(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels or tuple(x.shape[-2:]) != self.input_hw:
            raise ValueError(
                f"SLLConv2d expects (B, {self.channels}, {self.input_hw[0]}, {self.input_hw[1]}) input (its bound "
                f"depends on the input size), got shape {tuple(x.shape)}"
            )
        p = self.kernel_size // 2
        if self.training:
            w = self.weight
            h = F.relu(F.conv2d(x, w, self.bias, padding=p)) * self.scales().view(1, -1, 1, 1)
            return x - F.conv2d(h, self.adjoint_kernel(w), padding=p)
        w = self.weight.detach()
        h = F.relu(_sound_conv(x, w, self.bias, self.pads)) * self._applied_scales().view(1, -1, 1, 1)
        return x - _sound_conv(h, self.adjoint_kernel(w), None, self.pads)

    def _bound(self) -> float:
        scaled = self._scaled_weight64()
        if scaled is None:
            return math.inf
        b, _ = scaled
        k2 = self.kernel_size**2
        under = smallest_normal(torch.float64) * k2 * math.sqrt(self.inner * self.channels)  # ‖conv with all-λ kernel‖
        err = mul_up(_rounding_factor(), abs_conv2d_norm_bound(b, 1)) + under
        return _lip_from_mu(round_up(conv2d_norm_bound(b, self.input_hw, 1, self.pads) + up(err)))

    def _norm_w(self) -> float:
        return self._eval_scales.remember(
            self, "norm_w", lambda: conv2d_norm_bound(self.weight, self.input_hw, 1, self.pads))

    def error_model(self, in_shape, dtype, lip: float) -> fp.ErrorModel:
        w = self.weight.detach()
        wt = self.adjoint_kernel(w)
        nw = self._norm_w()
        hw = self.input_hw[0] * self.input_hw[1]
        k2 = self.kernel_size**2
        bias = self.bias is not None
        models = [
            fp.affine_error_model(w.flatten(1), self.bias, nw, dtype, hw, abs_conv2d_norm_bound(w, 1),
                                  accumulate.rounding_depth(self.channels * k2, self.channels, bias)),
            fp.elementwise_model(1.0, self.inner * hw, dtype),  # ReLU
            fp.scale_model(self._max_scale(), self.inner * hw, dtype),
            fp.affine_error_model(wt.flatten(1), None, nw, dtype, hw, abs_conv2d_norm_bound(wt, 1),
                                  accumulate.rounding_depth(self.inner * k2, self.inner, False)),
        ]
        return self._residual(models, lip, self.channels * hw, dtype)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, inner={self.inner}, kernel_size={self.kernel_size}, "
                f"input_size={self.input_hw}")
