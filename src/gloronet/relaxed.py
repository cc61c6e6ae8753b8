"""Relaxed robustness: top-K (RTK) and affinity certificates and bottom logits (Leino & Fredrikson,
"Relaxing Local Robustness", NeurIPS 2021).

Let ``S_k(x)`` be the classes of the ``k`` highest logits at ``x`` (positions in the sorted order:
masked by index, never by value equality).

* **RTK robustness** at ``x``: some ``k ≤ K`` keeps ``S_k(x')`` equal to ``S_k(x)`` for every
  ``‖x' − x‖ < ε``. Certificate for one ``k``: every ``i ∈ S_k`` and ``j ∉ S_k`` keep
  ``y_i > y_j`` throughout the ball — with the sound pairwise margin bounds of
  :class:`gloronet.radius.MarginBounds` (``low_ij − slope_ij·r > 0``; in exact arithmetic
  ``y_i − y_j > r·K_ij``). The certified ``k`` is the largest that passes (0: none).
* **Affinity robustness**: as RTK, but only the ``k`` whose ``S_k(x)`` lies inside one group of
  classes may count. Classes that belong to no given group form groups of their own.
* **Bottom logit** (training): ``m_k = min_{i∈S_k}(y_i − max_{j∉S_k}(y_j + ε K_ij))``,
  ``m = max`` over the allowed ``k``, ``y_⊥ = max(y) − m``. Unlike the reference TF code no
  gradient is stopped, so ``K = 1`` is exactly the ordinary GloRo bottom logit, values and
  gradients.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from .radius import MarginBounds, radius_from_rows

# CIFAR-100's 20 superclasses over its 100 fine labels (alphabetical fine-label order, as in the
# dataset's `coarse_labels`), and visually confusable Fashion-MNIST groups
# (T-shirt/top, pullover, dress, coat, shirt | trouser | sandal, sneaker, ankle boot | bag).
NAMED_AFFINITIES: dict[str, list[list[int]]] = {
    "cifar100-superclasses": [
        [4, 30, 55, 72, 95], [1, 32, 67, 73, 91], [54, 62, 70, 82, 92], [9, 10, 16, 28, 61],
        [0, 51, 53, 57, 83], [22, 39, 40, 86, 87], [5, 20, 25, 84, 94], [6, 7, 14, 18, 24],
        [3, 42, 43, 88, 97], [12, 17, 37, 68, 76], [23, 33, 49, 60, 71], [15, 19, 21, 31, 38],
        [34, 63, 64, 66, 75], [26, 45, 77, 79, 99], [2, 11, 35, 46, 98], [27, 29, 44, 78, 93],
        [36, 50, 65, 74, 80], [47, 52, 56, 59, 96], [8, 13, 48, 58, 90], [41, 69, 81, 85, 89],
    ],
    "fashion-mnist-groups": [[0, 2, 3, 4, 6], [1], [5, 7, 9], [8]],
}


@dataclass(frozen=True)
class Relaxation:
    """What counts as robust: the largest set size ``top_k`` and, for affinity, the groups."""

    top_k: int
    groups: tuple[tuple[int, ...], ...] | None = None

    @property
    def kind(self) -> str:
        return "affinity" if self.groups is not None else "rtk"

    def membership(self, num_classes: int, device) -> torch.Tensor | None:
        """(G, C) bool: class c belongs to group g."""
        if self.groups is None:
            return None
        m = torch.zeros(len(self.groups), num_classes, dtype=torch.bool, device=device)
        for g, members in enumerate(self.groups):
            m[g, list(members)] = True
        return m


def _load_groups(spec) -> list[list[int]]:
    if isinstance(spec, str) and spec in NAMED_AFFINITIES:
        return NAMED_AFFINITIES[spec]
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"affinity {str(spec)!r} is neither a named set ({', '.join(NAMED_AFFINITIES)}) nor a file")
        try:
            loaded = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ValueError(f"{path}: cannot parse the affinity groups: {e}") from None
        if isinstance(loaded, dict) and "groups" in loaded:
            loaded = loaded["groups"]
        return _check_list(loaded, str(path))
    return _check_list(spec, "affinity")


def _check_list(groups, where: str) -> list[list[int]]:
    if not isinstance(groups, (list, tuple)) or not groups or not all(isinstance(g, (list, tuple)) and g for g in groups):
        raise ValueError(f"{where}: affinity groups must be a non-empty list of non-empty lists of class indices")
    out = []
    for g in groups:
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in g):
            raise ValueError(f"{where}: class indices must be integers, got group {list(g)}")
        if len(set(g)) != len(g):
            raise ValueError(f"{where}: group {list(g)} repeats a class")
        out.append([int(c) for c in g])
    return out


def make_relaxation(num_classes: int, top_k: int | None = None, affinity=None) -> Relaxation | None:
    """Validate ``top_k`` (1..C) and ``affinity`` (a name, a list of lists, or a YAML/JSON file)
    into a :class:`Relaxation`; ``None`` when neither is given (ordinary GloRo). With groups and no
    ``top_k``, ``K`` is the size of the largest group."""
    if top_k is None and affinity is None:
        return None
    groups = None
    if affinity is not None:
        groups = _load_groups(affinity)
        bad = sorted({c for g in groups for c in g if not 0 <= c < num_classes})
        if bad:
            raise ValueError(f"affinity groups name classes {bad[:5]} outside 0..{num_classes - 1}")
        covered = {c for g in groups for c in g}
        groups = groups + [[c] for c in range(num_classes) if c not in covered]  # classes of their own
    if top_k is None:
        top_k = max(len(g) for g in groups)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_classes:
        raise ValueError(f"top_k must be an integer in 1..{num_classes}, got {top_k!r}")
    return Relaxation(int(top_k), None if groups is None else tuple(tuple(g) for g in groups))


def _ranks(y: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, classes)``: all classes by decreasing logit (ties by index), and the first ``k``."""
    order = torch.sort(y.detach(), dim=1, descending=True, stable=True).indices
    return order, order[:, :k]


