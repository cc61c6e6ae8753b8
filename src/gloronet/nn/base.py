"""The Lipschitz-layer protocol and the one place that turns a module into bounds.

Every layer in ``gloronet.nn`` has

* ``lipschitz()`` — a differentiable training *estimate*;
* ``lipschitz_bound()`` — a float, a *provable* upper bound of its L2 Lipschitz constant;
* ``error_model(in_shape, dtype, lip)`` — a :class:`gloronet.fp.ErrorModel`: how far its
  floating-point forward pass can be from the exact map (``lip`` is its own bound, passed in so
  it is computed once);
* ``iterate_buffers`` — the names of buffers that hold power-iteration iterates (they change the
  estimate, never the map; the bound cache ignores exactly these buffers);
* ``derived_attributes`` — names of plain attributes that hold caches derived from the rest
  (never the map); every other attribute is part of the fingerprint (:mod:`gloronet.nn.state`).

A container (``Sequential``, ``LiResStack``) instead lists the modules it applies in order with
``sequential_parts()``. :func:`body_steps` flattens a body into the leaf layers certification
walks through; it refuses (:class:`UnboundedLayerError`) anything whose map the bounds may not
describe: modules without a proven bound (there is no default of 1), a subclass whose
``forward`` is newer than its bound, a ``forward`` replaced on the instance, forward hooks, and a
``GloroNet`` used as a layer (its ``lipschitz_bound()`` is its body's, without its head).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import fp
from .state import EvalCache  # noqa: F401  (the layers' derived-weight cache; keyed on MapState)

# Stateless torch modules whose L2 Lipschitz constant is known exactly.
_KNOWN_ONE_LIPSCHITZ = (nn.Identity, nn.Flatten, nn.ReLU)


class UnboundedLayerError(TypeError):
    """Raised when certification meets a module without a proven Lipschitz bound or error model."""


class LipschitzModule(nn.Module):
    """Base class: subclasses implement ``lipschitz()``, ``lipschitz_bound()``, ``error_model()``.

    ``norm_nonincreasing = True`` declares that the computed output never has a larger L2 norm
    than the input (permutations, MinMax, ReLU): certification then skips measuring it.
    """

    iterate_buffers: tuple[str, ...] = ()
    derived_attributes: tuple[str, ...] = ()
    norm_nonincreasing: bool = False

    def lipschitz(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def lipschitz_bound(self) -> float:  # pragma: no cover - interface
        raise NotImplementedError


def _unbounded(module: nn.Module, why: str = "has no proven Lipschitz bound") -> UnboundedLayerError:
    return UnboundedLayerError(
        f"{type(module).__name__} {why}, so a GloroNet containing it cannot be certified. Use the "
        "layers of gloronet.nn (LipConv2d, LipLinear, MinMax, Flatten, ...) or give the module "
        "lipschitz(), lipschitz_bound() and error_model() methods."
    )


def _defining_class(cls: type, name: str) -> type | None:
    return next((c for c in cls.__mro__ if name in c.__dict__), None)


def check_map_is_described(module: nn.Module) -> None:
    """Refuse a module whose forward pass may differ from what its bound describes."""
    if "forward" in vars(module):
        raise _unbounded(module, "has its forward replaced on the instance")
    if module._forward_hooks or module._forward_pre_hooks:
        raise _unbounded(
            module,
            "has forward hooks, which can change its map behind its bound (old-style weight_norm / "
            "spectral_norm are such hooks: use torch.nn.utils.parametrizations instead)",
        )
    if getattr(module, "_is_gloro_net", False):
        raise UnboundedLayerError(
            "a GloroNet cannot be a layer of another GloroNet's body: its lipschitz_bound() covers its "
            "body only, not its head. Build one GloroNet from the combined body (e.g. Sequential(a.body, ...))."
        )
    forward_owner = _defining_class(type(module), "forward")
    for attr in ("lipschitz_bound", "error_model", "sequential_parts"):
        owner = _defining_class(type(module), attr)
        if owner is None or forward_owner is owner or not issubclass(forward_owner, owner):
            continue
        if _defining_class(owner, "forward") is not nn.Module:  # the bound was written for another forward
            raise _unbounded(
                module, f"overrides forward() (in {forward_owner.__name__}) but inherits {attr}() from {owner.__name__}"
            )


def check_global_hooks() -> None:
    """Refuse global module hooks: they may change any layer's output behind its bound."""
    import torch.nn.modules.module as mod

    if mod._global_forward_hooks or mod._global_forward_pre_hooks:
        raise UnboundedLayerError("global forward hooks are registered (register_module_forward_hook): remove them to certify")


def _parts(module: nn.Module) -> list[nn.Module] | None:
    if type(module) is nn.Sequential:
        return list(module)
    if hasattr(module, "sequential_parts"):
        return list(module.sequential_parts())
    return None


def body_steps(module: nn.Module) -> list[nn.Module]:
    """The leaf layers ``module`` applies in order (containers flattened), each checked."""
    check_map_is_described(module)
    parts = _parts(module)
    if parts is None:
        if not (hasattr(module, "lipschitz_bound") or type(module) in _KNOWN_ONE_LIPSCHITZ):
            raise _unbounded(module)
        return [module]
    return [leaf for part in parts for leaf in body_steps(part)]


def lipschitz_bound_of(module: nn.Module) -> float:
    """Provable L2 Lipschitz bound of ``module``; raises :class:`UnboundedLayerError` otherwise."""
    from ..bounds import mul_up

    steps = body_steps(module)
    if steps == [module]:
        if type(module) in _KNOWN_ONE_LIPSCHITZ:
            return 1.0
        bound = float(module.lipschitz_bound())
        if not bound >= 0:
            raise ValueError(f"{type(module).__name__}.lipschitz_bound() returned {bound}, not a number >= 0")
        return bound
    return mul_up(*(lipschitz_bound_of(m) for m in steps))


def error_model_of(module: nn.Module, in_shape: tuple[int, ...], dtype: torch.dtype, lip: float) -> fp.ErrorModel:
    """The :class:`gloronet.fp.ErrorModel` of one leaf layer on inputs of shape ``in_shape``."""
    if type(module) in (nn.Identity, nn.Flatten):
        return fp.exact_model(lip)
    if type(module) is nn.ReLU:
        n = 1
        for s in in_shape:
            n *= int(s)
        return fp.elementwise_model(lip, n, dtype)
    if not hasattr(module, "error_model"):
        raise _unbounded(module, "has no floating-point error model (error_model())")
    return module.error_model(tuple(int(s) for s in in_shape), dtype, lip)


def never_increases_norm(module: nn.Module) -> bool:
    """True if the computed output of ``module`` is never longer (L2) than its input."""
    return type(module) in _KNOWN_ONE_LIPSCHITZ or getattr(type(module), "norm_nonincreasing", False)


def lipschitz_estimate_of(module: nn.Module) -> torch.Tensor:
    """Differentiable Lipschitz estimate of ``module`` (for training losses)."""
    if hasattr(module, "lipschitz"):
        return module.lipschitz()
    if type(module) is nn.Sequential:
        out = torch.ones(())
        for m in module:
            out = out * lipschitz_estimate_of(m)
        return out
    if type(module) in _KNOWN_ONE_LIPSCHITZ:
        return torch.ones(())
    raise _unbounded(module)
