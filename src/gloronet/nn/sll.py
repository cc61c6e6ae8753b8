"""SLL, SDP-based Lipschitz layers (Araujo, Havens, Delattre, Allauzen & Hu, "A Unified Algebraic
Perspective on Lipschitz Neural Networks", ICLR 2023, Thm 3; code: araujoalexandre/Lipschitz-SLL-Networks).

The residual block (here ``W`` is the inner map, inner × features, or a conv kernel)::

    φ(x) = x − Wᵀ C σ(W x + b),     C = diag(c),  c = 2 / T,
    T_i = Σ_j |W Wᵀ|_ij q_j / q_i,  q = exp(q_param)            (dense; conv: the Gram kernel)

with ``σ`` = ReLU. In exact arithmetic ``T ⪰ W Wᵀ`` and φ is 1-Lipschitz. ``c`` is computed in
floating point, so the bound is proven for the ``c`` actually used (cached in eval mode,
:class:`~gloronet.nn.state.EvalCache`), with ``W`` the parameter itself:

**Bound (tight, proven).** For inputs ``x, y`` ReLU's secant slopes lie in ``[0, 1]``:
``σ(Wx + b) − σ(Wy + b) = D W(x − y)`` with ``D`` diagonal, ``0 ⪯ D ⪯ I``. Hence
``φ(x) − φ(y) = (I − M)(x − y)``, ``M = Wᵀ C^{½} D C^{½} W = Bᵀ D B`` with ``B = C^{½} W``
(``c ≥ 0`` checked; diagonal matrices commute). ``M`` is symmetric and ``0 ⪯ M ⪯ BᵀB``, so the
eigenvalues of ``I − M`` lie in ``[1 − μ, 1]``, ``μ = ‖B‖₂²``, and

    Lip(φ) ≤ max(1, μ − 1)

(attained for ``μ ≥ 2`` at ``D = I``; = 1 when ``T ⪰ WWᵀ`` holds for the computed ``c``).
``‖B‖₂`` is bounded by :func:`gloronet.bounds.dense_norm_bound` / ``conv2d_norm_bound`` (at the
block's input size, 'same' zero padding, stride 1) of ``B̃ = fl(fl(√c)·W)`` formed in float64,
plus ``‖B − B̃‖ ≤ γ₂/(1 − γ₂)·‖|B̃|‖₂ + λ·(size term)`` (two roundings per entry, and any
underflow; ``‖|B̃|‖₂`` by :func:`gloronet.bounds.nonneg_norm_bound` /
:func:`gloronet.bounds.abs_conv2d_norm_bound`). The conv block's ``Wᵀ`` is the stride-1
convolution with the flipped, transposed kernel and the same symmetric padding — exactly the
adjoint of ``conv(·, W)`` for odd kernels, where the output size equals the input size.

**Rounding.** Two sound models; :meth:`error_model` returns the one with the smaller ``rel``
(fields never mixed, except the overflow peaks, which are claims about the computed values alone).

*Chain* (general, loose): ``fl(x − ĝ(x))`` with ``ĝ`` = affine (chunked sums) → ReLU → ``c ⊙``
(one multiplication) → affine without bias: composed :class:`gloronet.fp.ErrorModel` s, then
:func:`gloronet.fp.residual_model`; the branch's Lipschitz factors are ``‖W‖₂`` bounds and ``max c``,
so its ``rel`` grows like ``max c·‖W‖²``, which ``T ⪰ WWᵀ`` does not keep near 2.

*Scaled* (tight): with ``s = √c`` (exact reals; ``c`` the scales the forward applies), ``B = SW`` and
``cᵢWᵢᵀ = sᵢBᵢᵀ``, ``g(x) = Wᵀ(c ⊙ σ(Wx + b)) = Bᵀσ(Bx + Sb)`` (σ positively homogeneous), so every
error is measured in scaled coordinates. Let ``a = ‖x‖``, ``N ≥ ‖B‖₂``, ``N_a ≥ ‖|B|‖₂``
(both for the real ``B``: the float64 ``B̃`` plus the allowance of ``_bound``), ``σ_b ≥ ‖Sb‖``
(over all positions), ``γ₁, γ₂`` the two sums' depths, ``n₁, n₂`` their terms per output,
``m``/``n`` the inner/outer sizes, ``R₁, R₂`` the largest absolute row sums of ``W`` and ``Wᵀ``,
``s₊ = max s``, ``s₋ = min{sᵢ : cᵢ > 0}``, ``λ`` the smallest normal, ``u`` the unit roundoff.

1. ``û = u + e`` with ``|e_k| ≤ γ₁(Σ_t|W_kt||x_t| + |b_k|) + Λ₁ₖ`` (:func:`gloronet.fp.dot_product_model`,
   ``‖Λ₁‖ ≤ (1+γ₁)λ√m(R₁ + √n₁·a + 2n₁)``); ``sₖ|W_kt| = |B_kt|``, so
   ``‖Se‖ ≤ E₁ := γ₁(N_a·a + σ_b) + s₊‖Λ₁‖`` (absolute errors of ``û`` scale by ``sₖ ≤ s₊``).
2. ``r̂ = σ(û) + ε``, ``|εₖ| ≤ λ`` (a flushed value); ``‖Sr̂‖ ≤ ‖Sû‖ + s₊λ√m ≤ P := N·a + σ_b + E₁ + s₊λ√m``.
3. ``ẑₖ = fl(r̂ₖcₖ) = cₖr̂ₖ(1+δₖ) + ηₖ``, ``|δₖ| ≤ u``, ``|ηₖ| ≤ λ``; ``cₖ = 0`` gives ``ẑₖ = 0``
   exactly. In scaled coordinates ``ζₖ = ẑₖ/sₖ = sₖr̂ₖ(1+δₖ) + ηₖ/sₖ`` (``ζₖ = 0`` if ``cₖ = 0``):
   ``‖ζ‖ ≤ Z := (1+u)P + λ√m/s₋`` (a flushed product's error scales by ``1/sₖ ≤ 1/s₋``), and
   ``ζₖ − sₖσ(uₖ) = sₖr̂ₖδₖ + ηₖ/sₖ + sₖεₖ + sₖ(σ(ûₖ) − σ(uₖ))`` gives
   ``‖ζ − Sσ(u)‖ ≤ E₂ := uP + λ√m/s₋ + s₊λ√m + E₁`` (σ is 1-Lipschitz per coordinate).
4. ``v̂ⱼ = Σₖ W_kj ẑₖ(1+θ_kj) + Λ₂ⱼ``, ``|θ| ≤ γ₂``, ``‖Λ₂‖ ≤ (1+γ₂)λ√n(R₂ + √n₂‖ẑ‖ + 2n₂)``,
   ``‖ẑ‖ ≤ s₊Z``. The products are the same reals ``W_kj ẑₖ = B_kj ζₖ``, and
   ``Wᵀ(ẑ − Cσ(u)) = Bᵀ(ζ − Sσ(u))``, so
   ``‖v̂ − g(x)‖ ≤ γ₂N_a·Z + N·E₂ + ‖Λ₂‖`` — affine in ``a``: the branch's ``rel``/``abs``, with
   ``‖g(y) − g(x)‖ = ‖BᵀDB(y − x)‖ ≤ N²‖y − x‖`` (its ``lip``) and ``‖g(0)‖ ≤ N·σ_b`` (``offset``).
5. :func:`gloronet.fp.residual_model` with the block's proven ``lip`` (the subtraction). The branch
   keeps the chain's ``peak_rel``/``peak_abs`` (actual units; the overflow check is unchanged).

Every term above is ``γ·N·N_a``-sized, not ``max c·‖W‖²``-sized. The model is not used (the chain
is) when ``c`` is not finite and ``≥ 0`` or some ``0 < cₖ < λ`` (a subnormal scale that a DAZ unit
reads as 0 errs relatively, by ``sₖr̂ₖ``; :func:`gloronet.fp.scale_model`, in the chain, allows
``λ‖a‖`` for it).

Estimate (training): the constant 1 (the exact block is 1-Lipschitz when ``T`` is exact).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import fp
from ..bounds import (
    abs_conv2d_norm_bound,
    as_float64,
    conv2d_norm_bound,
    dense_norm_bound,
    nonneg_norm_bound,
)
from ..rounding import gamma, gamma64, mul_up, norm_upper_from, round_up, smallest_normal, unit_roundoff, up
from . import accumulate, depthwise
from .base import EvalCache, LipschitzModule


def sll_dense_scales(weight: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(inner,) ``c = 2/T``, ``T_i = Σ_j |WWᵀ|_ij q_j/q_i`` for ``W`` (inner × features), ``q = exp(q_param)``."""
    gram = (weight @ weight.mT).abs()
    return 2.0 / _weighted_row_sums(gram, q)


