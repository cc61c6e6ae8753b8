"""klasleino/gloro schedule strings, reproduced step for step.

Source: klasleino/gloro ``gloro/training/schedules.py`` (``Schedule``) and
``gloro/training/callbacks.py`` (``VariableScheduler``), as shipped in gloro 1.1.1 on PyPI.

A string such as ``"[0.01]-log-[50%:1.1]"`` is a list of sections ``[time:value]`` (time in
epochs or ``%`` of the run; the first section's time is 0) joined by transitions: ``-`` linear,
``-exp-`` geometric, ``-log-`` ``log(lerp(exp(a), exp(b)))``, and nothing
between two sections for a step. Values multiply ``base`` (the target ε, the initial lr, ...).
The reference turns it into one value per epoch (``i / duration`` for ``i = 0 .. duration-1``,
so a ramp stops one step short of its end value unless a later section holds it) and its
callback sets, at batch ``b`` of ``n`` in epoch ``e >= 1``, ``S[e-1] + (S[e] - S[e-1]) · b / n``
(epoch 0 uses ``S[0]``): each epoch's value is reached only at the end of that epoch. Once the
list runs out (``e >= len(S)``) the callback keeps its last pair, so the last interpolation
repeats every epoch. ``GloroStringSchedule`` does exactly this, as a function of the fractional
epoch ``e + b / n`` that :mod:`gloronet.train` passes.

Named strings (``fixed``, ``linear``, ``linear_half``, ``linear_from_X``, ``linear_half_from_X``,
``logarithmic``, ``logarithmic_half``, ``decay_to_X``, ``decay_after_half_to_X``,
``decay_until_half_to_X``) expand as in gloro 1.1.1 (``X`` is absolute, not a multiple of base).
An unknown transition, which the reference silently treats as a step, is refused here.
"""
from __future__ import annotations

import math
import re

from .schedule_base import Schedule

__all__ = ["NAMED", "PREFIXED", "parse_gloro_schedule", "GloroStringSchedule"]

# gloro 1.1.1 ``Schedule.__init__``: exact names, then prefixes whose rest is a number X (absolute).
NAMED = {
    "linear": "[0.]-[1.]",
    "linear_half": "[0.]-[50%:1.]-[1.]",
    "logarithmic": "[0.01]-log-[1.]",
    "logarithmic_half": "[0.01]-log-[50%:1.]-[1.]",
}
PREFIXED = {  # {r} = X / base
    "linear_from_": "[{r}]-[1.]",
    "linear_half_from_": "[{r}]-[50%:1.]-[1.]",
    "decay_to_": "[1.]-exp-[{r}]",
    "decay_after_half_to_": "[1.]-[50%:1.]-exp-[{r}]",
    "decay_until_half_to_": "[1.]-exp-[50%:{r}]-[{r}]",
}


def _interp(kind: str, a: float, b: float, d: int) -> list[float]:
    if d == 0:
        return []
    if kind == "-":
        return [a + (b - a) * i / d for i in range(d)]
    if kind == "-exp-":
        if a <= 0 or b <= 0:
            raise ValueError(f"an -exp- transition needs values > 0, got {a:g} and {b:g}")
        rate = math.log(b / a) / d
        return [a * math.exp(rate * i) for i in range(d)]
    if kind == "-log-":
        return [math.log((math.exp(b) - math.exp(a)) / d * i + math.exp(a)) for i in range(d)]
    return [a] * d  # '' : a step


def _section(text: str, duration: int, is_start: bool, is_end: bool) -> tuple[int, float]:
    if not (text.startswith("[") and text.endswith("]")):
        raise ValueError(f"invalid section {text!r}")
    body = text[1:-1]
    if not (is_start or is_end or ":" in body):
        raise ValueError(f"section {text!r} needs a time, as in [50%:1.0]")
    time = 0 if is_start else duration
    if ":" in body:
        t, body = body.split(":")
        time = int(float(t[:-1]) / 100.0 * duration) if t.endswith("%") else int(t)
    return time, float(body)


def parse_gloro_schedule(text: str, duration: int, base: float) -> list[float]:
    """The per-epoch list ``Schedule(text, duration, base).as_list()`` of gloro 1.1.1."""
    if text == "fixed":
        return [float(base)]
    if text in NAMED:
        return parse_gloro_schedule(NAMED[text], duration, base)
    for prefix, pattern in PREFIXED.items():
        if text.startswith(prefix):
            r = float(text[len(prefix):]) / base  # the reference formats it with str(float)
            return parse_gloro_schedule(pattern.format(r=r), duration, base)
    transitions = re.split(r"\[.*?\]", text)
    sections = re.findall(r"\[.*?\]", text)
    if len(sections) < 2 or any(t for t in (transitions[0], transitions[-1])):
        raise ValueError(f"invalid gloro schedule {text!r}: expected '[v0]<transition>[t1:v1]...'")
    out: list[float] = []
    n = len(sections)
    for i in range(n - 1):
        kind = transitions[i + 1]
        if kind not in ("", "-", "-exp-", "-log-"):
            raise ValueError(f"unknown transition {kind!r} in {text!r}; known: '-', '-exp-', '-log-', '' (step)")
        t0, v0 = _section(sections[i], duration, i == 0, False)
        t1, v1 = _section(sections[i + 1], duration, False, i + 1 == n - 1)
        if not 0 <= t0 <= t1:
            raise ValueError(f"invalid times in gloro schedule {text!r}")
        out += _interp(kind, v0 * base, v1 * base, t1 - t0)
        if kind == "" and i + 1 == n - 1 and t1 < duration - 1:
            out.append(v1 * base)
    if not out:
        raise ValueError(f"gloro schedule {text!r} is empty for a {duration}-epoch run")
    return out


class GloroStringSchedule(Schedule):
    """``s(e)``: the value gloro's ``VariableScheduler(interpolate=True)`` sets at fractional epoch ``e``."""

    def __init__(self, text: str, total_epochs: int, base: float):
        self.text, self.total_epochs, self.base = text, int(total_epochs), float(base)
        self.values = parse_gloro_schedule(text, self.total_epochs, self.base)
        if not all(math.isfinite(v) and v >= 0 for v in self.values):
            raise ValueError(f"gloro schedule {text!r} with base {base:g} has negative or non-finite values")

    def __call__(self, epoch: float) -> float:
        s = self.values
        e = int(math.floor(epoch))
        if e <= 0 or len(s) == 1:
            return s[0]
        frac = epoch - e
        if e >= len(s):  # the reference stops updating; its last (prev, current) pair repeats
            e = len(s) - 1
        return s[e - 1] + (s[e] - s[e - 1]) * frac

    def __repr__(self) -> str:
        return f"GloroStringSchedule({self.text!r}, total_epochs={self.total_epochs}, base={self.base:g})"
