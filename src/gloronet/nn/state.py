"""What determines a module's map, as a snapshot that can be compared exactly.

A bound cached for a model stays valid only while nothing its forward pass reads has changed:

* the module tree — the very objects, by identity, under the same names;
* every parameter and buffer (exact copies: shape, dtype, device and values), except the
  iterates a layer declares in ``iterate_buffers`` (power-iteration vectors move the training
  estimate, never the map) — never "every name starting with ``power_``";
* tensors held as plain attributes (not registered), compared the same way;
* every plain attribute (numbers, strings, shapes, dtypes: ``depth``, ``input_hw``, ``stride``,
  ``eps`` ...), so changing one through Python is seen too.

Any change in place, through ``.data``, by an optimizer, by ``load_state_dict`` or by assigning
an attribute makes :meth:`MapState.matches` false.
"""
from __future__ import annotations

import torch
from torch import nn

_PLAIN = (type(None), bool, int, float, complex, str, torch.dtype, torch.device, torch.Size)
_NOT_MAP = frozenset({"training"})


def _plain(value) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (tuple, list, set, frozenset)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(_plain(k) and _plain(v) for k, v in value.items())
    return False


def map_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for everything a module's map may read, iterates excluded (not recursive)."""
    iterates = set(getattr(type(module), "iterate_buffers", ()))
    out = [(n, t) for n, t in module._parameters.items() if t is not None]
    out += [(n, t) for n, t in module._buffers.items() if t is not None and n not in iterates]
    out += [(n, t) for n, t in vars(module).items() if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter)]
    return out


def _plain_attributes(module: nn.Module) -> dict:
    return {k: v for k, v in vars(module).items() if k not in _NOT_MAP and _plain(v)}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


class MapState:
    """An exact snapshot of what determines the maps of ``roots`` (and all their submodules)."""

    def __init__(self, *roots: nn.Module):
        self.modules = self._modules(roots)
        self.attributes = [_plain_attributes(m) for _, m in self.modules]
        self.tensors = [[(n, t.detach().clone()) for n, t in map_tensors(m)] for _, m in self.modules]

    @staticmethod
    def _modules(roots) -> list[tuple[str, nn.Module]]:
        return [(f"{i}.{name}", m) for i, r in enumerate(roots) for name, m in r.named_modules(remove_duplicate=False)]

    def matches(self, *roots: nn.Module) -> bool:
        modules = self._modules(roots)
        if len(modules) != len(self.modules) or any(
            n1 != n2 or m1 is not m2 for (n1, m1), (n2, m2) in zip(modules, self.modules)
        ):  # references are held, so a swapped-out module's id cannot be reused
            return False
        for (_, m), attrs, snap in zip(modules, self.attributes, self.tensors):
            if _plain_attributes(m) != attrs:
                return False
            now = map_tensors(m)
            if len(now) != len(snap) or any(n1 != n2 or not _same(s, t.detach()) for (n1, s), (n2, t) in zip(snap, now)):
                return False
        return True
