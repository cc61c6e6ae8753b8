"""Training losses for GloRo networks: GloRo cross-entropy, TRADES, EMMA and logit annealing (LA,
BRONet) — and ``standard``
cross-entropy on the clean logits (no bottom logit), for the non-robust twin of a GloRo model.

All losses are pure functions on tensors, differentiable, and return the mean over the batch
(``reduction="mean"``), the sum (``"sum"``) or the per-example values (``"none"``).

Conventions (shared with :mod:`gloronet.gloro`):

* ``logits``        (B, C) clean logits ``y = f(x)``.
* ``labels``        (B,) integer class indices in ``[0, C)``.
* ``bottom_logits`` (B, C+1): ``[y, y_⊥]`` with ``y_⊥ = max_{i≠j} (y_i + ε·K[j, i])`` and ``j`` the
  predicted class (``argmax y``), ``i = j`` masked by index.
* ``K``             (C, C) pairwise Lipschitz constants: ``K[j, i]`` bounds the Lipschitz constant of
  the margin ``f_j − f_i``; symmetric, zero diagonal, non-negative. For training this is the
  differentiable *estimate*, not the certification bound.
* ``epsilon``       the training radius, a float ``≥ 0`` (or a 0-d tensor).

Inputs in float16 / bfloat16 are computed in float32 (as autocast does for cross-entropy);
float32 and float64 are kept.

:func:`make_loss` turns a config value (``"crossentropy"``, ``"trades"``, ``{"name": "trades",
"lam": 1.5}``, ``"emma"``, ``{"name": "la", "gamma": 5}``) into a :class:`GloroLoss`, whose ``needs`` attribute tells the training
loop which tensors to compute.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from .tracing import is_compiling

__all__ = [
    "gloro_cross_entropy",
    "standard_cross_entropy",
    "trades_kl",
    "trades_loss",
    "emma_loss",
    "logit_annealing_loss",
    "LA_GAMMA",
    "LA_OFFSET",
    "LA_TEMPERATURE",
    "GloroLoss",
    "make_loss",
    "LOSS_NAMES",
    "EMMA_CLIP_MIN",
    "EMMA_CLIP_MAX",
    "EMMA_DENOM_MIN",
]

# EMMA constants, as in the liresnet reference code (hukkai/liresnet, models/margin_layer.py,
# ``emma_loss``): ``eps_ji = (-y / (margin * eps).clip(1e-8)).clip(0.01, 1)``.
EMMA_CLIP_MIN = 0.01
EMMA_CLIP_MAX = 1.0
EMMA_DENOM_MIN = 1e-8
# Logit-annealing defaults, as BRONet's CIFAR-10 config (ntuaislab/BRONet,
# bronet/configs/benchmark_reproduce/cifar10.yaml: gamma 5.0, temperature 0.75, offset 2.0).
LA_GAMMA = 5.0
LA_OFFSET = 2.0
LA_TEMPERATURE = 0.75

_REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------- validation helpers


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _reduce(values: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


def _check_scores(x: Any, name: str, min_classes: int) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (B, classes), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[1] < min_classes:
        raise ValueError(
            f"{name} must have at least {min_classes} columns, got shape {tuple(x.shape)}"
        )


def _working_dtype(*tensors: Tensor) -> torch.dtype:
    """Promote to at least float32 (half/bfloat16 losses are computed in float32)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_labels(labels: Any, batch: int, num_classes: int, what: str) -> Tensor:
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.ndim != 1 or labels.shape[0] != batch:
        raise ValueError(
            f"labels must have shape ({batch},) to match {what}, got shape {tuple(labels.shape)}"
        )
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be an integer (int64) tensor, got dtype {labels.dtype}")
    labels = labels.long()
    # Out-of-range labels would be a device-side assert on CUDA (unrecoverable); check eagerly.
    # This needs a host sync, so it is skipped inside torch.compile graphs.
    if batch > 0 and not is_compiling():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"labels must lie in [0, {num_classes}) (the bottom class is never a label); "
                f"got values in [{lo}, {hi}]"
            )
    return labels


