"""Dot products with a bounded rounding depth: the eval-mode kernels of the Lipschitz layers.

A dense layer or convolution output is a sum of ``n`` products. Summed by a BLAS / oneDNN /
cuBLAS kernel in an unknown order, a term may pass through up to ``n`` roundings, so the only
sound error bound is ``γ_n Σ|w_t a_t|`` (:mod:`gloronet.fp`) — ``3·10⁻⁴`` relative for a 3136-term
float32 sum, which costs certified radius. The certified program (eval mode) therefore splits the
sum into ``m ≤ min(16, ⌈n/32⌉)`` chunks of ``≤ ⌈n/m⌉`` terms (slices of the input features /
input channels), lets the kernel sum each chunk in any order, and adds the ``m`` partial results
one by one: every term then passes through at most ``⌈n/m⌉ + m − 1`` roundings (``+1`` for the
bias), about ``n/16`` instead of ``n``. Same products, same FLOPs, but more, smaller kernel calls —
so :class:`gloronet.GloroNet` runs it only where its fused pass cannot vouch for the answer
(``benchmarks/certify_price.py`` measures both). Training keeps the single fused kernel.

Inside :func:`fused` (per thread) the same functions run the one fused kernel call and
:func:`rounding_depth` reports its depth, ``n`` (+1 for the bias): the fast pass of
:class:`gloronet.GloroNet`, whose error models are built under the same context, so a layer's
kernel and its error model always read the one switch (:func:`chunk_count`).
"""
from __future__ import annotations

import contextlib
import math
import threading

import torch
import torch.nn.functional as F

MIN_CHUNK = 32  # an n-term sum splits into at most ⌈n / MIN_CHUNK⌉ chunks (no split up to this many)
MAX_CHUNKS = 16
_mode = threading.local()


@contextlib.contextmanager
def fused():
    """Within this context (this thread only) every sum runs as one kernel call, and
    :func:`rounding_depth` is that of an unknown summation order. Nests; restores on exit."""
    before = getattr(_mode, "fused", False)
    _mode.fused = True
    try:
        yield
    finally:
        _mode.fused = before


def is_fused() -> bool:
    """True inside :func:`fused` on this thread."""
    return getattr(_mode, "fused", False)


def chunking() -> tuple[int, int, bool]:
    """``(MAX_CHUNKS, MIN_CHUNK, is_fused())`` on this thread: everything :func:`chunk_count` reads,
    so caches of rounding depths and error models are keyed on it."""
    return MAX_CHUNKS, MIN_CHUNK, is_fused()


def chunk_count(n_terms: int, splittable: int) -> int:
    """Number of chunks for an ``n_terms``-term sum whose input splits into ``splittable`` slices
    (features of a dense layer, input channels of a convolution); 1 inside :func:`fused`."""
    if is_fused():
        return 1
    return max(1, min(MAX_CHUNKS, splittable, math.ceil(n_terms / MIN_CHUNK)))


def rounding_depth(n_terms: int, splittable: int, bias: bool) -> int:
    """Most roundings any product (or the bias) passes through in :func:`linear` / :func:`conv2d`:
    ``⌈n/m⌉`` inside the largest chunk, ``m − 1`` adding the partial sums, 1 adding the bias."""
    m = chunk_count(n_terms, splittable)
    per_slice = math.ceil(splittable / m)
    chunk_terms = per_slice * (n_terms // splittable)
    return chunk_terms + m - 1 + int(bias)


def _slices(size: int, m: int) -> list[slice]:
    step = math.ceil(size / m)
    return [slice(s, min(s + step, size)) for s in range(0, size, step)]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` summed in chunks of the input features (see the module docstring).

    The bias joins the first chunk's sum (``⌈n/m⌉ + 1`` terms); the other partial sums are added
    to it one by one, in place."""
    n = weight.shape[1]
    m = chunk_count(n, n)
    if m == 1:
        return F.linear(x, weight, bias)
    slices = _slices(n, m)
    out = F.linear(x[..., slices[0]], weight[:, slices[0]], bias)
    for sl in slices[1:]:
        out.add_(F.linear(x[..., sl], weight[:, sl]))
    return out


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int,
    pads: tuple[int, int, int, int] = (0, 0, 0, 0),
    groups: int = 1,
) -> torch.Tensor:
    """Zero-padded (``pads`` = left, right, top, bottom) ``F.conv2d`` summed in chunks of input
    channels, the bias in the first chunk; grouped convolutions are not split (their per-group
    sums are already short)."""
    left, right, top, bottom = pads
    if left == right and top == bottom:
        padding = (top, left)
    else:
        x, padding = F.pad(x, pads), (0, 0)
    c_in = weight.shape[1]
    m = chunk_count(weight[0].numel(), c_in) if groups == 1 else 1
    if m == 1:
        return F.conv2d(x, weight, bias, stride=stride, padding=padding, groups=groups)
    slices = _slices(c_in, m)
    out = F.conv2d(x[:, slices[0]], weight[:, slices[0]], bias, stride=stride, padding=padding)
    for sl in slices[1:]:
        out.add_(F.conv2d(x[:, sl], weight[:, sl], stride=stride, padding=padding))
    return out
