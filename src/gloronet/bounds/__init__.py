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

How ``λ_max`` is bounded (:func:`hermitian_max_bound`, :mod:`gloronet.bounds.eigen`): a candidate
``μ`` — a Lanczos estimate times ``1 + τ``, or the eigensolver's top eigenvalue raised by a few
rounding units — is *proved* ≥ ``λ_max`` by a floating-point Cholesky factorisation of
``M = μI − G`` whose residual ``LLᴴ − M`` is measured in float64 with a rigorous bound ``δ``:
since ``LLᴴ ⪰ 0`` for any ``L``, ``λ_min(M) ≥ −δ`` (Rump, "Verification of positive
definiteness", BIT 2006; the residual makes the proof independent of how LAPACK / cuSOLVER
factored). Eigenvalues, Lanczos values and factorisations only choose candidates; a candidate no
factorisation proves falls back to the next, and last to Gershgorin's discs. Cholesky costs
``n³/3`` flops and its residual one matrix product, at nearly matrix-product speed; an eigensolver
~5x the time (complex, n = 512, measured).

Rounding allowance (``u = 2⁻⁵³``; Higham, *Accuracy and Stability of Numerical Algorithms*, §3,
§24). Weights are first divided by a power of two (exact) so that the largest entry is in
``[1, 2)``: no square underflows to a "bound" below the true norm, nothing overflows, and the few
products that may still underflow (float64 models only) err by far less than the ``64u``-per-term
margin kept below. Forming a Gram matrix by ``D``-term inner products errs by
``|ΔG| ≤ γ_D|A|ᵀ|A|``, so ``‖ΔG‖₂ ≤ γ_D‖|A|‖₂²``, with ``‖|A|‖₂²`` bounded by ``‖A‖_F²`` or
``‖|A|‖₁‖|A|‖_∞``; the DFT of the Gram kernel adds ``≤ 24u`` per twiddle factor; the Cholesky
residual ``δ ≈ n·u·‖M‖``. All of this costs < 1e-8 relative; the candidate margin costs
``(1 + τ)^½ − 1``: ≤ 5e-4 on a frequency batch (``TAU``), ~5e-7 on a single matrix (``TAUS[0]``,
after refinement), ~1e-13 on an eigensolver candidate.

Kernels assumed (the same on the CPU and on a GPU): IEEE float64 (no TF32 mode exists for it);
matrix products are sums of products in any order or blocking (no Strassen-like or 3M complex
algorithms: ``MKL_BLAS_COMPUTE_MODE`` is refused, :mod:`gloronet.kernels`); cos/sin within 2 ulp.
Nothing is assumed about the eigensolver or the Cholesky factorisation.

Modules (``from gloronet.bounds import X`` works for every name below):

* :mod:`~gloronet.bounds.float64` — float64 copies on the compute device, power-of-two scalings;
* :mod:`~gloronet.bounds.geometry` — 'same' padding, output sizes, the conv map and its adjoint;
* :mod:`~gloronet.bounds.estimates` — power iteration and Lanczos (estimates, never bounds);
* :mod:`~gloronet.bounds.threads` — one CPU thread per bound computation;
* :mod:`~gloronet.bounds.eigen` — certified ``λ_max`` (eigensolver, Cholesky certificates);
* :mod:`~gloronet.bounds.dense` — explicit matrices; :mod:`~gloronet.bounds.conv_explicit` —
  convolutions by their explicit Gram matrix; :mod:`~gloronet.bounds.circular` — by circular
  convolutions; :mod:`~gloronet.bounds.conv` — which of the two at a layer's input size;
* :mod:`~gloronet.bounds.nonneg` — ``‖|W|‖₂`` for the floating-point error models.

The rounding model itself (``γ_n``, upward rounding) is :mod:`gloronet.rounding`; nothing here
imports :mod:`gloronet.fp` (which builds on these bounds).
"""
from __future__ import annotations

from ..rounding import mul_up, round_up
from .circular import (
    CHUNK,
    TAU,
    circular_conv_bound,
    conv2d_fft_bound,
    frequency_grams,
    gram_kernel,
)
from .conv import EXACT_MAX_DIM, EXACT_MAX_ENTRIES, SMALL_MAP, conv2d_norm_bound
from .conv_explicit import conv2d_explicit_gram
from .dense import dense_norm_bound, gram_norm_bound
from .eigen import EIGH_WORK, SLACKS, TAUS, U, hermitian_max_bound
from .estimates import LANCZOS_STEPS, lanczos_max, power_iteration_conv2d, power_iteration_dense
from .float64 import GRAM_SLACK, as_float64, compute_device, max_abs, pow2_scale, pow2_scales
from .geometry import Padding, conv2d_adjoint, conv2d_apply, conv_output_size, same_padding
from .nonneg import abs_conv2d_norm_bound, nonneg_norm_bound
from .threads import one_thread

__all__ = [
    "CHUNK", "EIGH_WORK", "EXACT_MAX_DIM", "EXACT_MAX_ENTRIES", "GRAM_SLACK", "LANCZOS_STEPS", "Padding",
    "SLACKS", "SMALL_MAP", "TAU", "TAUS", "U", "abs_conv2d_norm_bound", "as_float64", "circular_conv_bound",
    "compute_device", "conv2d_adjoint", "conv2d_apply", "conv2d_explicit_gram", "conv2d_fft_bound",
    "conv2d_norm_bound", "conv_output_size", "dense_norm_bound", "frequency_grams", "gram_kernel",
    "gram_norm_bound", "hermitian_max_bound", "lanczos_max", "max_abs", "mul_up", "nonneg_norm_bound",
    "one_thread", "pow2_scale", "pow2_scales", "power_iteration_conv2d", "power_iteration_dense", "round_up",
    "same_padding",
]
