"""Depthwise 3×3 stride-1 convolutions as explicit tap sums, for builds where PyTorch would run
them with Winograd.

On ARM (NEON) and RISC-V vector builds PyTorch sends a float32 convolution whose every group
sees one input channel (``x.shape[1] == groups``, ``weight.shape[1] == 1``, 3×3, stride 1,
contiguous) to ``Winograd3x3Depthwise``, whatever the backend settings: its rounding is not that
of a sum of products, so the error model (:mod:`gloronet.fp`) would not describe it. There the
eval-mode layers compute such a convolution here instead: ``y = Σ_t w_t·x_t`` over the 9 taps,
one product and one addition per tap, then the bias — every term rounded at most ``9 + 1``
times, the depth the layers' error models already charge for a 9-term sum plus the bias.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels


def winograd_shape(in_channels: int, weight_shape, stride: int, groups: int) -> bool:
    """Whether PyTorch's depthwise Winograd kernel accepts a convolution of this shape."""
    return (in_channels == groups and weight_shape[0] % in_channels == 0 and weight_shape[1] == 1
            and tuple(weight_shape[2:]) == (3, 3) and stride == 1)


def needs_taps(in_channels: int, weight_shape, stride: int, groups: int) -> bool:
    """Whether the sound forward must sum this convolution's taps itself (this build, this shape)."""
    return kernels.winograd_depthwise_build() and winograd_shape(in_channels, weight_shape, stride, groups)


def conv2d_taps(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pads) -> torch.Tensor:
    """``F.conv2d(F.pad(x, pads), weight, bias, groups=x.shape[1])`` for a (C·m, 1, kh, kw) weight,
    summed tap by tap in a fixed order (each product rounded once, each addition once)."""
    c = x.shape[1]
    xp = F.pad(x, pads)
    mult = weight.shape[0] // c
    if mult > 1:  # output channel o reads input channel o // m (exact copies)
        xp = xp.repeat_interleave(mult, dim=1)
    kh, kw = weight.shape[-2:]
    ho, wo = xp.shape[-2] - kh + 1, xp.shape[-1] - kw + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            term = weight[:, 0, i, j].view(1, -1, 1, 1) * xp[:, :, i : i + ho, j : j + wo]
            out = term if out is None else out.add_(term)
    return out if bias is None else out.add_(bias.view(1, -1, 1, 1))
