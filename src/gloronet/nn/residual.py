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

Estimate: power iteration on the whole kernel ``K`` (identity included). Bound:
:func:`gloronet.bounds.conv2d_norm_bound` of the whole kernel at the block's input size — exactly
the kernel the eval-mode forward pass convolves with.

:class:`LiResStack` runs the power iterations of all its blocks as ONE grouped convolution per
step (iterates concatenated along channels, ``groups = depth``), as ``LiResConv.lipschitz`` does.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..bounds import conv2d_adjoint, conv2d_apply, conv2d_norm_bound, mul_up, power_iteration_conv2d, same_padding
from .activation import MinMax
from .base import LipschitzModule


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

    @property
    def pads(self) -> tuple[int, int, int, int]:
        top, bottom = same_padding(self.input_hw[0], self.kernel_size, 1)
        left, right = same_padding(self.input_hw[1], self.kernel_size, 1)
        return left, right, top, bottom

    def residual_kernel(self) -> torch.Tensor:
        """``depth^-½ · γ ⊙ V`` (the residual branch alone)."""
        return (self.depth**-0.5) * (self.gamma * self.weight)

    def kernel(self) -> torch.Tensor:
        """The whole kernel ``I_centre + depth^-½ · γ ⊙ V`` (what eval mode convolves with)."""
        w = self.residual_kernel()
        c = self.kernel_size // 2
        eye = torch.eye(self.width, dtype=w.dtype, device=w.device)[:, :, None, None]
        return w + F.pad(eye, (c, c, c, c))

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
        if self.centering and self.training:
            r = F.conv2d(x, self.residual_kernel(), padding=c)
            mean = r.mean(dim=(0, 2, 3))
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
            out = x + r + (self.bias - mean).to(r.dtype).view(1, -1, 1, 1)
        else:
            shift = self.bias - self.running_mean if self.centering else self.bias
            out = F.conv2d(x, self.kernel(), padding=c)
            out = out + shift.to(out.dtype).view(1, -1, 1, 1)
        return self.act(out)

    def lipschitz(self, n_iter: int | None = None) -> torch.Tensor:
        """Differentiable estimate (from below) of ``‖conv(·, K)‖`` at the block's input size."""
        n = self.power_iters if n_iter is None and self.training else (n_iter or 0)
        return power_iteration_conv2d(self.kernel(), self.power_v, 1, self.pads, 1, n)

    def lipschitz_bound(self) -> float:
        return conv2d_norm_bound(self.kernel().detach(), self.input_hw, 1, self.pads)

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
    up) of the per-block provable bounds; MinMax is 1-Lipschitz.
    """

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
