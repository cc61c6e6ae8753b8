"""The schedule interface: ``s(epoch) -> float`` of the fractional epoch (:mod:`gloronet.schedules`
builds them from specs; :mod:`gloronet.schedule_strings` reads klasleino/gloro's strings)."""
from __future__ import annotations

__all__ = ["Schedule"]


class Schedule:
    """Base class: ``s(epoch) -> float``. Subclasses store their parameters as attributes."""

    def __call__(self, epoch: float) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v:.6g}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"
