"""Operator-norm estimates (for training) and provable upper bounds (for certification).

Two kinds of numbers live here and must never be confused:

* **estimates** — warm-started power iteration, and Lanczos. ``‖A v‖`` with ``‖v‖ = 1`` is a lower
  bound of ``‖A‖₂``; it converges to it from below, so it is NOT a bound. Differentiable, cheap,
  used in the training loss (Leino et al., "Globally-Robust Neural Networks", ICML 2021, §4).
* **bounds** — computed in float64 *on the device the weights live on* (the CPU for ``mps``,
  which has no float64), each with an explicit rounding allowance, so that the returned float is
  ≥ the exact operator norm of the weights. A bound is ``√λ_max`` of a Hermitian PSD Gram matrix:

  - dense layers, and convolutions whose explicit operator is small: ``G = AᵀA`` (or ``AAᵀ``) of
    the explicit operator (:func:`gram_norm_bound`, :func:`conv2d_explicit_gram`);
  - other convolutions: zero padding is a restriction of a circular convolution on a canvas
    ``N ≥ n + k − 1``, whose norm is ``max_ω ‖K̂(ω)‖₂`` over the 2-D DFT of the kernel (Sedghi,
    Gupta & Long, "The Singular Values of Convolutional Layers", ICLR 2019). The per-frequency
    Gram matrices ``K̂(ω)ᴴK̂(ω) = Σ_d C_d e^{−2πi⟨ω,d⟩/N}`` are the DFT of the *Gram kernel*
    ``C_d = Σ_v w_vᵀ w_{v+d}`` (the kernel of ``AᵀA``, as in the Gram iteration of Delattre, Barthélemy,
    Araujo & Allauzen, "Efficient Bound of Lipschitz Constant for Convolutional Layers by Gram
    Iteration", ICML 2023), formed by ONE real matrix product instead of one complex product per
    frequency. A stride-``s`` convolution is first rewritten *exactly* as a stride-1 convolution
    on the space-to-depth input (kernel ``⌈k/s⌉``, channels ``× s²``), since bounding it by its
    unstrided twin is sound but 1.5–2x loose.

How ``λ_max`` is bounded (:func:`hermitian_max_bound`): small problems by a symmetric
eigensolver; otherwise a candidate ``μ = θ(1 + τ)`` is *proved* ≥ ``λ_max`` by a floating-point
Cholesky factorisation of ``μI − G`` that runs to completion (Rump, "Verification of positive
definiteness", BIT 2006): with ``RᴴR = M + ΔM``, ``|ΔM| ≤ γ̃|Rᴴ||R|`` (Higham, *Accuracy and
Stability of Numerical Algorithms*, Thm 10.3, for any order of the inner products; ``γ̃ =
γ_{8(n+2)}`` also covers complex arithmetic, Higham Lemma 3.5), so ``λ_min(M) ≥ −2nγ̃·max_i M_ii``.
Cholesky costs ``n³/3`` flops at nearly matrix-product speed, an eigensolver ~5x the time
(complex, n = 512, measured). The estimate ``θ`` (Lanczos, or the exact top eigenvalue at the frequency whose Gram matrix has the
largest trace) only chooses ``μ`` and where exact work is done; a matrix whose factorisation
breaks down goes to the eigensolver. Every returned number comes from one of the two proofs.

Rounding allowance (``u = 2⁻⁵³``; Higham §3, §24). Weights are first divided by a power of two
(exact) so that the largest entry is in ``[1, 2)``: no square underflows to a "bound" below the
true norm, nothing overflows, and the few products that may still underflow (float64 models only)
err by far less than the ``64u``-per-term margin kept below. Forming a Gram matrix by ``D``-term
inner products errs by ``|ΔG| ≤ γ_D|A|ᵀ|A|``, so ``‖ΔG‖₂ ≤ γ_D‖|A|‖₂²``, with ``‖|A|‖₂²``
bounded by ``‖A‖_F²`` or ``‖|A|‖₁‖|A|‖_∞``; the DFT of the Gram kernel adds ``≤ 24u`` per
twiddle factor. An eigensolver errs by ``O(n·u)·‖G‖₂`` (``REL_SLACK = 1e-9`` covers it by orders
of magnitude); the Cholesky certificate above is exact arithmetic on the computed matrix. All of
this costs < 1e-8 relative; the candidate margin costs ``(1 + τ)^½ − 1``: ≤ 5e-4 on a frequency
batch (``TAU``), ~5e-7 on a single matrix (``TAUS[0]``, after refinement).

Kernels assumed (the same on the CPU and on a GPU): IEEE float64 (no TF32 mode exists for it);
matrix products are sums of products in any order or blocking (no Strassen-like algorithms);
Cholesky (LAPACK / cuSOLVER ``potrf``) computes each ``r_ij`` by that recurrence with any order
of the inner products and substitution-based triangular solves; cos/sin within 2 ulp.
"""
from __future__ import annotations

