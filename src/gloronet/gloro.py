"""``GloroNet``: a classifier with a Lipschitz-bounded body, the bottom logit, and sound certification.

Leino, Wang & Fredrikson, "Globally-Robust Neural Networks", ICML 2021. For the predicted class
``j`` and any ``i ≠ j`` the margin ``f_j − f_i`` is ``K_ji``-Lipschitz with
``K_ji = L_body · ‖w_j − w_i‖₂`` (``w`` = rows of the head). The bottom logit is
``y_⊥ = max_{i≠j} (y_i + ε·K_ji)`` and ``x`` is certified at radius ε iff
``y_j − y_i > ε·K_ji`` for all ``i ≠ j`` (strict; ``i = j`` masked by index) — in exact arithmetic.

``certify`` goes further by default: the margins must also clear a bound on the rounding error of
the forward pass at ``x`` and anywhere in the ball (:mod:`gloronet.fp`, :mod:`gloronet.radius`),
so the certificate holds for the floating-point program this module runs in eval mode.

The certified program sums each dense / conv output in a few chunks (:mod:`gloronet.nn.accumulate`:
a smaller rounding error, but slower kernels). The eval forward and ``certify`` run the fused
kernels instead — as fast as a plain network — and use the chunked program only where the fused
pass cannot prove it the same answer (:func:`gloronet.radius.fused_may_differ`; for ``certify``
also where the fused pass's larger centre error is what keeps a point from certifying): the
predictions are always the certified program's.
"""
from __future__ import annotations

import contextlib
import functools
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from . import centre64, fp, kernels, relaxed
from . import radius as radius_mod
from .bounds import mul_up
from .head_distances import pairwise_row_distances_bound
from .nn import accumulate
from .nn.base import (
    UnboundedLayerError,
    body_steps,
    check_global_hooks,
    check_map_is_described,
    error_model_of,
    lipschitz_bound_of,
    lipschitz_estimate_of,
    never_increases_norm,
)
from .nn.linear import LipLinear
from .nn.state import MapState, map_tensors
from .tracing import is_compiling


def check_epsilon(epsilon) -> float:
    eps = float(epsilon)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    return eps


_LINEAR_FORWARDS = (nn.Linear.forward, LipLinear.forward)


def head_weight(head: nn.Module) -> torch.Tensor:
    """The (C, D) matrix the head multiplies by in its current mode (differentiable in training)."""
    if hasattr(head, "head_weight"):
        return head.head_weight()
    if isinstance(head, nn.Linear) or (hasattr(head, "weight") and hasattr(head, "out_features")):
        return head.weight
    raise TypeError(f"the head must be a linear layer (LipLinear, LLNLinear or nn.Linear), got {type(head).__name__}")


def applied_head(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """``(W, b, depth)``: the matrix and bias exactly as the eval-mode head applies them, and the
    most roundings a term of a logit passes through (for the sound bounds).

    Only heads whose forward is ``F.linear(h, W, b)`` are accepted (``LipLinear``, ``LLNLinear``,
    ``nn.Linear``): the pairwise constants and the rounding analysis describe that map alone.
    """
    check_map_is_described(head)
    if type(head).forward not in _LINEAR_FORWARDS:
        raise UnboundedLayerError(
            f"certification needs a linear head (LipLinear, LLNLinear or nn.Linear), got {type(head).__name__} "
            "with its own forward()"
        )
    if isinstance(head, LipLinear):
        return head.applied_weight(), head.bias, head.rounding_depth()
    return head.weight.detach(), head.bias, head.weight.shape[1] + (head.bias is not None)


def pairwise_row_distances(w: torch.Tensor) -> torch.Tensor:
    """Differentiable ``‖w_j − w_i‖₂`` for all pairs (C, C), zero on the diagonal (training only)."""
    sq = (w * w).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (w @ w.t())).clamp_min(1e-12)
    return d2.sqrt() * (1.0 - torch.eye(w.shape[0], device=w.device, dtype=w.dtype))


