"""Cholesky orthogonalisation and the CHORD layers (Hu, Leino, Wang & Fredrikson, "A Recipe for
Improved Certifiable Robustness", ICLR 2024).

For ``X`` (n × m, n ≤ m)::

    S = X Xᵀ + εI,    L = chol(S),    W = L⁻¹ X

so ``W Wᵀ = L⁻¹ (S − εI) L⁻ᵀ = I − ε (LᵀL)⁻¹``: the rows of ``W`` are orthonormal up to ``ε``
and, ``LᵀL`` being similar to ``LLᵀ = S``, its singular values are ``√(1 − ε/λᵢ(S)) ≤ 1`` *in exact
arithmetic*. In floating point they can
exceed 1 by rounding, so every layer here is bounded by :func:`gloronet.bounds.dense_norm_bound`
of the matrix it actually produced — never by "it is orthogonal". For ``n > m`` the transpose is
orthogonalised (orthonormal columns).

``ε`` is relative by default, as in hukkai/liresnet (``ε = 10⁻³ · mean diag(X Xᵀ)``, treated as a
constant: no gradient flows through it); ``relative=False`` uses an absolute ``ε`` and the
backward pass is then the exact derivative.

Backward (derivation). With ``ε`` constant, ``dW = L⁻¹ (dX − dL W)``. For ``G = ∂ℓ/∂W``::

    ⟨G, dW⟩ = ⟨B, dX⟩ + ⟨Ā, dL⟩,      B = L⁻ᵀ G,    Ā = −tril(B Wᵀ)   (L is lower triangular)

The Cholesky differential is ``dL = L Φ(L⁻¹ dS L⁻ᵀ)`` with ``Φ`` = lower triangle, halved
diagonal, so ``⟨Ā, dL⟩ = ⟨L⁻ᵀ Φ(Lᵀ Ā) L⁻¹, dS⟩`` and, with ``dS = dX Xᵀ + X dXᵀ``, the
contribution to ``∂ℓ/∂X`` is ``L⁻ᵀ sym(Lᵀ Ā) L⁻¹ X = L⁻ᵀ sym(Lᵀ Ā) W`` where
``sym(C) = tril(C) + tril(C, −1)ᵀ`` (= ``Φ(C) + Φ(C)ᵀ``). Altogether::

    ∂ℓ/∂X = B + (L⁻ᵀ sym(tril(Lᵀ Ā))) W

— two triangular solves with ``Lᵀ`` and three matmuls; no explicit inverse. (The same result as
hukkai/liresnet ``models/cholesky_grad.py``; checked against autograd and ``gradcheck`` in
tests/test_liresnet.py.)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import fp
from ..tracing import is_compiling
from ..bounds import dense_norm_bound, mul_up, power_iteration_dense
from . import accumulate
from .activation import MinMax
from .base import EvalCache, LipschitzModule, UnboundedLayerError

DEFAULT_EPS = 1e-3


def _no_autocast(t: torch.Tensor):
    return torch.autocast(device_type=t.device.type, enabled=False)


def _full_precision(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _regularised_gram(x: torch.Tensor, eps: float, relative: bool) -> torch.Tensor:
    s = x @ x.mT
    diag = s.diagonal(dim1=-2, dim2=-1)
    shift = eps * diag.mean(dim=-1, keepdim=True) if relative else torch.full_like(diag[..., :1], eps)
    return s + torch.diag_embed(shift.detach().expand_as(diag))


class CholeskyOrthFunction(torch.autograd.Function):
    """``W = chol(X Xᵀ + εI)⁻¹ X`` for ``X`` (…, n, m), n ≤ m, with the hand-derived backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float, relative: bool):
        L, _ = torch.linalg.cholesky_ex(_regularised_gram(x, eps, relative))  # no host sync
        w = torch.linalg.solve_triangular(L, x, upper=False)
        ctx.save_for_backward(w, L)
        return w

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        w, L = ctx.saved_tensors
        with _no_autocast(g):
            g = g.to(w.dtype)
            lt = L.mT
            b = torch.linalg.solve_triangular(lt, g, upper=True)  # B = L⁻ᵀ G
            a = -(b @ w.mT).tril()  # Ā = ∂ℓ/∂L
            c = (lt @ a).tril()
            c = c + c.tril(-1).mT  # sym(·)
            gx = torch.linalg.solve_triangular(lt, c, upper=True) @ w + b
        return gx, None, None


