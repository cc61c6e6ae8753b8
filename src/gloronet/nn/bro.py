"""BRO dense layer: block reflector orthogonal weights (Lai et al., "Enhancing Certified Robustness
via Block Reflector Orthogonal Layers and Logit Annealing Loss", ICML 2025; code: ntuaislab/BRONet,
``BROLinear`` in lipconvnet/models/layers/bro.py).

For ``V`` (n × k), ``n = max(in, out)``::

    W = I − 2 V (VᵀV + εI)⁻¹ Vᵀ,     ε = 10⁻⁵ · mean diag(VᵀV)   (as the reference)

With ``ε = 0`` this is the block reflector (symmetric, orthogonal); with ``ε > 0`` its eigenvalues
are ``1`` and ``1 − 2σᵢ²/(σᵢ² + ε) ∈ (−1, 1]``, so ``‖W‖₂ ≤ 1`` in exact arithmetic. The layer
multiplies by ``W[:out, :in]`` (a block of an orthogonal matrix for non-square layers). The solve is
done in floating point, so the bound is :func:`gloronet.bounds.dense_norm_bound` of the weight
actually applied (a derived weight of :class:`~gloronet.nn.linear.LipLinear`: cached in eval mode
and read by the forward pass, the bound and the error model alike) — never "1 by construction".

Convolution (``BROConv2d``, the paper's BRO convolution; reference ``BRO`` in the same file): a kernel ``V`` (n × rank × k × k) is
zero-padded to the layer's fixed input size ``H × W``; per frequency ``ω`` of the 2-D DFT the
block reflector ``Ŵ(ω) = I − 2 V̂ (V̂ᴴV̂ + ε_ω I)⁻¹ V̂ᴴ`` (``ε_ω`` as above, per frequency) is applied to
``x̂(ω)``: a *circular* convolution on ``H × W`` whose per-frequency matrices have norm ≤ 1
(Sedghi et al., ICLR 2019: those are its singular values). The reference zero-pads the input by
``k // 2``, convolves circularly on that larger canvas and crops the output: ours does so with
``padding=k // 2`` and is circular on the input size itself with ``padding=0`` (the default);
stride 1 (the reference's stride 2 is its space-to-depth; here stride-2 layers are AOL convs).
Training runs it through differentiable FFTs, as the reference. Eval / certification does NOT trust FFT rounding: the
operator is materialised once as a spatial circular-convolution kernel ``K = IDFT(Ŵ)``
(out × in × H × W), computed in float64 and rounded once to the parameter dtype
(:class:`~gloronet.nn.state.EvalCache`); the forward pass runs that kernel (circular padding,
an exact copy, then the chunked :func:`gloronet.nn.accumulate.conv2d`), the bound is
:func:`gloronet.bounds.circular_conv_bound` of that same rounded kernel and the error model the
dot-product model of it — bound, error model and forward pass describe one operator.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import fp
from ..bounds import abs_conv2d_norm_bound, circular_conv_bound
from ..kernels import no_autocast
from . import accumulate, depthwise
from .base import EvalCache, LipschitzModule
from .linear import LipLinear

BRO_EPS = 1e-5


def block_reflector(v: torch.Tensor, eps: float = BRO_EPS) -> torch.Tensor:
    """``I − 2 V (VᵀV + ε·mean diag(VᵀV)·I)⁻¹ Vᵀ`` for ``V`` (n × k), differentiable."""
    sigma = v.mT @ v
    shift = eps * sigma.diagonal().mean()
    eye_k = torch.eye(sigma.shape[0], dtype=v.dtype, device=v.device)
    eye_n = torch.eye(v.shape[0], dtype=v.dtype, device=v.device)
    return eye_n - 2.0 * v @ torch.linalg.solve(sigma + shift * eye_k, v.mT)


class BROLinear(LipLinear):
    """Dense layer ``y = W[:out, :in] x + b`` with ``W`` the block reflector of ``V`` (n × rank);
    ``rank`` defaults to ``n // 2`` (the reference's ``mask_level = 0.5``)."""

    def __init__(self, in_features: int, out_features: int, rank: int | None = None, bias: bool = True,
                 power_iters: int = 1):
        super().__init__(in_features, out_features, bias, power_iters)
        n = max(self.in_features, self.out_features)
        self.rank = int(max(1, n // 2) if rank is None else rank)
        if not 1 <= self.rank <= n:
            raise ValueError(f"rank must be in [1, {n}], got {rank}")
        del self.weight  # the parameter is V
        self.reflector = nn.Parameter(nn.init.orthogonal_(torch.empty(n, self.rank)))

    def derive_weight(self) -> torch.Tensor:
        v = self.reflector if self.reflector.dtype in (torch.float32, torch.float64) else self.reflector.float()
        with torch.autocast(device_type=v.device.type, enabled=False):  # the solve needs fp32 at least
            return block_reflector(v)[: self.out_features, : self.in_features]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank}"


def bro_spectrum(v: torch.Tensor, hw: Sequence[int], out_ch: int, in_ch: int, eps: float = BRO_EPS) -> torch.Tensor:
    """(H, W//2+1, out, in) half-spectrum ``Ŵ(ω)[:out, :in]`` of the BRO convolution of the kernel
    ``v`` (n, rank, k, k) on an ``H × W`` canvas (unnormalised DFT; the reflector is scale-free)."""
    vf = torch.fft.rfft2(v, s=tuple(hw)).permute(2, 3, 0, 1)  # (H, W2, n, rank)
    vh = vf.mH
    sigma = vh @ vf
    shift = eps * sigma.diagonal(dim1=-2, dim2=-1).real.mean(dim=-1)
    eye_r = torch.eye(sigma.shape[-1], dtype=sigma.dtype, device=v.device)
    sigma = sigma + shift[..., None, None] * eye_r
    n = v.shape[0]
    eye_n = torch.eye(n, dtype=sigma.dtype, device=v.device)
    w = eye_n - 2.0 * vf @ torch.linalg.solve(sigma, vh)
    return w[..., :out_ch, :in_ch]


def spatial_kernel(spectrum: torch.Tensor, hw: Sequence[int]) -> torch.Tensor:
    """The cross-correlation kernel ``w`` (out, in, H, W) with ``F.conv2d(circular_pad(x), w)`` equal
    to ``irfft2(Ŵ · rfft2(x))``: ``K = irfft2(Ŵ)`` is the convolution kernel
    (``y[p] = Σ_q K[p − q] x[q]``) and ``w[v] = K[−v mod N]``."""
    k = torch.fft.irfft2(spectrum.permute(2, 3, 0, 1), s=tuple(hw))
    return torch.roll(torch.flip(k, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1))


class BROConv2d(LipschitzModule):
    """BRO convolution (stride 1, circular on the fixed canvas): ``y = crop(Ŵ-map(pad(x))) + b``.

    ``V`` is (n × rank × k × k) with ``n = max(in, out)``, ``rank`` default ``n // 2`` (as
    :class:`BROLinear`); ``init="identity"`` (the reference's ``id_init``: ``V`` = the first
    ``rank`` unit vectors at the centre tap, a 1×1 reflector) or ``"orthogonal"``.
    ``padding = p``: the input is zero-padded by ``p`` on each side, the circular convolution runs
    on the ``(H + 2p) × (W + 2p)`` canvas and the output is cropped back to ``H × W`` (the
    reference's ``zero_padding``, ``p = k // 2``: no wrap-around at the borders); ``p = 0``: circular
    on the input size itself."""

    def __init__(self, in_channels: int, out_channels: int, input_size: int | Sequence[int], kernel_size: int = 3,
                 rank: int | None = None, bias: bool = True, init: str = "identity", padding: int = 0):
        super().__init__()
        hw = (input_size, input_size) if isinstance(input_size, int) else tuple(int(s) for s in input_size)
        if len(hw) != 2 or min(hw) < 1:
            raise ValueError(f"input_size must be (H, W) > 0, got {input_size}")
        if int(padding) != padding or padding < 0:
            raise ValueError(f"padding must be an integer >= 0, got {padding!r}")
        self.padding = int(padding)
        canvas = (hw[0] + 2 * self.padding, hw[1] + 2 * self.padding)
        if not 1 <= kernel_size <= min(canvas):
            raise ValueError(f"kernel_size must be in [1, {min(canvas)}] (the padded input size), got {kernel_size}")
        self.in_channels, self.out_channels, self.kernel_size = int(in_channels), int(out_channels), int(kernel_size)
        self.input_hw = hw
        self.canvas_hw = canvas
        n = max(self.in_channels, self.out_channels)
        self.rank = int(max(1, n // 2) if rank is None else rank)
        if not 1 <= self.rank <= n:
            raise ValueError(f"rank must be in [1, {n}], got {rank}")
        v = torch.zeros(n, self.rank, kernel_size, kernel_size)
        if init == "identity":
            c = (kernel_size - 1) // 2
            v[torch.arange(self.rank), torch.arange(self.rank), c, c] = 1.0
        elif init == "orthogonal":
            nn.init.orthogonal_(v)
        else:
            raise ValueError(f"init must be 'identity' or 'orthogonal', got {init!r}")
        self.reflector = nn.Parameter(v)
        self.bias = nn.Parameter(torch.zeros(self.out_channels)) if bias else None
        self._eval_kernel = EvalCache()

    # -- the operator -------------------------------------------------------------------------
    def spectrum(self) -> torch.Tensor:
        """Differentiable half-spectrum ``Ŵ(ω)`` (H', W'//2+1, out, in) on the canvas, at least float32."""
        v = self.reflector if self.reflector.dtype in (torch.float32, torch.float64) else self.reflector.float()
        with no_autocast(v.device.type):
            return bro_spectrum(v, self.canvas_hw, self.out_channels, self.in_channels)

    def derive_kernel(self) -> torch.Tensor:
        """The spatial circular kernel (out, in, H', W') on the canvas: computed in float64, rounded once."""
        v = self.reflector.detach().to(torch.float64)
        spec = bro_spectrum(v, self.canvas_hw, self.out_channels, self.in_channels)
        return spatial_kernel(spec, self.canvas_hw).to(self.reflector.dtype)

    def _applied_kernel(self) -> torch.Tensor:
        return self._eval_kernel.get(self, self.derive_kernel)

    def applied_kernel(self) -> torch.Tensor:
        """A copy of the eval-mode kernel (what the forward pass, bound and error model read)."""
        return self._applied_kernel().clone()

    def _apply(self, fn, *args, **kwargs):  # .to(), .double(): drop the cached kernel
        self._eval_kernel.clear()
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.input_hw
        if x.dim() != 4 or x.shape[1] != self.in_channels or tuple(x.shape[-2:]) != self.input_hw:
            raise ValueError(f"BROConv2d expects (B, {self.in_channels}, {h}, {w}) input (its bound depends on the "
                             f"input size), got shape {tuple(x.shape)}")
        p, (ch, cw) = self.padding, self.canvas_hw
        x = F.pad(x, (p, p, p, p)) if p else x  # zeros: exact
        if self.training:
            spec = self.spectrum()
            with no_autocast(x.device.type):  # FFTs and the complex product at float32 at least
                xf = torch.fft.rfft2(x.to(spec.real.dtype))
                y = torch.fft.irfft2(torch.einsum("hwoi,bihw->bohw", spec, xf), s=(ch, cw)).to(x.dtype)
            y = y[:, :, p:p + h, p:p + w]
            return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)
        # exact copies: the circular extension, sliced to the windows of the H × W outputs kept
        xp = F.pad(x, (0, cw - 1, 0, ch - 1), mode="circular") if ch * cw > 1 else x
        xp = xp[:, :, p:p + h + ch - 1, p:p + w + cw - 1] if p else xp
        k = self._applied_kernel()
        if depthwise.needs_taps(self.in_channels, k.shape, 1, 1):  # 1 channel, 3×3 map: no Winograd
            return depthwise.conv2d_taps(xp, k, self.bias, (0, 0, 0, 0))
        return accumulate.conv2d(xp, k, self.bias, 1)

    # -- estimate, bound, rounding --------------------------------------------------------------
    def lipschitz(self) -> torch.Tensor:
        """Training estimate: 1 (every ``Ŵ(ω)`` is a block of a reflector, norm ≤ 1 exactly)."""
        return torch.ones((), dtype=self.reflector.dtype, device=self.reflector.device)

    def lipschitz_bound(self) -> float:
        """``max_ω ‖K̂(ω)‖₂`` of the applied (rounded) kernel on the canvas, proven
        (:func:`gloronet.bounds.circular_conv_bound`). With padding the layer is
        ``crop ∘ C ∘ pad``: zero padding is an isometric embedding and the crop a coordinate
        projection, both of norm ≤ 1, so ``‖crop ∘ C ∘ pad‖ ≤ ‖C‖``."""
        k = self._applied_kernel()
        return self._eval_kernel.remember(self, "bound", lambda: circular_conv_bound(k, self.canvas_hw))

    def _abs_norm(self) -> float:
        """``‖|A|‖₂``: each entry of the circular operator is one kernel entry (with padding, ``A`` is a
        submatrix of the canvas operator: ``‖|A|‖ ≤`` the canvas's), so ``|A|`` is the
        circular conv with ``|w|``, of norm ``max_ω ‖|w|^(ω)‖ ≤ ‖Σ_v |w_v|‖₂``
        (:func:`gloronet.bounds.abs_conv2d_norm_bound`'s argument, which holds on the canvas)."""
        k = self._applied_kernel()
        return self._eval_kernel.remember(self, "abs", lambda: abs_conv2d_norm_bound(k, 1))

    def error_model(self, in_shape, dtype, lip: float) -> fp.ErrorModel:
        k = self._applied_kernel()
        h, w = self.input_hw
        bias = self.bias is not None
        depth = accumulate.rounding_depth(k[0].numel(), self.in_channels, bias)
        return fp.affine_error_model(k.flatten(1), self.bias, lip, dtype, h * w, self._abs_norm(), depth)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}, "
                f"input_size={self.input_hw}" + (f", padding={self.padding}" if self.padding else ""))
