"""LiResNet (Hu et al., NeurIPS 2023) and CHORD-LiResNet (Hu et al., ICLR 2024) GloRo networks.

Layout (following hukkai/liresnet ``models/model.py``)::

    x − ½                       translation (the reference feeds ``x.sub(.5)``), Lipschitz 1
    stem                        conv 5×5 stride 2 (inputs up to 64×64: CIFAR, Tiny-ImageNet),
                                or a patchify conv (kernel = stride = round(√(width/3)), as the
                                reference's ImageNet stem) for larger inputs;  + MinMax
    LiResStack(depth, width)    linear residual blocks (each + MinMax)
    neck                        4×4 stride-4 conv, flatten, dense ``dense_width``, MinMax
                                (CHORD: both Cholesky-orthogonalised, as ``Map2Vec``)
    ChordMLP(dense_depth)       CHORD only: dense residual layers (each + MinMax)
    head                        LLN (last-layer normalised) linear head

Registry names: ``liresnet-<depth>l<width>w`` and ``chord-<depth>l<width>w`` (e.g.
``liresnet-18l256w``, ``chord-12l512w``); the paper variants are registered by name, any other
is built through the generic ``liresnet`` / ``chord`` entries with ``depth=``/``width=``
(:func:`gloronet.models.create` parses any such name). ``chord`` adds ``dense_depth=8`` CHORD layers of
width ``dense_width=2048`` by default.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import torch
from torch import nn

from .. import fp
from ..gloro import GloroNet
from ..nn.activation import MinMax
from ..nn.base import LipschitzModule
from ..nn.conv import LipConv2d
from ..nn.head import LLNLinear
from ..nn.linear import LipLinear
from ..nn.orthogonal import DEFAULT_EPS, CholeskyOrthConv2d, CholeskyOrthLinear, ChordMLP
from ..nn.reshape import Flatten
from ..nn.residual import LiResStack
from ..nn.sequential import Sequential
from .registry import create, register, register_resolver

__all__ = ["FAMILIES", "NAMED_VARIANTS", "InputShift", "build_liresnet", "build_neck", "build_stem", "create",
           "parse_name"]

FAMILIES = {"liresnet": {"depth": 18, "width": 256}, "chord": {"depth": 12, "width": 512}}
NAMED_VARIANTS = (
    "liresnet-6l128w",
    "liresnet-12l256w",
    "liresnet-18l256w",
    "liresnet-12l512w",
    "liresnet-12l588w",
    "chord-6l128w",
    "chord-12l512w",
    "chord-12l588w",
)
_NAME_RE = re.compile(r"(?P<family>[a-z]+)-(?P<depth>\d+)l(?P<width>\d+)w")


class InputShift(LipschitzModule):
    """``x + shift``: a translation, so exactly 1-Lipschitz; one rounding per element,
    ``|fl(x + s) − (x + s)| ≤ u|x + s|`` (the scalar may be rounded to the model's dtype first:
    still a translation)."""

    def __init__(self, shift: float):
        super().__init__()
        self.shift = float(shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift

    def float64_map(self):
        """The map in float64 (:mod:`gloronet.centre64`) of a float32 model: torch adds a Python
        scalar to a float32 tensor as a float32 scalar, so the float32 forward adds ``shift``
        rounded to float32, and so does this (exactly, in float64)."""
        s32 = float(torch.tensor(self.shift, dtype=torch.float32))
        return lambda h: h + s32

    def lipschitz(self) -> torch.Tensor:
        return torch.ones(())

    def lipschitz_bound(self) -> float:
        return 1.0

    def error_model(self, in_shape, dtype, lip: float) -> fp.ErrorModel:
        u, root = fp.unit_roundoff(dtype), math.sqrt(math.prod(in_shape))
        offset = fp.up(abs(self.shift) * (1 + u) * root)  # ‖φ(0)‖ with the rounded scalar
        lam = fp.smallest_normal(dtype)
        return fp.ErrorModel(lip=lip, rel=u, abs=fp.up(u * offset + 2 * lam * root), offset=offset,
                             peak_rel=1.0 + u, peak_abs=fp.up((1 + u) * abs(self.shift) * (1 + u)))

    def extra_repr(self) -> str:
        return f"shift={self.shift}"


def parse_name(name: str) -> tuple[str, int, int]:
    """``'liresnet-18l256w'`` -> ``('liresnet', 18, 256)``; clear ``ValueError`` otherwise."""
    expected = (
        "expected '<family>-<depth>l<width>w' with family 'liresnet' or 'chord', "
        "e.g. 'liresnet-18l256w' or 'chord-12l512w'"
    )
    if not isinstance(name, str):
        raise ValueError(f"model name must be a string, got {name!r}; {expected}")
    m = _NAME_RE.fullmatch(name.strip().lower())
    if m is None:
        raise ValueError(f"cannot parse model name {name!r}: {expected}")
    family, depth, width = m["family"], int(m["depth"]), int(m["width"])
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r} in {name!r}: {expected}")
    if depth < 1:
        raise ValueError(f"model name {name!r}: depth must be >= 1, got {depth}")
    if width < 2 or width % 2:
        raise ValueError(f"model name {name!r}: width must be even and >= 2 (MinMax splits channels in halves), got {width}")
    return family, depth, width


def build_stem(in_channels: int, hw: tuple[int, int], width: int, stem: str, patch_size: int | None, power_iters: int):
    """The stem conv (see the module docstring): 5×5 stride 2, or patchify for inputs above 64×64."""
    if stem == "auto":
        stem = "conv" if max(hw) <= 64 else "patchify"
    if stem == "conv":
        return LipConv2d(in_channels, width, 5, stride=2, padding=2, input_size=hw, power_iters=power_iters)
    if stem == "patchify":
        p = int(patch_size) if patch_size is not None else max(1, round((width / 3) ** 0.5))
        if p < 1 or min(hw) < p:
            raise ValueError(f"patch_size {p} does not fit inputs of size {hw}")
        return LipConv2d(in_channels, width, p, stride=p, padding="valid", input_size=hw, power_iters=power_iters)
    raise ValueError(f"stem must be 'auto', 'conv' or 'patchify', got {stem!r}")


def build_neck(width: int, hw: tuple[int, int], dense_width: int, chord: bool, orth_eps: float = DEFAULT_EPS,
               power_iters: int = 1) -> list[nn.Module]:
    """The neck: a 4×4 stride-4 conv ('same'), Flatten, a dense layer to ``dense_width``, MinMax;
    CHORD's ``Map2Vec`` (``chord=True``: both Cholesky-orthogonalised) or LiResNet's (power-iteration
    normalised)."""
    if chord:
        conv = CholeskyOrthConv2d(width, width, 4, eps=orth_eps, power_iters=power_iters)
    else:
        conv = LipConv2d(width, width, 4, stride=4, padding="same", input_size=hw, power_iters=power_iters)
    oh, ow = conv.output_hw(hw)
    dense_cls = CholeskyOrthLinear if chord else LipLinear
    dense_kw = {"eps": orth_eps} if chord else {}
    return [conv, Flatten(), dense_cls(width * oh * ow, dense_width, power_iters=power_iters, **dense_kw), MinMax()]


def build_liresnet(
    in_shape: Sequence[int],
    num_classes: int,
    epsilon: float,
    *,
    depth: int,
    width: int,
    chord: bool = False,
    dense_width: int = 2048,
    dense_depth: int | None = None,
    stem: str = "auto",
    patch_size: int | None = None,
    kernel_size: int = 3,
    centering: bool = True,
    center_input: bool = True,
    power_iters: int = 1,
    orth_eps: float = DEFAULT_EPS,
    head: str = "lln",
) -> GloroNet:
    """Build a LiResNet (``chord=False``) or CHORD-LiResNet (``chord=True``) :class:`GloroNet`.

    Args:
        in_shape: (C, H, W) of the inputs (in [0, 1]).
        depth, width: number and width of the linear residual blocks.
        dense_width: width of the neck's dense layer (and of the CHORD layers).
        dense_depth: CHORD dense residual layers (default 8 for CHORD; must be 0 for LiResNet).
        stem: 'auto' (5×5 stride 2 up to 64×64 inputs, patchify above), 'conv' or 'patchify'.
        patch_size: patchify kernel/stride (default ``round(√(width/3))`` as the reference).
        kernel_size: kernel of the residual blocks.
        centering: batch mean-centring of the residual branches.
        center_input: subtract ½ from the inputs first.
        power_iters: power-iteration steps per training step of every estimate.
        orth_eps: relative ε of the Cholesky orthogonalisation (CHORD).
        head: 'lln' (default, as the papers) or 'linear'.
    """
    c, h, w = (int(s) for s in in_shape)
    depth, width, dense_width = int(depth), int(width), int(dense_width)
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    for label, value in (("width", width), ("dense_width", dense_width)):
        if value < 2 or value % 2:
            raise ValueError(f"{label} must be even and >= 2 (MinMax), got {value}")
    if dense_depth is None:
        dense_depth = 8 if chord else 0
    if dense_depth < 0 or (dense_depth and not chord):
        raise ValueError(f"dense_depth={dense_depth}: CHORD dense layers exist only in 'chord' models (>= 0)")
    if head not in ("lln", "linear"):
        raise ValueError(f"head must be 'lln' or 'linear', got {head!r}")

    layers: list[nn.Module] = [InputShift(-0.5)] if center_input else []
    stem_conv = build_stem(c, (h, w), width, stem, patch_size, power_iters)
    layers += [stem_conv, MinMax()]
    hw = stem_conv.output_hw((h, w))
    layers.append(LiResStack(depth, width, hw, kernel_size=kernel_size, centering=centering, power_iters=power_iters))
    layers += build_neck(width, hw, dense_width, chord, orth_eps, power_iters)
    if dense_depth:
        layers.append(ChordMLP(dense_width, dense_depth, eps=orth_eps, power_iters=power_iters))
    head_cls = LLNLinear if head == "lln" else LipLinear
    return GloroNet(Sequential(*layers), head_cls(dense_width, num_classes), epsilon)


def _family_builder(family: str):
    defaults = FAMILIES[family]

    def build(in_shape, num_classes, epsilon, depth: int = defaults["depth"], width: int = defaults["width"], **kw):
        return build_liresnet(in_shape, num_classes, epsilon, depth=depth, width=width, chord=family == "chord", **kw)

    build.__doc__ = f"``{family}`` with ``depth={defaults['depth']}``, ``width={defaults['width']}`` unless given."
    return build


def _named_builder(name: str):
    family, depth, width = parse_name(name)

    def build(in_shape, num_classes, epsilon, **kw):
        for key, fixed in (("depth", depth), ("width", width)):
            if key in kw and int(kw[key]) != fixed:
                raise ValueError(
                    f"{name!r} fixes {key}={fixed}, got {key}={kw[key]}; use create('{family}', ..., depth=..., width=...)"
                )
            kw.pop(key, None)
        return build_liresnet(in_shape, num_classes, epsilon, depth=depth, width=width, chord=family == "chord", **kw)

    build.__doc__ = f"``{family}`` with depth {depth} and width {width}."
    return build


def resolve(name: str, kwargs: dict) -> tuple[str, dict] | None:
    """Any ``liresnet-<D>l<W>w`` / ``chord-<D>l<W>w`` that is not registered by name: the generic
    ``liresnet`` / ``chord`` entry with ``depth`` and ``width`` (so the net's ``config`` rebuilds it
    through :func:`gloronet.models.create` alone); None for other names."""
    if not (_NAME_RE.fullmatch(name) or name.startswith(tuple(FAMILIES))):
        return None
    family, depth, width = parse_name(name)
    for k, fixed in (("depth", depth), ("width", width)):
        if k in kwargs and int(kwargs[k]) != fixed:
            raise ValueError(f"{name!r} fixes {k}={fixed}, got {k}={kwargs[k]}")
    return family, {**kwargs, "depth": depth, "width": width}


for _family in FAMILIES:
    register(_family)(_family_builder(_family))
for _name in NAMED_VARIANTS:
    register(_name)(_named_builder(_name))
register_resolver(resolve)
