"""LiResNet: the linear residual block and a stack of them (Hu, Zou, Wang, Leino, Fredrikson &
Sadeghi, "Unlocking Deterministic Robustness Certification on ImageNet", NeurIPS 2023).

A block is ONE convolution whose kernel contains the skip connection::

    x  <-  MinMax( conv(x, K) + b ),     K = I_centre + depth^-½ · (γ ⊙ V)

``I_centre`` is the identity placed at the kernel centre (so ``conv(x, I_centre) = x``), ``V`` a
learned k×k kernel and ``γ`` one learnable scale per OUTPUT channel (it multiplies ``V[o, :, :, :]``,
as ``gamma`` of shape (depth, width, 1, 1, 1) in hukkai/liresnet ``LiResConv``); ``depth`` is the
number of blocks in the stack. Zero 'same' padding.

Mean-centring of the residual branch (``centering=True``, as the reference): in training the
branch ``r = conv(x, K − I)`` has its batch mean over (B, H, W) subtracted (gradient flows through
the mean, as in batch norm) and a running mean is tracked (momentum 0.1); in eval mode the running
mean is subtracted instead — a constant translation, so the block is still the affine map
``conv(x, K) + b − μ`` whose Lipschitz constant is ``‖conv(·, K)‖``.

The forward pass (both modes) computes ``x + conv(x, R) + shift`` with ``R = depth^-½ γ⊙V``: the
same affine map as ``conv(x, K) + shift``, but the identity term is added once instead of
being summed inside every convolution output, so its rounding is ``γ₂|x|`` rather than
``γ_{n+2}|x|`` (``n = width·k²``): ``‖e‖ ≤ γ_{d+2}‖|R|‖₂‖x‖ + γ₂‖x‖ + γ₁‖shift‖`` with ``d`` the
rounding depth of the chunked eval convolution (:mod:`gloronet.nn.accumulate`).
In eval mode ``R`` is computed once (:class:`~gloronet.nn.state.EvalCache`) and the forward pass,
the bound and the error model read that same tensor.

Estimate: power iteration on the whole kernel ``K`` (identity included). Bound:
:func:`gloronet.bounds.conv2d_norm_bound` of ``I_centre + R`` formed in float64 on the block's
device, plus the ``2⁻⁵³(1 + |R_centre|)`` that forming it may round off — the map the forward
pass computes.

:class:`LiResStack` runs the power iterations of all its blocks as ONE grouped convolution per
step (iterates concatenated along channels, ``groups = depth``), as ``LiResConv.lipschitz`` does.
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
    conv2d_adjoint,
    conv2d_apply,
    conv2d_norm_bound,
    mul_up,
    power_iteration_conv2d,
    round_up,
    same_padding,
)
from . import accumulate, depthwise
from .activation import MinMax
from .base import EvalCache, LipschitzModule, UnboundedLayerError


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = (int(s) for s in size)
    return h, w


def _normalize_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Normalise each channel group of a (1, G·C, H, W) tensor to unit norm."""
    flat = x.reshape(groups, -1)
    return (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)).reshape(x.shape)


def power_iteration_conv2d_grouped(weight, v, groups: int, padding, n_iter: int = 1) -> torch.Tensor:
    """Warm-started power iteration of ``groups`` independent stride-1 convolutions at once.

    ``weight`` (G·C_out, C_in, k, k) holds the G kernels stacked; ``v`` (1, G·C_in, H, W) the G
    right-singular-vector iterates (each of unit norm), updated in place without gradient.
    Returns the (G,) differentiable estimates ``‖A_g v_g‖`` — each a lower bound of ``‖A_g‖₂``,
    identical to running :func:`gloronet.bounds.power_iteration_conv2d` on every kernel.
    """
    hw = v.shape[-2:]
    with torch.autocast(device_type=weight.device.type, enabled=False):
        with torch.no_grad():
            w = weight.detach().to(v.dtype)
            for _ in range(n_iter):
                u = _normalize_groups(conv2d_apply(v, w, 1, padding, groups), groups)
                v.copy_(_normalize_groups(conv2d_adjoint(u, w, hw, 1, padding, groups), groups))
        out = conv2d_apply(v.to(weight.dtype), weight, 1, padding, groups)
        return out.reshape(groups, -1).norm(dim=1)


