"""Geometry of zero-padded, strided 2-D convolutions, and the layer's linear map and its adjoint."""
from __future__ import annotations

import math
from typing import Sequence

import torch.nn.functional as F

Padding = tuple[int, int, int, int]  # (left, right, top, bottom), the order of F.pad


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'same' padding (extra pixel at the end): output size ``⌈size / stride⌉``."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def conv_output_size(size: int, kernel: int, stride: int, pad_lo: int, pad_hi: int) -> int:
    return (size + pad_lo + pad_hi - kernel) // stride + 1


def conv2d_apply(x, weight, stride: int, padding: Padding, groups: int = 1):
    """The layer's linear map: zero-pad with ``padding`` then a valid strided convolution."""
    return F.conv2d(F.pad(x, padding), weight, stride=stride, groups=groups)


def conv2d_adjoint(y, weight, input_hw: Sequence[int], stride: int, padding: Padding, groups: int = 1):
    """Adjoint (transpose) of :func:`conv2d_apply` for inputs of spatial size ``input_hw``."""
    pl, pr, pt, pb = padding
    hp, wp = input_hw[0] + pt + pb, input_hw[1] + pl + pr
    kh, kw = weight.shape[-2:]
    oph = hp - ((y.shape[-2] - 1) * stride + kh)
    opw = wp - ((y.shape[-1] - 1) * stride + kw)
    x = F.conv_transpose2d(y, weight, stride=stride, output_padding=(oph, opw), groups=groups)
    return x[..., pt : pt + input_hw[0], pl : pl + input_hw[1]]