def _check_nonneg_scalar(value: Any, name: str) -> None:
    """``value`` must be a finite number >= 0 or a 0-d tensor (tensor values are not inspected)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(float(value)) or float(value) < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")


# --------------------------------------------------------------------------- losses


def gloro_cross_entropy(bottom_logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """GloRo cross-entropy (Leino, Wang & Fredrikson, ICML 2021).

    Softmax cross-entropy over the ``C + 1`` GloRo logits ``[y, y_⊥]`` with the true label::

        loss = −log softmax([y, y_⊥])[label] = logsumexp([y, y_⊥]) − y_label

    The bottom class ⊥ is never a label, so minimising this loss pushes ``y_label`` above ``y_⊥``,
    i.e. towards a correct *and* certified prediction. This is ``gloro.training.losses.Crossentropy``
    (klasleino/gloro) at temperature 1, applied to the GloroNet output ``[y, y_⊥]``.

    Args:
        bottom_logits: (B, C+1) clean logits with the bottom logit as the last column.
        labels: (B,) integer labels in ``[0, C)``.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per-example, shape (B,)).
    """
    _check_reduction(reduction)
    _check_scores(bottom_logits, "bottom_logits", min_classes=3)
    batch, num_cols = bottom_logits.shape
    labels = _check_labels(labels, batch, num_cols - 1, "bottom_logits")
    z = bottom_logits.to(_working_dtype(bottom_logits))
    return F.cross_entropy(z, labels, reduction=reduction)


def standard_cross_entropy(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Ordinary softmax cross-entropy on the ``C`` clean logits: no bottom logit, ε ignored.

    Trains the *non-robust twin* of a GloRo model (same architecture, data and loop), the
    baseline that shows what robust training changes (membership inference, attributions).
    """
    _check_reduction(reduction)
    _check_scores(logits, "logits", min_classes=2)
    labels = _check_labels(labels, logits.shape[0], logits.shape[1], "logits")
    return F.cross_entropy(logits.to(_working_dtype(logits)), labels, reduction=reduction)


def _check_clean_and_bottom(logits: Tensor, bottom_logits: Tensor) -> None:
    _check_scores(logits, "logits", min_classes=2)
    _check_scores(bottom_logits, "bottom_logits", min_classes=3)
    if bottom_logits.shape[0] != logits.shape[0]:
        raise ValueError(
            f"logits and bottom_logits must have the same batch size, got {tuple(logits.shape)} "
            f"and {tuple(bottom_logits.shape)}"
        )
    if bottom_logits.shape[1] != logits.shape[1] + 1:
        raise ValueError(
            "bottom_logits must have exactly one more column than logits (the bottom logit), got "
            f"logits {tuple(logits.shape)} and bottom_logits {tuple(bottom_logits.shape)}"
        )


def trades_kl(logits: Tensor, bottom_logits: Tensor, reduction: str = "mean") -> Tensor:
    """The robust (KL) term of GloRo-TRADES, ``KL(P ‖ Q)`` per example.

    ``P = [softmax(y), 0]`` is the clean prediction distribution padded with a zero-probability
    bottom class, ``Q = softmax([y, y_⊥])`` the (C+1)-way GloRo distribution::

        KL(P ‖ Q) = Σ_{i<C} p_i · (log p_i − log q_i)

    (the ⊥ term vanishes because ``p_⊥ = 0``). When ``bottom_logits[:, :C] == logits`` (as a GloRo
    net produces them) ``log p_i − log q_i`` is the same for every ``i < C`` and the KL has the
    closed form ``logsumexp([y, y_⊥]) − logsumexp(y) = softplus(y_⊥ − logsumexp(y)) = −log(1 − q_⊥)``
    — the form used in hukkai/liresnet ``trades_loss``. We evaluate the general sum, which is exact
    for any pair of inputs (so gradients w.r.t. ``logits`` and ``bottom_logits`` are each correct),
    and gradient flows through both ``P`` and ``Q`` as in the reference (no stop-gradient).
    """
    _check_reduction(reduction)
    _check_clean_and_bottom(logits, bottom_logits)
    dtype = _working_dtype(logits, bottom_logits)
    num_classes = logits.shape[1]
    log_p = torch.log_softmax(logits.to(dtype), dim=1)
    log_q = torch.log_softmax(bottom_logits.to(dtype), dim=1)[:, :num_classes]
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    return _reduce(kl, reduction)


