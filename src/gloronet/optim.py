"""Optimizers: Adam / NAdam, optionally wrapped in Lookahead.

Lookahead (Zhang, Lucas, Hinton & Ba, NeurIPS 2019): every ``k`` inner steps the slow weights
move ``φ ← φ + α(θ − φ)`` and the fast weights restart from them.
"""
from __future__ import annotations

import torch


class Lookahead:
    """Wraps an optimizer; exposes ``param_groups``, ``step``, ``zero_grad`` and state dicts."""

    def __init__(self, inner: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5):
        if k < 1 or not 0 < alpha <= 1:
            raise ValueError(f"Lookahead needs k >= 1 and 0 < alpha <= 1, got k={k}, alpha={alpha}")
        self.inner, self.k, self.alpha = inner, k, alpha
        self.param_groups = inner.param_groups
        self.steps = 0
        self.slow = [p.detach().clone() for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.inner.step(closure)
        self.steps += 1
        if self.steps % self.k == 0:
            for slow, p in zip(self.slow, (p for g in self.param_groups for p in g["params"])):
                slow.add_(p - slow, alpha=self.alpha)
                p.copy_(slow)
        return loss

    def zero_grad(self, set_to_none: bool = True):
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"inner": self.inner.state_dict(), "steps": self.steps, "slow": self.slow}

    def load_state_dict(self, state):
        self.inner.load_state_dict(state["inner"])
        self.steps = state["steps"]
        for s, saved in zip(self.slow, state["slow"]):
            s.copy_(saved)


def make_optimizer(params, name: str, weight_decay: float = 0.0, lookahead: bool = False):
    """Adam or NAdam at lr 1.0 (the training loop sets the scheduled lr every step)."""
    params = list(params)
    cls = {"adam": torch.optim.Adam, "nadam": torch.optim.NAdam}[name]
    opt = cls(params, lr=1.0, weight_decay=weight_decay)
    return Lookahead(opt) if lookahead else opt