def _allowed(classes: torch.Tensor, relax: Relaxation, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K) bool: ``S_k`` may count; (B, K) int64: the first group holding it (-1: none)."""
    B, K = classes.shape
    member = relax.membership(num_classes, classes.device)
    if member is None:
        return torch.ones(B, K, dtype=torch.bool, device=classes.device), torch.full((B, K), -1, device=classes.device)
    inside = member[:, classes].permute(1, 2, 0).int().cummin(dim=1).values.bool()  # (B, K, G): S_k ⊆ group
    any_ = inside.any(dim=2)
    first = torch.where(any_, inside.int().argmax(dim=2), torch.full_like(any_, -1, dtype=torch.long))
    return any_, first


def bottom_logit(logits: torch.Tensor, K: torch.Tensor, epsilon: float, relax: Relaxation) -> torch.Tensor:
    """(B, C+1) ``[y, y_⊥]`` with the relaxed bottom logit (see the module docstring); differentiable
    in ``logits`` and ``K`` (the training estimate of the pairwise constants)."""
    y = logits.float()
    B, C = y.shape
    Kmax = relax.top_k
    order, classes = _ranks(y, Kmax)
    vals = y[:, None, :] + epsilon * K.to(y.dtype)[classes]  # (B, K, C): y_j + ε K_{i_p j}
    by_rank = vals.gather(2, order[:, None, :].expand(B, Kmax, C))
    # suffix maximum over ranks ≥ k (the classes outside S_k), for k = 1..K
    suffix = by_rank.flip(2).cummax(dim=2).values.flip(2)
    outside = torch.cat([suffix, torch.full_like(suffix[..., :1], -math.inf)], dim=2)[:, :, 1 : Kmax + 1]  # (B, p, k)
    top = y.gather(1, classes)  # (B, K): y_{i_p}
    gap = top[:, :, None] - outside  # (B, p, k): y_{i_p} − max_{j∉S_k}(y_j + ε K_{i_p j})
    p_in_k = torch.arange(Kmax, device=y.device)[:, None] < torch.arange(1, Kmax + 1, device=y.device)[None, :]
    m_k = gap.masked_fill(~p_in_k, math.inf).amin(dim=1)  # (B, k)
    allowed, _ = _allowed(classes, relax, C)
    m = m_k.masked_fill(~allowed, -math.inf).amax(dim=1)
    return torch.cat([y, (y.amax(dim=1) - m)[:, None]], dim=1)


@dataclass
class RelaxedCertificate:
    """Per-example relaxed certificate (batch dimension B).

    ``k``: the certified set size (0 = none); ``classes[:, :k]`` is the set that cannot change
    within ``epsilon``; ``group``: the index of the (affinity) group holding it, -1 for none / RTK;
    ``radii[:, k−1]``: the radius within which ``S_k`` stays the top-``k`` set (0 where that ``k``
    is not allowed); ``k`` is the largest allowed ``k`` with ``radii > epsilon``.

    As on an ordinary :class:`gloronet.Certificate`: ``pred`` is the predicted (top) class,
    ``classes[:, 0]``, and ``certified`` is ``k > 0`` — some allowed top-k set is certified at
    ``epsilon`` (relaxed robustness; ``False`` is a rejection). With both ``top_k`` and groups the
    certificate is affinity robustness with sets of at most ``top_k`` classes (``relaxation.kind``).
    """

    k: torch.Tensor  # (B,) int64
    classes: torch.Tensor  # (B, K) int64, highest first
    group: torch.Tensor  # (B,) int64
    radii: torch.Tensor  # (B, K) float64
    groups_of_k: torch.Tensor  # (B, K) int64: group holding S_k (-1 none)
    logits: torch.Tensor  # (B, C) float64
    epsilon: float
    arithmetic: str
    relaxation: Relaxation

    @property
    def pred(self) -> torch.Tensor:
        """(B,) the predicted class: the top class of every certified set."""
        return self.classes[:, 0]

    @property
    def certified(self) -> torch.Tensor:
        """(B,) bool: some allowed top-k set is certified at ``epsilon`` (``k > 0``)."""
        return self.k > 0

    def at(self, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k, group)`` certified at another ``epsilon`` (from the same radii)."""
        return certified_k(self.radii, self.groups_of_k, epsilon)