def trades_loss(
    logits: Tensor,
    bottom_logits: Tensor,
    labels: Tensor,
    lam: float | Tensor = 1.0,
    reduction: str = "mean",
    robust: str = "kl",
) -> Tensor:
    """GloRo-TRADES loss, as ``gloro.training.losses.Trades`` (klasleino/gloro, default
    ``robust_loss_string='kl_divergence'``, temperature 1) defines it for GloRo nets::

        loss = CE(y, label) + λ · KL(P ‖ Q)
        P = [softmax(y), 0]            (clean distribution, zero-probability bottom column appended)
        Q = softmax([y, y_⊥])          (GloRo (C+1)-way distribution)
        KL(P ‖ Q) = Σ_{i<C} p_i (log p_i − log q_i)  = softplus(y_⊥ − logsumexp(y))  when consistent

    In the reference, ``y_pred`` is the GloroNet output ``[y, y_⊥]``; the clean term is
    ``CategoricalCrossentropy(from_logits=True)(y_true, y_pred[:, :-1])``, the robust term is
    ``KLDivergence()(add_extra_column(softmax(y_pred[:, :-1])), softmax(y_pred))`` — Keras'
    ``KLDivergence(t, p) = Σ t·log(t/p)``, i.e. the KL direction is KL(clean ‖ GloRo) — and the two are
    combined as ``standard_loss + lam * robust_loss``. Gradient flows through both arguments of the KL.
    Differences from the reference: Keras clips both distributions to ``[1e-7, 1]`` inside
    ``KLDivergence`` (adding a ≈1e-7 term for the zero bottom entry); we use exact log-softmaxes.
    hukkai/liresnet ``trades_loss`` computes the same KL in closed form (see :func:`trades_kl`).

    Args:
        logits: (B, C) clean logits (used for the clean CE and for ``P``).
        bottom_logits: (B, C+1) ``[y, y_⊥]`` (used for ``Q``); its first C columns are expected to
            equal ``logits`` (not checked: that would need a host sync every step).
        labels: (B,) integer labels in ``[0, C)``.
        lam: the TRADES weight λ ≥ 0 (float or 0-d tensor, e.g. from a schedule).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        robust: ``"kl"`` (default) or ``"ce"``: the cross-entropy ``H(P, Q) = KL(P ‖ Q) + H(P)``
            (gloro's ``robust_loss_string='crossentropy'``, ``trades_ce``; the ICML 2021 snapshot's
            ``MarginTradesLoss`` behind the published MNIST and CIFAR-10 rows). The extra ``H(P)``
            also rewards confident clean predictions.
    """
    _check_reduction(reduction)
    _check_clean_and_bottom(logits, bottom_logits)
    _check_nonneg_scalar(lam, "lam")
    if robust not in ("kl", "ce"):
        raise ValueError(f"TRADES robust term must be 'kl' or 'ce', got {robust!r}")
    labels = _check_labels(labels, logits.shape[0], logits.shape[1], "logits")
    dtype = _working_dtype(logits, bottom_logits)
    clean = F.cross_entropy(logits.to(dtype), labels, reduction="none")
    kl = trades_kl(logits, bottom_logits, reduction="none")
    if robust == "ce":  # + H(P), P = softmax(y)
        log_p = torch.log_softmax(logits.to(dtype), dim=1)
        kl = kl - (log_p.exp() * log_p).sum(dim=1)
    return _reduce(clean + lam * kl, reduction)


