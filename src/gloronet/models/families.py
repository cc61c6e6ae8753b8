"""AOL, SLL and BRO networks (issue 20), MNIST-sized and CIFAR-shaped.

* ``aol-mnist`` / ``aol-small``: the GloRo 4C3F / 6C2F layouts (:mod:`.convnets`) with every conv
  and dense layer but the head an AOL layer (Prach & Lampert, ECCV 2022). Differs from the AOL
  paper's networks (berndprach/AOL: 1×1/3×3 AOL convs with concatenation pooling, AOL head).
* ``sll-mnist`` / ``sll-small``: an AOL stem conv, stages of SLL conv blocks (Araujo et al., ICLR
  2023) joined by stride-2 AOL convs (4×4, 'same'), one more stride-2 AOL conv, Flatten, an AOL
  dense layer to ``dense_width``, SLL dense blocks, a linear head. Smaller than the paper's SLL
  Small (araujoalexandre/Lipschitz-SLL-Networks reproduce_tables.py: 20 conv blocks of width 45,
  7 dense blocks of inner width 2048; channel-padding stem, pooling, a normalised last layer),
  sized to train on a CPU.
* ``bro-mnist``: an AOL stem conv, stride-2 AOL convs (4×4, 'same') between stages of BRO
  convolutions (Lai et al., ICML 2025; circular on the stage's input size), MinMax after every
  layer but the head, Flatten, an AOL dense layer, BRO dense layers, a linear head. Much smaller
  than BRONet (ntuaislab/BRONet: a LiResNet backbone with BRO convs, a BRO-dense neck, an LLN
  head), sized to train on a CPU.

SLL blocks carry their ReLU inside (no MinMax between them); every bound is the layers' proven
bound of the computed weights (:mod:`gloronet.nn.aol`, :mod:`gloronet.nn.sll`).
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from ..gloro import GloroNet
from ..nn import (AOLConv2d, AOLLinear, BROConv2d, BROLinear, Flatten, LipLinear, LLNLinear, MinMax, Sequential,
                  SLLConv2d, SLLLinear)
from .convnets import CONV_NETS, conv_net
from .registry import register

# (width, SLL conv blocks) per stage; dense width; SLL dense blocks.
SLL_NETS: dict[str, tuple[list[tuple[int, int]], int, int]] = {
    "sll-mnist": ([(16, 2), (32, 2)], 256, 2),
    "sll-small": ([(32, 3), (64, 3), (128, 3)], 512, 2),
}
AOL_NETS = {"aol-mnist": "4c3f", "aol-small": "6c2f"}
# stem width; (width, BRO conv layers) per stride-2 stage; dense width; BRO dense layers.
BRO_NETS: dict[str, tuple[int, list[tuple[int, int]], int, int]] = {
    "bro-mnist": (16, [(32, 2), (32, 1)], 256, 1),
}


def _head_class(head: str) -> type:
    """The head layer class of ``head``: 'linear' (LipLinear) or 'lln' (LLNLinear)."""
    if head not in ("linear", "lln"):
        raise ValueError(f"head must be 'linear' or 'lln', got {head!r}")
    return LLNLinear if head == "lln" else LipLinear


def sll_net(
    stages: Sequence[tuple[int, int]],
    dense_width: int,
    dense_blocks: int,
    in_shape: Sequence[int],
    num_classes: int,
    epsilon: float,
    head: str = "linear",
    power_iters: int = 1,
) -> GloroNet:
    """An SLL network (see the module docstring); ``power_iters`` for the AOL layers' estimates."""
    head_cls = _head_class(head)
    channels, hw = in_shape[0], (in_shape[1], in_shape[2])
    layers: list[nn.Module] = []
    for i, (width, blocks) in enumerate(stages):
        conv = AOLConv2d(channels, width, 3 if i == 0 else 4, stride=1 if i == 0 else 2, input_size=hw,
                         power_iters=power_iters)
        hw, channels = conv.output_hw(hw), width
        layers += [conv] + [SLLConv2d(width, hw) for _ in range(blocks)]
    down = AOLConv2d(channels, channels, 4, stride=2, input_size=hw, power_iters=power_iters)
    hw = down.output_hw(hw)
    layers += [down, Flatten(), AOLLinear(channels * hw[0] * hw[1], dense_width, power_iters=power_iters)]
    layers += [SLLLinear(dense_width) for _ in range(dense_blocks)]
    return GloroNet(Sequential(*layers), head_cls(dense_width, num_classes), epsilon)


def bro_net(
    stem: int,
    stages: Sequence[tuple[int, int]],
    dense_width: int,
    dense_blocks: int,
    in_shape: Sequence[int],
    num_classes: int,
    epsilon: float,
    head: str = "linear",
    power_iters: int = 1,
) -> GloroNet:
    """A BRO network (see the module docstring); ``power_iters`` for the AOL layers' estimates."""
    head_cls = _head_class(head)
    hw = (in_shape[1], in_shape[2])
    layers: list[nn.Module] = [AOLConv2d(in_shape[0], stem, 3, input_size=hw, power_iters=power_iters), MinMax()]
    channels = stem
    for width, blocks in stages:
        down = AOLConv2d(channels, width, 4, stride=2, input_size=hw, power_iters=power_iters)
        hw, channels = down.output_hw(hw), width
        layers += [down, MinMax()]
        for _ in range(blocks):
            layers += [BROConv2d(width, width, hw), MinMax()]
    layers += [Flatten(), AOLLinear(channels * hw[0] * hw[1], dense_width, power_iters=power_iters), MinMax()]
    for _ in range(dense_blocks):
        layers += [BROLinear(dense_width, dense_width), MinMax()]
    return GloroNet(Sequential(*layers), head_cls(dense_width, num_classes), epsilon)


def _register_bro(name: str) -> None:
    stem, stages, width, blocks = BRO_NETS[name]
    register(name)(lambda in_shape, num_classes, epsilon, **kw: bro_net(stem, stages, width, blocks, in_shape,
                                                                        num_classes, epsilon, **kw))


def _register_sll(name: str) -> None:
    stages, width, blocks = SLL_NETS[name]
    register(name)(lambda in_shape, num_classes, epsilon, **kw: sll_net(stages, width, blocks, in_shape, num_classes,
                                                                        epsilon, **kw))


def _register_aol(name: str) -> None:
    convs, denses = CONV_NETS[AOL_NETS[name]]
    register(name)(lambda in_shape, num_classes, epsilon, **kw: conv_net(
        convs, denses, in_shape, num_classes, epsilon, conv_cls=AOLConv2d, dense_cls=AOLLinear, **kw))


for _name in SLL_NETS:
    _register_sll(_name)
for _name in AOL_NETS:
    _register_aol(_name)
for _name in BRO_NETS:
    _register_bro(_name)
