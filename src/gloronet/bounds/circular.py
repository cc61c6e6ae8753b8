"""Provable bounds of convolutions through circular convolutions on a canvas (large maps).

Zero padding is a restriction of a circular convolution on a canvas ``N ≥ n + k − 1``, whose norm
is ``max_ω ‖K̂(ω)‖₂`` over the 2-D DFT of the kernel (Sedghi, Gupta & Long, "The Singular Values
of Convolutional Layers", ICLR 2019). The per-frequency Gram matrices
``K̂(ω)ᴴK̂(ω) = Σ_d C_d e^{−2πi⟨ω,d⟩/N}`` are the DFT of the *Gram kernel* ``C_d = Σ_v w_vᵀ w_{v+d}``
(Delattre, Barthélemy, Araujo & Allauzen, "Efficient Bound of Lipschitz Constant for
Convolutional Layers by Gram Iteration", ICML 2023), formed by ONE real matrix product.
"""
from __future__ import annotations

import concurrent.futures
import math
import threading

import torch
import torch.nn.functional as F

from ..rounding import gamma64, round_up, sqrt_up, up
from . import eigen
from .eigen import _top_eigenvalue, candidates_bound, cholesky_certificates, eigensolver_bound, hermitian_max_bound
from .float64 import as_float64, max_abs, pow2_scale
from .geometry import Padding
from .threads import _matmul, _workers, one_thread

TAU = 2.0**-10  # frequency batches: Cholesky at μ = θ(1 + τ), θ an exact top eigenvalue
CHUNK = 2**23  # complex entries of per-frequency Gram matrices formed at a time (128 MiB)


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


def gram_kernel(w: torch.Tensor) -> torch.Tensor:
    """The kernel ``C`` (2kh−1, 2kw−1, n, n) of ``AᵀA`` for the stride-1 kernel ``w`` (m, n, kh, kw):
    ``C[d] = Σ_v w_vᵀ w_{v+d}`` (``w_v`` = the m × n matrix of tap ``v``): the blocks of ``WᵀW``
    for the (m × taps·n) matrix ``W = [w_v]_v``, of which only the upper block triangle is
    multiplied out (``C[−d] = C[d]ᵀ``). Each entry sums ≤ ``m + taps`` products."""
    m, n, kh, kw = w.shape
    taps = kh * kw
    a = w.permute(0, 2, 3, 1).reshape(m, taps * n)  # columns: (tap, channel)
    c = w.new_zeros(2 * kh - 1, 2 * kw - 1, n, n)
    for t in range(taps):  # blocks w_tᵀ w_t' for t' ≥ t only (C[−d] = C[d]ᵀ): ~half the products
        row = _matmul(a[:, t * n : (t + 1) * n].mT, a[:, t * n :])
        i, j = divmod(t, kw)
        for t2 in range(t, taps):
            i2, j2 = divmod(t2, kw)
            block = row[:, (t2 - t) * n : (t2 - t + 1) * n]
            c[kh - 1 + i2 - i, kw - 1 + j2 - j] += block
            if t2 != t:
                c[kh - 1 + i - i2, kw - 1 + j - j2] += block.mT
    return c


