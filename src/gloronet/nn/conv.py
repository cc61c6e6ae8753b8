"""``LipConv2d``: a 2-D convolution that knows its Lipschitz estimate and provable bound.

The operator norm of a convolution depends on the input size, so the layer records the spatial
size it is applied to (given as ``input_size`` or taken from the first forward pass) and refuses
other sizes: the bound always describes the map actually computed. The size is kept as a plain
tuple (``input_hw``; the ``input_size`` buffer mirrors it for checkpoints), so the check compares
Python ints with the input's shape — a shape guard under ``torch.compile`` / ``torch.export``,
not a data-dependent read of a tensor.

Padding ``'same'`` follows TensorFlow (the odd pixel at the end), as in the original GloRo code.

Subclasses whose kernel is *derived* from the parameters (``AOLConv2d``) override
:meth:`derive_weight`, as ``LipLinear`` subclasses do: in eval mode the forward pass, the bound and
the error model then all read one cached kernel (:class:`gloronet.nn.state.EvalCache`).

Rounding: each output sums ``n = (C_in/groups)·k²`` products, in eval mode in chunks of input
channels (:mod:`gloronet.nn.accumulate`), then the bias is added: every term is rounded at most
``d ≈ n/16`` times and ``‖ŷ − y‖ ≤ γ_d(‖|A|‖₂‖x‖ + ‖b‖)`` with ``‖|A|‖₂`` from
:func:`gloronet.bounds.abs_conv2d_norm_bound` (:func:`gloronet.fp.dot_product_model`).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import fp
from ..bounds import (
    abs_conv2d_norm_bound,
    conv2d_apply,
    conv2d_norm_bound,
    conv_output_size,
    power_iteration_conv2d,
    same_padding,
)
from . import accumulate, depthwise
from .base import EvalCache, LipschitzModule
from .derived import DerivedWeight


class LipConv2d(DerivedWeight, LipschitzModule):
    iterate_buffers = ("power_v",)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: str | int = "same",
        groups: int = 1,
        bias: bool = True,
        input_size: Sequence[int] | None = None,
        power_iters: int = 1,
    ):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels={in_channels} and out_channels={out_channels} must be divisible by groups={groups}")
        if not (padding in ("same", "valid") or (isinstance(padding, int) and padding >= 0)):
            raise ValueError(f"padding must be 'same', 'valid' or a non-negative int, got {padding!r}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride, self.groups = int(kernel_size), int(stride), int(groups)
        self.padding = padding
        self.power_iters = int(power_iters)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.orthogonal_(self.weight)
        self.register_buffer("input_size", torch.zeros(2, dtype=torch.long))
        self.register_buffer("power_v", torch.empty(0))
        self._hw: tuple[int, int] | None = None
        self._eval_weight = EvalCache()
        if input_size is not None:
            self._set_input_size(tuple(int(s) for s in input_size))

    # -- geometry ---------------------------------------------------------------------------
    @property
    def input_hw(self) -> tuple[int, int] | None:
        return self._hw

    def pads(self, hw: Sequence[int]) -> tuple[int, int, int, int]:
        """(left, right, top, bottom) zero padding for inputs of size ``hw``."""
        k, s = self.kernel_size, self.stride
        if self.padding == "same":
            top, bottom = same_padding(hw[0], k, s)
            left, right = same_padding(hw[1], k, s)
            return left, right, top, bottom
        p = 0 if self.padding == "valid" else self.padding
        return p, p, p, p

    def output_hw(self, hw: Sequence[int]) -> tuple[int, int]:
        left, right, top, bottom = self.pads(hw)
        k, s = self.kernel_size, self.stride
        return conv_output_size(hw[0], k, s, top, bottom), conv_output_size(hw[1], k, s, left, right)

    def _set_input_size(self, hw: tuple[int, int]) -> None:
        if min(self.output_hw(hw)) < 1:
            raise ValueError(f"input size {hw} is too small for kernel {self.kernel_size} with padding {self.padding!r}")
        self.input_size.copy_(torch.tensor(hw))
        self._hw = (int(hw[0]), int(hw[1]))
        v = torch.randn(1, self.in_channels, *hw, device=self.weight.device)
        self.power_v = v / v.norm()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "power_v"
        if key in state_dict and state_dict[key].shape != self.power_v.shape:
            self.power_v = torch.empty_like(state_dict[key], device=self.power_v.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        h, w = (int(s) for s in self.input_size.tolist())
        self._hw = (h, w) if h > 0 else None

    # -- forward, estimate, bound --------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"LipConv2d expects (B, {self.in_channels}, H, W) input, got shape {tuple(x.shape)}")
        hw = tuple(x.shape[-2:])
        if self.input_hw is None:
            self._set_input_size(hw)
        elif hw != self.input_hw:
            raise ValueError(
                f"LipConv2d was set up for {self.input_hw[0]}x{self.input_hw[1]} inputs (its Lipschitz bound "
                f"depends on the input size) but got {hw[0]}x{hw[1]}; build a new model for this input size"
            )
        if not self.training:
            return self.eval_conv(x, self._applied_weight(), self.bias)
        w = self.derive_weight()
        left, right, top, bottom = self.pads(hw)
        if left == right and top == bottom:  # zero padding inside the kernel: no padded copy, bias fused
            return F.conv2d(x, w, self.bias, self.stride, (top, left), groups=self.groups)
        out = conv2d_apply(x, w, self.stride, (left, right, top, bottom), self.groups)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)

    def eval_conv(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The eval-mode convolution of ``x`` with kernel ``w`` and ``bias`` (the applied weight, or
        an exact float64 copy of it: :mod:`gloronet.centre64`): chunked sums, or taps for
        depthwise kernels (no Winograd)."""
        hw = tuple(x.shape[-2:])
        if depthwise.needs_taps(self.in_channels, w.shape, self.stride, self.groups):
            return depthwise.conv2d_taps(x, w, bias, self.pads(hw))
        return accumulate.conv2d(x, w, bias, self.stride, self.pads(hw), self.groups)

    def float64_map(self):
        """This layer's eval map in float64 (:mod:`gloronet.centre64`): :meth:`eval_conv` with the
        applied weight and the bias cast exactly."""
        w, b = self.applied_float64()
        return lambda h: self.eval_conv(h, w, b)

    def _require_input_size(self) -> tuple[int, int]:
        if self.input_hw is None:
            raise RuntimeError("LipConv2d does not know its input size yet: pass input_size=(H, W) or run a forward pass first")
        return self.input_hw

    def _checked_input_size(self) -> tuple[int, int]:
        """The input size, refused if the ``input_size`` buffer was edited behind the layer's back
        (the forward pass checks inputs against ``input_hw``, so that is what the bounds describe)."""
        hw = self._require_input_size()
        if tuple(self.input_size.tolist()) != hw:
            raise ValueError(
                f"LipConv2d.input_size holds {tuple(self.input_size.tolist())} but the layer is set up for {hw}: "
                "the buffer only mirrors the size for checkpoints; build a new layer (or load a state_dict) instead"
            )
        return hw

    def lipschitz(self, n_iter: int | None = None) -> torch.Tensor:
        """Differentiable estimate (from below) of the operator norm at the recorded input size."""
        hw = self._require_input_size()
        n = self.power_iters if n_iter is None and self.training else (n_iter or 0)
        return power_iteration_conv2d(self.forward_weight(), self.power_v, self.stride, self.pads(hw), self.groups, n)

    def lipschitz_bound(self) -> float:
        """Provable bound at the recorded input size (:func:`gloronet.bounds.conv2d_norm_bound`,
        computed on the weight's device); the power-iteration iterate seeds its estimates."""
        hw = self._checked_input_size()
        start = self.power_v if self.power_v.shape == (1, self.in_channels, *hw) else None
        return conv2d_norm_bound(self._applied_weight(), hw, self.stride, self.pads(hw), self.groups, start=start)

    def error_model(self, in_shape, dtype, lip: float) -> fp.ErrorModel:
        ho, wo = self.output_hw(self._checked_input_size())
        w = self._applied_weight()
        abs_norm = abs_conv2d_norm_bound(w, self.stride, self.groups)
        n, c_in = w[0].numel(), w.shape[1]
        bias = self.bias is not None
        depth = accumulate.rounding_depth(n, c_in, bias) if self.groups == 1 else n + bias
        return fp.affine_error_model(w.flatten(1), self.bias, lip, dtype, ho * wo, abs_norm, depth)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding!r}, groups={self.groups}, input_size={self.input_hw}"
        )
