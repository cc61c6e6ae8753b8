"""Provable bounds of convolutions through the explicit Gram matrix of their operator (small maps)."""
from __future__ import annotations

import torch

from ..rounding import gamma64, round_up, sqrt_up, up
from .eigen import hermitian_max_bound
from .float64 import as_float64, pow2_scale
from .geometry import Padding, conv2d_apply, conv_output_size
from .threads import one_thread


@one_thread
def conv2d_explicit_gram(weight: torch.Tensor, input_hw, stride: int, padding: Padding) -> tuple[torch.Tensor, float]:
    """``(G, err)``: the Gram matrix of the smaller side of a zero-padded, strided convolution
    ``A`` — ``AᵀA`` if ``d_in ≤ d_out``, else ``AAᵀ`` — in float64 on the weight's device, rows
    ordered (position, channel), and ``err ≥ ‖G − G_exact‖₂``.

    Output side: ``(AAᵀ)[(p,o),(p+Δ,o')] = Σ_t Q[t,o; t−sΔ,o']`` over the taps ``t`` whose input
    pixel ``sp + t − pad`` is real (not padding) and with ``t − sΔ`` a tap too, where
    ``Q[t,t'] = w_t w_{t'}ᵀ`` (all tap pairs: one matrix product). Input side likewise with
    ``R[t,t'] = w_tᵀ w_{t'}`` over the taps ``t`` through which an output pixel sees ``q``. ``G`` is
    block banded: one small product per offset ``Δ`` (0/1 masks times tap pairs). Each entry sums
    at most ``taps`` products of ``c``-term inner products (``c`` = the channels summed over), so
    ``|ΔG| ≤ γ_{c+taps}|A|ᵀ|A|`` and ``‖ΔG‖₂ ≤ γ_{c+taps}‖|A|‖₁‖|A|‖_∞`` with
    ``‖|A|‖_∞ ≤ max_o Σ_{c,t}|w|`` and ``‖|A|‖₁ ≤ max_c Σ_{o,t}|w|``. No convolution kernel is trusted.
    """
    w = as_float64(weight)
    c_out, c_in, kh, kw = w.shape
    h, wd = input_hw
    pl, pr, pt, pb = padding
    ho, wo = conv_output_size(h, kh, stride, pt, pb), conv_output_size(wd, kw, stride, pl, pr)
    dev = w.device
    output_side = c_out * ho * wo < c_in * h * wd
    if output_side:  # Q[t, t'] = w_t w_t'ᵀ, rows p over the output pixels
        mats, c, (sh, sw), step = w.permute(2, 3, 0, 1).reshape(kh * kw * c_out, c_in), c_out, (ho, wo), stride
    else:  # R[t, t'] = w_tᵀ w_t', rows q over the input pixels
        mats, c, (sh, sw), step = w.permute(2, 3, 1, 0).reshape(kh * kw * c_in, c_out), c_in, (h, wd), 1
    pairs = (mats @ mats.mT).view(kh, kw, c, kh, kw, c).permute(0, 1, 3, 4, 2, 5)  # [t, t', ·, ·]
    yy = torch.arange(sh, device=dev)[:, None, None, None]
    xx = torch.arange(sw, device=dev)[None, :, None, None]
    ty = torch.arange(kh, device=dev)[None, None, :, None]
    tx = torch.arange(kw, device=dev)[None, None, None, :]
    if output_side:  # the input pixel of tap t at output pixel p is real
        qy, qx = stride * yy + ty - pt, stride * xx + tx - pl
        mask = (qy >= 0) & (qy < h) & (qx >= 0) & (qx < wd)
    else:  # some output pixel sees input pixel q through tap t
        sy, sx = yy + pt - ty, xx + pl - tx
        mask = (sy % stride == 0) & (sx % stride == 0) & (sy >= 0) & (sy < stride * ho) & (sx >= 0) & (sx < stride * wo)
    mask = mask.to(torch.float64)  # (sh, sw, kh, kw)
    g = w.new_zeros(sh, sw, c, sh, sw, c)
    _fill_banded_gram(g, pairs, mask, (kh, kw), step, output_side)
    n = sh * sw * c
    a = w.abs()
    row, col = float(a.sum(dim=(1, 2, 3)).max()), float(a.sum(dim=(0, 2, 3)).max())
    depth = (c_in if output_side else c_out) + kh * kw + 64
    err = up(gamma64(depth) * row * col * (1 + 2 * gamma64(w.numel())))
    return g.view(n, n), err


def _fill_banded_gram(g, pairs, mask, kernel, step: int, output_side: bool) -> None:
    """The blocks of :func:`conv2d_explicit_gram`, one matrix product per position offset ``Δ``."""
    sh, sw, c = g.shape[:3]
    kh, kw = kernel
    dev = g.device
    ry, rx = (kh - 1) // step, (kw - 1) // step
    for dy in range(-ry, ry + 1):
        for dx in range(-rx, rx + 1):
            # partner tap t' = t − sΔ (output side) or t + Δ (input side)
            oy, ox = (-step * dy, -step * dx) if output_side else (dy, dx)
            t_lo_y, t_hi_y = max(0, -oy), min(kh, kh - oy)
            t_lo_x, t_hi_x = max(0, -ox), min(kw, kw - ox)
            if t_lo_y >= t_hi_y or t_lo_x >= t_hi_x:
                continue
            tp = pairs[t_lo_y:t_hi_y, t_lo_x:t_hi_x]  # (ny, nx, kh, kw, c, c) -> pick t' = t + o
            ny, nx = t_hi_y - t_lo_y, t_hi_x - t_lo_x
            iy = torch.arange(ny, device=dev)
            ix = torch.arange(nx, device=dev)
            sel = tp[iy[:, None], ix[None, :], (iy + t_lo_y + oy)[:, None], (ix + t_lo_x + ox)[None, :]]
            m = mask[:, :, t_lo_y:t_hi_y, t_lo_x:t_hi_x].reshape(sh * sw, ny * nx)
            blocks = (m @ sel.reshape(ny * nx, c * c)).view(sh, sw, c, c)
            y0, y1 = max(0, -dy), min(sh, sh - dy)
            x0, x1 = max(0, -dx), min(sw, sw - dx)
            if y0 < y1 and x0 < x1:  # block (p, p + Δ) for every p with p + Δ in range
                py = torch.arange(y0, y1, device=dev)[:, None]
                px = torch.arange(x0, x1, device=dev)[None, :]
                g[py, px, :, py + dy, px + dx, :] = blocks[y0:y1, x0:x1]


def _explicit_conv_bound(weight, input_hw, stride: int, padding: Padding, start=None) -> float:
    """:func:`hermitian_max_bound` of :func:`conv2d_explicit_gram` (input-shaped ``start``)."""
    w = as_float64(weight)
    scale = pow2_scale(w)
    w = w / scale
    g, err = conv2d_explicit_gram(w, input_hw, stride, padding)
    if start is not None:
        start = start.detach().to(w).reshape(1, w.shape[1], *input_hw)
        if g.shape[0] != start.numel():  # Gram of the output side: the image of the input iterate
            start = conv2d_apply(start, w, stride, padding)
        start = start.flatten(2).transpose(1, 2).reshape(1, -1)  # (position, channel) order
    return round_up(sqrt_up(hermitian_max_bound(g, err, start)) * scale)