def _twiddles(c: torch.Tensor, canvas, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``, ``sin`` (F, D) of ``2π⟨ω, d⟩/N`` for the frequencies ``freqs`` (flat indices into
    the ``N₁ × (N₂//2 + 1)`` half-spectrum) and the offsets ``d`` of the Gram kernel ``c``. The
    phase is reduced modulo ``N₁N₂`` in integers first (``|Δφ| ≤ 3u·2π``) and cos/sin are
    accurate to 2 ulp (CPU and CUDA), so each factor errs by ≤ 24u."""
    dh, dw = c.shape[:2]
    n1, n2 = canvas
    a, b = freqs // (n2 // 2 + 1), freqs % (n2 // 2 + 1)
    d1 = torch.arange(dh, device=c.device) - dh // 2
    d2 = torch.arange(dw, device=c.device) - dw // 2
    r = a[:, None, None] * d1[None, :, None] * n2 + b[:, None, None] * d2[None, None, :] * n1
    phase = torch.remainder(r, n1 * n2).reshape(len(freqs), -1).to(torch.float64) * (2 * math.pi / (n1 * n2))
    return torch.cos(phase), torch.sin(phase)


def frequency_grams(c: torch.Tensor, canvas, freqs: torch.Tensor) -> torch.Tensor:
    """``G(ω) = Σ_d C_d e^{−2πi⟨ω,d⟩/N} = K̂(ω)ᴴK̂(ω)`` (F, n, n) complex128 for the frequencies
    ``freqs`` (flat indices into the half-spectrum): two real matrix products."""
    cos, sin = _twiddles(c, canvas, freqs)
    n = c.shape[-1]
    flat = c.reshape(-1, n * n)
    return torch.complex(cos @ flat, -(sin @ flat)).view(len(freqs), n, n)


def _frequency_batch_bound(c: torch.Tensor, canvas, err: float) -> float:
    """``max_ω λ_max(G(ω))`` bound over the half-spectrum (``G(−ω) = conj G(ω)``: same spectrum).

    The frequency with the largest ``tr G(ω)`` gets the eigensolver; its top eigenvalue ``θ`` is
    the candidate (proved for that frequency by :func:`~gloronet.bounds.eigen.eigensolver_bound`).
    All others, in decreasing order of trace and in chunks that grow from 4 to 64 matrices (at
    most ``CHUNK`` entries), get a Cholesky certificate at ``μ = θ(1 + τ)``
    (:func:`~gloronet.bounds.eigen.cholesky_certificates`): ``μI − G(ω)`` is formed directly
    (negated twiddles: negation is exact, so it equals ``fl(μI − G̃)``). Those that break down get
    the eigensolver and raise ``θ``. A frequency whose maximum is below the candidate costs one
    Cholesky and one residual product; exact work happens only where the maximum may be. On the
    CPU the chunks go to the caller's number of threads of single-threaded workers
    (:func:`one_thread`).
    """
    n1, n2 = canvas
    n = c.shape[-1]
    freqs = torch.arange(n1 * (n2 // 2 + 1), device=c.device)
    if len(freqs) * n**3 <= eigen.EIGH_WORK:
        return eigensolver_bound(frequency_grams(c, canvas, freqs), err)
    cos, _ = _twiddles(c, canvas, freqs)
    trace = cos @ c.diagonal(dim1=-2, dim2=-1).sum(dim=-1).reshape(-1)  # tr C_{−d} = tr C_d: real
    order = torch.argsort(trace, descending=True)
    flat = c.reshape(-1, n * n)
    cap = max(1, min(64, CHUNK // (n * n)))
    chunks, i, size = [], 1, 4
    while i < len(order):
        size = min(size, cap)
        chunks.append(order[i : i + size])
        i, size = i + size, 2 * size
    first = frequency_grams(c, canvas, order[:1])
    state = {"theta": _top_eigenvalue(first)}
    first_bound = candidates_bound(first, torch.tensor([state["theta"]], dtype=torch.float64, device=c.device), err)
    lock = threading.Lock()

    def certify(todo) -> float:
        best = 0.0
        for idx in todo:
            with lock:
                mu = state["theta"] * (1 + TAU)
            cos, sin = _twiddles(c, canvas, idx)
            m = torch.complex(torch.neg(cos) @ flat, sin @ flat).view(len(idx), n, n)  # −G̃(ω)
            dmax = m.diagonal(dim1=-2, dim2=-1).real.abs().amax(dim=-1)
            m.diagonal(dim1=-2, dim2=-1).add_(mu)
            bounds = cholesky_certificates(m, torch.full_like(dmax, mu), dmax, err)
            del m
            ok = torch.isfinite(bounds)
            if bool(ok.any()):
                best = max(best, float(bounds[ok].max()))
            if not bool(ok.all()):
                gs = frequency_grams(c, canvas, idx[~ok])
                lam = torch.linalg.eigvalsh(gs)[..., -1]
                best = max(best, candidates_bound(gs, lam, err))
                with lock:
                    state["theta"] = max(state["theta"], float(lam.max()))
        return best

    workers = _workers(c.device)
    if workers > 1:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(certify, [chunks[w::workers] for w in range(workers)]))
    else:
        parts = [certify(chunks)]
    return max(first_bound, *parts)


@one_thread
def circular_conv_bound(w: torch.Tensor, canvas) -> float:
    """Provable upper bound of the circular stride-1 convolution with kernel ``w`` (m, n, kh, kw)
    on a canvas ``canvas = (N₁, N₂)`` (each ≥ the kernel): ``max_ω ‖K̂(ω)‖₂``.

    Gram matrices over the smaller side (the kernel transposed tap by tap gives ``K̂ᵀ``, whose
    Gram matrix ``conj(K̂K̂ᴴ)`` has the same spectrum). Allowance: ``C_d`` sums ≤ ``m + taps``
    products per entry and ``Σ_d ‖C_d‖_F ≤ (Σ_v ‖w_v‖_F)² ≤ taps·‖w‖_F²``; the DFT's ``D``-term
    sums and twiddles add ``(γ_D + 24u)`` of that, real and imaginary parts apart:
    ``‖ΔG(ω)‖₂ ≤ 4γ_{m+taps+D+64}·taps·‖w‖_F²``.
    """
    w = as_float64(w)
    if not math.isfinite(max_abs(w)):
        return math.inf
    scale = pow2_scale(w)
    w = w / scale
    if w.shape[1] > w.shape[0]:
        w = w.transpose(0, 1)
    m, n, kh, kw = w.shape
    c = gram_kernel(w)
    taps, offsets = kh * kw, c.shape[0] * c.shape[1]
    fro = float((w * w).sum()) * (1 + 2 * gamma64(w.numel()))
    err = up(4 * gamma64(m + taps + offsets + 64) * taps * fro)
    if taps == 1:  # K̂(ω) = w_0 at every frequency
        lam = hermitian_max_bound(c.view(1, n, n), err)
    else:
        lam = _frequency_batch_bound(c, canvas, err)
    return round_up(sqrt_up(lam) * scale)


@one_thread
def conv2d_fft_bound(weight, input_hw, stride: int, padding: Padding, groups: int = 1) -> float:
    """Provable upper bound of a zero-padded, strided conv via circular convolution.

    With padding and stride ``s`` the layer is ``Crop ∘ ValidConv_s ∘ ZeroPad``; ``ZeroPad`` and
    the extension to a multiple of ``s`` are isometric embeddings and ``Crop`` has norm ≤ 1.
    ``ValidConv_s`` equals a stride-1 valid conv (kernel ``k' = ⌈k/s⌉``) on the space-to-depth
    input of side ``m``; a valid conv is an exact crop of the circular conv on a canvas
    ``N ≥ m`` (no index wraps), whose singular values are those of the per-frequency matrices
    ``K̂(ω) = Σ_v w'[v] e^{-2πi⟨ω,v⟩/N}`` (Sedghi et al., ICLR 2019, Thm. 6):
    :func:`circular_conv_bound`. Grouped: the largest group's bound (block diagonal).
    """
    w = as_float64(weight)
    if not math.isfinite(max_abs(w)):
        return math.inf
    pl, pr, pt, pb = padding
    hp, wp = input_hw[0] + pt + pb, input_hw[1] + pl + pr
    nh, nw = -(-hp // stride), -(-wp // stride)
    co_g = w.shape[0] // groups
    bound = 0.0
    for g in range(groups):
        wg = _space_to_depth_kernel(w[g * co_g : (g + 1) * co_g], stride)
        bound = max(bound, circular_conv_bound(wg, (max(nh, wg.shape[-2]), max(nw, wg.shape[-1]))))
    return bound
