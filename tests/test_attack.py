"""An L2 PGD attack on certified points of a small trained GloRo net finds no adversarial
example inside the certified radius, while the same attack does succeed at 3x that radius
(so the attack is strong enough for the first result to mean something)."""
from __future__ import annotations

import torch

import gloronet
from gloronet.losses import gloro_cross_entropy


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
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for step in range(150):
        i = torch.randint(0, len(x), (64,), generator=gen)
        loss = gloro_cross_entropy(net.bottom_logits(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    xt, yt = _blobs(200, gen)
    cert = net.certify(xt)
    ok = cert.certified & (cert.pred == yt)
    assert ok.sum() >= 20, f"only {int(ok.sum())} certified points: the test would be vacuous"
    xs, pred, radius = xt[ok][:60], cert.pred[ok][:60], cert.radius[ok][:60].float()
    inside = _pgd(net, xs, pred, radius * (1 - 1e-6), gen=gen)
    assert (inside < 0).all(), f"adversarial example inside a certified radius: {inside.max().item()}"
    outside = _pgd(net, xs, pred, 3 * radius, gen=gen)
    assert (outside > 0).any(), "PGD never succeeds even at 3x the radius: the attack is too weak to test anything"
