"""Optimizers: Adam / AdamW / NAdam, optionally wrapped in Lookahead.

Lookahead (Zhang, Lucas, Hinton & Ba, NeurIPS 2019): every ``k`` inner steps the slow weights
move ``φ ← φ + α(θ − φ)`` and the fast weights restart from them. ``lookahead: true`` uses
k = 5, α = 0.5 (the paper's); ``{k: 6, alpha: 0.5}`` is ``timm.optim.Lookahead``'s default, which
hukkai/liresnet's CHORD recipes use. ``adam`` adds weight decay to the gradient (L2), ``adamw``
decouples it (Loshchilov & Hutter), as the LiResNet snapshot's ``torch.optim.AdamW``.
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


OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "nadam": torch.optim.NAdam}


def lookahead_args(lookahead) -> dict | None:
    """``False``/``None`` -> None; ``True`` -> {}; ``{k, alpha}`` -> itself (validated)."""
    if lookahead is None or lookahead is False:
        return None
    if lookahead is True:
        return {}
    if isinstance(lookahead, dict) and set(lookahead) <= {"k", "alpha"}:
        k, alpha = lookahead.get("k", 5), lookahead.get("alpha", 0.5)
        if isinstance(k, int) and not isinstance(k, bool) and k >= 1 and isinstance(alpha, (int, float)) and 0 < alpha <= 1:
            return dict(lookahead)
    raise ValueError(f"lookahead must be true, false or {{k: int >= 1, alpha: (0, 1]}}, got {lookahead!r}")


def make_optimizer(params, name: str, weight_decay: float = 0.0, lookahead=False):
    """Adam, AdamW or NAdam at lr 1.0 (the training loop sets the scheduled lr every step)."""
    params = list(params)
    opt = OPTIMIZERS[name](params, lr=1.0, weight_decay=weight_decay)
    la = lookahead_args(lookahead)
    return opt if la is None else Lookahead(opt, **la)
