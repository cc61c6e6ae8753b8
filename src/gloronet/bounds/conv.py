"""The bound of a conv layer at its input size: the explicit Gram matrix or the circular bound."""
from __future__ import annotations

import math

from .circular import conv2d_fft_bound
from .conv_explicit import _explicit_conv_bound
from .float64 import max_abs
from .geometry import Padding, conv_output_size
from .threads import one_thread

EXACT_MAX_DIM = 2048
EXACT_MAX_ENTRIES = 40_000_000
SMALL_MAP = 14  # below this side the circular bound is several % loose (tests/test_bounds.py)


@one_thread
def conv2d_norm_bound(
    weight,
    input_hw,
    stride: int,
    padding: Padding,
    groups: int = 1,
    exact_max_dim: int | None = None,
    start: torch.Tensor | None = None,
) -> float:
    """Provable, tight upper bound of a conv layer's operator norm at its actual input size.

    Grouped convolutions are bounded group by group (block-diagonal operator). Exact (explicit
    operator, :func:`conv2d_explicit_gram`) when ``min(d_in, d_out) ≤ exact_max_dim`` (default
    ``EXACT_MAX_DIM``) — twice
    that on maps smaller than 14 px, where the circular bound is loosest — and the operator has at
    most ``EXACT_MAX_ENTRIES`` entries; otherwise the circular/FFT bound (measured on 14–16 px
    maps: ≤ 1% loose for k ≤ 2, ~1.5% for k = 3, up to ~5–10% for k = 5; tests/test_bounds.py).
    ``start`` (1, C_in, H, W): the layer's power-iteration iterate, a Lanczos start vector.
    """
    exact_max_dim = EXACT_MAX_DIM if exact_max_dim is None else exact_max_dim
    if groups > 1:  # block-diagonal over groups: the norm is the largest block's norm, exactly
        co_g, ci_g = weight.shape[0] // groups, weight.shape[1]
        return max(
            conv2d_norm_bound(weight[g * co_g : (g + 1) * co_g], input_hw, stride, padding, 1, exact_max_dim,
                              None if start is None else start[:, g * ci_g : (g + 1) * ci_g])
            for g in range(groups)
        )
    if not math.isfinite(max_abs(weight.detach())):
        return math.inf
    c_in = weight.shape[1]
    d_in = c_in * input_hw[0] * input_hw[1]
    kh, kw = weight.shape[-2:]
    ho = conv_output_size(input_hw[0], kh, stride, padding[2], padding[3])
    wo = conv_output_size(input_hw[1], kw, stride, padding[0], padding[1])
    d_out = weight.shape[0] * ho * wo
    limit = exact_max_dim if min(input_hw) >= SMALL_MAP else 2 * exact_max_dim
    if min(d_in, d_out) <= limit and d_in * d_out <= EXACT_MAX_ENTRIES:
        return _explicit_conv_bound(weight, input_hw, stride, padding, start)
    return conv2d_fft_bound(weight, input_hw, stride, padding)