def cholesky_orth(x: torch.Tensor, eps: float = DEFAULT_EPS, relative: bool = True) -> torch.Tensor:
    """Cholesky-orthogonalise the last two dims of ``x`` (rows if n ≤ m, else columns)."""
    if x.dim() < 2:
        raise ValueError(f"cholesky_orth needs a matrix (…, n, m), got shape {tuple(x.shape)}")
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    with _no_autocast(x):  # Cholesky needs fp32 at least, also inside an autocast region
        x = _full_precision(x)
        if x.shape[-2] > x.shape[-1]:
            return CholeskyOrthFunction.apply(x.mT, float(eps), bool(relative)).mT
        return CholeskyOrthFunction.apply(x, float(eps), bool(relative))


def cholesky_orth_reference(x: torch.Tensor, eps: float = DEFAULT_EPS, relative: bool = True) -> torch.Tensor:
    """The same map with plain autograd (for tests; ε detached as in :func:`cholesky_orth`)."""
    if x.shape[-2] > x.shape[-1]:
        return cholesky_orth_reference(x.mT, eps, relative).mT
    L = torch.linalg.cholesky(_regularised_gram(x, eps, relative))
    return torch.linalg.solve_triangular(L, x, upper=False)


# --------------------------------------------------------------------------- shared machinery
class _CholeskyLayer(LipschitzModule):
    """A layer whose weight is produced by Cholesky orthogonalisation of its parameters.

    * training mode: the weight is recomputed (differentiably, in fp32 even under autocast) at
      every forward; ``lipschitz()`` reuses that same tensor once if the parameters have not changed
      since, so a training step orthogonalises once.
    * eval mode: the produced weight is computed without gradient and cached
      (:class:`~gloronet.nn.state.EvalCache`, keyed on the layer's whole state: parameters,
      buffers, ``eps``, ``depth`` …); the forward pass, ``lipschitz_bound()`` and ``error_model()`` read the
      *same* tensor, so the bound describes exactly the map that is certified. No gradient
      reaches the parameters in eval mode. :meth:`produced_weight` hands out a copy, so editing
      it cannot change the cached weight behind the bound.
    """

    iterate_buffers = ("power_u",)
    derived_attributes = ("_step_cache",)  # the training step's weight, reused by lipschitz()

    def __init__(self, eps: float, relative_eps: bool, power_iters: int):
        super().__init__()
        if not (eps >= 0 and math.isfinite(eps)):
            raise ValueError(f"eps must be finite and >= 0, got {eps}")
        self.eps, self.relative_eps, self.power_iters = float(eps), bool(relative_eps), int(power_iters)
        self._eval = EvalCache()
        self._step_cache: tuple[tuple, torch.Tensor] | None = None

    # subclasses: the parameters the weight depends on, and the differentiable weight itself
    def _orth_params(self) -> list[torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def _build_weight(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def compute_weight(self) -> torch.Tensor:
        """The orthogonalised weight, differentiable, in fp32 (fp64 for a double model)."""
        with _no_autocast(self._orth_params()[0]):
            return self._build_weight()

    def _versions(self) -> tuple:
        return tuple((p._version, p.data_ptr(), p.device) for p in self._orth_params())

    def _applied_weight(self) -> torch.Tensor:
        """The eval-mode weight itself (no gradient, cached while the layer's whole state is
        unchanged: :class:`~gloronet.nn.state.EvalCache`): what forward and bounds read."""
        return self._eval.get(self, self.compute_weight)

    def produced_weight(self) -> torch.Tensor:
        """A copy of the eval-mode weight (the cached one stays private)."""
        return self._applied_weight().clone()

    def _matrix_bounds(self) -> list[float]:
        """``dense_norm_bound`` of each produced matrix (on its device, the power-iteration iterate
        ``power_u`` seeding the estimate), computed once per produced weight."""
        w = self._applied_weight()
        mats = w.unbind(0) if w.dim() == 3 else [w]
        starts = self.power_u.reshape(len(mats), -1)
        return self._eval.remember(self, "bounds", lambda: [dense_norm_bound(m, u) for m, u in zip(mats, starts)])

    def weight_matrix(self) -> torch.Tensor:
        """The weight the forward pass uses in the current mode (in eval mode a copy of the cached
        one, like :meth:`produced_weight`)."""
        if not self.training:
            return self.produced_weight()
        return self._forward_weight()

    def _forward_weight(self) -> torch.Tensor:
        """What the forward pass multiplies by: the cached weight itself in eval mode."""
        if not self.training:
            return self._applied_weight()
        w = self.compute_weight()
        if not is_compiling() and torch.is_grad_enabled():
            self._step_cache = (self._versions(), w)
        return w

    def _weight_for_estimate(self) -> torch.Tensor:
        if not self.training:
            return self._applied_weight()
        cache, self._step_cache = self._step_cache, None
        if (
            cache is not None
            and not is_compiling()
            and torch.is_grad_enabled()
            and cache[1].requires_grad
            and cache[0] == self._versions()
        ):
            return cache[1]
        return self.compute_weight()

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .double(): drop cached weights
        self._eval.clear()
        self._step_cache = None
        return super()._apply(fn, *args, **kwargs)

    def _n_iter(self, n_iter: int | None) -> int:
        return self.power_iters if n_iter is None and self.training else (n_iter or 0)


# --------------------------------------------------------------------------- dense
class CholeskyOrthLinear(_CholeskyLayer):
    """Dense layer ``y = W x + b`` with ``W = CholeskyOrth(V)`` (out × in).

    Estimate: warm-started power iteration on the produced ``W``. Bound: ``dense_norm_bound`` of
    the produced ``W`` (≤ 1 only up to rounding, so it is computed, not assumed).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        eps: float = DEFAULT_EPS,
        relative_eps: bool = True,
        power_iters: int = 1,
    ):
        super().__init__(eps, relative_eps, power_iters)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.raw_weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.orthogonal_(self.raw_weight)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        u = torch.randn(out_features)
        self.register_buffer("power_u", u / u.norm())

    def _orth_params(self) -> list[torch.Tensor]:
        return [self.raw_weight]

    def _build_weight(self) -> torch.Tensor:
        return cholesky_orth(_full_precision(self.raw_weight), self.eps, self.relative_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects {self.in_features} input features, got shape {tuple(x.shape)}")
        w = self._forward_weight().to(x.dtype)
        return F.linear(x, w, self.bias) if self.training else accumulate.linear(x, w, self.bias)

    def lipschitz(self, n_iter: int | None = None) -> torch.Tensor:
        """Power-iteration estimate (from below) of ``‖W‖₂`` for the produced ``W``."""
        return power_iteration_dense(self._weight_for_estimate(), self.power_u, self._n_iter(n_iter))

    def lipschitz_bound(self) -> float:
        return self._matrix_bounds()[0]

    def error_model(self, in_shape, dtype, lip: float) -> fp.ErrorModel:
        depth = accumulate.rounding_depth(self.in_features, self.in_features, self.bias is not None)
        return fp.affine_error_model(self._applied_weight(), self.bias, lip, dtype, math.prod(in_shape[:-1]), depth=depth)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"eps={self.eps}, relative_eps={self.relative_eps}"
        )


class ChordLinear(CholeskyOrthLinear):
    """The CHORD dense residual layer ``W = CholeskyOrth(I + depth^-½ · γ ⊙ V)`` (square).

    ``γ`` scales the rows of ``V`` (one learnable scale per output feature), ``depth`` is the
    number of such layers in the stack (it only sets the residual scale).
    """

    def __init__(
        self,
        features: int,
        depth: int = 1,
        bias: bool = True,
        eps: float = DEFAULT_EPS,
        relative_eps: bool = True,
        power_iters: int = 1,
    ):
        super().__init__(features, features, bias, eps, relative_eps, power_iters)
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth = int(depth)
        with torch.no_grad():
            self.raw_weight.normal_().div_(features)
        self.gamma = nn.Parameter(torch.ones(features, 1))

    def _orth_params(self) -> list[torch.Tensor]:
        return [self.raw_weight, self.gamma]

    def _build_weight(self) -> torch.Tensor:
        v = _full_precision(self.raw_weight)
        x = torch.eye(self.in_features, dtype=v.dtype, device=v.device) + (self.depth**-0.5) * (self.gamma.to(v.dtype) * v)
        return cholesky_orth(x, self.eps, self.relative_eps)

    def extra_repr(self) -> str:
        return f"features={self.in_features}, depth={self.depth}, eps={self.eps}, relative_eps={self.relative_eps}"


class ChordMLP(_CholeskyLayer):
    """``depth`` CHORD dense residual layers, each followed by MinMax, orthogonalised in ONE batched
    Cholesky call: ``W_i = CholeskyOrth(I + depth^-½ · γ_i ⊙ V_i)``.

    Estimate: batched warm-started power iteration (product of per-layer estimates).
    Bound: product (rounded up) of ``dense_norm_bound`` of each produced ``W_i``.
    """

    def __init__(
        self,
        features: int,
        depth: int,
        activation: bool = True,
        eps: float = DEFAULT_EPS,
        relative_eps: bool = True,
        power_iters: int = 1,
    ):
        super().__init__(eps, relative_eps, power_iters)
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if activation and features % 2:
            raise ValueError(f"MinMax needs an even number of features, got {features}")
        self.features, self.depth = int(features), int(depth)
        self.raw_weight = nn.Parameter(torch.randn(depth, features, features) / features)
        self.gamma = nn.Parameter(torch.ones(depth, features, 1))
        self.bias = nn.Parameter(torch.zeros(depth, features))
        self.act = MinMax() if activation else nn.Identity()
        u = torch.randn(depth, features)
        self.register_buffer("power_u", u / u.norm(dim=1, keepdim=True))

    def _orth_params(self) -> list[torch.Tensor]:
        return [self.raw_weight, self.gamma]

    def _build_weight(self) -> torch.Tensor:
        v = _full_precision(self.raw_weight)
        eye = torch.eye(self.features, dtype=v.dtype, device=v.device)
        return cholesky_orth(eye + (self.depth**-0.5) * (self.gamma.to(v.dtype) * v), self.eps, self.relative_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.features:
            raise ValueError(f"ChordMLP expects {self.features} input features, got shape {tuple(x.shape)}")
        weights = self._forward_weight().to(x.dtype)
        dense = F.linear if self.training else accumulate.linear
        for w, b in zip(weights.unbind(0), self.bias.unbind(0)):
            x = self.act(dense(x, w, b))
        return x

    def layer_lipschitz(self, n_iter: int | None = None) -> torch.Tensor:
        """(depth,) differentiable per-layer estimates (batched power iteration)."""
        weights = self._weight_for_estimate()
        u = self.power_u
        with _no_autocast(weights), torch.no_grad():
            w = weights.detach().to(u.dtype)
            for _ in range(self._n_iter(n_iter)):
                v = F.normalize(torch.einsum("dij,di->dj", w, u), dim=1)
                u.copy_(F.normalize(torch.einsum("dij,dj->di", w, v), dim=1))
            v = F.normalize(torch.einsum("dij,di->dj", w, u), dim=1)
        with _no_autocast(weights):
            return torch.einsum("di,dij,dj->d", u.to(weights.dtype), weights, v.to(weights.dtype))

    def lipschitz(self, n_iter: int | None = None) -> torch.Tensor:
        return self.layer_lipschitz(n_iter).prod()

    def lipschitz_bound(self) -> float:
        self._check_act()
        return mul_up(*self._matrix_bounds())

    def _check_act(self) -> None:
        if type(self.act) not in (MinMax, nn.Identity):
            raise UnboundedLayerError(f"ChordMLP.act must be MinMax or Identity (1-Lipschitz, exact), got {type(self.act).__name__}")

    def error_model(self, in_shape, dtype, lip: float) -> fp.ErrorModel:
        """The composition of the layers' dense error models (each followed by MinMax)."""
        self._check_act()
        positions, numel = math.prod(in_shape[:-1]), math.prod(in_shape)
        depth = accumulate.rounding_depth(self.features, self.features, True)
        models = []
        for w, b, bound in zip(self._applied_weight().unbind(0), self.bias.unbind(0), self._matrix_bounds()):
            models.append(fp.affine_error_model(w, b, bound, dtype, positions, depth=depth))
            if type(self.act) is MinMax:
                models.append(fp.elementwise_model(1.0, numel, dtype))
        return fp.compose(models)

    def extra_repr(self) -> str:
        return f"features={self.features}, depth={self.depth}, eps={self.eps}, relative_eps={self.relative_eps}"


# --------------------------------------------------------------------------- patch convolution
class CholeskyOrthConv2d(_CholeskyLayer):
    """Patchify convolution (kernel ``k``, stride ``k``) whose kernel, read as the matrix
    ``M`` (out × in·k²), is Cholesky-orthogonalised — the neck of CHORD (``Map2Vec``).

    Bound: the patches are disjoint, so after TensorFlow-'same' zero padding (an isometric
    embedding) the layer is ``M`` applied independently to each patch — a direct sum of copies of
    ``M`` acting on disjoint coordinates, whose norm is exactly ``‖M‖₂`` for any input size. Hence
    ``dense_norm_bound`` of the produced ``M``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 4,
        bias: bool = True,
        eps: float = DEFAULT_EPS,
        relative_eps: bool = True,
        power_iters: int = 1,
    ):
        super().__init__(eps, relative_eps, power_iters)
        self.in_channels, self.out_channels, self.kernel_size = int(in_channels), int(out_channels), int(kernel_size)
        self.raw_weight = nn.Parameter(torch.empty(out_channels, in_channels * kernel_size**2))
        nn.init.orthogonal_(self.raw_weight)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        u = torch.randn(out_channels)
        self.register_buffer("power_u", u / u.norm())

    def _orth_params(self) -> list[torch.Tensor]:
        return [self.raw_weight]

    def _build_weight(self) -> torch.Tensor:
        return cholesky_orth(_full_precision(self.raw_weight), self.eps, self.relative_eps)

    def pads(self, hw) -> tuple[int, int, int, int]:
        k = self.kernel_size
        th, tw = (-hw[0]) % k, (-hw[1]) % k
        return tw // 2, tw - tw // 2, th // 2, th - th // 2

    def output_hw(self, hw) -> tuple[int, int]:
        return -(-hw[0] // self.kernel_size), -(-hw[1] // self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"CholeskyOrthConv2d expects (B, {self.in_channels}, H, W) input, got shape {tuple(x.shape)}")
        m = self._forward_weight().to(x.dtype)
        k = self.kernel_size
        kernel = m.reshape(self.out_channels, self.in_channels, k, k)
        if self.training:
            return F.conv2d(F.pad(x, self.pads(x.shape[-2:])), kernel, self.bias, stride=k)
        return accumulate.conv2d(x, kernel, self.bias, k, self.pads(x.shape[-2:]))

    def lipschitz(self, n_iter: int | None = None) -> torch.Tensor:
        return power_iteration_dense(self._weight_for_estimate(), self.power_u, self._n_iter(n_iter))

    def lipschitz_bound(self) -> float:
        return self._matrix_bounds()[0]

    def error_model(self, in_shape, dtype, lip: float) -> fp.ErrorModel:
        """Patches are disjoint: ``M`` acts on each separately, ``‖|A|‖₂ = ‖|M|‖₂``."""
        ho, wo = self.output_hw(in_shape[-2:])
        depth = accumulate.rounding_depth(self.in_channels * self.kernel_size**2, self.in_channels, self.bias is not None)
        return fp.affine_error_model(self._applied_weight(), self.bias, lip, dtype, ho * wo, depth=depth)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.kernel_size}, eps={self.eps}"
