"""The L2 attacks of gloronet.evaluate (PGD, APGD-CE, APGD-T) against linear models, whose minimal
adversarial distance is known in closed form, and `gloronet attack`'s report on a linear GloRo
net: the attack must succeed just outside that distance, fail just inside it, and never break a
certificate."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gloronet
from gloronet.evaluate import pgd
from gloronet.evaluate.attack import run_attack
from gloronet.evaluate.common import Run

pytestmark = pytest.mark.usefixtures("single_thread")


def _linear(num_classes=5, d=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    W, b = torch.randn(num_classes, d, generator=g), torch.randn(num_classes, generator=g)
    return (lambda x: x.flatten(1) @ W.t() + b), W, b


def _min_distance(W, z, j):
    """Exact distance from x to the nearest point where another class ties with j (linear model)."""
    m = z.gather(1, j[:, None]) - z
    dist = (W[j][:, None, :] - W[None]).norm(dim=-1)
    return (m / dist.clamp_min(1e-30)).masked_fill(torch.nn.functional.one_hot(j, len(W)).bool(), float("inf")).amin(1)


def _setup(seed=0):
    f, W, _ = _linear(seed=seed)
    x = torch.randn(48, 1, 4, 5, generator=torch.Generator().manual_seed(seed + 1))
    z = f(x)
    j = z.argmax(1)
    return f, W, x, j, _min_distance(W, z, j)


def test_ensemble_attack_succeeds_just_outside_and_fails_inside_the_minimal_distance():
    f, _, x, j, d = _setup()
    cfg = pgd.AttackConfig(steps=40)
    out = pgd.ensemble(f, x, j, d * 1.01, cfg)
    assert (out.score >= 0).all(), "a non-robust linear model must be broken at 1.01x its minimal distance"
    assert ((out.x_adv.double() - x.double()).flatten(1).norm(dim=1) <= d.double() * 1.01).all()
    inside = pgd.ensemble(f, x, j, d * 0.99, cfg)
    assert (inside.score < 0).all() and all(s == "" for s in inside.first_success)


@pytest.mark.parametrize("which,factor", [("pgd", 1.05), ("apgd-ce", 1.2), ("apgd-t", 1.01)])
def test_each_attack_alone_succeeds(which, factor):
    """Untargeted attacks can stall at a local maximum (the margin of a linear model is convex,
    and maximised over a ball); the targeted one, aimed at the nearest class, is exact."""
    f, _, x, j, d = _setup(seed=3)
    r = d * factor
    gen = torch.Generator().manual_seed(0)
    if which == "pgd":
        best = pgd.pgd(f, x, j, r, steps=40)
    elif which == "apgd-ce":
        best = pgd.apgd(f, x, j, r, pgd.ce_loss, steps=40, gen=gen)
    else:  # towards the class at minimal distance
        z = f(x)
        W = _linear(seed=3)[1]
        m = (z.gather(1, j[:, None]) - z) / (W[j][:, None, :] - W[None]).norm(dim=-1).clamp_min(1e-30)
        t = m.masked_fill(torch.nn.functional.one_hot(j, len(W)).bool(), float("inf")).argmin(1)
        best = pgd.apgd(f, x, j, r, pgd.dlr_targeted(t), steps=40, gen=gen)
    assert (best.score >= 0).float().mean() >= (1.0 if which == "apgd-t" else 0.95)


def test_projection_keeps_rounded_points_inside_the_ball_and_box():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(64, 3, 8, 8, generator=g) * 0.8 + 0.1)
    radius = torch.rand(64, generator=g, dtype=torch.float64) * 1e-3 + 1e-6
    far = x + torch.randn(x.shape, generator=g)
    y = pgd.project(x, far, radius, (0.0, 1.0))
    assert y.dtype == x.dtype and ((y >= 0) & (y <= 1)).all()
    assert ((y.double() - x.double()).flatten(1).norm(dim=1) <= radius).all()


def test_apgd_checkpoints_follow_croce_hein():
    assert pgd.apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def linear_gloro_run(num_classes: int, d: int = 12, seed: int = 0, epsilon: float = 0.1) -> Run:
    """A GloRo net whose body is the identity (L = 1): radius = min_i (z_j − z_i)/‖w_j − w_i‖."""
    torch.manual_seed(seed)
    net = gloronet.GloroNet(gloronet.nn.Sequential(gloronet.nn.Flatten()), gloronet.nn.LipLinear(d, num_classes), epsilon)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    net.config = {"name": "linear"}
    return Run(Path("."), net, {}, "synthetic", None, torch.device("cpu"))


def mid_gray_images(n: int, d: int = 12, seed: int = 0) -> torch.Tensor:
    """uint8 images in 100..155, far from the box edges relative to the radii used here."""
    return torch.randint(100, 156, (n, 1, 3, d // 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_attack_report_on_a_linear_gloro_net_matches_the_closed_form():
    run = linear_gloro_run(3)
    images = mid_gray_images(200)
    x = run.inputs(images)
    W = run.net.head.weight.detach()
    z = run.net(x)
    labels = z.argmax(1)
    flip = torch.arange(len(labels)) % 5 == 0  # some misclassified points
    labels[flip] = (labels[flip] + 1) % 3
    d = _min_distance(W, z, z.argmax(1))
    eps = float(d.median())
    keep = ((d / eps - 1).abs() > 1e-3)  # drop points too close to ε to call
    images, labels, d = images[keep], labels[keep], d[keep]
    run.net.epsilon = eps
    rep = run_attack(run, images, labels, pgd.AttackConfig(steps=30, restarts=1, targets=1))
    correct = run.net(run.inputs(images)).argmax(1) == labels
    assert rep["robust_accuracy"] == pytest.approx(float((correct & (d > eps)).double().mean()))
    assert rep["broken_certified"] == 0 and rep["vra"] <= rep["robust_accuracy"] <= rep["clean_accuracy"]
    assert rep["gap"] == pytest.approx(rep["robust_accuracy"] - rep["vra"])
    assert 0 <= rep["margin_consumed_max"] < 1 and rep["attacked_at_radius"] > 0
    # the linear model's certificates are tight: the attack gets within 1% of breaking them
    assert rep["margin_consumed_max"] > 0.99
