"""The Lipschitz-layer protocol and the one place that turns a module into a bound.

Every layer in ``gloronet.nn`` has ``lipschitz()`` (a differentiable training *estimate*) and
``lipschitz_bound()`` (a float, a *provable* upper bound of its L2 Lipschitz constant).
:func:`lipschitz_bound_of` refuses modules it cannot bound: there is no default of 1.
"""
from __future__ import annotations

import torch
from torch import nn

# Stateless torch modules whose L2 Lipschitz constant is known exactly.
_KNOWN_ONE_LIPSCHITZ = (nn.Identity, nn.Flatten, nn.ReLU)


class UnboundedLayerError(TypeError):
    """Raised when certification meets a module without a proven Lipschitz bound."""


class LipschitzModule(nn.Module):
    """Base class: subclasses implement ``lipschitz()`` and ``lipschitz_bound()``.

    Buffers whose name starts with ``power_`` hold power-iteration iterates: they change the
    estimate, never the bound (GloroNet's bound cache ignores them).
    """

    def lipschitz(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def lipschitz_bound(self) -> float:  # pragma: no cover - interface
        raise NotImplementedError


def _unbounded(module: nn.Module) -> UnboundedLayerError:
    return UnboundedLayerError(
        f"{type(module).__name__} has no proven Lipschitz bound, so a GloroNet containing it "
        "cannot be certified. Use the layers of gloronet.nn (LipConv2d, LipLinear, MinMax, "
        "Flatten, ...) or give the module lipschitz() and lipschitz_bound() methods."
    )


def lipschitz_bound_of(module: nn.Module) -> float:
    """Provable L2 Lipschitz bound of ``module``; raises :class:`UnboundedLayerError` otherwise."""
    if hasattr(module, "lipschitz_bound"):
        return float(module.lipschitz_bound())
    if type(module) is nn.Sequential:
        from ..bounds import mul_up

        return mul_up(*(lipschitz_bound_of(m) for m in module))
    if type(module) in _KNOWN_ONE_LIPSCHITZ:
        return 1.0
    raise _unbounded(module)


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
