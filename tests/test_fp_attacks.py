"""Adversarial soundness tests of floating-point certificates (``certify(arithmetic="float")``).

The promise under test: for every ``x'`` in the model's dtype with ``‖x' − x‖₂ < cert.radius``
(L2 over all input coordinates, checked rigorously in float64), the model's own eval-mode forward
pass (under :func:`gloronet.fp.sound_kernels`) predicts ``cert.pred`` *strictly*, whatever batch
``x'`` sits in (alone, at another position, among other inputs) and on 1 or 2 threads.

The attack (:func:`_attack`), per point with radius > 0:

1. directions: the float64 gradient (autograd on a float64 copy of the model) of the margin
   ``f_i − f_j`` for the runner-up classes ``i`` of the predicted ``j``, normalised;
2. points ``x + t·d`` for ``t = r·(1 − k·2⁻²⁴)`` (and ``k·u`` of the model dtype, and coarse
   fractions of ``r``), rounded to the model dtype both to nearest and towards ``x``, kept only if
   their float64 distance to ``x`` is provably ``< r``;
3. a rounding search in the spirit of Jin, Ohrimenko & Rubinstein, "Getting a-Round Guarantees"
   (2022): random ±1-ulp moves (``torch.nextafter``) of random subsets of coordinates of those
   points, again kept only inside the ball;
4. every candidate evaluated in a batch of candidates, in reverse order, interleaved with random
   other inputs at random positions, and alone, each on 1 and 2 threads; a tie counts as a flip.

Each construction makes rounding decide the prediction near the exact-arithmetic boundary: the
same attack must find flips inside ``arithmetic="exact"`` radii (so the construction exercises
rounding, and the attack is able to see it), none inside the default float radii, and the float
certificates must not be vacuous (some radius > 0).
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import gloronet
from gloronet.data import DatasetNotFoundError, load_dataset
from gloronet.losses import gloro_cross_entropy
from gloronet.nn import Flatten, LipLinear, MinMax, Normalize, Sequential

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _mnist_root() -> Path | None:
    """The dataset root holding real MNIST: ``$GLORONET_DATA`` or ``../shared/data`` (as in test_train)."""
    for candidate in (os.environ.get("GLORONET_DATA"), SHARED):
        if candidate and (Path(candidate) / "mnist").is_dir():
            return Path(candidate)
    return None


def _mnist(split: str, limit: int | None = None):
    """Real MNIST ``(x, y)`` (float32 in [0, 1]) or ``None`` when absent."""
    root = _mnist_root()
    if root is None:
        return None
    try:
        return load_dataset("mnist", split, data_dir=root, limit=limit, download=False)
    except DatasetNotFoundError:
        return None


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def _threads(n: int):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.fixture(autouse=True)
def _restore_threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def _model_dtype(net) -> torch.dtype:
    return next(iter(net.parameters())).dtype


# --------------------------------------------------------------------------------------- the attack
def _not_strict(out: torch.Tensor, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(flip, margin)``: flip when logit ``pred`` is not strictly above every other (NaN flips too)."""
    own = out.gather(1, pred[:, None]).squeeze(1)
    other = out.scatter(1, pred[:, None], -math.inf).amax(1)
    return ~(own > other), (own - other).to(torch.float64)


def _inside(xp: torch.Tensor, x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, dist)``: ``mask`` proves ``‖xp − x‖₂ < r`` (float64 evaluation with its error bound).

    Per row: differences (exact for float32 data, relative error ``≤ 2⁻⁵³`` for float64), squares
    (exact / ``2⁻⁵³``), an ``n``-term sum (``≤ γ_n``) and a square root: relative error well below
    ``(n + 8)·2⁻⁵²``, so ``dist·(1 + (n + 8)·2⁻⁵²) < r`` implies the exact distance is ``< r``.
    """
    diff = (xp.to(torch.float64) - x.to(torch.float64)).flatten(1)
    dist = (diff * diff).sum(dim=1).sqrt()
    n = diff.shape[1]
    return dist * (1.0 + (n + 8) * 2.0**-52) < r, dist


def _round_towards(xp64: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``xp64`` rounded to ``dtype`` coordinate-wise towards ``x`` (so no coordinate moves further)."""
    near = xp64.to(dtype)
    x = x.to(dtype)
    away = (near.to(torch.float64) - x.to(torch.float64)).abs() > (xp64 - x.to(torch.float64)).abs()
    return torch.where(away, torch.nextafter(near, x), near)


