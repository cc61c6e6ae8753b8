"""Model registry (timm style): ``create(name, in_shape, num_classes, epsilon)`` -> ``GloroNet``.

Families (:mod:`.convnets`, :mod:`.liresnet`) import this module and register their builders;
this module never imports a family. A family may also register a *resolver* for names it builds
without registering each one (``liresnet-<D>l<W>w`` of any size).
"""
from __future__ import annotations

from typing import Callable, Sequence

from ..gloro import GloroNet

_REGISTRY: dict[str, Callable[..., GloroNet]] = {}
_RESOLVERS: list[Callable[[str, dict], "tuple[str, dict] | None"]] = []


def register(name: str):
    """Decorator adding a builder ``fn(in_shape, num_classes, epsilon, **kw) -> GloroNet``."""

    def wrap(fn):
        _REGISTRY[name] = fn
        return fn

    return wrap


def register_resolver(fn: Callable[[str, dict], "tuple[str, dict] | None"]) -> None:
    """``fn(name, kwargs) -> (registered name, kwargs)`` for names it understands, else None."""
    _RESOLVERS.append(fn)


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create(name: str, in_shape: Sequence[int], num_classes: int, epsilon: float = 0.0, **kwargs) -> GloroNet:
    """Build a registered architecture (or one a family resolves) for inputs ``in_shape = (C, H, W)``.

    The returned net carries ``net.config`` (the registered name and arguments) so it can be
    rebuilt from a checkpoint alone.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        for resolve in _RESOLVERS if isinstance(key, str) else ():
            found = resolve(key, kwargs)
            if found is not None:
                key, kwargs = found
                break
        else:
            raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    in_shape = tuple(int(s) for s in in_shape)
    if len(in_shape) != 3 or min(in_shape) < 1:
        raise ValueError(f"in_shape must be (channels, height, width), got {in_shape}")
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    net = _REGISTRY[key](in_shape, int(num_classes), epsilon, **kwargs)
    net.config = {"name": key, "in_shape": list(in_shape), "num_classes": int(num_classes), **kwargs}
    return net
