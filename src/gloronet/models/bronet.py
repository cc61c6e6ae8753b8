"""BRONet (Lai et al., "Enhancing Certified Robustness via Block Reflector Orthogonal Layers and
Logit Annealing Loss", ICML 2025): the LiResNet backbone with its residual blocks replaced by BRO
convolutions.

Layout (following ntuaislab/BRONet ``bronet/models/model.py``, ``BRONet``)::

    x − ½                       translation, Lipschitz 1 (:class:`.liresnet.InputShift`)
    stem                        conv 5×5 stride 2 + MinMax (:func:`.liresnet.build_stem`)
    depth × (BROConv2d + MinMax)  BRO convolutions, width → width, 3×3, rank ``width // 2``,
                                zero padding ``k // 2`` then circular on the padded canvas, cropped
                                (the reference's ``LiResConvOrtho``, ``mode="bro"``, ``zero_padding``)
    neck                        CHORD's ``Map2Vec`` (:func:`.liresnet.build_neck`): Cholesky
                                4×4 stride-4 conv, flatten, Cholesky dense to ``dense_width``, MinMax
    dense layers                ``dense="chord"``: :class:`~gloronet.nn.orthogonal.ChordMLP`
                                (the paper's CIFAR configs, ``dense_type: cholesky``) or
                                ``dense="bro"``: ``dense_depth × (BROLinear + MinMax)`` (the
                                reference's ``LiBroMLP``, its default ``dense_type``)
    head                        LLN linear head

Differences from the reference (also in ``configs/*bronet*``): no batch mean-centring of the
convolutions; ``V`` is the parameter itself,
initialised to the identity reflector (the reference trains ``V = I + depth^-½·γ⊙W``, which starts
near it); ``ε = 10⁻⁵`` in the reflector's regularised solve (the reference: 10⁻⁷ in the backbone).

Every layer's bound is that layer's proven bound of the weights its eval forward pass applies
(BROConv2d: the materialised, rounded circular kernel), so the body's bound is their product.

Registry: ``bronet`` (``depth=``, ``width=``; defaults 12 / 512), ``bronet-12l512w`` (BRONet-L of
``configs/benchmark_reproduce/cifar10.yaml``) and ``bronet-mnist`` (4 BRO convs of width 16, two
BRO dense layers of width 128: sized for MNIST on a CPU).
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from ..gloro import GloroNet
from ..nn.activation import MinMax
from ..nn.bro import BROConv2d, BROLinear
from ..nn.head import LLNLinear
from ..nn.linear import LipLinear
from ..nn.orthogonal import DEFAULT_EPS, ChordMLP
from ..nn.sequential import Sequential
from .liresnet import InputShift, build_neck, build_stem
from .registry import register

__all__ = ["BRONETS", "build_bronet"]

# name -> fixed arguments of build_bronet
BRONETS: dict[str, dict] = {
    "bronet-12l512w": {"depth": 12, "width": 512, "dense_width": 2048, "dense_depth": 8, "dense": "chord"},
    "bronet-mnist": {"depth": 4, "width": 16, "dense_width": 128, "dense_depth": 2, "dense": "bro"},
}


def build_bronet(
    in_shape: Sequence[int],
    num_classes: int,
    epsilon: float,
    *,
    depth: int = 12,
    width: int = 512,
    dense_width: int = 2048,
    dense_depth: int = 8,
    dense: str = "chord",
    rank: int | None = None,
    kernel_size: int = 3,
    padding: int | None = None,
    stem: str = "auto",
    patch_size: int | None = None,
    center_input: bool = True,
    power_iters: int = 1,
    orth_eps: float = DEFAULT_EPS,
    head: str = "lln",
) -> GloroNet:
    """Build a BRONet :class:`GloroNet` (see the module docstring).

    Args:
        in_shape: (C, H, W) of the inputs (in [0, 1]).
        depth, width: number and width of the BRO convolutions.
        dense_width, dense_depth: width of the neck's dense layer and number of dense layers after it.
        dense: 'chord' (Cholesky-orthogonal dense layers) or 'bro' (BRO dense layers).
        rank: rank of every BRO reflector (default ``width // 2``, the paper's ratio 0.5).
        kernel_size: kernel of the BRO convolutions.
        padding: their zero padding (default ``kernel_size // 2``, as the reference; 0: circular on
            the feature map).
        stem, patch_size, center_input, power_iters, orth_eps: as :func:`.liresnet.build_liresnet`.
        head: 'lln' (default, as the paper) or 'linear'.
    """
    c, h, w = (int(s) for s in in_shape)
    depth, width, dense_width, dense_depth = int(depth), int(width), int(dense_width), int(dense_depth)
    if depth < 1 or dense_depth < 0:
        raise ValueError(f"depth must be >= 1 and dense_depth >= 0, got {depth}, {dense_depth}")
    for label, value in (("width", width), ("dense_width", dense_width)):
        if value < 2 or value % 2:
            raise ValueError(f"{label} must be even and >= 2 (MinMax), got {value}")
    if dense not in ("chord", "bro"):
        raise ValueError(f"dense must be 'chord' or 'bro', got {dense!r}")
    if head not in ("lln", "linear"):
        raise ValueError(f"head must be 'lln' or 'linear', got {head!r}")

    layers: list[nn.Module] = [InputShift(-0.5)] if center_input else []
    stem_conv = build_stem(c, (h, w), width, stem, patch_size, power_iters)
    hw = stem_conv.output_hw((h, w))
    layers += [stem_conv, MinMax()]
    pad = kernel_size // 2 if padding is None else padding
    for _ in range(depth):
        layers += [BROConv2d(width, width, hw, kernel_size, rank=rank, padding=pad), MinMax()]
    layers += build_neck(width, hw, dense_width, True, orth_eps, power_iters)
    if dense_depth and dense == "chord":
        layers.append(ChordMLP(dense_width, dense_depth, eps=orth_eps, power_iters=power_iters))
    for _ in range(dense_depth if dense == "bro" else 0):
        layers += [BROLinear(dense_width, dense_width), MinMax()]
    head_cls = LLNLinear if head == "lln" else LipLinear
    return GloroNet(Sequential(*layers), head_cls(dense_width, num_classes), epsilon)


def _named(name: str):
    fixed = BRONETS[name]

    def build(in_shape, num_classes, epsilon, **kw):
        clash = {k: v for k, v in kw.items() if k in fixed and v != fixed[k]}
        if clash:
            raise ValueError(f"{name!r} fixes {', '.join(f'{k}={fixed[k]}' for k in clash)}; "
                             f"use create('bronet', ..., {', '.join(clash)}=...)")
        return build_bronet(in_shape, num_classes, epsilon, **{**kw, **fixed})

    build.__doc__ = f"BRONet with {', '.join(f'{k}={v}' for k, v in fixed.items())}."
    return build


register("bronet")(build_bronet)
for _name in BRONETS:
    register(_name)(_named(_name))