def append_bottom_logit(logits: torch.Tensor, K: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``[y, y_⊥]`` with ``y_⊥ = max_{i≠j} (y_i + ε·K_ji)``, ``j = argmax y`` (masked by index)."""
    logits = logits.float()
    pred = logits.detach().argmax(dim=1)
    shifted = logits + epsilon * K[pred].to(logits.dtype)
    own = torch.nn.functional.one_hot(pred, logits.shape[1]).bool()
    bottom = shifted.masked_fill(own, -math.inf).amax(dim=1, keepdim=True)
    return torch.cat([logits, bottom], dim=1)


def bottom_logit(logits: torch.Tensor, K: torch.Tensor, epsilon: float, relax=None) -> torch.Tensor:
    """``[y, y_⊥]``: the GloRo bottom logit, or the relaxed one for a :class:`~gloronet.relaxed.Relaxation`."""
    if relax is None or (relax.top_k == 1 and relax.groups is None):
        return append_bottom_logit(logits, K, epsilon)
    return relaxed.bottom_logit(logits, K, epsilon, relax)


@dataclass
class Certificate:
    """Per-example certification result (all tensors have batch dimension B).

    ``certified`` is exactly ``radius > epsilon``; ``radius`` is a lower bound of the distance
    (L2, in input units) within which the prediction cannot change — for the floating-point
    forward pass when ``arithmetic == "float"`` (default), for the exact real-valued network only
    when ``arithmetic == "exact"``.
    """

    pred: torch.Tensor  # (B,) predicted class
    certified: torch.Tensor  # (B,) bool: robust at radius epsilon
    radius: torch.Tensor  # (B,) float64 certified L2 radius (0 when not certifiable)
    logits: torch.Tensor  # (B, C) float64
    epsilon: float
    arithmetic: str = "float"


@dataclass
class _Bounds:
    """Everything certification derives from the weights, valid while ``state`` matches."""

    state: MapState
    dtype: torch.dtype
    chunking: tuple  # accumulate.chunking(): the certified program's sums (head depth, profiles) depend on it
    steps: list[nn.Module]  # the body's leaf layers, in order
    lips: list[float]  # their Lipschitz bounds
    L: float
    D: torch.Tensor  # (C, C) float64 bounds of ‖w_j − w_i‖
    K: torch.Tensor  # (C, C) L·D rounded up, diagonal 0
    head: radius_mod.Head
    profiles: dict = field(default_factory=dict)  # input shapes -> radius.Profile
    fused_ok: bool = True  # False once a step turned out to have no error model (the eval forward then runs chunked)

    @functools.cached_property
    def steps64(self) -> list | None:
        """:func:`gloronet.centre64.float64_steps` of the body (float64 copies of the weights), made
        on first use and kept while these bounds are; None where the float64 centre does not apply
        (a float64 model, or a head not re-evaluated in float64: :attr:`radius.Head.reevaluate`)."""
        usable = self.dtype == torch.float32 and self.head.reevaluate
        return centre64.float64_steps(self.steps) if usable else None


ARITHMETIC = ("float", "exact")
RECHECK_BELOW = 1e-3  # certify rechecks rows with fused radius ≤ ε < exact-arithmetic radius / (1 − this)
# The fused pass measures ‖activation‖ only where an example's activation has at most this many times as
# many elements as its input (and always the input, the body's output, and the activation after one it did
# not measure); a larger one — a convolution's wide early output, which costs 2-4% of the pass to read
# again — gets the bound the step's error model propagates (error_plan.propagated_norms): looser, so a few
# more rows are measured again by the chunked program. Of those, the eval forward measures only the input
# and the output at once and defers the others (_Deferred): its guard reads the two and the propagated
# norms, and only the rows it cannot vouch for are measured at the kept activations too (certify
# measures every one at once: it reports every row's radius).
MEASURE_NORMS_UP_TO = 8


class GloroNet(nn.Module):
    """``f = head ∘ body`` with a provable Lipschitz bound on ``body`` and a linear ``head``."""

    _is_gloro_net = True  # refused as a layer of another GloroNet's body (gloronet.nn.base)

    def __init__(self, body: nn.Module, head: nn.Module, epsilon: float):
        super().__init__()
        self.body = body
        self.head = head
        self.epsilon = epsilon
        head_weight(head)  # fail early on an unsupported head
        self._bound_cache: _Bounds | None = None
        self.config: dict | None = None  # construction arguments, set by gloronet.models.create
        # (low, high) of the inputs the model was trained on (gloronet.data: [0, 1]); None: unknown
        self.input_range: tuple[float, float] | None = None

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
        """Logits. In eval mode the prediction is exactly that of the program certificates describe:
        IEEE float32 / float64 kernels that sum products (:func:`gloronet.kernels.sound_kernels`),
        no autocast — whatever the global settings — with chunked sums (:mod:`gloronet.nn.accumulate`).

        It runs the fused kernels and returns their logits where
        :func:`gloronet.radius.fused_may_differ` proves that the chunked program predicts the same
        class strictly; the other rows are computed again by the chunked program (whose logits
        they then hold). The first eval call computes the model's bounds (as ``certify`` does, and
        cached with them); a model that cannot be certified (a layer without a bound) runs the
        chunked program throughout. Training mode runs with the caller's settings."""
        if self.training or is_compiling():  # a compiler traces the ops; the runtime sets kernels
            return self.head(self.body(x))
        with kernels.sound_kernels(), kernels.no_autocast(x.device.type):
            bounds = self._fast_bounds(x.device)
            if bounds is None:
                return self.head(self.body(x))
            deferred = _Deferred()
            with accumulate.fused():
                h, norms, shapes = _run_steps(x, bounds.steps, measure=True, measure_up_to=MEASURE_NORMS_UP_TO,
                                              deferred=deferred)
                logits = self.head(h)
            with torch.no_grad():
                try:
                    profile = self._profile(bounds, tuple(shapes))
                except UnboundedLayerError:  # a layer without an error model: the chunked program only
                    bounds.fused_ok = False  # (remembered with the bounds: no fused pass wasted next time)
                    return self.head(self.body(x))
                errors = radius_mod.body_errors(profile, norms, fused_centre=True)  # propagates the unmeasured norms
                unsure = radius_mod.fused_may_differ(profile, bounds.D, errors, logits)
                if deferred and bool(unsure.any()):  # those rows again, with the deferred norms measured
                    rows = unsure.nonzero()[:, 0]
                    fine = deferred.norms_of(norms, rows)
                    errors = radius_mod.body_errors(profile, fine, fused_centre=True)
                    unsure[rows] = radius_mod.fused_may_differ(profile, bounds.D, errors, logits[rows])
            if bool(unsure.any()):
                rows = unsure.nonzero()[:, 0]
                logits = logits.index_put((rows,), self.head(self.body(x[rows])))
            return logits

    def _fast_bounds(self, device: torch.device) -> _Bounds | None:
        """The bounds the fused eval forward needs; None where the model cannot be certified here
        (a layer without a bound, mixed dtypes, an environment certification refuses)."""
        if kernels.environment_problem(device.type):
            return None
        try:
            bounds = self._sound_bounds()
        except (UnboundedLayerError, ValueError):
            return None
        return bounds if bounds.fused_ok else None

    # -- training: differentiable estimates ------------------------------------------------------
    def pairwise_lipschitz(self) -> torch.Tensor:
        """Differentiable (C, C) estimate of ``K_ji`` (power iteration: NOT a bound)."""
        w = head_weight(self.head).float()
        return lipschitz_estimate_of(self.body).to(w.device) * pairwise_row_distances(w)

    def bottom_logits(self, x: torch.Tensor, epsilon: float | None = None, top_k: int | None = None,
                      affinity=None) -> torch.Tensor:
        """(B, C+1) logits with the bottom logit last, from the training estimate; with ``top_k`` /
        ``affinity`` the relaxed bottom logit (:func:`gloronet.relaxed.bottom_logit`)."""
        eps = self.epsilon if epsilon is None else check_epsilon(epsilon)
        logits = self(x)
        relax = relaxed.make_relaxation(logits.shape[1], top_k, affinity)
        return bottom_logit(logits, self.pairwise_lipschitz(), eps, relax)

    # -- certification: provable bounds ----------------------------------------------------------
    def _model_dtype(self) -> torch.dtype:
        """The one floating dtype of every tensor the map reads (mixed dtypes are refused: the
        bound would describe a weight the forward pass casts)."""
        dtypes = {t.dtype for m in self.modules() for _, t in map_tensors(m) if t.is_floating_point()}
        if len(dtypes) != 1 or not dtypes <= {torch.float32, torch.float64}:
            found = ", ".join(sorted(str(d) for d in dtypes)) or "none"
            raise ValueError(
                f"certification needs all floating-point parameters and buffers in one dtype, float32 or float64; "
                f"found {found}: call net.float() or net.double() first"
            )
        return dtypes.pop()

    def _check_certifiable(self) -> None:
        check_global_hooks()
        if type(self).forward is not GloroNet.forward or "forward" in vars(self):
            raise UnboundedLayerError(f"{type(self).__name__} overrides GloroNet.forward: its map is not the one bounded")
        for m in self.modules():
            if m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m):
                check_map_is_described(m)  # raises with the reason

    def _sound_bounds(self) -> _Bounds:
        """Bounds and head data, recomputed only when something that determines the map changed
        (:class:`gloronet.nn.state.MapState`: modules, parameters, buffers, every attribute)."""
        self._check_certifiable()
        kernels.check_environment(next(iter(self.parameters())).device.type)
        cache = self._bound_cache
        chunking = accumulate.chunking()
        if cache is not None and cache.chunking == chunking and cache.state.matches(self.body, self.head):
            return cache  # the same tensors, bit for bit and dtype for dtype: the same model dtype
        dtype = self._model_dtype()
        state = MapState(self.body, self.head)
        with torch.no_grad():
            steps = body_steps(self.body)
            lips = [lipschitz_bound_of(m) for m in steps]
            L = mul_up(*lips)
            w, b, depth = applied_head(self.head)
            D = pairwise_row_distances_bound(w)
            K = torch.nextafter(D * L, torch.full_like(D, math.inf))  # product rounded up
            K.fill_diagonal_(0.0)
        head = radius_mod.Head.build(w, b, depth, dtype)
        self._bound_cache = _Bounds(state, dtype, chunking, steps, lips, L, D, K, head)
        return self._bound_cache

    def _profile(self, bounds: _Bounds, shapes: tuple) -> radius_mod.Profile:
        """The rounding analysis of the body and head for inputs of these per-step shapes."""
        if shapes not in bounds.profiles:
            def models():
                return [error_model_of(m, shape, bounds.dtype, lip) for m, shape, lip in zip(bounds.steps, shapes, bounds.lips)]

            chunked = models()
            with accumulate.fused():  # the same layers' models for one fused kernel call per sum
                fused = models()
            bounds.profiles[shapes] = radius_mod.make_profile(chunked, bounds.head, bounds.dtype, fused)
        return bounds.profiles[shapes]

    def lipschitz_bound(self) -> float:
        """Provable L2 Lipschitz bound of the body (float64, rounded up; cached)."""
        return self._sound_bounds().L

    def lipschitz_constant(self) -> torch.Tensor:
        """Sound (C, C) float64 ``K_ji = L_body·‖w_j − w_i‖`` on the CPU; diagonal 0 (cached)."""
        return self._sound_bounds().K.clone()

    @torch.no_grad()
    def certify(self, x: torch.Tensor, epsilon: float | None = None, arithmetic: str = "float",
                top_k: int | None = None, affinity=None, fast: bool = True, recheck_at=None):
        """Certify each example of ``x`` at radius ε using only provable bounds.

        ``arithmetic="float"`` (default): the certificate holds for this network's own
        floating-point forward pass — for every ``x'`` with ``‖x' − x‖₂ < radius`` the model
        computes the certified class (strictly), under the kernel assumptions of README "What a
        certificate promises" (enforced here by :func:`gloronet.kernels.sound_kernels`); hence also for
        the exact network. ``arithmetic="exact"``: the real-arithmetic test of the GloRo paper,
        which ignores rounding — for comparison with published numbers only.

        With ``top_k=K`` and/or ``affinity=groups`` (a list of class-index lists, a named set of
        :data:`gloronet.relaxed.NAMED_AFFINITIES` or a YAML/JSON file) it returns a
        :class:`gloronet.relaxed.RelaxedCertificate` (``.k``, ``.classes``, ``.group``) with the
        same soundness; ``top_k=1`` is ordinary GloRo.

        ``fast`` (default): the centre pass runs the fused kernels, as fast as a plain network, and
        the certified (chunked) program measures again the rows whose prediction it cannot vouch
        for and, with ``arithmetic="float"``, those whose radius falls short of some ε in
        ``recheck_at`` (default ``[epsilon]``) while their exact-arithmetic radius reaches it — the
        latter also around a float64 centre where the body allows (:mod:`gloronet.centre64`: almost
        none of the centre's share of the rounding allowance is left); the larger proven radius
        stands. The fused centre errs more than the chunked one, and it measures the norms of wide
        activations less tightly (:data:`MEASURE_NORMS_UP_TO`), so radii away from those ε are
        slightly smaller (all sound; at ε ``certified`` is at least that of ``fast=False`` up to
        rounding-level differences between the two centres).
        ``fast=False``: the certified program throughout (relaxed certificates always use it).

        The forward pass runs in eval mode, without autocast, on a copy of ``x`` (never mutated).
        Ties and non-finite inputs, logits or bounds never certify; ``certified`` is exactly
        ``radius > ε``. Inputs outside :attr:`input_range` (when known) raise a warning;
        :func:`gloronet.certify.certify_dataset` refuses them.
        """
        eps = self.epsilon if epsilon is None else check_epsilon(epsilon)
        problem = self.out_of_range(x)
        if problem:
            warnings.warn(f"GloroNet.certify: {problem}: the certificates hold, but for inputs unlike the training "
                          "data", stacklevel=2)
        if arithmetic not in ARITHMETIC:
            raise ValueError(f"arithmetic must be one of {ARITHMETIC}, got {arithmetic!r}")
        relax = relaxed.make_relaxation(self.num_classes, top_k, affinity)
        if relax is not None:
            logits, margins, adjust, _ = self._margin_pass(x, arithmetic, fused=False)
            return relaxed.certify_relaxed(margins, logits, relax, eps, arithmetic, adjust)
        bounds = self._sound_bounds()  # checked once: every pass of this call reads the same model
        logits, margins, adjust, unsure = self._margin_pass(x, arithmetic, fused=fast, bounds=bounds)
        logits = logits.detach().to(torch.float64)
        pred = logits.argmax(dim=1)
        radius = adjust(radius_mod.certified_radii(margins, pred))
        fused_pass = unsure is not None  # fast: rows it cannot vouch for, or just short of an ε, are measured again
        recheck = unsure.to(radius.device, copy=True) if fused_pass else torch.zeros_like(radius, dtype=torch.bool)
        if fused_pass and arithmetic == "float":  # where the fused centre's larger error may stand between the point and ε
            at = [eps] if recheck_at is None else [check_epsilon(e) for e in recheck_at]
            exact = self._exact_radii(logits, margins.K, pred, adjust, (radius <= max(at)) | recheck)
            recheck |= _short_of(radius, exact, at)
        if bool(recheck.any()):
            rows = recheck.nonzero()[:, 0]
            again, margins2, adjust2, _ = self._margin_pass(x[rows.to(x.device)], arithmetic, fused=False, bounds=bounds)
            pred2 = again.detach().argmax(dim=1).to(pred.device)
            radius2 = adjust2(radius_mod.certified_radii(margins2, pred2)).to(radius.device)
            if arithmetic == "float":  # still short: also around a float64 centre (both radii proven for pred2)
                short = _short_of(radius2, exact[rows], at).nonzero()[:, 0]
                sharper = (self._float64_centre_radii(x[rows[short].to(x.device)], pred2[short], bounds)
                           if len(short) else None)
                if sharper is not None:
                    radius2[short] = torch.maximum(radius2[short], sharper.to(radius2.device))
            radius[rows] = torch.where(pred2 == pred[rows], torch.maximum(radius2, radius[rows]), radius2)
            pred[rows] = pred2
            logits[rows] = again.detach().to(logits)
        return Certificate(pred=pred, certified=radius > eps, radius=radius, logits=logits,
                           epsilon=eps, arithmetic=arithmetic)

    @staticmethod
    def _exact_radii(logits: torch.Tensor, K: torch.Tensor, pred: torch.Tensor, adjust, rows: torch.Tensor) -> torch.Tensor:
        """(B,) exact-arithmetic radii of ``pred`` (as ``arithmetic="exact"``) where ``rows``, 0
        elsewhere: all :meth:`certify` reads of them are the rows that may be short of some ε
        (radius at most the largest) and the rows it measures again anyway."""
        exact = torch.zeros_like(logits[:, 0])
        idx = rows.nonzero()[:, 0]
        if len(idx):
            exact[idx] = radius_mod.certified_radii(radius_mod.margin_bounds(logits[idx], K, None, None), pred[idx])
        return adjust(exact)

    def _margin_pass(self, x: torch.Tensor, arithmetic: str, fused: bool = False, bounds: _Bounds | None = None):
        """The certifying forward pass: ``(logits, MarginBounds, adjust, unsure)``, where ``adjust``
        maps radii (B,) or (B, K) around the point the model received to radii around ``x`` (minus
        the cast to the model's dtype; 0 for non-finite inputs, logits or bounds).

        ``fused``: the pass runs fused kernels (its centre error from their models) and ``unsure``
        (B,) flags the rows where the certified program's prediction may differ from the pass's
        (:func:`gloronet.radius.fused_may_differ`); otherwise the pass is the certified program
        itself and ``unsure`` is None. It defers no norm (unlike the eval forward: every row's
        radius is reported, as sharp as the norms measured at once make it). ``bounds``:
        :meth:`_sound_bounds`, when the caller has just checked them (one ``certify`` call)."""
        if not torch.is_tensor(x) or x.dim() < 2 or not x.is_floating_point():
            got = f"a {x.dtype} tensor of shape {tuple(x.shape)}" if torch.is_tensor(x) else f"a {type(x).__name__}"
            todo = (": convert uint8 pixels with x.float() / 255 (gloronet.certify.certify_dataset takes uint8 as is)"
                    if torch.is_tensor(x) and x.dtype == torch.uint8 else "")
            raise ValueError(f"certify expects a floating-point batch tensor (B, ...) in the model's input range, got "
                             f"{got}{todo}")
        bounds = self._sound_bounds() if bounds is None else bounds
        device = next(iter(self.parameters())).device
        xc = x.to(device=device, dtype=bounds.dtype, copy=True)
        sound_fp = arithmetic == "float"
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            with kernels.sound_kernels(), kernels.no_autocast(device.type), (
                    accumulate.fused() if fused else contextlib.nullcontext()):
                h, norms, shapes = _run_steps(xc, bounds.steps, measure=sound_fp or fused,
                                              measure_up_to=MEASURE_NORMS_UP_TO if fused else None)
                logits = self.head(h)
        finally:
            for m, mode in modes:  # restore each module's own mode (not recursively)
                m.training = mode
        if logits.dim() != 2 or logits.shape[1] < 2:
            raise ValueError(f"certification needs logits of shape (B, C>=2), got {tuple(logits.shape)}")
        profile = None
        if sound_fp or fused:
            try:
                profile = self._profile(bounds, tuple(shapes))
            except UnboundedLayerError:
                if sound_fp:
                    raise
                return self._margin_pass(x, arithmetic, fused=False, bounds=bounds)  # exact arithmetic: no error model
        # once, for both; the norms the fused pass did not measure are propagated by its error models
        errors = None if profile is None else radius_mod.body_errors(profile, norms, fused_centre=fused)
        margins = radius_mod.margin_bounds(logits, bounds.K, bounds.D, profile if sound_fp else None, norms, h,
                                           fused_centre=fused, errors=errors)
        unsure = radius_mod.fused_may_differ(profile, bounds.D, errors, logits) if fused else None
        # a finite norm bound means every coordinate of the input is finite
        finite_x = torch.isfinite(norms[0]) if norms else torch.isfinite(xc.flatten(1)).all(dim=1)
        return logits, margins, _adjuster(_finite_rows(logits, finite_x, bounds.K), _cast_shift(x, xc)), unsure

    def _float64_centre_radii(self, x: torch.Tensor, pred: torch.Tensor, bounds: _Bounds | None = None) -> torch.Tensor | None:
        """(B,) radii within which the certified (float32) program predicts ``pred`` strictly,
        from a float64 centre pass (:mod:`gloronet.centre64`: ``Pc`` ~2⁻²⁹ of the float32 one);
        None where the model is not float32 or its body has a step that pass cannot evaluate."""
        found = self._float64_centre_pass(x, bounds)
        if found is None:
            return None
        margins, adjust = found
        return adjust(radius_mod.certified_radii(margins, pred.to(margins.y.device)))

    def _float64_centre_pass(self, x: torch.Tensor, bounds: _Bounds | None = None):
        """``(MarginBounds, adjust)`` of the certified program around a float64 centre (as
        :meth:`_margin_pass` returns them), or None (see :meth:`_float64_centre_radii`)."""
        bounds = self._sound_bounds() if bounds is None else bounds
        steps64 = bounds.steps64
        if steps64 is None:
            return None
        device = next(iter(self.parameters())).device
        xc = x.to(device=device, dtype=bounds.dtype, copy=True)
        with torch.no_grad(), kernels.sound_kernels(), kernels.no_autocast(device.type), accumulate.fused():
            h, norms, shapes = _run_steps(xc.to(torch.float64), bounds.steps, measure=True, calls=steps64)
        profile = self._profile64(bounds, tuple(shapes))
        errors = radius_mod.body_errors(profile, norms, fused_centre=True)
        unread = h.new_zeros(len(h), self.num_classes)  # margin_bounds re-evaluates the head from h (reevaluate)
        margins = radius_mod.margin_bounds(unread, bounds.K, bounds.D, profile, norms, h, fused_centre=True, errors=errors)
        return margins, _adjuster(_finite_rows(margins.y, torch.isfinite(norms[0]), bounds.K), _cast_shift(x, xc))

    def _profile64(self, bounds: _Bounds, shapes: tuple) -> radius_mod.Profile:
        """The certified program's profile with the float64 centre's error models in the centre slot."""
        key = ("float64 centre", shapes)
        if key not in bounds.profiles:
            chunked = self._profile(bounds, shapes)
            with accumulate.fused():  # the float64 pass runs one kernel per sum
                models64 = [error_model_of(m, shape, torch.float64, lip)
                            for m, shape, lip in zip(bounds.steps, shapes, bounds.lips)]
            bounds.profiles[key] = radius_mod.make_profile(chunked.models, bounds.head, bounds.dtype, models64)
        return bounds.profiles[key]

    def out_of_range(self, x: torch.Tensor) -> str | None:
        """Why ``x`` lies outside :attr:`input_range` (e.g. pixels in 0..255 for a model trained on
        0..1, where every radius would be meaningless), or None when it fits or no range is known."""
        if self.input_range is None or not torch.is_tensor(x) or not x.is_floating_point() or x.numel() == 0:
            return None
        lo, hi = self.input_range
        x_lo, x_hi = (float(v) for v in torch.aminmax(x.detach()))  # NaN propagates
        if math.isfinite(x_lo) and math.isfinite(x_hi) and lo <= x_lo and x_hi <= hi:
            return None  # one pass over x in the common case
        rows = torch.isfinite(x.detach().reshape(len(x) if x.dim() > 1 else 1, -1)).all(dim=1)
        if not bool(rows.all()):
            return f"inputs hold NaN or Inf values ({int((~rows).sum())} of {len(rows)} examples): such inputs never certify"
        return (f"inputs span [{x_lo:.4g}, {x_hi:.4g}] but the model was trained on inputs in [{lo:g}, {hi:g}]"
                + (" (divide 0..255 pixels by 255)" if x_hi > 2 * hi > 0 else ""))

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}"


