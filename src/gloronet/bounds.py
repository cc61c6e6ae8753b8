"""Operator-norm estimates (for training) and provable upper bounds (for certification).

Two kinds of numbers live here and must never be confused:

* **estimates** — warm-started power iteration. ``‖A v‖`` with ``‖v‖ = 1`` is a lower bound of
  ``‖A‖₂``; it converges to it from below, so it is NOT a bound. Differentiable, cheap, used in
  the training loss (Leino et al., "Globally-Robust Neural Networks", ICML 2021, §4).
* **bounds** — computed in float64 and inflated by an explicit rounding allowance so that the
  returned float is ≥ the exact operator norm of the float32 weights:

  - exact: the largest eigenvalue of the Gram matrix of the explicit operator (dense layers, and
    convolutions whose explicit matrix is small);
  - convolutions: zero padding is a restriction of a circular convolution on a canvas
    ``N ≥ n + k − 1``, whose norm is ``max_ω ‖K̂(ω)‖₂`` over the 2-D DFT of the kernel
    (Sedghi, Gupta & Long, "The Singular Values of Convolutional Layers", ICLR 2019).
    A stride-``s`` convolution is first rewritten *exactly* as a stride-1 convolution on the
    space-to-depth input (kernel ``⌈k/s⌉``, channels ``× s²``), since bounding it by its
    unstrided twin is sound but 1.5–2x loose.

Rounding allowance (``u = 2⁻⁵³``; Higham, *Accuracy and Stability of Numerical Algorithms*,
§3, §24): forming a Gram matrix from ``D``-term float64 inner products errs by at most
``γ_D ‖A‖_F² ≈ D·u·‖A‖_F²`` (``GRAM_SLACK = 1e-8`` covers ``D ≤ 9·10⁷``); a backward-stable
symmetric eigensolver errs by ``O(d·u)·‖G‖₂`` and a length-``N`` FFT by ``O(log N·u)`` times the
ℓ₁ norm of its input (``REL_SLACK = 1e-9`` covers both by orders of magnitude). The inflation
costs ~1e-5 relative at most, far below the tightness tolerance.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

REL_SLACK = 1e-9
GRAM_SLACK = 1e-8
EXACT_MAX_DIM = 2048
EXACT_MAX_ENTRIES = 40_000_000
SMALL_MAP = 14  # below this side the circular bound is several % loose (tests/test_bounds.py)

Padding = tuple[int, int, int, int]  # (left, right, top, bottom), the order of F.pad


# --------------------------------------------------------------------------- rounding helpers
def round_up(x: float) -> float:
    """The next float above ``x`` (so a correctly-rounded result becomes an upper bound)."""
    return math.nextafter(float(x), math.inf)


def mul_up(*factors: float) -> float:
    """Product of non-negative floats, rounded upwards after every multiplication."""
    out = 1.0
    for f in factors:
        if f < 0 or math.isnan(f):
            raise ValueError(f"bounds must be non-negative, got {f}")
        out = round_up(out * f)
    return out


def _inflate_sq(lam: float, scale_sq: float) -> float:
    """Upper bound of a squared norm from a computed eigenvalue ``lam`` with error ≤ slack·scale."""
    return round_up(max(lam, 0.0) + REL_SLACK * abs(lam) + GRAM_SLACK * scale_sq)


# --------------------------------------------------------------------------- geometry
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


# --------------------------------------------------------------------------- power iteration
def _fp32(t: torch.Tensor):
    """Lipschitz computations stay in full precision even inside an AMP autocast region."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def _normalize(v: torch.Tensor) -> torch.Tensor:
    return v / v.flatten().norm().clamp_min(1e-30)


def power_iteration_dense(weight: torch.Tensor, u: torch.Tensor, n_iter: int = 1):
    """Warm-started power iteration for a matrix ``W`` (out × in).

    Updates the left iterate ``u`` (out,) in place (no gradient) and returns the differentiable
    estimate ``σ = uᵀ W v`` with ``v = Wᵀu/‖Wᵀu‖`` — a lower bound of ``‖W‖₂`` (Miyato et al.,
    "Spectral Normalization for GANs", ICLR 2018).
    """
    with _fp32(weight), torch.no_grad():
        w = weight.detach().to(u.dtype)
        for _ in range(n_iter):
            v = _normalize(w.t() @ u)
            u.copy_(_normalize(w @ v))
        v = _normalize(w.t() @ u)
    with _fp32(weight):  # clone: the buffer is updated in place by later calls (autograd-safe)
        return torch.dot(u.to(weight.dtype).clone(), weight @ v.to(weight.dtype))