def emma_loss(
    logits: Tensor,
    labels: Tensor,
    K: Tensor,
    epsilon: float | Tensor,
    reduction: str = "mean",
) -> Tensor:
    """EMMA loss (Hu, Zou, Wang, Leino, Fredrikson & Sadeghi, "Unlocking Deterministic Robustness
    Certification on ImageNet", NeurIPS 2023), following hukkai/liresnet ``emma_loss``
    (models/margin_layer.py).

    With ``y`` the TRUE label, every wrong logit is raised by an adaptive fraction of its
    worst-case gain ``ε·K[y, i]`` and cross-entropy is taken on the result::

        c_i  = stopgrad( clip( (f_y − f_i) / max(ε·K[y, i], 1e-8), 0.01, 1 ) )
        f̃_i = f_i + c_i · ε · K[y, i]      for i ≠ y,      f̃_y = f_y
        loss = CE(f̃, y)

    ``c_i`` is the fraction of the radius ε at which the margin ``f_y − f_i`` is already certified
    (capped at 1: beyond ε the full GloRo penalty applies; floored at 0.01, also for misclassified
    points where ``f_y < f_i``). The stop-gradient means no gradient flows through ``c_i``; the
    gradient w.r.t. ``K`` is ``c_i·ε·∂CE/∂f̃_i``.

    Details as in the reference: the denominator is clamped at ``1e-8`` *before* dividing, so
    ``ε = 0`` or ``K[y, i] = 0`` give a finite ``c_i`` (then clipped) and a zero raise — EMMA at
    ``ε = 0`` is exactly the clean cross-entropy, never NaN. The reference shifts ``f`` by ``f_y``
    first (cross-entropy is shift invariant, so that changes nothing) and relies on
    ``K[y, y] = 0``; we instead mask ``i = y`` by index, so a non-zero diagonal in an estimated
    ``K`` cannot raise the true logit.

    Args:
        logits: (B, C) clean logits.
        labels: (B,) integer labels in ``[0, C)``.
        K: (C, C) pairwise Lipschitz constants (estimate; differentiable), ``K[y, i]`` for margin
            ``f_y − f_i``.
        epsilon: training radius ε ≥ 0 (float or 0-d tensor).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
    """
    _check_reduction(reduction)
    raised, labels = _emma_logits(logits, labels, K, epsilon)
    return F.cross_entropy(raised, labels, reduction=reduction)


def _emma_logits(logits: Tensor, labels: Tensor, K: Tensor, epsilon: float | Tensor) -> tuple[Tensor, Tensor]:
    """EMMA's raised logits ``f̃`` (see :func:`emma_loss`), checked inputs; and the checked labels."""
    _check_scores(logits, "logits", min_classes=2)
    num_classes = logits.shape[1]
    if not isinstance(K, Tensor):
        raise ValueError(f"K must be a torch.Tensor, got {type(K).__name__}")
    if tuple(K.shape) != (num_classes, num_classes):
        raise ValueError(
            f"K must have shape (C, C) = ({num_classes}, {num_classes}) to match logits "
            f"{tuple(logits.shape)}, got shape {tuple(K.shape)}"
        )
    if not K.is_floating_point():
        raise ValueError(f"K must be a floating-point tensor, got dtype {K.dtype}")
    _check_nonneg_scalar(epsilon, "epsilon")
    labels = _check_labels(labels, logits.shape[0], num_classes, "logits")

    dtype = _working_dtype(logits, K)
    y = logits.to(dtype)
    k_rows = K.to(dtype)[labels]  # (B, C): K[y_b, i]
    gain = epsilon * k_rows  # worst-case gain ε·K[y, i] of class i on the true class
    gap = y.gather(1, labels[:, None]) - y  # f_y − f_i
    with torch.no_grad():  # stop-gradient: c_i is a constant for backprop
        factor = (gap / gain.clamp_min(EMMA_DENOM_MIN)).clamp(EMMA_CLIP_MIN, EMMA_CLIP_MAX)
    is_true = F.one_hot(labels, num_classes).bool()
    raise_ = torch.where(is_true, torch.zeros_like(gain), factor * gain)
    return y + raise_, labels


