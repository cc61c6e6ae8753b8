"""Schedules for ε, learning rate and TRADES λ.

A schedule is a callable ``s(epoch) -> float`` of the *fractional* epoch
``epoch = epoch_index + batch_index / num_batches`` (so ``0 <= epoch <= total_epochs``).
Build one from a plain config value with :func:`make_schedule`::

    make_schedule(0.3, total_epochs=500)                        # constant 0.3
    make_schedule(None, total_epochs=500, base=0.45)            # constant base
    make_schedule({"kind": "log_lerp_exp", "start_factor": 0.01, "end_factor": 1.1,
                   "ramp_fraction": 0.5}, total_epochs=300, base=1.58)   # gloro's "-log-" ramp
    make_schedule({"kind": "gloro", "schedule": "[0.01]-log-[50%:1.1]"},
                  total_epochs=300, base=1.58)    # the reference string, step for step
    make_schedule({"kind": "exp_decay", "value": 1e-3, "final": 1e-6,
                   "decay_start_fraction": 0.5}, total_epochs=300)        # GloRo lr

Keys per ``kind`` (``a | b``: give exactly one; ``[...]``: optional, default shown)::

    constant   value | value_factor
    linear        start | start_factor,  end | end_factor,  ramp_epochs | ramp_fraction
    log_lerp_exp  start | start_factor,  end | end_factor,  ramp_epochs | ramp_fraction,
                  [scale = 1 | scale_factor]
    geometric     start | start_factor,  end | end_factor,  ramp_epochs | ramp_fraction
    gloro         schedule (a klasleino/gloro schedule string),  [base]  (see schedule_strings)
    cosine     peak | peak_factor,  [warmup_epochs | warmup_fraction = 0],
               [warmup_start = 0],  [final = 0 | final_factor]
    exp_decay  value | value_factor,  final | final_factor,
               [decay_start | decay_start_fraction = 0]

Meaning of the keys:

* ``value/start/end/peak`` are absolute levels; ``<level>_factor`` is a multiple of ``base``
  (e.g. the target ε), so ``start_factor: 0.01`` means ``start = 0.01 * base``.
* ``final_factor`` is relative to the level being decayed from: ``peak`` (cosine) or
  ``value`` (exp_decay), e.g. "cosine to 1e-5·lr" is ``final_factor: 1.0e-5``.
* ``*_epochs`` / ``decay_start`` are in epochs; ``*_fraction`` are fractions of ``total_epochs``.
* All values must be finite and ``>= 0``; ``geometric`` needs ``start, end > 0`` and
  ``exp_decay`` needs ``value, final > 0``.

Ramps, ``t = clamp(e / ramp_epochs, 0, 1)``, held at ``end`` afterwards:

* ``linear``: ``start + (end - start) t``.
* ``log_lerp_exp``: ``scale · log((1 - t) e^start + t e^end)``: klasleino/gloro's ``-log-``
  transition (``gloro/training/schedules.py::_log_interp``, scale 1, absolute levels). Concave;
  for levels below 1 nearly linear. The ICML 2021 snapshot's ``logarithmic_half`` applies it to
  factors and scales after: ``{start: 0.01, end: 1.0, scale_factor: 1.1}`` (× base).
* ``geometric``: ``start (end / start)^t``: gloro's ``-exp-`` transition (``_exp_interp``).

The kind ``log`` is refused: it used to mean ``geometric`` here, the opposite of gloro's ``-log-``.
These kinds are continuous in the fractional epoch. ``gloro`` reproduces the reference library's
per-epoch list and its per-batch interpolation exactly (:mod:`gloronet.schedule_strings`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from .schedule_base import Schedule
from .schedule_strings import GloroStringSchedule

__all__ = [
    "Schedule",
    "Constant",
    "LinearRamp",
    "LogLerpExpRamp",
    "GeometricRamp",
    "WarmupCosine",
    "ExpDecay",
    "make_schedule",
    "SCHEDULE_KEYS",
]


def _progress(epoch: float, start: float, length: float) -> float:
    """``clamp((epoch - start) / length, 0, 1)``; a zero-length ramp is a step at ``start``."""
    if length <= 0:
        return 1.0 if epoch >= start else 0.0
    return min(max((epoch - start) / length, 0.0), 1.0)


class Constant(Schedule):
    """``s(e) = value``."""

    def __init__(self, value: float):
        self.value = float(value)

    def __call__(self, epoch: float) -> float:
        return self.value


class LinearRamp(Schedule):
    """``s(e) = start + (end - start) · t``, ``t = clamp(e / ramp_epochs, 0, 1)``; held at ``end``."""

    def __init__(self, start: float, end: float, ramp_epochs: float):
        self.start, self.end, self.ramp_epochs = float(start), float(end), float(ramp_epochs)

    def __call__(self, epoch: float) -> float:
        t = _progress(epoch, 0.0, self.ramp_epochs)
        return (1.0 - t) * self.start + t * self.end  # exact at both ends


class LogLerpExpRamp(Schedule):
    """gloro's ``-log-`` ramp ``s(e) = scale · log((1 - t) e^start + t e^end)``,
    ``t = clamp(e / ramp_epochs, 0, 1)``; held at ``scale · end`` afterwards (klasleino/gloro
    ``training/schedules.py::_log_interp``)."""

    def __init__(self, start: float, end: float, ramp_epochs: float, scale: float = 1.0):
        self.start, self.end, self.ramp_epochs = float(start), float(end), float(ramp_epochs)
        self.scale = float(scale)

    def __call__(self, epoch: float) -> float:
        t = _progress(epoch, 0.0, self.ramp_epochs)
        if t >= 1.0:
            return self.scale * self.end
        return self.scale * math.log((1.0 - t) * math.exp(self.start) + t * math.exp(self.end))


class GeometricRamp(Schedule):
    """Geometric ramp ``s(e) = start · (end / start) ** t``, ``t = clamp(e / ramp_epochs, 0, 1)``;
    held at ``end`` afterwards. Equal ratios in equal times (gloro's ``-exp-`` transition)."""

    def __init__(self, start: float, end: float, ramp_epochs: float):
        if start <= 0 or end <= 0:
            raise ValueError(f"GeometricRamp needs start > 0 and end > 0, got start={start}, end={end}")
        self.start, self.end, self.ramp_epochs = float(start), float(end), float(ramp_epochs)

    def __call__(self, epoch: float) -> float:
        t = _progress(epoch, 0.0, self.ramp_epochs)
        return self.end if t >= 1.0 else self.start * (self.end / self.start) ** t


class WarmupCosine(Schedule):
    """Linear warm-up ``warmup_start → peak`` over ``[0, warmup_epochs]``, then cosine
    ``final + (peak - final) · (1 + cos(π t)) / 2`` with ``t`` going 0 → 1 over
    ``[warmup_epochs, total_epochs]``; equals ``final`` from ``total_epochs`` on."""

    def __init__(self, peak: float, total_epochs: float, warmup_epochs: float = 0.0,
                 warmup_start: float = 0.0, final: float = 0.0):
        self.peak, self.final = float(peak), float(final)
        self.warmup_start, self.warmup_epochs = float(warmup_start), float(warmup_epochs)
        self.total_epochs = float(total_epochs)

    def __call__(self, epoch: float) -> float:
        if epoch < self.warmup_epochs:
            u = _progress(epoch, 0.0, self.warmup_epochs)
            return (1.0 - u) * self.warmup_start + u * self.peak
        t = _progress(epoch, self.warmup_epochs, self.total_epochs - self.warmup_epochs)
        return self.final + (self.peak - self.final) * 0.5 * (1.0 + math.cos(math.pi * t))


class ExpDecay(Schedule):
    """``value`` until ``decay_start``, then geometric decay
    ``value · (final / value) ** t``, ``t`` going 0 → 1 over ``[decay_start, total_epochs]``;
    equals ``final`` from ``total_epochs`` on."""

    def __init__(self, value: float, final: float, total_epochs: float, decay_start: float = 0.0):
        if value <= 0 or final <= 0:
            raise ValueError(f"ExpDecay needs value > 0 and final > 0, got value={value}, final={final}")
        self.value, self.final = float(value), float(final)
        self.decay_start, self.total_epochs = float(decay_start), float(total_epochs)

    def __call__(self, epoch: float) -> float:
        t = _progress(epoch, self.decay_start, self.total_epochs - self.decay_start)
        return self.final if t >= 1.0 else self.value * (self.final / self.value) ** t


# ----------------------------------------------------------------------------------------------
# config -> schedule

SCHEDULE_KEYS: dict[str, tuple[str, ...]] = {
    "constant": ("value", "value_factor"),
    "linear": ("start", "start_factor", "end", "end_factor", "ramp_epochs", "ramp_fraction"),
    "log_lerp_exp": ("start", "start_factor", "end", "end_factor", "ramp_epochs", "ramp_fraction",
                     "scale", "scale_factor"),
    "geometric": ("start", "start_factor", "end", "end_factor", "ramp_epochs", "ramp_fraction"),
    "gloro": ("schedule", "base"),
    "cosine": ("peak", "peak_factor", "warmup_epochs", "warmup_fraction", "warmup_start",
               "final", "final_factor"),
    "exp_decay": ("value", "value_factor", "final", "final_factor",
                  "decay_start", "decay_start_fraction"),
}


class _Spec:
    """Reads validated numbers out of a schedule dict; errors name the key and the allowed ones."""

    def __init__(self, kind: str, spec: Mapping[str, Any], total_epochs: float, base: float | None):
        self.kind, self.spec, self.total, self.base = kind, spec, total_epochs, base
        allowed = SCHEDULE_KEYS[kind]
        for key in spec:
            if key not in allowed:
                self.fail(f"unknown key {key!r}")

    def fail(self, problem: str):
        allowed = ", ".join(SCHEDULE_KEYS[self.kind])
        raise ValueError(f"schedule kind {self.kind!r}: {problem}; allowed keys: {allowed}")

    def number(self, key: str) -> float:
        v = self.spec[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.fail(f"key {key!r} must be a number, got {v!r}")
        if not math.isfinite(v) or v < 0:
            self.fail(f"key {key!r} must be finite and >= 0, got {v!r}")
        return float(v)

    def one_of(self, a: str, b: str, scale: float | None, default: float | None = None) -> float:
        """Value of key ``a`` (absolute) or ``b`` (times ``scale``); exactly one unless defaulted."""
        has_a, has_b = a in self.spec, b in self.spec
        if has_a and has_b:
            self.fail(f"give either {a!r} or {b!r}, not both")
        if has_a:
            return self.number(a)
        if has_b:
            if scale is None:
                self.fail(f"key {b!r} is a multiple of base, but no base was given")
            return self.number(b) * scale
        if default is None:
            self.fail(f"missing key {a!r} (or {b!r})")
        return default

    def level(self, key: str, default: float | None = None) -> float:
        return self.one_of(key, f"{key}_factor", self.base, default)

    def epochs(self, key: str, fraction_key: str, default: float | None = None) -> float:
        return self.one_of(key, fraction_key, self.total, default)


def make_schedule(spec: Any, total_epochs: int, base: float | None = None) -> Schedule:
    """Build a :class:`Schedule` from a config value (see the module docstring for the keys).

    ``spec`` is a number (constant), ``None`` (constant ``base``), an existing
    :class:`Schedule` (returned as is) or a dict with ``kind`` and that kind's keys.
    ``total_epochs`` resolves ``*_fraction`` keys and ends cosine / exp_decay; ``base``
    resolves ``*_factor`` level keys. Bad specs raise ``ValueError``.
    """
    if isinstance(total_epochs, bool) or not isinstance(total_epochs, (int, float)) or total_epochs <= 0:
        raise ValueError(f"total_epochs must be a positive number, got {total_epochs!r}")
    if base is not None and (not math.isfinite(base) or base < 0):
        raise ValueError(f"base must be finite and >= 0, got {base!r}")
    if isinstance(spec, Schedule):
        return spec
    if spec is None:
        if base is None:
            raise ValueError("schedule spec is None and no base was given")
        return Constant(base)
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        if not math.isfinite(spec) or spec < 0:
            raise ValueError(f"constant schedule must be finite and >= 0, got {spec!r}")
        return Constant(spec)
    if not isinstance(spec, Mapping):
        raise ValueError(f"schedule spec must be a number or a dict with 'kind', got {spec!r}")
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind == "log":
        raise ValueError(
            "schedule kind 'log' was removed because it was ambiguous: it meant a geometric ramp, "
            "while klasleino/gloro's '-log-' is log(lerp(exp(start), exp(end))). Use kind "
            "'log_lerp_exp' for gloro's curve, 'geometric' for start·(end/start)^t, or kind 'gloro' "
            "with the reference schedule string")
    if kind not in SCHEDULE_KEYS:
        raise ValueError(f"schedule 'kind' must be one of {', '.join(SCHEDULE_KEYS)}; got {kind!r}")
    s = _Spec(kind, spec, float(total_epochs), base)

    if kind == "constant":
        return Constant(s.level("value"))
    if kind == "gloro":
        text = spec.get("schedule")
        if not isinstance(text, str):
            s.fail(f"key 'schedule' must be a gloro schedule string, got {text!r}")
        ref = s.number("base") if "base" in spec else base
        if ref is None:
            s.fail("needs 'base' (the value the string's numbers multiply), and none was given")
        try:
            return GloroStringSchedule(text, int(total_epochs), ref)
        except ValueError as e:
            s.fail(str(e))
    if kind in ("linear", "log_lerp_exp", "geometric"):
        start, end = s.level("start"), s.level("end")
        ramp = s.epochs("ramp_epochs", "ramp_fraction")
        if kind == "linear":
            return LinearRamp(start, end, ramp)
        if kind == "log_lerp_exp":
            return LogLerpExpRamp(start, end, ramp, s.level("scale", default=1.0))
        if start <= 0 or end <= 0:
            s.fail(f"a geometric ramp needs start > 0 and end > 0 (got start={start:g}, end={end:g})")
        return GeometricRamp(start, end, ramp)
    if kind == "cosine":
        peak = s.level("peak")
        warmup = s.epochs("warmup_epochs", "warmup_fraction", default=0.0)
        if warmup > total_epochs:
            s.fail(f"warm-up ({warmup:g} epochs) is longer than the run ({total_epochs} epochs)")
        final = s.one_of("final", "final_factor", peak, default=0.0)
        warmup_start = s.number("warmup_start") if "warmup_start" in spec else 0.0
        return WarmupCosine(peak, total_epochs, warmup, warmup_start, final)
    # exp_decay
    value = s.level("value")
    final = s.one_of("final", "final_factor", value)
    decay_start = s.epochs("decay_start", "decay_start_fraction", default=0.0)
    if decay_start > total_epochs:
        s.fail(f"decay_start ({decay_start:g}) is after the end of the run ({total_epochs} epochs)")
    if value <= 0 or final <= 0:
        s.fail(f"exp_decay needs value > 0 and final > 0 (got value={value:g}, final={final:g})")
    return ExpDecay(value, final, total_epochs, decay_start)