def power_iteration_conv2d(weight, v, stride: int, padding: Padding, groups: int = 1, n_iter: int = 1):
    """Warm-started power iteration for the convolution operator on inputs shaped like ``v``.

    ``v`` (1, C, H, W) is the right-singular-vector iterate, updated in place without gradient.
    Returns the differentiable estimate ``‖A v‖`` (``‖v‖ = 1``), a lower bound of ``‖A‖₂``.
    """
    hw = v.shape[-2:]
    with _fp32(weight), torch.no_grad():
        w = weight.detach().to(v.dtype)
        for _ in range(n_iter):
            u = _normalize(conv2d_apply(v, w, stride, padding, groups))
            v.copy_(_normalize(conv2d_adjoint(u, w, hw, stride, padding, groups)))
    with _fp32(weight):  # clone: the buffer is updated in place by later calls (autograd-safe)
        return conv2d_apply(v.to(weight.dtype).clone(), weight, stride, padding, groups).flatten().norm()


# --------------------------------------------------------------------------- exact bounds
def pow2_scales(peak: torch.Tensor) -> torch.Tensor:
    """Elementwise power of two ``s`` with ``peak / s ∈ [1, 2)`` (1 where ``peak`` is 0 or not finite).

    Dividing by ``s`` is exact, and keeps squares of tiny weights from underflowing to zero
    (which would make a "bound" smaller than the true norm).
    """
    ok = (peak > 0) & torch.isfinite(peak)
    exponent = torch.frexp(torch.where(ok, peak, torch.ones_like(peak))).exponent - 1
    return torch.where(ok, torch.ldexp(torch.ones_like(peak), exponent), torch.ones_like(peak))


def pow2_scale(t: torch.Tensor) -> float:
    """:func:`pow2_scales` of ``max|t|`` as a float (1.0 for an empty or all-zero ``t``)."""
    peak = t.abs().max() if t.numel() else torch.zeros((), dtype=torch.float64)
    return float(pow2_scales(peak.to(torch.float64)))


def gram_norm_bound(a: torch.Tensor) -> float:
    """Provable upper bound of ``‖A‖₂`` for an explicit (batched: max over) matrix, in float64.

    ``‖A‖₂² = λ_max(A Aᴴ)``, taking the Gram matrix of the smaller side; the eigenvalue is
    inflated by the rounding allowance (module docstring) before the square root. ``A`` is first
    divided by a power of two (exact) so that no product underflows.
    """
    a = a.to(torch.complex128 if a.is_complex() else torch.float64)
    scale = pow2_scale(a)
    if scale != 1.0:
        return round_up(gram_norm_bound(a / scale) * scale)
    if a.shape[-2] > a.shape[-1]:
        a = a.mT
    gram = a @ a.mH
    lam = torch.linalg.eigvalsh(gram)[..., -1]
    fro_sq = (a.abs() ** 2).sum(dim=(-2, -1))
    bound_sq = max(_inflate_sq(l, f) for l, f in zip(lam.flatten().tolist(), fro_sq.flatten().tolist()))
    if not math.isfinite(bound_sq):
        return math.inf
    return round_up(round_up(math.sqrt(bound_sq)) * (1 + REL_SLACK))


def dense_norm_bound(weight: torch.Tensor) -> float:
    """Provable upper bound of the spectral norm of a dense weight (exact up to rounding)."""
    if not torch.isfinite(weight).all():
        return math.inf
    return gram_norm_bound(weight.detach().reshape(weight.shape[0], -1).cpu())


