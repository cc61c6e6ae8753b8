"""``GloroNet``: a classifier with a Lipschitz-bounded body, the bottom logit, and sound certification.

Leino, Wang & Fredrikson, "Globally-Robust Neural Networks", ICML 2021. For the predicted class
``j`` and any ``i ≠ j`` the margin ``f_j − f_i`` is ``K_ji``-Lipschitz with
``K_ji = L_body · ‖w_j − w_i‖₂`` (``w`` = rows of the head). The bottom logit is
``y_⊥ = max_{i≠j} (y_i + ε·K_ji)`` and ``x`` is certified at radius ε iff
``y_j − y_i > ε·K_ji`` for all ``i ≠ j`` (strict; ``i = j`` masked by index).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from .bounds import GRAM_SLACK, pow2_scales
from .nn.base import lipschitz_bound_of, lipschitz_estimate_of


def check_epsilon(epsilon) -> float:
    eps = float(epsilon)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    return eps


def head_weight(head: nn.Module) -> torch.Tensor:
    """The (C, D) matrix the head multiplies by (row-normalised for an LLN head)."""
    if hasattr(head, "head_weight"):
        return head.head_weight()
    if isinstance(head, nn.Linear) or (hasattr(head, "weight") and hasattr(head, "out_features")):
        return head.weight
    raise TypeError(f"the head must be a linear layer (LipLinear, LLNLinear or nn.Linear), got {type(head).__name__}")


def pairwise_row_distances(w: torch.Tensor) -> torch.Tensor:
    """Differentiable ``‖w_j − w_i‖₂`` for all pairs (C, C), zero on the diagonal (training only)."""
    sq = (w * w).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (w @ w.t())).clamp_min(1e-12)
    return d2.sqrt() * (1.0 - torch.eye(w.shape[0], device=w.device, dtype=w.dtype))


def pairwise_row_distances_bound(w: torch.Tensor) -> torch.Tensor:
    """Provable upper bounds of ``‖w_j − w_i‖₂`` in float64 (C, C), diagonal 0.

    Differences of float32 values are exact in float64. Each difference vector is divided by its
    own power of two ``s`` (exact) so that no square underflows, then a ``D``-term sum of squares
    errs by at most ``D·u`` relative (covered by ``GRAM_SLACK``); the square root is rounded up.
    """
    w = w.detach().to(torch.float64).cpu()
    c, d = w.shape
    out = torch.empty(c, c, dtype=torch.float64)
    rows = max(1, (1 << 24) // max(1, c * d))
    for start in range(0, c, rows):
        diff = w[start : start + rows, None, :] - w[None, :, :]
        peak = diff.abs().amax(dim=-1, keepdim=True)
        scale = pow2_scales(peak)
        norm = ((diff / scale) ** 2).sum(dim=-1).mul(1 + GRAM_SLACK).sqrt()
        norm = torch.nextafter(norm, torch.full_like(norm, math.inf))
        out[start : start + rows] = norm * scale.squeeze(-1)  # × 2^k: exact (or inf)
    out.fill_diagonal_(0.0)
    return out


def append_bottom_logit(logits: torch.Tensor, K: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``[y, y_⊥]`` with ``y_⊥ = max_{i≠j} (y_i + ε·K_ji)``, ``j = argmax y`` (masked by index)."""
    logits = logits.float()
    pred = logits.detach().argmax(dim=1)
    shifted = logits + epsilon * K[pred].to(logits.dtype)
    own = torch.nn.functional.one_hot(pred, logits.shape[1]).bool()
    bottom = shifted.masked_fill(own, -math.inf).amax(dim=1, keepdim=True)
    return torch.cat([logits, bottom], dim=1)


@dataclass
class Certificate:
    """Per-example certification result (all tensors have batch dimension B)."""

    pred: torch.Tensor  # (B,) predicted class
    certified: torch.Tensor  # (B,) bool: robust at radius epsilon
    radius: torch.Tensor  # (B,) float64 certified L2 radius (0 when not certifiable)
    logits: torch.Tensor  # (B, C) float64
    epsilon: float


