"""AOL, almost-orthogonal layers (Prach & Lampert, "Almost-Orthogonal Layers for Efficient
General-Purpose Lipschitz Networks", ECCV 2022; code: berndprach/AOL).

Dense (Theorem 1): ``W' = W·diag(d)``, ``d_j = (Σ_i |WᵀW|_ij)^{-1/2}``; then ``‖W'‖₂ ≤ 1``.
Convolution (Theorem 2): the same with the Gram *kernel* of ``K``: for input channels ``a, b`` and
every shift ``s``, ``(KᵀK)_{ab}(s) = Σ_{o,v} K_{o,a}(v + s) K_{o,b}(v)`` (the kernel of ``AᵀA``),
and ``d_a = (Σ_{b,s} |(KᵀK)_{ab}(s)|)^{-1/2}`` scales input channel ``a`` of the kernel.

Both are derived weights (``derive_weight``): the training path rescales differentiably; in eval
mode the rescaled float32 weight is computed once (:class:`~gloronet.nn.state.EvalCache`) and the
forward pass, the bound and the error model read that same tensor. The bound is NOT "1 by
Theorem 1/2": ``d`` is computed in floating point, so ``lipschitz_bound()`` is the provable
operator-norm bound of the rescaled kernel actually applied (``dense_norm_bound`` /
``conv2d_norm_bound`` at the recorded input size, every stride / padding ``LipConv2d`` supports).
Rounding is that of ``LipLinear`` / ``LipConv2d`` with the applied weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .conv import LipConv2d
from .linear import LipLinear

TINY = 1e-30  # a zero column / channel gets scale TINY^-1/2 times zeros: zero


def aol_dense_scales(weight: torch.Tensor) -> torch.Tensor:
    """(in,) ``d_j = (Σ_i |WᵀW|_ij)^{-1/2}`` for ``W`` (out × in) — Prach & Lampert, Thm 1."""
    gram = weight.mT @ weight
    return gram.abs().sum(dim=1).clamp_min(TINY).rsqrt()


def aol_conv_scales(kernel: torch.Tensor) -> torch.Tensor:
    """(C_in,) AOL scales of a kernel (C_out, C_in, kh, kw) — Prach & Lampert, Thm 2: the Gram
    kernel ``KᵀK`` (C_in, C_in, 2kh−1, 2kw−1) is one convolution of the kernel with itself."""
    kh, kw = kernel.shape[-2:]
    kt = kernel.transpose(0, 1)  # (C_in, C_out, kh, kw): C_in "images" of C_out channels
    gram = F.conv2d(kt, kt, padding=(kh - 1, kw - 1))
    return gram.abs().sum(dim=(1, 2, 3)).clamp_min(TINY).rsqrt()


class AOLLinear(LipLinear):
    """Dense layer ``y = W·diag(d)·x + b`` with the AOL scales ``d`` (:func:`aol_dense_scales`)."""

    def derive_weight(self) -> torch.Tensor:
        return self.weight * aol_dense_scales(self.weight)[None, :]


class AOLConv2d(LipConv2d):
    """Convolution with the AOL-rescaled kernel ``K·d`` (per input channel, :func:`aol_conv_scales`).

    ``groups = 1`` only (the paper's layer). Initialisation as berndprach/AOL's default
    (``orthogonal_center``: an orthogonal matrix at the kernel's centre tap ``(k − 1)//2``, zeros
    elsewhere, so that an AOL layer starts as a 1×1 orthogonal map); ``init="orthogonal"`` keeps
    ``LipConv2d``'s."""

    def __init__(self, *args, init: str = "orthogonal_center", **kwargs):
        super().__init__(*args, **kwargs)
        if self.groups != 1:
            raise ValueError(f"AOLConv2d supports groups=1 only, got groups={self.groups}")
        if init not in ("orthogonal_center", "orthogonal"):
            raise ValueError(f"init must be 'orthogonal_center' or 'orthogonal', got {init!r}")
        if init == "orthogonal_center":
            c = (self.kernel_size - 1) // 2
            centre = nn.init.orthogonal_(torch.empty(self.out_channels, self.in_channels, device=self.weight.device))
            with torch.no_grad():
                self.weight.zero_()
                self.weight[:, :, c, c] = centre

    def derive_weight(self) -> torch.Tensor:
        return self.weight * aol_conv_scales(self.weight)[None, :, None, None]