def sll_conv_scales(kernel: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(inner,) ``c = 2/T`` for a kernel (inner, C, k, k): ``|WWᵀ|`` summed over the Gram kernel's shifts."""
    k = kernel.shape[-1]
    gram = F.conv2d(kernel, kernel, padding=k - 1).abs().sum(dim=(2, 3))  # (inner, inner)
    return 2.0 / _weighted_row_sums(gram, q)


def _weighted_row_sums(gram: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``Σ_j gram_ij e^{q_j − q_i}`` (never 0: a zero row gives an infinite ``c`` times a zero column)."""
    return (gram * torch.exp(q[None, :] - q[:, None])).sum(dim=1).clamp_min(1e-30)


def _sound_conv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, pads) -> torch.Tensor:
    """The eval-mode stride-1 convolution, as ``LipConv2d`` runs it: chunked sums, or tap sums
    where this build would use Winograd (one input channel, 3×3)."""
    if depthwise.needs_taps(w.shape[1], w.shape, 1, 1):
        return depthwise.conv2d_taps(x, w, bias, pads)
    return accumulate.conv2d(x, w, bias, 1, pads)


def _lip_from_mu(norm_b: float) -> float:
    """``max(1, μ − 1)`` rounded up, ``μ = norm_b²`` (see the module docstring)."""
    if not math.isfinite(norm_b):
        return math.inf
    mu = mul_up(norm_b, norm_b)
    return max(1.0, round_up(mu - 1.0))


def _rounding_factor() -> float:
    """``γ₂/(1 − γ₂)`` in float64, rounded up: ``|B − fl(fl(√c)·W)| ≤`` this ``·|fl(fl(√c)·W)|``."""
    g = gamma64(2)
    return up(g / (1.0 - g))


class _SLLBase(LipschitzModule):
    """Shared: parameters, the cached scales ``c`` and the residual error model."""

    def __init__(self, weight: torch.Tensor, bias: bool):
        super().__init__()
        inner = weight.shape[0]
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(inner)) if bias else None
        self.q = nn.Parameter(torch.zeros(inner))
        self._eval_scales = EvalCache()

    def compute_scales(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def scales(self) -> torch.Tensor:
        """``c`` as the forward pass uses it: differentiable in training, cached in eval mode."""
        return self.compute_scales() if self.training else self._applied_scales()

    def _applied_scales(self) -> torch.Tensor:
        return self._eval_scales.get(self, self.compute_scales)

    def applied_scales(self) -> torch.Tensor:
        """A copy of the eval-mode ``c`` (editing it cannot change the map behind its bound)."""
        return self._applied_scales().clone()

    def _apply(self, fn, *args, **kwargs):  # .to(), .double(): drop the cached scales
        self._eval_scales.clear()
        return super()._apply(fn, *args, **kwargs)

    def _scaled_weight64(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(B̃, c)`` in float64: ``B̃ = fl(fl(√c)·W)`` (rows scaled), or None if ``c`` is not finite
        and ``≥ 0`` (then nothing is proven)."""
        c = as_float64(self._applied_scales())
        if not bool(torch.isfinite(c).all()) or bool((c < 0).any()):
            return None
        w = as_float64(self.weight)
        return c.sqrt().view(-1, *([1] * (w.dim() - 1))) * w, c

    def lipschitz(self, n_iter: int | None = None) -> torch.Tensor:
        """Training estimate: 1 (the exact block's constant when ``T ⪰ WWᵀ``)."""
        return torch.ones((), dtype=self.weight.dtype, device=self.weight.device)

    def lipschitz_bound(self) -> float:
        self._applied_scales()
        return self._eval_scales.remember(self, "bound", self._bound)

    def _max_scale(self) -> float:
        c = self._applied_scales().detach()
        return round_up(float(c.abs().max())) if c.numel() else 0.0

    def _features(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def _norms64(self, b: torch.Tensor) -> tuple[float, float, float]:  # pragma: no cover - interface
        """``(‖B̃‖₂ bound, ‖|B̃|‖₂ bound, λ₆₄ allowance)`` of the scaled float64 weight ``b``."""
        raise NotImplementedError

    def _scaled(self) -> dict | None:
        """What the bound and the scaled error model need from ``W`` and ``c`` alone (cached with ``c``):
        ``N ≥ ‖B‖₂``, ``Na ≥ ‖|B|‖₂`` for the real ``B = SW`` (``B̃`` plus ``|B − B̃| ≤ ρ|B̃| + λ₆₄``),
        ``s₊ = max √c``, ``1/s₋`` (over ``c > 0``; 0 if none), ``‖s ⊙ b‖`` (one position), the
        largest absolute row sums ``R₁, R₂`` of ``W`` and ``Wᵀ`` (the inner map as a matrix), and
        the least positive ``c``. None where ``c`` is not finite and ``≥ 0``."""
        self._applied_scales()

        def compute():
            scaled = self._scaled_weight64()
            if scaled is None:
                return None
            b, c = scaled
            norm, abs_norm, under = self._norms64(b)
            err = up(mul_up(_rounding_factor(), abs_norm) + under)
            pos = c[c > 0]
            s = c.sqrt()
            bias = 0.0
            if self.bias is not None:  # √c and the product: 2 roundings (ρ); then the float64 norm
                sb = torch.linalg.vector_norm(s * as_float64(self.bias)).view(1)
                bias = mul_up(float(norm_upper_from(sb, self.inner, torch.float64)[0]), 1 + _rounding_factor())
            w = as_float64(self.weight).abs()
            per_tap = w.flatten(2).sum(dim=2) if w.dim() > 2 else w  # (inner, features): |W| summed over the taps
            return {
                "N": round_up(norm + err),
                "Na": round_up(abs_norm + err),
                "s_max": round_up(math.sqrt(float(c.max()))) if c.numel() else 0.0,
                "inv_s_min": round_up(1.0 / math.nextafter(math.sqrt(float(pos.min())), 0.0)) if pos.numel() else 0.0,
                "bias": bias,
                "R1": up(float(per_tap.sum(dim=1).max())),
                "R2": up(float(per_tap.sum(dim=0).max())),
                "c_min": float(pos.min()) if pos.numel() else math.inf,
            }

        return self._eval_scales.remember(self, "scaled", compute)

    def _bound(self) -> float:
        sc = self._scaled()
        return math.inf if sc is None else _lip_from_mu(sc["N"])

    @staticmethod
    def _pick(chain: fp.ErrorModel, scaled: fp.ErrorModel | None) -> fp.ErrorModel:
        """The chain or the scaled model (module docstring, "Rounding"), whichever has the smaller
        ``rel`` (the chain where the scaled one does not apply); never a mix of the two."""
        return scaled if scaled is not None and scaled.rel < chain.rel else chain

    def _both(self, chain_models: list[fp.ErrorModel], lip: float, dtype, positions: int,
              depths: tuple[int, int], terms: tuple[int, int]) -> tuple[fp.ErrorModel, fp.ErrorModel | None]:
        """The chain model of ``chain_models`` (the branch) and the scaled model (module docstring,
        steps 1-5) of sums of ``depths`` roundings and ``terms`` terms, at ``positions`` places. The
        scaled branch reuses the chain branch's peaks: they bound the computed values (actual
        units), whatever model bounds the error."""
        numel = self._features() * positions
        chain_branch = fp.compose(chain_models)
        chain = fp.residual_model(chain_branch, lip, numel, dtype)
        sc = self._scaled()
        u, lam = unit_roundoff(dtype), smallest_normal(dtype)
        if sc is None or sc["c_min"] < lam or not math.isfinite(sc["N"]):
            return chain, None
        g1, g2 = gamma(depths[0], dtype), gamma(depths[1], dtype)
        n1, n2 = terms
        N, Na, sp, isn = sc["N"], sc["Na"], sc["s_max"], sc["inv_s_min"]
        sb = mul_up(sc["bias"], math.sqrt(positions))
        rm, rn = math.sqrt(self.inner * positions), math.sqrt(numel)
        # (r, k) pairs: the bound r·‖x‖ + k; non-negative polynomials, rounded up (fp.up)
        l1 = up((1 + g1) * lam * rm)
        e1 = (up(g1 * Na + sp * l1 * math.sqrt(n1)), up(g1 * sb + sp * l1 * (sc["R1"] + 2 * n1)))  # ‖S(û − u)‖
        p = (up(N + e1[0]), up(sb + e1[1] + sp * lam * rm))  # ‖S r̂‖
        z = (up((1 + u) * p[0]), up((1 + u) * p[1] + lam * rm * isn))  # ‖ζ‖
        e2 = (up(e1[0] + u * p[0]), up(e1[1] + sp * lam * rm + u * p[1] + lam * rm * isn))  # ‖ζ − Sσ(u)‖
        l2 = up((1 + g2) * lam * rn)
        lam2 = (up(l2 * math.sqrt(n2) * sp * z[0]), up(l2 * (sc["R2"] + 2 * n2 + math.sqrt(n2) * sp * z[1])))
        branch = fp.ErrorModel(
            lip=mul_up(N, N),
            rel=up(g2 * Na * z[0] + N * e2[0] + lam2[0]),
            abs=up(g2 * Na * z[1] + N * e2[1] + lam2[1]),
            offset=mul_up(N, sb),
            peak_rel=chain_branch.peak_rel,
            peak_abs=chain_branch.peak_abs,
        )
        return chain, fp.residual_model(branch, lip, numel, dtype)


class SLLLinear(_SLLBase):
    """Dense SLL block on ``features`` inputs, inner width ``inner`` (default ``features``)."""

    def __init__(self, features: int, inner: int | None = None, bias: bool = True):
        inner = int(features if inner is None else inner)
        w = torch.empty(inner, int(features))
        nn.init.xavier_normal_(w)
        super().__init__(w, bias)
        self.features, self.inner = int(features), inner

    def compute_scales(self) -> torch.Tensor:
        return sll_dense_scales(self.weight, self.q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.features:
            raise ValueError(f"SLLLinear expects {self.features} input features, got shape {tuple(x.shape)}")
        w = self.weight
        if self.training:
            h = F.relu(F.linear(x, w, self.bias)) * self.scales()
            return x - F.linear(h, w.mT)
        h = F.relu(accumulate.linear(x, w.detach(), self.bias)) * self._applied_scales()
        return x - accumulate.linear(h, w.detach().mT, None)

    def _features(self) -> int:
        return self.features

    def _norms64(self, b: torch.Tensor) -> tuple[float, float, float]:
        return dense_norm_bound(b), nonneg_norm_bound(b.abs()), smallest_normal(torch.float64) * math.sqrt(b.numel())

    def _norm_w(self) -> float:
        return self._eval_scales.remember(self, "norm_w", lambda: dense_norm_bound(self.weight))

    def error_model(self, in_shape, dtype, lip: float) -> fp.ErrorModel:
        return self._pick(*self.error_models(in_shape, dtype, lip))

    def error_models(self, in_shape, dtype, lip: float) -> tuple[fp.ErrorModel, fp.ErrorModel | None]:
        """``(chain, scaled)``: the block's two sound models (``scaled`` None where it does not apply)."""
        positions = math.prod(in_shape[:-1])
        w = self.weight.detach()
        nw = self._norm_w()
        numel_mid = positions * self.inner
        bias = self.bias is not None
        depths = (accumulate.rounding_depth(self.features, self.features, bias),
                  accumulate.rounding_depth(self.inner, self.inner, False))
        models = [
            fp.affine_error_model(w, self.bias, nw, dtype, positions, depth=depths[0]),
            fp.elementwise_model(1.0, numel_mid, dtype),  # ReLU
            fp.scale_model(self._max_scale(), numel_mid, dtype),
            fp.affine_error_model(w.mT, None, nw, dtype, positions, depth=depths[1]),
        ]
        return self._both(models, lip, dtype, positions, depths, (self.features + bias, self.inner))

    def extra_repr(self) -> str:
        return f"features={self.features}, inner={self.inner}, bias={self.bias is not None}"


class SLLConv2d(_SLLBase):
    """Convolutional SLL block: ``x − convᵀ(c ⊙ ReLU(conv(x, W) + b))``, stride 1, odd kernel,
    'same' zero padding, at a fixed ``input_size`` (its bound depends on it)."""

    def __init__(self, channels: int, input_size: int | Sequence[int], inner: int | None = None,
                 kernel_size: int = 3, bias: bool = True):
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd ('same' padding, transposed conv = adjoint), got {kernel_size}")
        inner = int(channels if inner is None else inner)
        w = torch.empty(inner, int(channels), kernel_size, kernel_size)
        nn.init.xavier_normal_(w)
        super().__init__(w, bias)
        self.channels, self.inner, self.kernel_size = int(channels), inner, int(kernel_size)
        hw = (input_size, input_size) if isinstance(input_size, int) else tuple(int(s) for s in input_size)
        if len(hw) != 2 or min(hw) < 1:
            raise ValueError(f"input_size must be (H, W) > 0, got {input_size}")
        self.input_hw = hw

    @property
    def pads(self) -> tuple[int, int, int, int]:
        p = self.kernel_size // 2
        return p, p, p, p

    def compute_scales(self) -> torch.Tensor:
        return sll_conv_scales(self.weight, self.q)

    def adjoint_kernel(self, w: torch.Tensor) -> torch.Tensor:
        """The kernel of ``conv(·, W)ᵀ``: flipped, in/out channels swapped (same padding)."""
        return w.flip(-2, -1).transpose(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels or tuple(x.shape[-2:]) != self.input_hw:
            raise ValueError(
                f"SLLConv2d expects (B, {self.channels}, {self.input_hw[0]}, {self.input_hw[1]}) input (its bound "
                f"depends on the input size), got shape {tuple(x.shape)}"
            )
        p = self.kernel_size // 2
        if self.training:
            w = self.weight
            h = F.relu(F.conv2d(x, w, self.bias, padding=p)) * self.scales().view(1, -1, 1, 1)
            return x - F.conv2d(h, self.adjoint_kernel(w), padding=p)
        w = self.weight.detach()
        h = F.relu(_sound_conv(x, w, self.bias, self.pads)) * self._applied_scales().view(1, -1, 1, 1)
        return x - _sound_conv(h, self.adjoint_kernel(w), None, self.pads)

    def _features(self) -> int:
        return self.channels

    def _norms64(self, b: torch.Tensor) -> tuple[float, float, float]:
        under = smallest_normal(torch.float64) * self.kernel_size**2 * math.sqrt(self.inner * self.channels)  # ‖conv with all-λ kernel‖
        return conv2d_norm_bound(b, self.input_hw, 1, self.pads), abs_conv2d_norm_bound(b, 1), under

    def _norm_w(self) -> float:
        return self._eval_scales.remember(
            self, "norm_w", lambda: conv2d_norm_bound(self.weight, self.input_hw, 1, self.pads))

    def error_model(self, in_shape, dtype, lip: float) -> fp.ErrorModel:
        return self._pick(*self.error_models(in_shape, dtype, lip))

    def error_models(self, in_shape, dtype, lip: float) -> tuple[fp.ErrorModel, fp.ErrorModel | None]:
        """``(chain, scaled)``: the block's two sound models (``scaled`` None where it does not apply)."""
        w = self.weight.detach()
        wt = self.adjoint_kernel(w)
        nw = self._norm_w()
        hw = self.input_hw[0] * self.input_hw[1]
        k2 = self.kernel_size**2
        bias = self.bias is not None
        depths = (accumulate.rounding_depth(self.channels * k2, self.channels, bias),
                  accumulate.rounding_depth(self.inner * k2, self.inner, False))
        models = [
            fp.affine_error_model(w.flatten(1), self.bias, nw, dtype, hw, abs_conv2d_norm_bound(w, 1), depths[0]),
            fp.elementwise_model(1.0, self.inner * hw, dtype),  # ReLU
            fp.scale_model(self._max_scale(), self.inner * hw, dtype),
            fp.affine_error_model(wt.flatten(1), None, nw, dtype, hw, abs_conv2d_norm_bound(wt, 1), depths[1]),
        ]
        return self._both(models, lip, dtype, hw, depths, (self.channels * k2 + bias, self.inner * k2))

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, inner={self.inner}, kernel_size={self.kernel_size}, "
                f"input_size={self.input_hw}")