def conv2d_explicit_matrix(weight, input_hw, stride: int, padding: Padding, groups: int = 1):
    """The convolution as an explicit float64 matrix (d_out × d_in), built by feeding impulses.

    Impulses are fed from the smaller side (the operator or its adjoint); every entry is a single
    weight, so the matrix is exact.
    """
    w = weight.detach().to(torch.float64).cpu()
    c_in = w.shape[1] * groups
    d_in = c_in * input_hw[0] * input_hw[1]
    probe = conv2d_apply(torch.zeros(1, c_in, *input_hw, dtype=torch.float64), w, stride, padding, groups)
    out_shape = probe.shape[1:]
    d_out = probe.numel()
    if d_in <= d_out:
        eye = torch.eye(d_in, dtype=torch.float64).view(d_in, c_in, *input_hw)
        return conv2d_apply(eye, w, stride, padding, groups).reshape(d_in, d_out).t()
    eye = torch.eye(d_out, dtype=torch.float64).view(d_out, *out_shape)
    return conv2d_adjoint(eye, w, input_hw, stride, padding, groups).reshape(d_out, d_in)


def _space_to_depth_kernel(weight: torch.Tensor, stride: int) -> torch.Tensor:
    """Kernel of the stride-1 conv equivalent to a stride-``s`` one on space-to-depth input.

    ``y[i] = Σ_t w[t] x[s·i + t]``; with ``t = s·v + a``, ``x'[(c,a)][m] = x[c][s·m + a]`` and
    ``w'[o,(c,a)][v] = w[o,c][s·v + a]`` this is ``y[i] = Σ_v w'[v] x'[i + v]`` (zero taps pad
    the kernel to a multiple of ``s``).
    """
    co, ci, kh, kw = weight.shape
    kh2, kw2 = -(-kh // stride), -(-kw // stride)
    w = F.pad(weight, (0, kw2 * stride - kw, 0, kh2 * stride - kh))
    w = w.view(co, ci, kh2, stride, kw2, stride).permute(0, 1, 3, 5, 2, 4)
    return w.reshape(co, ci * stride * stride, kh2, kw2)


def conv2d_fft_bound(weight, input_hw, stride: int, padding: Padding, groups: int = 1) -> float:
    """Provable upper bound of a zero-padded, strided conv via circular convolution.

    With padding and stride ``s`` the layer is ``Crop ∘ ValidConv_s ∘ ZeroPad``; ``ZeroPad`` and
    the extension to a multiple of ``s`` are isometric embeddings and ``Crop`` has norm ≤ 1.
    ``ValidConv_s`` equals a stride-1 valid conv (kernel ``k' = ⌈k/s⌉``) on the space-to-depth
    input of side ``m``; a valid conv is an exact crop of the circular conv on a canvas
    ``N ≥ m`` (no index wraps), whose singular values are those of the per-frequency matrices
    ``K̂(ω) = Σ_v w'[v] e^{-2πi⟨ω,v⟩/N}`` (Sedghi et al., ICLR 2019, Thm. 6).
    """
    w = weight.detach().to(torch.float64).cpu()
    if not torch.isfinite(w).all():
        return math.inf
    pl, pr, pt, pb = padding
    hp, wp = input_hw[0] + pt + pb, input_hw[1] + pl + pr
    nh, nw = -(-hp // stride), -(-wp // stride)
    co_g = w.shape[0] // groups
    bound = 0.0
    for g in range(groups):
        wg = _space_to_depth_kernel(w[g * co_g : (g + 1) * co_g], stride)
        nh_g, nw_g = max(nh, wg.shape[-2]), max(nw, wg.shape[-1])
        spec = torch.fft.rfft2(wg, s=(nh_g, nw_g))  # (co, ci', nh, nw//2+1); ω and -ω: same norm
        mats = spec.permute(2, 3, 0, 1)
        sigma = gram_norm_bound(mats)
        # FFT rounding: ‖ΔK̂(ω)‖ ≤ c·log₂N·u·√taps·‖w‖_F (Higham §24); REL_SLACK covers it.
        taps = wg.shape[-2] * wg.shape[-1]
        sigma = round_up(sigma + REL_SLACK * math.sqrt(taps) * float(wg.norm()))
        bound = max(bound, sigma)
    return bound


def conv2d_norm_bound(
    weight,
    input_hw,
    stride: int,
    padding: Padding,
    groups: int = 1,
    exact_max_dim: int = EXACT_MAX_DIM,
) -> float:
    """Provable, tight upper bound of a conv layer's operator norm at its actual input size.

    Grouped convolutions are bounded group by group (block-diagonal operator). Exact (explicit
    matrix) when ``min(d_in, d_out) ≤ exact_max_dim`` — twice that on maps smaller than 14 px,
    where the circular bound is loosest — and the matrix fits in memory; otherwise
    the circular/FFT bound (measured on 14–16 px maps: ≤ 1% loose for k ≤ 2, ~1.5% for k = 3,
    up to ~5–10% for k = 5; tests/test_bounds.py). Both are sound; the smaller is returned.
    """
    if groups > 1:  # block-diagonal over groups: the norm is the largest block's norm, exactly
        co_g = weight.shape[0] // groups
        return max(conv2d_norm_bound(weight[g * co_g : (g + 1) * co_g], input_hw, stride, padding, 1, exact_max_dim)
                   for g in range(groups))
    c_in = weight.shape[1]
    d_in = c_in * input_hw[0] * input_hw[1]
    kh, kw = weight.shape[-2:]
    ho = conv_output_size(input_hw[0], kh, stride, padding[2], padding[3])
    wo = conv_output_size(input_hw[1], kw, stride, padding[0], padding[1])
    d_out = weight.shape[0] * ho * wo
    fft = conv2d_fft_bound(weight, input_hw, stride, padding)
    limit = exact_max_dim if min(input_hw) >= SMALL_MAP else 2 * exact_max_dim
    if min(d_in, d_out) <= limit and d_in * d_out <= EXACT_MAX_ENTRIES and math.isfinite(fft):
        exact = gram_norm_bound(conv2d_explicit_matrix(weight, input_hw, stride, padding))
        return min(fft, exact)
    return fft


# --------------------------------------------------------------------------- |W| norms (fp errors)
def nonneg_norm_bound(m: torch.Tensor, iters: int = 30) -> float:
    """Provable upper bound of ``‖M‖₂`` for an entrywise non-negative matrix ``M`` (m × n).

    Collatz–Wielandt: for ``G = MᵀM ≥ 0`` and any ``v > 0``, ``λ_max(G) ≤ max_i (Gv)_i / v_i``
    (Horn & Johnson, *Matrix Analysis*, Cor. 8.1.31); power iteration from ``v = 1`` tightens it.
    ``Gv`` is a sum of non-negative products, so its float64 value errs by at most ``γ_{m+n}``
    relative; that and the division's rounding are covered by the inflation below. ``M`` is
    first scaled by a power of two (exact) against underflow. O(iters·m·n), no eigensolver.
    """
    a = m.detach().to(torch.float64).cpu().reshape(m.shape[0], -1)
    if (a < 0).any():
        raise ValueError("nonneg_norm_bound needs an entrywise non-negative matrix")
    if not torch.isfinite(a).all():
        return math.inf
    if a.numel() == 0 or not (a > 0).any():
        return 0.0
    scale = pow2_scale(a)
    a = a / scale
    v = torch.ones(a.shape[1], dtype=torch.float64)
    best = math.inf
    for _ in range(iters):
        g = a.t() @ (a @ v)
        best = min(best, float((g / v).max()))
        v = (g / g.max()).clamp_min(1e-150)  # stays strictly positive
    rel = 2.0 ** -52 * (a.shape[0] + a.shape[1] + 8)
    return round_up(round_up(math.sqrt(round_up(best * (1 + rel)))) * scale)


def abs_conv2d_norm_bound(weight: torch.Tensor, stride: int, groups: int = 1) -> float:
    """Provable upper bound of ``‖|A|‖₂`` for a zero-padded convolution ``A`` (any input size).

    Every entry of ``A``'s matrix is one kernel entry or 0, so ``|A|`` is the same convolution
    with kernel ``|w|``. Rewritten at stride 1 on the space-to-depth input (kernel ``|w'|``,
    :func:`_space_to_depth_kernel`), it is a restriction of the circular convolution, whose norm
    is ``max_ω ‖K̂(ω)‖₂``; for a non-negative kernel ``|K̂(ω)| ≤ K̂(0)`` entrywise, and the
    spectral norm is monotone on non-negative matrices, so ``‖|A|‖₂ ≤ ‖Σ_v |w'[:, :, v]|‖₂``.
    Grouped convolutions are block diagonal: the largest group's bound.
    """
    w = weight.detach().to(torch.float64).cpu().abs()
    co_g = w.shape[0] // groups
    return max(
        gram_norm_bound(_space_to_depth_kernel(w[g * co_g : (g + 1) * co_g], stride).sum(dim=(-2, -1)))
        for g in range(groups)
    )
