"""A float64 centre for the certificates of a float32 model (issue 18: the VRA price).

The floating-point-sound margin at ``x`` loses ``D_ji·(Pc + P)`` (:mod:`gloronet.radius`): ``Pc``
bounds how far the pass that computed the centre ``ĉ_S(x)`` strays from the exact network, ``P``
how far the certified (float32, chunked) program may stray at ``x'``. On a trained 4C3F the two
are equal and dominate the price (BENCHMARKS.md, "The price after issue 18"). Computing the
centre in float64 shrinks ``Pc`` by ~2⁻²⁹, so :meth:`gloronet.GloroNet.certify` measures again,
this way too, the points whose radius falls just short of an ε. The argument is that of the fused
centre: the centre may come from any program whose error model is known, while ``P`` — and hence
every statement about the model's own outputs at ``x'`` — stays that of the certified program.

This is sound only where the float64 pass evaluates the same real map as the float32 program: each
step reads the very float32 tensors (and scalars) the float32 forward uses — the applied weight,
the bias, a residual kernel and shift — cast exactly to float64. A layer class says how with its
own ``float64_map()`` (``LipLinear``, ``LipConv2d``, ``LiResBlock``, ``InputShift``); a step of any
other type, a subclass that does not define its own included (weights or scales recomputed from
parameters, SLL blocks, normalisations, ...), makes the body unsupported, and nothing changes.
"""
from __future__ import annotations

from typing import Callable

import torch

from .nn import Flatten, MinMax

Step = Callable[[torch.Tensor], torch.Tensor]


def float64_steps(steps) -> list[Step] | None:
    """Float64 evaluations of the eval-mode maps of ``steps`` (exactly the same real maps), or None
    when some step is not of a supported type (see the module docstring)."""
    out = []
    for m in steps:
        f = _float64_step(m)
        if f is None:
            return None
        out.append(f)
    return out


def _float64_step(m) -> Step | None:
    t = type(m)
    if t in (MinMax, Flatten):  # comparisons and reshapes: the same ops in any dtype
        return m
    # a class's own float64_map, never an inherited one: a subclass may map differently
    return m.float64_map() if "float64_map" in vars(t) else None
