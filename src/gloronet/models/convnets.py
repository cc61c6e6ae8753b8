"""Convolutional GloRo architectures of Leino et al. (ICML 2021): MinMax after every layer but the
head, TensorFlow-'same' padding, orthogonal initialisation. ``C32k4s2`` = conv with 32 output
channels, kernel 4, stride 2; ``D512`` = dense layer with 512 units.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from ..gloro import GloroNet
from ..nn import Flatten, LipConv2d, LipLinear, LLNLinear, MinMax, Sequential
from .registry import register

# (out_channels, kernel, stride) per conv layer, then dense widths.
CONV_NETS: dict[str, tuple[list[tuple[int, int, int]], list[int]]] = {
    "2c2f": ([(16, 4, 2), (32, 4, 2)], [100]),
    "4c3f": ([(32, 3, 1), (32, 4, 2), (64, 3, 1), (64, 4, 2)], [512, 512]),
    "6c2f": ([(32, 3, 1), (32, 3, 1), (32, 4, 2), (64, 3, 1), (64, 3, 1), (64, 4, 2)], [512]),
    "8c2f": (
        [(64, 3, 1), (64, 3, 1), (64, 4, 2), (128, 3, 1), (128, 3, 1), (128, 4, 2), (256, 3, 1), (256, 4, 2)],
        [256],
    ),
}


def conv_net(
    convs: Sequence[tuple[int, int, int]],
    denses: Sequence[int],
    in_shape: Sequence[int],
    num_classes: int,
    epsilon: float,
    head: str = "linear",
    power_iters: int = 1,
    conv_cls: type = LipConv2d,
    dense_cls: type = LipLinear,
) -> GloroNet:
    """A plain GloRo conv net: ``[conv, MinMax]* Flatten [dense, MinMax]* head``; ``conv_cls`` /
    ``dense_cls`` swap in another layer family with the same constructor (AOL)."""
    if head not in ("linear", "lln"):
        raise ValueError(f"head must be 'linear' or 'lln', got {head!r}")
    channels, hw = in_shape[0], (in_shape[1], in_shape[2])
    layers: list[nn.Module] = []
    for out_ch, k, s in convs:
        conv = conv_cls(channels, out_ch, k, stride=s, padding="same", input_size=hw, power_iters=power_iters)
        layers += [conv, MinMax()]
        channels, hw = out_ch, conv.output_hw(hw)
    layers.append(Flatten())
    features = channels * hw[0] * hw[1]
    for width in denses:
        layers += [dense_cls(features, width, power_iters=power_iters), MinMax()]
        features = width
    head_cls = LLNLinear if head == "lln" else LipLinear
    return GloroNet(Sequential(*layers), head_cls(features, num_classes), epsilon)


def _register_conv_net(name: str) -> None:
    convs, denses = CONV_NETS[name]
    register(name)(lambda in_shape, num_classes, epsilon, **kw: conv_net(convs, denses, in_shape, num_classes, epsilon, **kw))


for _name in CONV_NETS:
    _register_conv_net(_name)