@contextlib.contextmanager
def _exact_arithmetic():
    """TF32 off and highest float32 matmul precision, restored afterwards."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


class GloroNet(nn.Module):
    """``f = head ∘ body`` with a provable Lipschitz bound on ``body`` and a linear ``head``."""

    def __init__(self, body: nn.Module, head: nn.Module, epsilon: float):
        super().__init__()
        self.body = body
        self.head = head
        self.epsilon = epsilon
        head_weight(head)  # fail early on an unsupported head
        self._bound_cache: tuple | None = None  # (structure, snapshot, L, K)
        self.config: dict | None = None  # construction arguments, set by gloronet.models.create

    @property
    def epsilon(self) -> float:
        return self._epsilon

    @epsilon.setter
    def epsilon(self, value) -> None:
        self._epsilon = check_epsilon(value)

    @property
    def num_classes(self) -> int:
        return head_weight(self.head).shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    # -- training: differentiable estimates ------------------------------------------------------
    def pairwise_lipschitz(self) -> torch.Tensor:
        """Differentiable (C, C) estimate of ``K_ji`` (power iteration: NOT a bound)."""
        w = head_weight(self.head).float()
        return lipschitz_estimate_of(self.body).to(w.device) * pairwise_row_distances(w)

    def bottom_logits(self, x: torch.Tensor, epsilon: float | None = None) -> torch.Tensor:
        """(B, C+1) logits with the bottom logit last, from the training estimate."""
        eps = self.epsilon if epsilon is None else check_epsilon(epsilon)
        return append_bottom_logit(self(x), self.pairwise_lipschitz(), eps)

    # -- certification: provable bounds ----------------------------------------------------------
    def _bound_tensors(self) -> list[torch.Tensor]:
        named = list(self.named_parameters()) + list(self.named_buffers())
        return [t for name, t in named if not name.rsplit(".", 1)[-1].startswith("power_")]

    def _sound_bounds(self) -> tuple[float, torch.Tensor]:
        """(L_body, K), recomputed only when a parameter or buffer changed.

        The cache is checked against the module structure and an exact copy of every parameter
        and buffer (iterates excepted), so any change of a weight — in place, through ``.data``,
        by an optimizer or by loading — or a swapped submodule triggers a recomputation.
        """
        tensors = self._bound_tensors()
        structure = [(name, m) for name, m in self.named_modules() if m is not self]
        if self._bound_cache is not None:
            cached_structure, snapshot, L, K = self._bound_cache
            same_modules = len(cached_structure) == len(structure) and all(
                n1 == n2 and m1 is m2 for (n1, m1), (n2, m2) in zip(cached_structure, structure)
            )  # references held: a swapped-out module's id cannot be reused
            if same_modules and len(snapshot) == len(tensors) and all(
                s.shape == t.shape and s.dtype == t.dtype and s.device == t.device and torch.equal(s, t.detach())
                for s, t in zip(snapshot, tensors)
            ):
                return L, K
        with torch.no_grad():
            L = lipschitz_bound_of(self.body)
            K = pairwise_row_distances_bound(head_weight(self.head)) * L
            K = torch.nextafter(K, torch.full_like(K, math.inf))  # product rounded up
            K.fill_diagonal_(0.0)
        self._bound_cache = (structure, [t.detach().clone() for t in tensors], L, K)
        return L, K

    def lipschitz_bound(self) -> float:
        """Provable L2 Lipschitz bound of the body (float64, rounded up; cached)."""
        return self._sound_bounds()[0]

    def lipschitz_constant(self) -> torch.Tensor:
        """Sound (C, C) float64 ``K_ji = L_body·‖w_j − w_i‖`` on the CPU; diagonal 0 (cached)."""
        return self._sound_bounds()[1].clone()

    @torch.no_grad()
    def certify(self, x: torch.Tensor, epsilon: float | None = None) -> Certificate:
        """Certify each example of ``x`` at radius ε using only the provable bound.

        The forward pass runs in eval mode, without autocast, with TF32 off; margins are compared
        in float64. Ties, non-finite inputs, logits or bounds never certify.
        """
        eps = self.epsilon if epsilon is None else check_epsilon(epsilon)
        if not torch.is_tensor(x) or x.dim() < 2 or not x.is_floating_point():
            raise ValueError(f"certify expects a floating-point batch tensor (B, ...), got {type(x).__name__} "
                             f"{tuple(x.shape) if torch.is_tensor(x) else ''}")
        dtype = next(self.parameters()).dtype
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"certify needs float32 or float64 weights, the model is in {dtype}: call net.float() first")
        K = self.lipschitz_constant()
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            with _exact_arithmetic(), torch.autocast(device_type=x.device.type, enabled=False):
                logits = self(x.to(dtype))
        finally:
            for m, mode in modes:  # restore each module's own mode (not recursively)
                m.training = mode
        y = logits.to(torch.float64)
        if y.dim() != 2 or y.shape[1] < 2:
            raise ValueError(f"certification needs logits of shape (B, C>=2), got {tuple(y.shape)}")
        K = K.to(y.device)
        pred = y.argmax(dim=1)
        margins = y.gather(1, pred[:, None]) - y  # (B, C), y_j - y_i
        Kj = K[pred]
        own = torch.nn.functional.one_hot(pred, y.shape[1]).bool()
        finite = torch.isfinite(y).all(dim=1) & torch.isfinite(x.flatten(1)).all(dim=1)
        finite &= bool(torch.isfinite(K).all())
        threshold = torch.nextafter(eps * Kj, torch.full_like(Kj, math.inf))  # ε·K rounded up
        certified = ((margins > threshold) | own).all(dim=1) & finite
        ratio = torch.where(Kj > 0, margins / Kj, torch.where(margins > 0, math.inf, 0.0))
        ratio = torch.where(torch.isinf(ratio), ratio, torch.nextafter(ratio, torch.zeros_like(ratio)))  # rounded down
        radius = ratio.masked_fill(own, math.inf).amin(dim=1).clamp_min(0.0)
        radius = torch.where(finite, radius, torch.zeros_like(radius))
        return Certificate(pred=pred, certified=certified, radius=radius, logits=y, epsilon=eps)

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}"