class LiResBlock(LipschitzModule):
    """One linear residual block ``x <- MinMax(conv(x, I + depth^-½ γ⊙V) + b)`` (see module doc).

    Args:
        width: channels (in = out).
        input_size: spatial size (H, W) the block is applied to (its bound depends on it).
        depth: number of blocks in the stack; sets the residual scale ``depth^-½``.
        kernel_size: odd kernel size (3 in the papers).
        centering: batch mean-centring of the residual branch with a running mean.
        activation: apply MinMax after the convolution (inside the block).
        momentum: running-mean update rate.
        power_iters: power-iteration steps per training-mode ``lipschitz()`` call.
    """

    iterate_buffers = ("power_v",)

    def __init__(
        self,
        width: int,
        input_size: int | Sequence[int],
        depth: int = 1,
        kernel_size: int = 3,
        centering: bool = True,
        activation: bool = True,
        momentum: float = 0.1,
        power_iters: int = 1,
    ):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (the identity sits at the centre), got {kernel_size}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if activation and width % 2:
            raise ValueError(f"MinMax needs an even width, got {width}")
        self.width, self.depth, self.kernel_size = int(width), int(depth), int(kernel_size)
        self.input_hw = _pair(input_size)
        if min(self.input_hw) < 1:
            raise ValueError(f"input_size must be positive, got {self.input_hw}")
        self.centering, self.momentum, self.power_iters = bool(centering), float(momentum), int(power_iters)
        self.weight = nn.Parameter(torch.randn(width, width, kernel_size, kernel_size) / (width * kernel_size**2))
        self.gamma = nn.Parameter(torch.ones(width, 1, 1, 1))
        self.bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("running_mean", torch.zeros(width) if self.centering else None)
        self.act = MinMax() if activation else nn.Identity()
        v = torch.randn(1, width, *self.input_hw)
        self.register_buffer("power_v", v / v.norm())
        self._eval_kernel = EvalCache()

    @property
    def pads(self) -> tuple[int, int, int, int]:
        top, bottom = same_padding(self.input_hw[0], self.kernel_size, 1)
        left, right = same_padding(self.input_hw[1], self.kernel_size, 1)
        return left, right, top, bottom

    def residual_kernel(self) -> torch.Tensor:
        """``depth^-½ · γ ⊙ V`` (the residual branch alone)."""
        return (self.depth**-0.5) * (self.gamma * self.weight)

    def _applied_residual_kernel(self) -> torch.Tensor:
        """``R`` as the eval-mode forward pass uses it, itself (no gradient; cached while the
        block's whole state — γ, V, depth, input size … — is unchanged)."""
        return self._eval_kernel.get(self, self.residual_kernel)

    def applied_residual_kernel(self) -> torch.Tensor:
        """A copy of ``R`` as the eval-mode forward pass uses it (editing it cannot change the map)."""
        return self._applied_residual_kernel().clone()

    def _identity(self, like: torch.Tensor) -> torch.Tensor:
        c = self.kernel_size // 2
        eye = torch.eye(self.width, dtype=like.dtype, device=like.device)[:, :, None, None]
        return F.pad(eye, (c, c, c, c))

    def kernel(self) -> torch.Tensor:
        """The whole kernel ``I_centre + depth^-½ · γ ⊙ V`` (training estimate)."""
        w = self.residual_kernel()
        return w + self._identity(w)

    def shift(self) -> torch.Tensor:
        """The eval-mode per-channel offset: ``b − running mean`` (or ``b``)."""
        return self.bias - self.running_mean if self.centering else self.bias

    def _check_act(self) -> None:
        if type(self.act) not in (MinMax, nn.Identity):
            raise UnboundedLayerError(f"LiResBlock.act must be MinMax or Identity (1-Lipschitz, exact), got {type(self.act).__name__}")

    def _apply(self, fn, *args, **kwargs):  # .to(), .double(): drop the cached kernel
        self._eval_kernel.clear()
        return super()._apply(fn, *args, **kwargs)

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.width:
            raise ValueError(f"LiResBlock expects (B, {self.width}, H, W) input, got shape {tuple(x.shape)}")
        if tuple(x.shape[-2:]) != self.input_hw:
            h, w = self.input_hw
            raise ValueError(
                f"LiResBlock was set up for {h}x{w} inputs (its Lipschitz bound depends on the input size) "
                f"but got {x.shape[-2]}x{x.shape[-1]}; build a new model for this input size"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        c = self.kernel_size // 2  # stride 1, odd kernel: 'same' padding is symmetric
        if self.training:
            r = F.conv2d(x, self.residual_kernel(), padding=c)
            offset = self.bias
            if self.centering:
                mean = r.mean(dim=(0, 2, 3))
                with torch.no_grad():
                    self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                offset = self.bias - mean
            out = x + r + offset.to(r.dtype).view(1, -1, 1, 1)
        else:
            out = self._eval_affine(x, self._applied_residual_kernel(), self.shift().to(x.dtype))
        return self.act(out)

    def _eval_affine(self, x: torch.Tensor, r: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """``fl(fl(x + conv(x, r)) + shift)``: the eval map before the activation, for the applied
        ``R`` and shift or exact float64 copies of them (:meth:`float64_map`)."""
        if depthwise.needs_taps(self.width, r.shape, 1, 1):  # width 1: no Winograd
            out = x + depthwise.conv2d_taps(x, r, None, self.pads)
        else:
            out = x + accumulate.conv2d(x, r, None, 1, self.pads)
        return out + shift.view(1, -1, 1, 1)

    def float64_map(self):
        """The eval map in float64 (:mod:`gloronet.centre64`): the applied ``R`` and the shift the
        eval forward adds (``b − μ`` as computed in the model's dtype), cast exactly; None with an
        activation other than MinMax / Identity."""
        if type(self.act) not in (MinMax, nn.Identity):
            return None
        r = self._applied_residual_kernel().detach().to(torch.float64)
        shift = self.shift().detach().to(torch.float64)
        return lambda h: self.act(self._eval_affine(h, r, shift))

    def lipschitz(self, n_iter: int | None = None) -> torch.Tensor:
        """Differentiable estimate (from below) of ``‖conv(·, K)‖`` at the block's input size."""
        n = self.power_iters if n_iter is None and self.training else (n_iter or 0)
        return power_iteration_conv2d(self.kernel(), self.power_v, 1, self.pads, 1, n)

    def lipschitz_bound(self) -> float:
        """Bound of ``x ↦ x + conv(x, R)`` for the applied ``R``: the kernel ``I + R`` is formed
        in float64, where each centre-diagonal entry may round by ``2⁻⁵³|1 + R_cc|``; that
        perturbation is a pointwise diagonal map of norm ``≤ 2⁻⁵³(1 + max|R_cc|)``."""
        self._check_act()
        r = self._applied_residual_kernel()

        def compute():
            r64 = as_float64(r)
            c = self.kernel_size // 2
            centre = r64[:, :, c, c].diagonal().abs().max()
            start = self.power_v if self.power_v.shape == (1, self.width, *self.input_hw) else None
            exact_part = conv2d_norm_bound(r64 + self._identity(r64), self.input_hw, 1, self.pads, start=start)
            return round_up(exact_part + 2.0**-52 * (1.0 + float(centre)))

        return self._eval_kernel.remember(self, "bound", compute)

    def error_model(self, in_shape, dtype, lip: float) -> fp.ErrorModel:
        """``out = fl(fl(x + conv(x, R)) + shift)``: products pass the chunked convolution's depth
        plus 2 roundings, ``x`` two, the shift one; then MinMax (exact up to flushed subnormals)."""
        self._check_act()
        r = self._applied_residual_kernel()
        n = self.width * self.kernel_size**2
        depth = accumulate.rounding_depth(n, self.width, bias=False) + 2  # then + x, + shift
        hw = self.input_hw[0] * self.input_hw[1]
        numel = self.width * hw
        a_r = self._eval_kernel.remember(self, "abs_norm", lambda: abs_conv2d_norm_bound(r, 1))
        row_abs = 1.0 + float(as_float64(r).abs().flatten(1).sum(dim=1).max())  # float64: within INFLATE
        shift = self.shift().detach().to(torch.float64).cpu()
        g_n, g2, g1, lam = fp.gamma(depth, dtype), fp.gamma(2, dtype), fp.gamma(1, dtype), fp.smallest_normal(dtype)
        offset = float(shift.norm()) * math.sqrt(hw)
        sqrt_m = math.sqrt(numel)
        affine = fp.ErrorModel(
            lip=lip,
            rel=fp.up(g_n * a_r + g2 + (1 + g_n) * lam * sqrt_m * math.sqrt(n + 2)),
            abs=fp.up(g1 * offset + (1 + g_n) * lam * sqrt_m * (row_abs + 2 * (n + 2))),
            offset=fp.up(offset),
            peak_rel=fp.up((1 + g_n) * (1 + a_r)),
            peak_abs=fp.up((1 + g_n) * (float(shift.abs().max()) + lam * (row_abs + 2 * (n + 2)))),
        )
        if type(self.act) is nn.Identity:
            return affine
        return affine.then(fp.elementwise_model(1.0, numel, dtype))

    def extra_repr(self) -> str:
        return (
            f"width={self.width}, input_size={self.input_hw}, depth={self.depth}, kernel_size={self.kernel_size}, "
            f"centering={self.centering}"
        )


class LiResStack(LipschitzModule):
    """``depth`` :class:`LiResBlock` s of the same width and input size, applied in sequence.

    ``lipschitz()`` is the product of the per-block estimates, all computed by ONE grouped
    convolution (and one grouped transposed convolution) per power-iteration step on the stack's
    own iterate ``power_v`` (1, depth·width, H, W). ``lipschitz_bound()`` is the product (rounded
    up) of the per-block provable bounds; MinMax is 1-Lipschitz. Certification walks the blocks
    one by one (``sequential_parts``).
    """

    iterate_buffers = ("power_v",)

    def __init__(
        self,
        depth: int,
        width: int,
        input_size: int | Sequence[int],
        kernel_size: int = 3,
        centering: bool = True,
        activation: bool = True,
        momentum: float = 0.1,
        power_iters: int = 1,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth, self.width, self.power_iters = int(depth), int(width), int(power_iters)
        self.blocks = nn.ModuleList(
            LiResBlock(width, input_size, depth, kernel_size, centering, activation, momentum, power_iters)
            for _ in range(depth)
        )
        v = torch.randn(1, depth * width, *self.blocks[0].input_hw)
        self.register_buffer("power_v", _normalize_groups(v, depth))

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.blocks[0].input_hw

    def sequential_parts(self) -> list[nn.Module]:
        return list(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def stacked_kernel(self) -> torch.Tensor:
        """(depth·width, width, k, k): the blocks' whole kernels, for a grouped convolution."""
        return torch.cat([b.kernel() for b in self.blocks], dim=0)

    def block_lipschitz(self, n_iter: int | None = None) -> torch.Tensor:
        """(depth,) differentiable per-block estimates from one grouped power iteration."""
        n = self.power_iters if n_iter is None and self.training else (n_iter or 0)
        return power_iteration_conv2d_grouped(self.stacked_kernel(), self.power_v, self.depth, self.blocks[0].pads, n)

    def lipschitz(self, n_iter: int | None = None) -> torch.Tensor:
        return self.block_lipschitz(n_iter).prod()

    def lipschitz_bound(self) -> float:
        return mul_up(*(b.lipschitz_bound() for b in self.blocks))

    def extra_repr(self) -> str:
        return f"depth={self.depth}, width={self.width}, input_size={self.input_hw}"