class _Deferred(list):
    """The activations a pass kept instead of measuring their norms (:func:`_run_steps`): entries
    ``(positions, activation, version)``; :meth:`norms_of` measures them for some rows."""

    def norms_of(self, norms: list, rows: torch.Tensor) -> list:
        """``norms`` of ``rows`` with the deferred ones measured now (an activation changed in place
        since — its version moved — stays propagated: its values are no longer those the pass used)."""
        out = [None if n is None else n[rows.to(n.device)] for n in norms]
        for positions, a, version in self:
            if a._version == version:
                rho = fp.norm_upper(a[rows.to(a.device)])
                for s in positions:
                    out[s] = rho
        return out


def _run_steps(h: torch.Tensor, steps, measure: bool, calls=None, measure_up_to: float | None = None,
               deferred: _Deferred | None = None):
    """``(output, norms, shapes)`` of running the body's ``steps`` on ``h``: the per-example input
    shape of every step and, with ``measure``, upper bounds of ‖input‖ of every step and of the
    output (re-used after steps that never lengthen: :func:`never_increases_norm`). ``calls``: what
    evaluates each step instead of the step itself (:func:`gloronet.centre64.float64_steps`).
    ``measure_up_to``: an activation with more than this many times the input's elements per example
    is not measured (None in ``norms``: :func:`gloronet.error_plan.propagated_norms` bounds it) unless
    the one before it was not either — a propagated bound never spans two steps; the input and the
    output always are measured. ``deferred``: the other activations it would measure are kept there
    instead (their norms None: propagated, or measured later for some rows by
    :meth:`_Deferred.norms_of`)."""
    norms, shapes, fresh, skipped = [], [], True, False
    limit = None if measure_up_to is None else measure_up_to * math.prod(h.shape[1:])

    def bound(a: torch.Tensor, last: bool):
        nonlocal skipped
        if not fresh and (norms[-1] is not None or not last):
            if deferred and deferred[-1][0][-1] == len(norms) - 1:  # the same activation's norm: one more place
                deferred[-1][0].append(len(norms))
            return norms[-1]
        skipped = bool(norms) and not last and not skipped and limit is not None and math.prod(a.shape[1:]) > limit
        if skipped:
            return None
        if deferred is not None and norms and not last:
            deferred.append(([len(norms)], a, a._version))
            return None
        return fp.norm_upper(a)

    for i, step in enumerate(steps):
        shapes.append(tuple(h.shape[1:]))
        if measure:
            norms.append(bound(h, last=False))
            fresh = not never_increases_norm(step)
        h = step(h) if calls is None else calls[i](h)
    if measure:
        norms.append(bound(h, last=True))
    return h, norms, shapes