def certified_k(radii: torch.Tensor, groups_of_k: torch.Tensor, epsilon: float):
    ok = radii > epsilon  # disallowed k have radius 0 and never pass
    ks = torch.arange(1, radii.shape[1] + 1, device=radii.device)
    k = torch.where(ok, ks, torch.zeros_like(ks)).amax(dim=1)
    group = torch.where(k > 0, groups_of_k.gather(1, (k - 1).clamp_min(0)[:, None])[:, 0], torch.full_like(k, -1))
    return k, group


def certify_relaxed(bounds: MarginBounds, logits: torch.Tensor, relax: Relaxation, epsilon: float,
                    arithmetic: str, adjust=lambda r: r) -> RelaxedCertificate:
    """The relaxed certificate from the sound pairwise margin bounds of one batch.

    ``radii[b, k−1] = min_{i ∈ S_k, j ∉ S_k} low_ij / slope_ij`` (rounded down; capped where the
    forward pass could overflow), i.e. within it every ``y_i`` stays strictly above every ``y_j``.
    ``adjust`` maps radii around the point the model received to radii around the caller's input
    (see ``GloroNet.certify``), before ``k`` is chosen.
    """
    y = logits.detach()
    B, C = y.shape
    Kmax = relax.top_k
    order, classes = _ranks(y, Kmax)
    ratios = torch.stack([radius_from_rows(*bounds.rows(classes[:, p])) for p in range(Kmax)], dim=1)  # (B, p, C)
    by_rank = ratios.gather(2, order[:, None, :].expand(B, Kmax, C))
    suffix = by_rank.flip(2).cummin(dim=2).values.flip(2)
    outside = torch.cat([suffix, torch.full_like(suffix[..., :1], math.inf)], dim=2)[:, :, 1 : Kmax + 1]  # (B, p, k)
    p_in_k = torch.arange(Kmax, device=y.device)[:, None] < torch.arange(1, Kmax + 1, device=y.device)[None, :]
    radii = outside.masked_fill(~p_in_k, math.inf).amin(dim=1)  # (B, k)
    radii = torch.minimum(radii, bounds.cap[:, None])
    finite = torch.isfinite(y).all(dim=1, keepdim=True)
    allowed, groups_of_k = _allowed(classes, relax, C)
    radii = adjust(torch.where(allowed & finite, radii, torch.zeros_like(radii)))
    k, group = certified_k(radii, groups_of_k, epsilon)
    return RelaxedCertificate(k=k, classes=classes, group=group, radii=radii, groups_of_k=groups_of_k,
                              logits=y.to(torch.float64), epsilon=epsilon, arithmetic=arithmetic, relaxation=relax)