def logit_annealing_loss(
    logits: Tensor,
    labels: Tensor,
    K: Tensor,
    epsilon: float | Tensor,
    gamma: float = LA_GAMMA,
    offset: float = LA_OFFSET,
    temperature: float = LA_TEMPERATURE,
    reduction: str = "mean",
) -> Tensor:
    """Logit annealing (LA) loss (Lai et al., "Enhancing Certified Robustness via Block Reflector
    Orthogonal Layers and Logit Annealing Loss", ICML 2025), following ntuaislab/BRONet
    ``logit_annealing_loss`` (bronet/models/margin_layer.py, ``lip_reg=True``).

    On EMMA's raised logits ``f̃`` (:func:`emma_loss`: each wrong logit raised by a stop-gradient
    fraction of ``ε·K[y, i]``), the true logit is lowered by ``offset`` and all are divided by the
    temperature ``T``; then a focal-style annealing factor down-weights examples already won::

        z    = (f̃ − offset·onehot(y)) / T
        CE   = −log softmax(z)_y,      p_t = exp(−CE)
        loss = T · (1 − p_t)^γ · CE

    ``γ = 0``, ``offset = 0``, ``T = 1`` is exactly EMMA. Args as :func:`emma_loss`, plus
    ``gamma ≥ 0``, ``offset`` and ``temperature > 0``.
    """
    _check_reduction(reduction)
    _check_nonneg_scalar(gamma, "gamma")
    if not (isinstance(offset, numbers.Real) and math.isfinite(float(offset))):
        raise ValueError(f"offset must be a finite number, got {offset!r}")
    if not (isinstance(temperature, numbers.Real) and math.isfinite(float(temperature)) and float(temperature) > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    raised, labels = _emma_logits(logits, labels, K, epsilon)
    z = (raised - offset * F.one_hot(labels, raised.shape[1]).to(raised.dtype)) / temperature
    ce = F.cross_entropy(z, labels, reduction="none")
    loss = temperature * (-torch.expm1(-ce)).pow(gamma) * ce  # (1 − p_t)^γ, 1 − e^{−CE} = −expm1(−CE)
    return _reduce(loss, reduction)


# --------------------------------------------------------------------------- config factory

_CANONICAL = {
    "crossentropy": "crossentropy",
    "gloro_ce": "crossentropy",
    "trades": "trades",
    "emma": "emma",
    "la": "la",
    "logit_annealing": "la",
    "standard": "standard",
}
LOSS_NAMES = tuple(_CANONICAL)
_NEEDS = {"crossentropy": "bottom", "trades": "bottom+clean", "emma": "pairwise", "la": "pairwise",
          "standard": "clean"}
_LA_KEYS = ("gamma", "offset", "temperature")
_ALLOWED_KEYS = {"crossentropy": ("name",), "trades": ("name", "lam", "robust"), "emma": ("name",),
                 "la": ("name", *_LA_KEYS), "standard": ("name",)}
_DEFAULT_LAM = 1.0  # gloro's Trades default


class GloroLoss:
    """A configured loss: ``loss(logits=..., bottom_logits=..., K=..., labels=..., epsilon=...,
    lam=...)``; keyword-only, arguments the loss does not need are ignored.

    Attributes:
        name: canonical name, ``"crossentropy"``, ``"trades"``, ``"emma"``, ``"la"`` or ``"standard"``.
        needs: what the training loop must compute —
            ``"bottom"`` (bottom_logits), ``"bottom+clean"`` (logits and bottom_logits; for TRADES
            ``logits`` may be omitted and is then ``bottom_logits[:, :-1]``, as in gloro), or
            ``"pairwise"`` (logits, K and epsilon).
        lam: default TRADES weight (``None`` for other losses); a ``lam`` passed at call time
            (e.g. from a schedule) overrides it. ``"clean"`` (logits only): ``standard``, plain
            cross-entropy that ignores ε and the bottom logit — a non-robust twin with the same
            architecture, data and loop (``gloronet privacy`` / ``overfit`` compare against it).
    """

    def __init__(self, name: str, lam: float | None = None, robust: str | None = None, **la_options: float):
        if name not in _NEEDS:
            raise ValueError(f"unknown loss {name!r}; allowed: {', '.join(LOSS_NAMES)}")
        if name == "trades":
            lam = _DEFAULT_LAM if lam is None else lam
            _check_nonneg_scalar(lam, "lam")
            lam = float(lam)
            robust = "kl" if robust is None else robust
            if robust not in ("kl", "ce"):
                raise ValueError(f"TRADES 'robust' must be 'kl' or 'ce', got {robust!r}")
        elif lam is not None or robust is not None:
            raise ValueError(f"loss {name!r} takes no 'lam' or 'robust'; only 'trades' does")
        unknown = sorted(set(la_options) - set(_LA_KEYS))
        if unknown or (la_options and name != "la"):
            raise ValueError(f"loss {name!r} takes no {sorted(la_options)}; only 'la' takes {', '.join(_LA_KEYS)}")
        self.la_options = {k: float(v) for k, v in la_options.items() if v is not None} if name == "la" else {}
        self.name = name
        self.needs = _NEEDS[name]
        self.lam = lam
        self.robust = robust

    def __call__(
        self,
        *,
        logits: Tensor | None = None,
        bottom_logits: Tensor | None = None,
        K: Tensor | None = None,
        labels: Tensor | None = None,
        epsilon: float | Tensor | None = None,
        lam: float | Tensor | None = None,
        reduction: str = "mean",
    ) -> Tensor:
        def need(value: Any, arg: str) -> Any:
            if value is None:
                raise ValueError(f"loss {self.name!r} (needs={self.needs!r}) requires {arg}=")
            return value

        need(labels, "labels")
        if self.name == "standard":
            return standard_cross_entropy(need(logits, "logits"), labels, reduction)
        if self.name == "crossentropy":
            return gloro_cross_entropy(need(bottom_logits, "bottom_logits"), labels, reduction)
        if self.name == "trades":
            need(bottom_logits, "bottom_logits")
            if logits is None:
                _check_scores(bottom_logits, "bottom_logits", min_classes=3)
                logits = bottom_logits[:, :-1]
            return trades_loss(
                logits, bottom_logits, labels, self.lam if lam is None else lam, reduction, self.robust
            )
        if self.name == "la":
            return logit_annealing_loss(need(logits, "logits"), labels, need(K, "K"), need(epsilon, "epsilon"),
                                        reduction=reduction, **self.la_options)
        return emma_loss(
            need(logits, "logits"), labels, need(K, "K"), need(epsilon, "epsilon"), reduction
        )

    def __repr__(self) -> str:
        extra = f", lam={self.lam}, robust={self.robust!r}" if self.lam is not None else ""
        extra += "".join(f", {k}={v}" for k, v in self.la_options.items())
        return f"GloroLoss(name={self.name!r}, needs={self.needs!r}{extra})"


def _canonical_name(name: Any) -> str:
    if not isinstance(name, str):
        raise ValueError(f"loss name must be a string, got {name!r}; allowed: {', '.join(LOSS_NAMES)}")
    key = name.strip().lower().replace("-", "_")
    if key not in _CANONICAL:
        raise ValueError(f"unknown loss {name!r}; allowed: {', '.join(LOSS_NAMES)}")
    return _CANONICAL[key]


def make_loss(spec: str | Mapping[str, Any] | GloroLoss) -> GloroLoss:
    """Build a :class:`GloroLoss` from a config value.

    ``spec`` is a name — ``"crossentropy"`` (alias ``"gloro_ce"``), ``"trades"``, ``"emma"``,
    ``"standard"`` (plain cross-entropy on the clean logits: the non-robust twin)
    (case-insensitive, ``-`` read as ``_``) — or a mapping ``{"name": ..., **options}``; the only
    options are TRADES' ``lam`` (λ, default 1.0) and ``robust`` (``kl``, default, or ``ce``), and
    logit annealing's (``"la"``, alias ``"logit_annealing"``) ``gamma``, ``offset``, ``temperature``.
    A :class:`GloroLoss` is returned unchanged.
    Unknown names or keys raise ``ValueError`` listing the allowed ones.
    """
    if isinstance(spec, GloroLoss):
        return spec
    if isinstance(spec, str):
        return GloroLoss(_canonical_name(spec))
    if isinstance(spec, Mapping):
        if "name" not in spec:
            raise ValueError(
                f"loss spec mapping needs a 'name' key (one of {', '.join(LOSS_NAMES)}), got "
                f"keys {sorted(map(str, spec))}"
            )
        name = _canonical_name(spec["name"])
        allowed = _ALLOWED_KEYS[name]
        unknown = sorted(str(k) for k in spec if k not in allowed)
        if unknown:
            raise ValueError(
                f"unknown key(s) {unknown} for loss {name!r}; allowed keys: {', '.join(allowed)}"
            )
        la = {k: spec[k] for k in _LA_KEYS if k in spec}
        return GloroLoss(name, lam=spec.get("lam"), robust=spec.get("robust"), **la)
    raise ValueError(
        f"loss spec must be a name ({', '.join(LOSS_NAMES)}) or a mapping with 'name', got "
        f"{type(spec).__name__}"
    )