def _short_of(radius: torch.Tensor, exact: torch.Tensor, epsilons) -> torch.Tensor:
    """(B,) True where a radius is at most some ε of ``epsilons`` that the exact-arithmetic radius
    reaches (within :data:`RECHECK_BELOW`): where a sharper allowance could still certify."""
    short = torch.zeros_like(radius, dtype=torch.bool)
    for e in epsilons:
        short |= (radius <= e) & (exact > e * (1 - RECHECK_BELOW))
    return short


def _finite_rows(logits: torch.Tensor, finite_input: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """(B,) True where the logits, the input and the Lipschitz constants are all finite: nothing
    else may certify."""
    return torch.isfinite(logits).all(dim=1) & finite_input.to(logits.device) & bool(torch.isfinite(K).all())


def _adjuster(finite: torch.Tensor, shift: torch.Tensor | None):
    """Maps radii (B,) or (B, K) around the point the model received to radii around the caller's
    ``x``: minus ``shift`` (:func:`_cast_shift`), and 0 where ``finite`` is False."""
    def adjust(radius: torch.Tensor) -> torch.Tensor:
        ok = finite.to(radius.device).view(-1, *([1] * (radius.dim() - 1)))
        if shift is not None:
            s = shift.to(radius.device).view_as(ok)
            radius = torch.where(torch.isfinite(s), torch.nextafter(radius - s, torch.full_like(radius, -math.inf)), 0.0)
            radius = radius.clamp_min(0.0)
        return torch.where(ok, radius, torch.zeros_like(radius))

    return adjust


def _cast_shift(x: torch.Tensor, xc: torch.Tensor) -> torch.Tensor | None:
    """(B,) upper bounds of ``‖x − xc‖`` when casting the caller's ``x`` to the model's dtype
    rounded it (radii around ``xc`` shrink by this much around ``x``); None when it was exact."""
    if torch.finfo(x.dtype).bits <= torch.finfo(xc.dtype).bits:
        return None  # widening (or same dtype): exact
    shift = fp.norm_upper(x.to(device=xc.device, dtype=torch.float64) - xc.to(torch.float64))
    return torch.nextafter(shift * fp.INFLATE, torch.full_like(shift, math.inf))