import concurrent.futures
import functools
import math
import threading
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from . import fp

REL_SLACK = 1e-9
GRAM_SLACK = 1e-8  # a D-term float64 sum of squares errs by ≤ γ_D ≤ GRAM_SLACK for D ≤ 9·10⁷
EXACT_MAX_DIM = 2048
EXACT_MAX_ENTRIES = 40_000_000
SMALL_MAP = 14  # below this side the circular bound is several % loose (tests/test_bounds.py)
U = 2.0**-53
EIGH_WORK = 2**24  # batch·n³ up to which the eigensolver is used outright (exact, and cheap)
TAU = 2.0**-10  # frequency batches: Cholesky at μ = θ(1 + τ), θ an exact top eigenvalue
TAUS = (2.0**-20, 2.0**-15, 2.0**-10, 2.0**-5)  # single matrices: tried in turn from a Lanczos estimate
LANCZOS_STEPS = 64
CHUNK = 2**23  # complex entries of per-frequency Gram matrices formed at a time (128 MiB)

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


def _gamma(n: int) -> float:
    """``γ_n`` in float64, rounded up."""
    return fp.gamma(int(n), torch.float64)


def _sqrt_up(x: float) -> float:
    return round_up(math.sqrt(x)) if math.isfinite(x) else math.inf


def compute_device(t: torch.Tensor) -> torch.device:
    """Where bounds of ``t`` are computed: its own device (MPS has no float64: the CPU there)."""
    return torch.device("cpu") if t.device.type == "mps" else t.device


def as_float64(t: torch.Tensor) -> torch.Tensor:
    """A detached float64 (complex128) copy of ``t`` on :func:`compute_device` (exact for
    float32/float64 inputs)."""
    dtype = torch.complex128 if t.is_complex() else torch.float64
    return t.detach().to(device=compute_device(t), dtype=dtype)


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


def lanczos_max(apply: Callable, v0: torch.Tensor, steps: int = LANCZOS_STEPS, tol: float = 2.0**-24) -> torch.Tensor:
    """Lanczos estimates (B,) float64 of ``λ_max`` of ``B`` Hermitian operators at once.

    ``apply`` maps (B, d) to (B, d); ``v0`` (B, d) holds the start vectors. Full
    re-orthogonalisation (twice, Parlett); an operator whose Krylov residual falls to rounding level
    (an invariant subspace in working precision, e.g. a near-identity Gram matrix) stops iterating;
    all stop when the largest Ritz values move by less than ``tol`` (relative) over 4 steps. In
    exact arithmetic every Ritz value lies in the spectrum's hull, so these are estimates from
    below: they choose candidates, they never bound anything.
    """
    b, d = v0.shape
    steps = max(1, min(steps, d))
    floor = 64 * torch.finfo(v0.dtype).eps
    basis = v0.new_zeros(steps, b, d)
    alpha = torch.zeros(b, steps, dtype=torch.float64, device=v0.device)
    beta = torch.zeros(b, steps, dtype=torch.float64, device=v0.device)
    v = v0 / v0.norm(dim=1, keepdim=True).clamp_min(1e-30)
    live = torch.ones(b, dtype=torch.bool, device=v0.device)
    prev = None
    for j in range(steps):
        basis[j] = v
        w = apply(v)
        alpha[:, j] = (v.conj() * w).sum(dim=1).real.to(torch.float64)
        for _ in range(2):
            w = w - torch.einsum("jb,jbd->bd", torch.einsum("jbd,bd->jb", basis[: j + 1].conj(), w), basis[: j + 1])
        nb = w.norm(dim=1).to(torch.float64)
        live &= nb > floor * alpha[:, : j + 1].abs().amax(dim=1)
        done = j + 1 == steps or not bool(live.any())
        if done or (j + 1) % 4 == 0:
            t = torch.diag_embed(alpha[:, : j + 1]) + torch.diag_embed(beta[:, :j], 1) + torch.diag_embed(beta[:, :j], -1)
            theta = torch.linalg.eigvalsh(t)[:, -1]
            if done or (prev is not None and bool(((theta - prev).abs() <= tol * theta.abs()).all())):
                return theta
            prev = theta
        beta[:, j] = torch.where(live, nb, torch.zeros_like(nb))
        v = torch.where(live[:, None], w / nb.clamp_min(1e-300).to(w.dtype)[:, None], torch.zeros_like(w))
    raise AssertionError("unreachable")


