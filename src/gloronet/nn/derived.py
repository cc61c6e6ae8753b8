"""Derived weights: the one place where a layer's applied weight comes from its parameters.

A layer whose weight is *derived* from its parameters (AOL's rescaled kernel, LLN's normalised
rows, BRO's reflector) overrides :meth:`DerivedWeight.derive_weight`. In training the forward pass
uses that differentiable tensor; in eval mode it is computed once
(:class:`gloronet.nn.state.EvalCache`, keyed on the layer's whole state) and the forward pass, the
bound and the error model all read that one tensor, so they describe one map. Public accessors
hand a derived weight out as a copy: editing it cannot change the map behind its bound. A layer
that does not override ``derive_weight`` applies its ``weight`` parameter itself (an edit of it is
an edit of the parameter, which the bound cache sees).
"""
from __future__ import annotations

import torch


class DerivedWeight:
    """Mixin for ``LipLinear`` / ``LipConv2d``: needs ``self.weight``, ``self.bias`` and ``self._eval_weight``."""

    def derive_weight(self) -> torch.Tensor:
        """The (differentiable) weight applied, from the parameters; here ``weight`` itself."""
        return self.weight

    def _derived(self) -> bool:
        return type(self).derive_weight is not DerivedWeight.derive_weight

    def _applied_weight(self) -> torch.Tensor:
        """The weight the eval-mode forward applies, itself (cached if derived): what the forward
        pass and the bounds read."""
        if not self._derived():
            return self.weight.detach()
        return self._eval_weight.get(self, self.derive_weight)

    def applied_weight(self) -> torch.Tensor:
        """The eval-mode weight (no gradient); a derived one is handed out as a copy."""
        w = self._applied_weight()
        return w.clone() if self._derived() else w

    def applied_float64(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight, bias)`` the eval forward applies, cast exactly to float64, for the float64
        centre (:mod:`gloronet.centre64`); bias None where the layer has none."""
        w = self._applied_weight().detach().to(torch.float64)
        return w, None if self.bias is None else self.bias.detach().to(torch.float64)

    def forward_weight(self) -> torch.Tensor:
        """Training: :meth:`derive_weight` (differentiable); eval: :meth:`applied_weight`."""
        if self.training or not self._derived():
            return self.derive_weight()
        return self.applied_weight()

    def _apply(self, fn, *args, **kwargs):  # .to(), .double(): drop the cached weight
        cache = self.__dict__.get("_eval_weight")  # absent in layers pickled before it existed
        if cache is not None:
            cache.clear()
        return super()._apply(fn, *args, **kwargs)
