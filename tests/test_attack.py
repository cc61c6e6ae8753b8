"""Empirical soundness: a strong L2 PGD attack finds nothing inside certified balls.

A small GloRo net (registry '2c2f' on 1x12x12 inputs) is trained with the GloRo cross-entropy on
three Gaussian blobs living in a 2-D subspace of image space, so that most test points certify.
The attack maximises the best wrong-class margin under projection onto each point's own
certified ball; the same attack at 3x the radius must succeed somewhere (the attack is real).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import gloronet

pytestmark = pytest.mark.usefixtures("single_thread")

H = 12
CLASSES = 3


def _blobs(n, gen, basis):
    centers = torch.tensor([[0.0, 0.0], [3.0, 0.0], [1.5, 2.6]])
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    ab = centers[y] + 0.35 * torch.randn(n, 2, generator=gen)
    x = (ab[:, :, None, None, None] * basis[None]).sum(1) + 0.02 * torch.randn(n, 1, H, H, generator=gen)
    return x, y


def _best_wrong_margin(net, x, j):
    """max_{i≠j} f_i(x) − f_j(x): >= 0 means the certified prediction j is not strictly on top."""
    y = net(x)
    own = F.one_hot(j, CLASSES).bool()
    return y.masked_fill(own, -math.inf).amax(1) - y.gather(1, j[:, None])[:, 0]


def _pgd_l2(net, x, j, radius, steps, restarts, gen):
    """L2 PGD with random starts inside the ball, normalised-gradient steps and projection onto
    the ball of per-example ``radius``; returns the best (largest) wrong-class margin seen."""
    r = radius.view(-1, 1, 1, 1)
    alpha = 2.5 * r / steps
    best = torch.full((x.shape[0],), -math.inf)
    for _ in range(restarts):
        d = torch.randn(x.shape, generator=gen)
        d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * r * torch.rand(x.shape[0], 1, 1, 1, generator=gen)
        for _ in range(steps):
            d.requires_grad_(True)
            m = _best_wrong_margin(net, x + d, j)
            best = torch.maximum(best, m.detach())
            (g,) = torch.autograd.grad(m.sum(), d)
            d = d.detach() + alpha * g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            d = d * torch.clamp(r / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1).clamp_min(1e-30), max=1.0)
        with torch.no_grad():
            assert (d.flatten(1).norm(dim=1) <= radius * (1 + 1e-5)).all()
            best = torch.maximum(best, _best_wrong_margin(net, x + d, j))
    return best


def test_pgd_finds_no_adversarial_example_inside_certified_radius():
    """After GloRo training, on every certified test point (>= 20 of them) PGD (100 steps, 4
    restarts) within radius·(1−1e-6) never makes another class reach the predicted one; at 3x the
    radius the same attack does flip many points, so the check is not vacuous."""
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(H * H, 2, generator=gen))[0].t().reshape(2, 1, H, H)
    x_train, y_train = _blobs(2000, gen, basis)
    x_test, y_test = _blobs(100, gen, basis)

    torch.manual_seed(0)
    net = gloronet.models.create("2c2f", (1, H, H), CLASSES, epsilon=0.5)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    net.train()
    for _ in range(250):
        idx = torch.randint(0, x_train.shape[0], (128,), generator=gen)
        loss = F.cross_entropy(net.bottom_logits(x_train[idx]), y_train[idx])  # label never ⊥
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)

    cert = net.certify(x_test, epsilon=0.3)
    vra = float(((cert.pred == y_test) & cert.certified).float().mean())
    assert vra >= 0.5, vra
    ok = cert.radius > 0
    assert int(ok.sum()) >= 20
    x, j = x_test[ok], cert.pred[ok]
    radius = (cert.radius[ok] * (1 - 1e-6)).float()

    best = _pgd_l2(net, x, j, radius, steps=100, restarts=4, gen=torch.Generator().manual_seed(1))
    assert torch.isfinite(best).all()
    assert (best < 0).all(), f"adversarial example inside a certified ball: margin {float(best.max())}"

    best3 = _pgd_l2(net, x, j, 3 * radius, steps=40, restarts=1, gen=torch.Generator().manual_seed(2))
    assert int((best3 >= 0).sum()) >= 1, "the attack never succeeds even at 3x the certified radius"
