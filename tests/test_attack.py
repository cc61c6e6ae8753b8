"""An L2 PGD attack on certified points of a small trained GloRo net finds no adversarial
example inside the certified radius, while the same attack does succeed at 3x that radius
(so the attack is strong enough for the first result to mean something)."""
from __future__ import annotations

import pytest
import torch

import gloronet

from conftest import train_briefly


def _blobs(n: int, gen: torch.Generator):
    """Three classes: a bright 4x4 patch at one of three places in a noisy 8x8 image."""
    y = torch.randint(0, 3, (n,), generator=gen)
    x = 0.1 * torch.rand(n, 1, 8, 8, generator=gen)
    for c, (r, col) in enumerate([(0, 0), (4, 4), (0, 4)]):
        x[y == c, :, r : r + 4, col : col + 4] += 0.8
    return x.clamp(0, 1), y


def _pgd(net, x, pred, radius, steps=100, restarts=3, gen=None):
    """Maximise max_{i≠j} f_i − f_j over ‖δ‖₂ ≤ radius; returns the best (largest) margin found."""
    best = torch.full((len(x),), -float("inf"))
    r = radius.view(-1, 1, 1, 1)
    for _ in range(restarts):
        delta = torch.randn(x.shape, generator=gen)
        delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * r * torch.rand(len(x), 1, 1, 1, generator=gen)
        for _ in range(steps):
            delta.requires_grad_(True)
            out = net(x + delta)
            own = out.gather(1, pred[:, None]).squeeze(1)
            other = out.scatter(1, pred[:, None], -float("inf")).amax(1)
            (g,) = torch.autograd.grad((other - own).sum(), delta)
            with torch.no_grad():
                step = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                delta = delta + 0.05 * r * step
                norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
                delta = delta * torch.clamp(r / norm.clamp_min(1e-12), max=1.0)
        with torch.no_grad():
            out = net(x + delta)
            own = out.gather(1, pred[:, None]).squeeze(1)
            best = torch.maximum(best, out.scatter(1, pred[:, None], -float("inf")).amax(1) - own)
    return best


def test_pgd_finds_nothing_inside_certified_radius():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    body = gloronet.nn.Sequential(
        gloronet.nn.LipConv2d(1, 8, 3, input_size=(8, 8)), gloronet.nn.MinMax(),
        gloronet.nn.Flatten(), gloronet.nn.LipLinear(512, 32), gloronet.nn.MinMax(),
    )
    net = gloronet.GloroNet(body, gloronet.nn.LipLinear(32, 3), epsilon=0.3)
    x, y = _blobs(512, gen)
    train_briefly(net, x, y, 150, 64, 3e-3, gen)
    xt, yt = _blobs(200, gen)
    cert = net.certify(xt)
    ok = cert.certified & (cert.pred == yt)
    assert ok.sum() >= 20, f"only {int(ok.sum())} certified points: the test would be vacuous"
    xs, pred, radius = xt[ok][:60], cert.pred[ok][:60], cert.radius[ok][:60].float()
    inside = _pgd(net, xs, pred, radius * (1 - 1e-6), gen=gen)
    assert (inside < 0).all(), f"adversarial example inside a certified radius: {inside.max().item()}"
    outside = _pgd(net, xs, pred, 3 * radius, gen=gen)
    assert (outside > 0).any(), "PGD never succeeds even at 3x the radius: the attack is too weak to test anything"


# --------------------------------------------------------------------------- registry 2c2f variant
H = 12


def _subspace_blobs(n, gen, basis):
    """Three Gaussian blobs in a random 2-D subspace of 1x12x12 image space, plus small noise."""
    centers = torch.tensor([[0.0, 0.0], [3.0, 0.0], [1.5, 2.6]])
    y = torch.randint(0, 3, (n,), generator=gen)
    ab = centers[y] + 0.35 * torch.randn(n, 2, generator=gen)
    x = (ab[:, :, None, None, None] * basis[None]).sum(1) + 0.02 * torch.randn(n, 1, H, H, generator=gen)
    return x, y


def _best_wrong_margin(net, x, j):
    """max_{i≠j} f_i(x) − f_j(x): >= 0 means the certified prediction j is not strictly on top."""
    out = net(x)
    return out.scatter(1, j[:, None], -float("inf")).amax(1) - out.gather(1, j[:, None])[:, 0]


def _pgd_l2(net, x, j, radius, steps, restarts, gen):
    """L2 PGD: random starts in the ball, normalised-gradient steps, projection onto each example's
    ball; returns the best (largest) wrong-class margin seen along the way."""
    r = radius.view(-1, 1, 1, 1)
    alpha = 2.5 * r / steps
    best = torch.full((x.shape[0],), -float("inf"))
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


@pytest.mark.usefixtures("single_thread")
def test_pgd_on_registry_2c2f_finds_nothing_inside_certified_radius():
    """Registry '2c2f' (strided convs, dense, MinMax) trained 250 steps with cross-entropy on
    bottom_logits: on every test point with radius > 0 (>= 20 of them, VRA >= 50% at ε=0.3), PGD
    (100 steps, 4 restarts, every iterate checked) within radius·(1−1e-6) never lets another class
    reach the predicted one; at 3x the radius the same attack flips points (non-vacuous)."""
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(H * H, 2, generator=gen))[0].t().reshape(2, 1, H, H)
    x_train, y_train = _subspace_blobs(2000, gen, basis)
    x_test, y_test = _subspace_blobs(100, gen, basis)
    torch.manual_seed(0)
    net = train_briefly(gloronet.models.create("2c2f", (1, H, H), 3, epsilon=0.5), x_train, y_train, 250, 128, 2e-3, gen)
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