@dataclass
class AttackResult:
    points: int = 0  # points with 0 < radius < inf
    candidates: int = 0  # distinct evaluations (candidate x' × batch context × thread count)
    flips: list = field(default_factory=list)  # (point, distance, radius, margin, context)
    min_margin: float = math.inf  # smallest computed margin (pred − best other) seen

    @property
    def flipped_points(self) -> int:
        return len({f[0] for f in self.flips})

    def describe(self, limit: int = 3) -> str:
        worst = sorted(self.flips, key=lambda f: f[2] - f[1])[:limit]
        rows = "; ".join(f"point {p}: ‖x'−x‖={d!r} < radius={r!r}, margin {m:.3g} ({ctx})" for p, d, r, m, ctx in worst)
        return f"{len(self.flips)} flips on {self.flipped_points}/{self.points} points: {rows}"


def _directions(net, x: torch.Tensor, pred: torch.Tensor, classes: int) -> torch.Tensor:
    """(P, k, *shape) unit float64 gradients of ``f_i − f_j`` for the ``k`` best other classes ``i``."""
    net64 = copy.deepcopy(net).double().eval()
    for p in net64.parameters():
        p.requires_grad_(False)
    x64 = x.detach().to(torch.float64).clone().requires_grad_(True)
    with torch.enable_grad():
        out = net64(x64)
        C = out.shape[1]
        k = min(classes, C - 1)
        others = out.detach().scatter(1, pred[:, None], -math.inf).topk(k, dim=1).indices  # (P, k)
        dirs = []
        for c in range(k):
            margin = out.gather(1, others[:, c : c + 1]) - out.gather(1, pred[:, None])
            (g,) = torch.autograd.grad(margin.sum(), x64, retain_graph=c + 1 < k)
            norm = g.flatten(1).norm(dim=1).clamp_min(1e-300).view(-1, *([1] * (g.dim() - 1)))
            dirs.append(g / norm)
    return torch.stack(dirs, dim=1)


