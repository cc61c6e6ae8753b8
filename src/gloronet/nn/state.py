"""What determines a module's map: ONE fingerprint, used by every cache and memo of the bounds.

A bound (or a weight derived for the eval forward) stays valid only while nothing the forward
pass reads has changed. :class:`MapState` is an exact snapshot of

* the module tree — the very objects, by identity, under the same names;
* every parameter and buffer, bit for bit (shape, dtype, device, bits), except the iterates a
  layer declares in ``iterate_buffers`` (power-iteration vectors move the training estimate,
  never the map) — never "every name starting with ``power_``";
* every other attribute of every module (:func:`freeze`): numbers of any type (Python, numpy
  scalars and arrays, ``Fraction``, enums …), strings, dtypes, shapes, tensors, and tuples /
  lists / dicts / sets of them; functions and classes by identity. A value it cannot
  fingerprint (any other object, whose contents could change unseen) is refused with
  :class:`FingerprintError`. Excluded: torch's own bookkeeping, :class:`EvalCache` instances
  (derived from the rest) and names a layer declares in ``derived_attributes`` (caches that never
  change the map).

Any change in place, through ``.data``, by an optimizer, by ``load_state_dict`` or by assigning
an attribute makes :meth:`MapState.matches` false. :class:`EvalCache` (a layer's derived weight
and the bounds memoised on it) and the ``GloroNet`` bound cache are both keyed on it, so no memo
is keyed on less than what determines the map.
"""
from __future__ import annotations

import enum
import functools
import numbers
import types

import torch
from torch import nn

from ..tracing import is_compiling

_MODULE_INTERNALS = frozenset(vars(nn.Module()))  # torch's bookkeeping (hooks are refused elsewhere)
_BY_IDENTITY = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.BuiltinMethodType,
                functools.partial, type)
_SIMPLE = (type(None), bool, int, str, bytes, torch.dtype, torch.device, torch.layout, torch.memory_format)