def _random_like(shape, t: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Reproducible standard normal numbers on ``t``'s device, in ``t``'s dtype."""
    gen = torch.Generator(device=t.device).manual_seed(seed)
    return torch.randn(shape, generator=gen, device=t.device, dtype=t.dtype)


# --------------------------------------------------------------------------- λ_max, proved
def pow2_scales(peak: torch.Tensor) -> torch.Tensor:
    """Elementwise power of two ``s`` with ``peak / s ∈ [1, 2)`` (1 where ``peak`` is 0 or not finite).

    Dividing by ``s`` is exact, and keeps squares of tiny weights from underflowing to zero
    (which would make a "bound" smaller than the true norm).
    """
    ok = (peak > 0) & torch.isfinite(peak)
    exponent = torch.frexp(torch.where(ok, peak, torch.ones_like(peak))).exponent - 1
    return torch.where(ok, torch.ldexp(torch.ones_like(peak), exponent), torch.ones_like(peak))


def max_abs(t: torch.Tensor) -> float:
    """``max|t|`` as a float (0 for an empty ``t``; NaN or inf if ``t`` holds one), in one pass."""
    return float(torch.linalg.vector_norm(t, ord=math.inf)) if t.numel() else 0.0


def pow2_scale(t: torch.Tensor) -> float:
    """:func:`pow2_scales` of ``max|t|`` as a float (1.0 for an empty, all-zero or non-finite ``t``)."""
    top = max_abs(t)
    return math.ldexp(1.0, math.frexp(top)[1] - 1) if top > 0 and math.isfinite(top) else 1.0


_threads = threading.local()  # the caller's intra-op thread count while a bound runs on one


def one_thread(fn):
    """Run a bound computation with one CPU intra-op thread (``torch.get_num_threads()`` is
    restored after). Bounds are many small operations and LAPACK calls: on a busy 2-core machine
    two threads made them 2x (Cholesky, small products) to 200x (eigensolver) slower, one thread
    never. The caller's thread count is kept for :func:`_matmul` (big products) and for
    side-by-side workers (:func:`_frequency_batch_bound`). GPU kernels are unaffected."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        threads = torch.get_num_threads()
        if threads == 1 or getattr(_threads, "outer", 0):
            return fn(*args, **kwargs)
        _threads.outer = threads
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
            _threads.outer = 0

    return run


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b``; a big product on the CPU inside :func:`one_thread` gets the caller's threads
    back (matrix products were measured no slower with two threads on a busy machine)."""
    threads = getattr(_threads, "outer", 0)
    if a.device.type != "cpu" or threads <= 1 or a.shape[-2] * a.shape[-1] * b.shape[-1] < 2**26:
        return a @ b
    torch.set_num_threads(threads)
    try:
        return a @ b
    finally:
        torch.set_num_threads(1)


def _workers(device: torch.device) -> int:
    """How many single-threaded workers may run side by side (the caller's CPU threads)."""
    return max(1, getattr(_threads, "outer", 0)) if device.type == "cpu" else 1


@one_thread
def _top_eigenvalue(g: torch.Tensor) -> float:
    """``max_b λ_max(g_b)`` from the symmetric eigensolver (lower triangles are read)."""
    return float(torch.linalg.eigvalsh(g)[..., -1].max())


def _eig_bound(lam: float, err: float) -> float:
    """``λ_max(H)`` from the eigensolver's top eigenvalue ``lam`` of the computed matrix."""
    return fp.up(lam + REL_SLACK * abs(lam) + err)


def _cholesky_passes(g: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the floating-point Cholesky factorisation of ``μ_b I − g_b`` ran to completion."""
    return torch.linalg.cholesky_ex(_shifted(g, mu)).info == 0


def _cholesky_bound(mu: float, n: int, dmax: float, err: float) -> float:
    """``λ_max(H)`` once Cholesky of ``M = fl(μI − G)`` (n × n) ran to completion.

    ``M = μI − G + Δ_D`` (the diagonal rounds once: ``|Δ_D| ≤ u(μ + dmax)``, ``dmax = max|G_ii|``);
    ``RᴴR = M + ΔM`` with ``‖ΔM‖₂ ≤ γ̃‖R‖_F² ≤ γ̃/(1 − γ̃)·tr M`` and ``tr M ≤ n(μ + dmax)(1 + u)``
    (every pivot, hence every ``M_ii``, is positive). So ``μI − G ⪰ −(μ + dmax)(2nγ̃ + u)·I`` and
    ``λ_max(H) ≤ μ + (μ + dmax)(2nγ̃ + u) + err``.
    """
    return fp.up(mu + (mu + dmax) * (2 * n * _gamma(8 * (n + 2)) + U) + err)


@one_thread
def hermitian_max_bound(g: torch.Tensor, err: float, start: torch.Tensor | None = None) -> float:
    """Provable upper bound of ``max_b λ_max(H_b)`` for Hermitian ``H_b`` given finite float64
    (complex128) matrices ``g`` (…, n, n) with ``‖g_b − H_b‖₂ ≤ err`` (lower triangles are read).

    Eigensolver for ``batch·n³ ≤ EIGH_WORK``. Otherwise Lanczos estimates ``θ_b`` (from ``start``
    (…, n) if given, else a fixed random vector), raised to ``max_i g_ii`` (a lower bound too), and
    Cholesky certificates at ``θ_b(1 + τ)`` for ``τ`` in ``TAUS`` (:func:`_cholesky_bound`). When
    only a larger ``τ`` passes, the factor ``L`` of ``μI − G`` it produced refines the estimate:
    shift-and-invert Lanczos (``λ_max(G) = μ − 1/λ_max((μI − G)⁻¹)``, two triangular solves per
    step, converging fast because ``μ`` sits just above ``λ_max``), then one more certificate at
    the refined ``θ(1 + τ₀)``. What no certificate covers goes to the eigensolver.
    """
    n = g.shape[-1]
    g = g.reshape(-1, n, n)
    if g.numel() == 0:
        return fp.up(err)
    if g.shape[0] * n**3 <= EIGH_WORK:
        return _eig_bound(_top_eigenvalue(g), err)
    diag = g.diagonal(dim1=-2, dim2=-1).real
    dmax = float(diag.abs().max())
    v0 = _random_like((g.shape[0], n), g)
    if start is not None:
        s = start.detach().reshape(-1, n).to(g)
        v0 = s / s.norm(dim=1, keepdim=True).clamp_min(1e-30) + 1e-3 * v0 / math.sqrt(n)
    theta = lanczos_max(lambda v: (g @ v.unsqueeze(-1)).squeeze(-1), v0)
    theta = torch.maximum(theta.to(torch.float64), diag.amax(dim=1))
    best, pending = 0.0, torch.arange(g.shape[0], device=g.device)
    for tau in TAUS:
        mu = theta[pending] * (1 + tau)
        gp = g[pending]
        factor, info = torch.linalg.cholesky_ex(_shifted(gp, mu))
        ok = info == 0
        if bool(ok.any()):
            mu_ok = mu[ok]
            if tau != TAUS[0]:  # refine from the factor, certify again at the tight margin
                lf = factor[ok]
                nu = lanczos_max(lambda v: torch.cholesky_solve(v.unsqueeze(-1), lf).squeeze(-1),
                                 _random_like((len(mu_ok), n), lf), steps=24, tol=2.0**-30)
                refined = torch.where(nu > 0, mu_ok - 1 / nu, mu_ok) * (1 + TAUS[0])
                tighter = (refined < mu_ok) & (torch.linalg.cholesky_ex(_shifted(gp[ok], refined)).info == 0)
                mu_ok = torch.where(tighter, refined, mu_ok)
            best = max(best, _cholesky_bound(float(mu_ok.max()), n, dmax, err))
        pending = pending[~ok]
        if pending.numel() == 0:
            return best
    return max(best, _eig_bound(_top_eigenvalue(g[pending]), err))


def _shifted(g: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """``fl(μ_b I − g_b)``: off-diagonal entries negated (exact), the diagonal rounded once."""
    m = torch.neg(g)
    m.diagonal(dim1=-2, dim2=-1).add_(mu.to(m.dtype)[:, None])
    return m


# --------------------------------------------------------------------------- explicit operators
@one_thread
def gram_norm_bound(a: torch.Tensor, start: torch.Tensor | None = None) -> float:
    """Provable upper bound of ``‖A‖₂`` for an explicit (batched: max over) matrix, in float64.

    ``‖A‖₂² = λ_max(A Aᴴ)``, taking the Gram matrix of the smaller side; ``A`` is first divided
    by a power of two (exact). Forming ``AAᴴ`` with ``q``-term inner products errs by
    ``≤ γ_q ‖A‖_F²`` in norm (``2γ_{q+64}`` also covers complex arithmetic and underflow).
    ``start`` (…, rows of ``A``): an approximate top left singular vector (a training iterate).
    """
    a = as_float64(a)
    if a.numel() == 0:
        return 0.0
    if not math.isfinite(max_abs(a)):
        return math.inf
    scale = pow2_scale(a)
    a = a / scale
    if a.shape[-2] > a.shape[-1]:
        if start is not None:  # left vectors of Aᵀ = Aᴴ-images of the left vectors of A
            start = (a.mH @ start.to(a).reshape(*a.shape[:-2], -1, 1)).squeeze(-1)
        a = a.mT
    fro = float(torch.linalg.vector_norm(a, dim=(-2, -1)).max()) ** 2 * (1 + 4 * _gamma(a.shape[-2] * a.shape[-1] + 4))
    err = fp.up(2 * _gamma(a.shape[-1] + 64) * fro)
    return round_up(_sqrt_up(hermitian_max_bound(_gram(a), err, start)) * scale)


def _gram(a: torch.Tensor, parts: int = 4) -> torch.Tensor:
    """``A Aᴴ`` from the products of its lower block triangle only (``parts`` row blocks; the
    upper blocks are conjugate transposes, so the result is exactly Hermitian): 5/8 of the work
    for 4 parts. Every entry is one inner product, as in ``A @ Aᴴ``."""
    rows = a.shape[-2]
    if rows < 256 * parts:
        return _matmul(a, a.mH)
    edges = [rows * k // parts for k in range(parts + 1)]
    g = a.new_empty(*a.shape[:-2], rows, rows)
    for r in range(parts):
        lo, hi = edges[r], edges[r + 1]
        g[..., lo:hi, : hi] = _matmul(a[..., lo:hi, :], a[..., :hi, :].mH)
        g[..., : lo, lo:hi] = g[..., lo:hi, : lo].mH
    return g


def dense_norm_bound(weight: torch.Tensor, start: torch.Tensor | None = None) -> float:
    """Provable upper bound of the spectral norm of a dense weight (exact up to rounding and the
    certificate margin ``τ``); ``start``: the layer's power-iteration iterate (output side)."""
    return gram_norm_bound(weight.detach().reshape(weight.shape[0], -1), start)


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
    err = fp.up(_gamma(depth) * row * col * (1 + 2 * _gamma(w.numel())))
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
    return round_up(_sqrt_up(hermitian_max_bound(g, err, start)) * scale)


# --------------------------------------------------------------------------- circular convolutions
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
    the candidate. All others, in decreasing order of trace and in chunks that grow from 4 to 64
    matrices (at most ``CHUNK`` entries), get a Cholesky certificate at ``μ = θ(1 + τ)``:
    ``μI − G(ω)`` is formed directly (negated twiddles: negation is exact, so it equals
    ``fl(μI − G̃)``). Those that break down get the eigensolver and raise ``θ``. A frequency whose
    maximum is below the candidate costs one Cholesky; exact work happens only where the maximum
    may be. On the CPU the chunks go to the caller's number of threads of single-threaded
    workers (:func:`one_thread`).
    """
    n1, n2 = canvas
    n = c.shape[-1]
    freqs = torch.arange(n1 * (n2 // 2 + 1), device=c.device)
    if len(freqs) * n**3 <= EIGH_WORK:
        return _eig_bound(_top_eigenvalue(frequency_grams(c, canvas, freqs)), err)
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
    state = {"theta": _top_eigenvalue(frequency_grams(c, canvas, order[:1]))}
    lock = threading.Lock()

    def certify(todo) -> float:
        best = 0.0
        for idx in todo:
            with lock:
                mu = state["theta"] * (1 + TAU)
            cos, sin = _twiddles(c, canvas, idx)
            m = torch.complex(torch.neg(cos) @ flat, sin @ flat).view(len(idx), n, n)  # −G̃(ω)
            dmax = float(m.diagonal(dim1=-2, dim2=-1).real.abs().max())
            m.diagonal(dim1=-2, dim2=-1).add_(mu)
            ok = torch.linalg.cholesky_ex(m).info == 0
            del m
            if bool(ok.any()):
                best = max(best, _cholesky_bound(mu, n, dmax, err))
            if not bool(ok.all()):
                lam = _top_eigenvalue(frequency_grams(c, canvas, idx[~ok]))
                best = max(best, _eig_bound(lam, err))
                with lock:
                    state["theta"] = max(state["theta"], lam)
        return best

    workers = _workers(c.device)
    if workers > 1:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(certify, [chunks[w::workers] for w in range(workers)]))
    else:
        parts = [certify(chunks)]
    return max(_eig_bound(state["theta"], err), *parts)


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
    fro = float((w * w).sum()) * (1 + 2 * _gamma(w.numel()))
    err = fp.up(4 * _gamma(m + taps + offsets + 64) * taps * fro)
    if taps == 1:  # K̂(ω) = w_0 at every frequency
        lam = hermitian_max_bound(c.view(1, n, n), err)
    else:
        lam = _frequency_batch_bound(c, canvas, err)
    return round_up(_sqrt_up(lam) * scale)


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


# --------------------------------------------------------------------------- |W| norms (fp errors)
@one_thread
def nonneg_norm_bound(m: torch.Tensor, iters: int = 30) -> float:
    """Provable upper bound of ``‖M‖₂`` for an entrywise non-negative matrix ``M`` (m × n).

    Collatz–Wielandt: for ``G = MᵀM ≥ 0`` and any ``v > 0``, ``λ_max(G) ≤ max_i (Gv)_i / v_i``
    (Horn & Johnson, *Matrix Analysis*, Cor. 8.1.31); power iteration from ``v = 1`` tightens it.
    ``Gv`` is a sum of non-negative products, so its float64 value errs by at most ``γ_{m+n}``
    relative; that and the division's rounding are covered by the inflation below. ``M`` is
    first scaled by a power of two (exact) against underflow. O(iters·m·n), no eigensolver.
    """
    a = as_float64(m).reshape(m.shape[0], -1)
    if bool((a < 0).any()):
        raise ValueError("nonneg_norm_bound needs an entrywise non-negative matrix")
    if not math.isfinite(max_abs(a)):
        return math.inf
    if a.numel() == 0 or not bool((a > 0).any()):
        return 0.0
    scale = pow2_scale(a)
    a = a / scale
    v = torch.ones(a.shape[1], dtype=torch.float64, device=a.device)
    best = math.inf
    for _ in range(iters):
        g = a.t() @ (a @ v)
        best = min(best, float((g / v).max()))
        v = (g / g.max()).clamp_min(1e-150)  # stays strictly positive
    rel = 2.0 ** -52 * (a.shape[0] + a.shape[1] + 8)
    return round_up(round_up(math.sqrt(round_up(best * (1 + rel)))) * scale)


@one_thread
def abs_conv2d_norm_bound(weight: torch.Tensor, stride: int, groups: int = 1) -> float:
    """Provable upper bound of ``‖|A|‖₂`` for a zero-padded convolution ``A`` (any input size).

    Every entry of ``A``'s matrix is one kernel entry or 0, so ``|A|`` is the same convolution
    with kernel ``|w|``. Rewritten at stride 1 on the space-to-depth input (kernel ``|w'|``,
    :func:`_space_to_depth_kernel`), it is a restriction of the circular convolution, whose norm
    is ``max_ω ‖K̂(ω)‖₂``; for a non-negative kernel ``|K̂(ω)| ≤ K̂(0)`` entrywise, and the
    spectral norm is monotone on non-negative matrices, so ``‖|A|‖₂ ≤ ‖Σ_v |w'[:, :, v]|‖₂``.
    Grouped convolutions are block diagonal: the largest group's bound.
    """
    w = as_float64(weight).abs()
    co_g = w.shape[0] // groups
    return max(
        gram_norm_bound(_space_to_depth_kernel(w[g * co_g : (g + 1) * co_g], stride).sum(dim=(-2, -1)))
        for g in range(groups)
    )