def _evaluate(net, cands: torch.Tensor, pred: torch.Tensor, gen: torch.Generator, singles: int):
    """Evaluate candidates in several batch contexts and thread counts.

    Returns ``(flip, margin, contexts)``: per candidate, whether some context failed to predict
    ``pred`` strictly, the smallest margin over contexts, and the name of the failing context."""
    N = cands.shape[0]
    flip = torch.zeros(N, dtype=torch.bool)
    margin = torch.full((N,), math.inf, dtype=torch.float64)
    where = [""] * N
    evaluations = 0
    scale = float(cands.to(torch.float64).abs().mean()) + 1.0
    net.eval()

    def record(sel, out, name):
        nonlocal evaluations
        f, m = _not_strict(out, pred[sel])
        evaluations += int(m.numel())
        margin[sel] = torch.minimum(margin[sel], m)
        for i in sel[f].tolist():
            if not flip[i]:
                where[i] = name
        flip[sel] |= f

    all_idx = torch.arange(N)
    with torch.no_grad(), gloronet.fp.sound_kernels():
        for nt in (1, 2):
            with _threads(nt):
                record(all_idx, net(cands), f"batch of {N}, {nt} thread(s)")
                record(all_idx.flip(0), net(cands.flip(0)), f"reversed batch, {nt} thread(s)")
                R = max(3, N // 3)
                fill = (torch.randn(R, *cands.shape[1:], generator=gen, dtype=torch.float64) * scale).to(cands.dtype)
                perm = torch.randperm(N + R, generator=gen)
                mixed = torch.empty(N + R, *cands.shape[1:], dtype=cands.dtype)
                mixed[perm[:N]] = cands
                mixed[perm[N:]] = fill
                record(all_idx, net(mixed)[perm[:N]], f"among {R} random inputs, {nt} thread(s)")
        # alone (and second in a pair), the most dangerous first
        order = torch.argsort(margin)[:singles]
        for nt in (1, 2):
            with _threads(nt):
                for i in order.tolist():
                    sel = torch.tensor([i])
                    record(sel, net(cands[i : i + 1]), f"alone, {nt} thread(s)")
                    pair = torch.cat([fill[:1], cands[i : i + 1]])
                    record(sel, net(pair)[1:], f"second of 2, {nt} thread(s)")
    return flip, margin, where, evaluations


def _attack(net, x: torch.Tensor, cert, *, seed: int = 0, classes: int = 3, ulp_moves: int = 200,
            singles: int = 64, ks=None) -> AttackResult:
    """Search every ball ``‖x' − x‖ < cert.radius`` (radius > 0) for an ``x'`` not predicted ``cert.pred``."""
    dtype = _model_dtype(net)
    gen = _gen(seed)
    x = x.to(dtype)
    r_all = cert.radius.to(torch.float64).cpu()
    idx = torch.nonzero((r_all > 0) & torch.isfinite(r_all)).flatten()
    res = AttackResult(points=int(idx.numel()))
    if idx.numel() == 0:
        return res
    xs, pred, radius = x[idx], cert.pred[idx].cpu(), r_all[idx]
    dirs = _directions(net, xs, pred, classes)  # (P, k, *shape)
    u = 2.0**-24 if dtype == torch.float32 else 2.0**-53
    if ks is None:
        fracs = [k * 2.0**-24 for k in (0.25, 0.5, 1, 2, 4, 16, 64, 256, 4096)]
        fracs += [k * u for k in (1, 4, 64, 2**10, 2**16)] + [1e-4, 1e-3, 1e-2, 0.1, 0.5]
    else:
        fracs = list(ks)
    fracs = sorted({f for f in fracs if 0 < f < 1})
    numel = xs[0].numel()
    cand_x, cand_p = [], []
    for p in range(xs.shape[0]):
        x0 = xs[p : p + 1]
        r = float(radius[p])
        base = []
        for d in dirs[p]:
            for f in fracs:
                xp64 = x0.to(torch.float64) + (r * (1.0 - f)) * d[None]
                base += [xp64.to(dtype), _round_towards(xp64, x0, dtype)]
        base = torch.cat(base)
        ok, _ = _inside(base, x0.expand_as(base), torch.full((base.shape[0],), r, dtype=torch.float64))
        base = base[ok]
        if base.shape[0] == 0:
            continue
        # rounding search: random ±1-ulp moves of random coordinate subsets of the base points
        pick = torch.randint(0, base.shape[0], (ulp_moves,), generator=gen)
        src = base[pick].flatten(1)
        density = torch.tensor([1.0 / numel, 0.01, 0.1, 0.5, 1.0], dtype=torch.float64)
        dens = density[torch.randint(0, len(density), (ulp_moves,), generator=gen)][:, None]
        mask = torch.rand(src.shape, generator=gen, dtype=torch.float64) < dens
        mask[torch.arange(ulp_moves), torch.randint(0, numel, (ulp_moves,), generator=gen)] = True
        mode = torch.randint(0, 3, (ulp_moves, 1), generator=gen)
        rnd = torch.where(torch.rand(src.shape, generator=gen) < 0.5, -1.0, 1.0).to(dtype)
        grad_sign = torch.sign(dirs[p][torch.randint(0, dirs.shape[1], (ulp_moves,), generator=gen)].flatten(1)).to(dtype)
        home = torch.sign(x0.flatten(1) - src)  # towards x: never leaves the ball
        sign = torch.where(mode == 0, rnd, torch.where(mode == 1, grad_sign, home))
        sign = torch.where(sign == 0, rnd, sign)
        moved = torch.where(mask, torch.nextafter(src, sign * math.inf), src).view(-1, *xs.shape[1:])
        ok, _ = _inside(moved, x0.expand_as(moved), torch.full((moved.shape[0],), r, dtype=torch.float64))
        cands = torch.cat([base, moved[ok]])
        cand_x.append(cands)
        cand_p.append(torch.full((cands.shape[0],), p, dtype=torch.long))
    if not cand_x:
        return res
    cands, owner = torch.cat(cand_x), torch.cat(cand_p)
    flip, margin, where, evaluations = _evaluate(net, cands, pred[owner], gen, singles)
    res.candidates = evaluations
    res.min_margin = float(margin.min())
    _, dist = _inside(cands, xs[owner], radius[owner])
    for i in torch.nonzero(flip).flatten().tolist():
        p = int(owner[i])
        res.flips.append((int(idx[p]), float(dist[i]), float(radius[p]), float(margin[i]), where[i]))
    return res


def _check(net, x, *, eps=None, seed=0, min_exact_flips=1, **kw):
    """Float and exact certificates of ``x``, attacked; returns (float result, exact result, float cert)."""
    cert_f = net.certify(x, epsilon=eps)
    cert_e = net.certify(x, epsilon=eps, arithmetic="exact")
    assert cert_f.arithmetic == "float" and cert_e.arithmetic == "exact"
    res_e = _attack(net, x, cert_e, seed=seed, **kw)
    res_f = _attack(net, x, cert_f, seed=seed + 1, **kw)
    print(f"exact: {res_e.flipped_points}/{res_e.points} points flipped ({len(res_e.flips)} of {res_e.candidates} "
          f"evaluations); float: {res_f.flipped_points}/{res_f.points} points flipped ({len(res_f.flips)} of "
          f"{res_f.candidates} evaluations), min margin {res_f.min_margin:.3g}")
    assert res_f.points > 0, "no float certificate with radius > 0: the test would be vacuous"
    assert res_f.candidates > 0, "the attack produced no candidate inside any float radius"
    assert not res_f.flips, "float certificate broken: " + res_f.describe()
    assert res_e.flipped_points >= min_exact_flips, (
        f"the attack found {res_e.flipped_points} flips inside exact-arithmetic radii (wanted >= {min_exact_flips}): "
        "the construction does not exercise rounding, or the attack is too weak to see it")
    return res_f, res_e, cert_f


# ------------------------------------------------------------------------ 1. huge biases, tiny weights
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_biases_rounding_dominates_the_margin(dtype):
    """Logits ``B + s·(w·x)`` with ``B ≈ 10⁷`` (float32) / ``10⁸`` (float64) and ``s`` = ulp(B):
    every computed logit is ``B`` plus a few ulps, so the computed margin is the rounding of the
    exact one, off by up to an ulp — as large as the margin itself."""
    B = 1.0e7 if dtype == torch.float32 else 1.0e8
    s = float(torch.finfo(dtype).eps) * 2.0 ** math.floor(math.log2(B))  # ulp(B)
    torch.manual_seed(0)
    head = LipLinear(2, 3).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-0.7, 0.3]], dtype=torch.float64).to(dtype) * s)
        head.bias.copy_(torch.tensor([B, B + s, B - s], dtype=torch.float64).to(dtype))
    net = gloronet.GloroNet(Sequential(Flatten()), head, 0.5).to(dtype)
    x = ((torch.rand(300, 2, generator=_gen(1), dtype=torch.float64) * 2 - 1) * 40).to(dtype)
    _check(net, x, seed=2, min_exact_flips=5)