class FingerprintError(TypeError):
    """An attribute holds a value whose changes the bound cache could not see."""


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` reinterpreted bit for bit as integers where it is floating (NaN equals itself, −0 ≠ 0)."""
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.is_floating_point():
        t = t.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()])
    return t


class _Tensor:
    """A tensor compared exactly (shape, dtype, device, bits)."""

    __hash__ = None

    def __init__(self, t: torch.Tensor, copy: bool):
        t = t.detach()
        self.t = t.clone() if copy else t

    def __eq__(self, other) -> bool:
        a, b = self.t, other.t if isinstance(other, _Tensor) else None
        return (b is not None and a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                and torch.equal(_bits(a), _bits(b)))


class _Same:
    """An object compared by identity (functions, classes): a rebinding is seen, never an id reuse
    (the reference is held)."""

    __hash__ = None

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other) -> bool:
        return isinstance(other, _Same) and other.obj is self.obj


def freeze(value, where: str, copy: bool = True):
    """An immutable snapshot of ``value`` that compares equal (``==``) exactly when the value is
    the same (type included); tensors are copied when ``copy``. Raises :class:`FingerprintError`
    naming ``where`` for a value it cannot fingerprint."""
    kind = type(value)
    tag = f"{kind.__module__}.{kind.__qualname__}"
    if isinstance(value, torch.Tensor):
        return _Tensor(value, copy)
    if isinstance(value, enum.Enum):
        return (tag, value.name, freeze(value.value, where, copy))
    if isinstance(value, float):  # numpy.float64 too
        return (tag, float(value).hex())
    if isinstance(value, complex):
        return (tag, value.real.hex(), value.imag.hex())
    if isinstance(value, _SIMPLE):
        return (tag, value)
    if kind.__module__ == "numpy" and hasattr(value, "tobytes") and hasattr(value, "dtype"):
        if value.dtype.hasobject:
            raise FingerprintError(f"{where} is a numpy array of Python objects, which the bound cache cannot fingerprint")
        return (tag, value.dtype.str, tuple(getattr(value, "shape", ())), value.tobytes())
    if isinstance(value, numbers.Number):  # Fraction, Decimal, ...: exact text
        return (tag, repr(value))
    if isinstance(value, (tuple, list)):
        return (tag, tuple(freeze(v, f"{where}[{i}]", copy) for i, v in enumerate(value)))
    if isinstance(value, dict):
        return (tag, tuple((freeze(k, where, copy), freeze(v, f"{where}[{k!r}]", copy)) for k, v in value.items()))
    if isinstance(value, (set, frozenset)):
        return (tag, frozenset(freeze(v, where, copy) for v in value))
    if isinstance(value, _BY_IDENTITY):
        return (tag, _Same(value))
    raise FingerprintError(
        f"{where} holds a {kind.__name__}, which the bound cache cannot fingerprint (a change inside it would "
        "go unseen): store numbers, strings, tensors or tuples / lists / dicts of them, submodules as modules, "
        "or list the name in the class's derived_attributes if it never changes the map"
    )


def map_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for every parameter, buffer and tensor attribute a module's map may read,
    iterates excluded (not recursive)."""
    iterates = set(getattr(type(module), "iterate_buffers", ()))
    out = [(n, t) for n, t in module._parameters.items() if t is not None]
    out += [(n, t) for n, t in module._buffers.items() if t is not None and n not in iterates]
    out += [(n, t) for n, t in vars(module).items() if isinstance(t, torch.Tensor)]
    return out


def _fingerprint(module: nn.Module, copy: bool) -> tuple:
    """The frozen state of one module (not recursive): its tensors and its attributes."""
    name = type(module).__name__
    skip = _MODULE_INTERNALS | set(getattr(type(module), "derived_attributes", ()))
    tensors = tuple((n, _Tensor(t, copy)) for n, t in map_tensors(module))
    attrs = tuple(
        (k, freeze(v, f"{name}.{k}", copy)) for k, v in vars(module).items()
        if k not in skip and not isinstance(v, (torch.Tensor, EvalCache))
    )
    return tensors, attrs


class MapState:
    """An exact snapshot of what determines the maps of ``roots`` (and all their submodules)."""

    def __init__(self, *roots: nn.Module):
        self.modules = self._modules(roots)
        self.snapshots = [_fingerprint(m, copy=True) for _, m in self.modules]

    @staticmethod
    def _modules(roots) -> list[tuple[str, nn.Module]]:
        return [(f"{i}.{name}", m) for i, r in enumerate(roots) for name, m in r.named_modules(remove_duplicate=False)]

    def matches(self, *roots: nn.Module) -> bool:
        modules = self._modules(roots)
        if len(modules) != len(self.modules) or any(
            n1 != n2 or m1 is not m2 for (n1, m1), (n2, m2) in zip(modules, self.modules)
        ):  # references are held, so a swapped-out module's id cannot be reused
            return False
        return all(_fingerprint(m, copy=False) == snap for (_, m), snap in zip(modules, self.snapshots))


class EvalCache:
    """A tensor derived from its owner module (a normalised or orthogonalised weight, a residual
    kernel), computed once without gradient, and the values memoised on it (its bounds) — all
    valid while the owner's :class:`MapState` matches (parameters, buffers, every attribute).

    The eval-mode forward pass, ``lipschitz_bound()`` and ``error_model()`` read the one tensor
    :meth:`get` returns; public accessors hand out copies, so nothing outside can edit it. The
    entry is replaced in one assignment (safe for concurrent readers); copies and pickles of a
    module start with an empty cache.
    """

    _pinned = False  # see pin()

    def __init__(self):
        self._entry: tuple[MapState, torch.Tensor, dict] | None = None

    def _current(self, owner: nn.Module):
        entry = self._entry
        return entry if entry is not None and entry[0].matches(owner) else None

    def get(self, owner: nn.Module, compute) -> torch.Tensor:
        """The cached ``compute()`` while ``owner`` is unchanged; recomputed otherwise. While
        ``torch.compile`` / ``torch.export`` trace, the graph computes it (no data-dependent check) —
        unless :meth:`pin` was called: then the cached tensor is read as a constant."""
        if is_compiling():
            entry = self._entry
            if self._pinned and entry is not None:
                return entry[1]
            with torch.no_grad():
                return compute()
        entry = self._current(owner)
        if entry is None:
            state = MapState(owner)
            with torch.no_grad():
                entry = (state, compute(), {})
            self._entry = entry
        return entry[1]

    def remember(self, owner: nn.Module, key, compute):
        """``compute()`` once per cached tensor and ``key`` (e.g. its Lipschitz bound). Call it
        after :meth:`get` (``compute`` reads that tensor); memoised only while ``owner`` is
        unchanged from the entry it was computed for."""
        entry = self._current(owner)
        if entry is not None and key in entry[2]:
            return entry[2][key]
        value = compute()
        if entry is not None and self._entry is entry and entry[0].matches(owner):
            entry[2][key] = value
        return value

    def clear(self) -> None:
        self._entry = None

    def pin(self) -> None:
        """Traces read the cached tensor as a constant instead of computing it in the graph (an
        exported program then applies exactly the weight that was bounded, and needs none of the
        ops that derive it: complex solves, FFTs). For a private copy nothing edits afterwards
        (the trace cannot check the owner's state); copies start unpinned."""
        self._pinned = True

    def __getstate__(self):
        return {"_entry": None}


def eval_caches(module: nn.Module):
    """Every :class:`EvalCache` held by ``module`` or a submodule."""
    for m in module.modules():
        for v in vars(m).values():
            if isinstance(v, EvalCache):
                yield v
