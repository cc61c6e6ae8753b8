"""Relaxed (top-K and affinity) certificates and bottom logits (Leino & Fredrikson, NeurIPS 2021).

Oracles: brute force over explicit sets with exact pairwise distances on linear models; a loop
implementation of the bottom-logit formula; the forward pass itself at points inside the certified
radii (random and margin-gradient directions), compared as *sets* with strict separation.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import gloronet
from gloronet import relaxed
from gloronet.certify import certify_dataset
from gloronet.gloro import append_bottom_logit
from gloronet.nn import Flatten, LipLinear, MinMax, Sequential

pytestmark = pytest.mark.usefixtures("single_thread")
D = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _linear_net(classes=6, dim=5, seed=0, dtype=D):
    g = _gen(seed)
    head = LipLinear(dim, classes).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(classes, dim, generator=g, dtype=dtype))
        head.bias.copy_(0.3 * torch.randn(classes, generator=g, dtype=dtype))
    return gloronet.GloroNet(Sequential(Flatten()), head, 0.1).to(dtype)


def _brute_force_radii(net, x, K):
    """Exact radius of each top-k set of an affine classifier: min over i in S_k, j outside of
    (y_i − y_j)/‖w_i − w_j‖ (the exact distance to the boundary where they swap)."""
    w, b = net.head.weight.detach(), net.head.bias.detach()
    y = x @ w.t() + b
    out = torch.zeros(len(x), K, dtype=D)
    for n in range(len(x)):
        order = sorted(range(y.shape[1]), key=lambda c: -float(y[n, c]))
        for k in range(1, K + 1):
            inside, outside = order[:k], order[k:]
            out[n, k - 1] = min(
                (float((y[n, i] - y[n, j]) / (w[i] - w[j]).norm()) for i in inside for j in outside), default=math.inf
            )
    return out


@pytest.mark.parametrize("arithmetic", ["exact", "float"])
def test_linear_rtk_radii_match_brute_force(arithmetic):
    """On affine classifiers the exact-arithmetic radii of every top-k set equal the brute-force
    distances (1e-7 relative: the bound's slack) and the sound ones are never larger; cert.k is the largest k whose
    radius exceeds ε."""
    net = _linear_net()
    x = torch.randn(40, 5, generator=_gen(1), dtype=D)
    cert = net.certify(x, top_k=4, arithmetic=arithmetic, epsilon=0.05)
    truth = _brute_force_radii(net, x, 4)
    assert (cert.radii <= truth * (1 + 1e-12)).all()
    if arithmetic == "exact":
        torch.testing.assert_close(cert.radii, truth, rtol=1e-7, atol=0)  # the bound's slack (GRAM_SLACK)
    else:
        assert (cert.radii >= truth * (1 - 1e-7)).all()  # float64 rounding costs ~1e-15 more
    ks = torch.arange(1, 5)
    expected_k = torch.where(truth > 0.05 * (1 + 1e-6), ks, 0).amax(dim=1)
    clear = ((truth - 0.05).abs() > 1e-6).all(dim=1)
    assert torch.equal(cert.k[clear], expected_k[clear])
    order = (x @ net.head.weight.detach().t() + net.head.bias.detach()).argsort(dim=1, descending=True)
    assert torch.equal(cert.classes, order[:, :4])
    assert (cert.group == -1).all()


@pytest.mark.parametrize("arithmetic", ["exact", "float"])
def test_top_1_is_ordinary_gloro(arithmetic):
    torch.manual_seed(0)
    net = gloronet.models.create("2c2f", (1, 28, 28), 10, 0.05)
    x = torch.rand(16, 1, 28, 28, generator=_gen(2))
    plain = net.certify(x, arithmetic=arithmetic, fast=False)  # relaxed certificates use the certified program's pass
    top1 = net.certify(x, top_k=1, arithmetic=arithmetic)
    assert torch.equal(top1.radii[:, 0], plain.radius) and torch.equal(top1.classes[:, 0], plain.pred)
    assert torch.equal(top1.k, plain.certified.long())


def test_ties_at_the_set_boundary_never_certify():
    net = _linear_net(classes=4, dim=4, dtype=torch.float32)
    with torch.no_grad():
        net.head.weight.copy_(torch.eye(4))
        net.head.bias.zero_()
    x = torch.tensor([[3.0, 2.0, 2.0, 0.0], [3.0, 3.0, 1.0, 0.0]])
    cert = net.certify(x, top_k=3, epsilon=0.0, arithmetic="exact")
    assert cert.radii[0, 1] == 0 and cert.radii[0, 0] > 0 and cert.radii[0, 2] > 0  # y_2 = y_3 splits S_2
    assert cert.radii[1, 0] == 0 and cert.radii[1, 1] > 0  # y_1 = y_2: only the pair {0, 1} is a set


# --------------------------------------------------------------------------- affinity
def test_affinity_counts_only_sets_inside_one_group():
    net = _linear_net(classes=6, dim=6)
    with torch.no_grad():
        net.head.weight.copy_(torch.eye(6, dtype=D))
        net.head.bias.zero_()
    groups = [[0, 1], [2, 3, 4]]  # class 5 becomes a group of its own
    x = torch.tensor([[5.0, 4.0, 0, 0, 0, 0], [5.0, 0, 4.0, 0, 0, 0], [0, 0, 5.0, 4.9, 4.8, 0], [0, 0, 0, 0, 0, 5.0]], dtype=D)
    cert = net.certify(x, affinity=groups, epsilon=0.1)
    assert cert.radii.shape == (4, 3)
    assert cert.k.tolist() == [2, 1, 3, 1]
    assert cert.group.tolist() == [0, 0, 1, 2]
    assert cert.radii[1, 1] == 0  # {0, 2} spans two groups: not allowed
    rtk = net.certify(x, top_k=3, epsilon=0.1)
    assert rtk.k[1] == 2  # plain RTK does accept {0, 2}


def test_affinity_specs_and_validation(tmp_path):
    assert relaxed.make_relaxation(10, affinity="fashion-mnist-groups").top_k == 5
    sets = relaxed.NAMED_AFFINITIES["cifar100-superclasses"]
    assert sorted(c for g in sets for c in g) == list(range(100)) and all(len(g) == 5 for g in sets)
    f = tmp_path / "groups.yaml"
    f.write_text("- [0, 1]\n- [2]\n")
    assert relaxed.make_relaxation(4, affinity=str(f)).groups == ((0, 1), (2,), (3,))
    j = tmp_path / "groups.json"
    j.write_text(json.dumps({"groups": [[1, 3]]}))
    assert relaxed.make_relaxation(4, affinity=str(j), top_k=2).groups == ((1, 3), (0,), (2,))
    for bad, match in [("nope", "named set"), ([[0, 0]], "repeats"), ([[0, 7]], "outside"), ([], "non-empty"), ([[0.5]], "integers")]:
        with pytest.raises(ValueError, match=match):
            relaxed.make_relaxation(4, affinity=bad)
    for k in (0, 5, 1.5, True):
        with pytest.raises(ValueError, match="top_k"):
            relaxed.make_relaxation(4, top_k=k)
    assert relaxed.make_relaxation(4) is None


# --------------------------------------------------------------------------- bottom logit
def _loop_bottom(y, K, eps, top_k, groups=None):
    """The definition, one example and one k at a time (sets by position in the sorted order)."""
    out = []
    for n in range(y.shape[0]):
        order = sorted(range(y.shape[1]), key=lambda c: (-float(y[n, c]), c))
        best = -math.inf
        for k in range(1, top_k + 1):
            S = order[:k]
            if groups is not None and not any(set(S) <= set(g) for g in groups):
                continue
            m = min(float(y[n, i]) - max((float(y[n, j] + eps * K[i, j]) for j in order[k:]), default=-math.inf) for i in S)
            best = max(best, m)
        out.append(float(y[n].max()) - best)
    return torch.tensor(out, dtype=D)


def test_bottom_logit_matches_the_definition_with_ties():
    g = _gen(3)
    y = torch.randn(30, 7, generator=g, dtype=D)
    y[:5, 3] = y[:5, 1]  # ties
    K = torch.rand(7, 7, generator=g, dtype=D) * 2
    K = (K + K.t()) / 2
    K.fill_diagonal_(0)
    for top_k, groups in [(1, None), (2, None), (4, None), (7, None), (3, [[0, 1, 2], [3, 4], [5, 6]])]:
        relax = relaxed.make_relaxation(7, top_k, groups)
        got = relaxed.bottom_logit(y, K, 0.3, relax)
        assert torch.equal(got[:, :7], y.float())
        torch.testing.assert_close(got[:, 7].double(), _loop_bottom(y, K, 0.3, top_k, relax.groups), rtol=1e-5, atol=1e-5)


def test_bottom_logit_top_1_is_the_ordinary_one_with_gradients():
    g = _gen(4)
    y = torch.randn(12, 5, generator=g, requires_grad=True)
    K = torch.rand(5, 5, generator=g)
    K = ((K + K.t()) / 2).fill_diagonal_(0).requires_grad_(True)
    a = relaxed.bottom_logit(y, K, 0.2, relaxed.Relaxation(1))
    b = append_bottom_logit(y, K, 0.2)
    torch.testing.assert_close(a, b)
    ga = torch.autograd.grad(a[:, -1].sum(), (y, K))
    gb = torch.autograd.grad(b[:, -1].sum(), (y, K))
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v)


def test_larger_k_never_raises_the_bottom_logit_and_trains():
    torch.manual_seed(0)
    net = _linear_net(classes=6, dim=5, dtype=torch.float32)
    y = torch.randn(8, 6)
    K = net.lipschitz_constant().float()
    prev = append_bottom_logit(y, K, 0.3)[:, -1]
    for k in (2, 3, 6):
        cur = relaxed.bottom_logit(y, K, 0.3, relaxed.Relaxation(k))[:, -1]
        assert (cur <= prev + 1e-6).all()
        prev = cur
    net.train()
    x, labels = torch.randn(32, 5), torch.randint(0, 6, (32,))
    loss = torch.nn.functional.cross_entropy(net.bottom_logits(x, top_k=3), labels)
    loss.backward()
    assert torch.isfinite(net.head.weight.grad).all() and net.head.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- soundness by attack
def _top_sets(net, xs, k):
    with torch.no_grad():
        y = net.eval()(xs)
    order = y.sort(dim=1, descending=True, stable=True)
    return order.indices[:, :k], order.values


@pytest.mark.parametrize("affinity", [None, [[0, 1, 2], [3, 4, 5, 6, 7]]])
def test_certified_sets_survive_attacks_inside_the_radius(affinity):
    """A small nonlinear net: for every certified (k, set) no point inside the radius — random
    directions and the gradient directions of every pair's margin — changes the set or ties it."""
    torch.manual_seed(5)
    body = Sequential(Flatten(), LipLinear(6, 16), MinMax(), LipLinear(16, 16), MinMax())
    net = gloronet.GloroNet(body, LipLinear(16, 8), 0.05).eval()
    x = torch.randn(24, 6, generator=_gen(6))
    cert = net.certify(x, top_k=None if affinity else 4, affinity=affinity, epsilon=0.02)
    net64 = copy.deepcopy(net).double()
    checked = 0
    for n in range(len(x)):
        for k in range(1, cert.radii.shape[1] + 1):
            r = float(cert.radii[n, k - 1])
            if r <= 0:
                continue
            S = set(cert.classes[n, :k].tolist())
            dirs = [torch.randn(6, generator=_gen(100 + n * 7 + k)) for _ in range(6)]
            x64 = x[n : n + 1].double().requires_grad_(True)
            y64 = net64(x64)[0]
            for i in S:
                for j in set(range(8)) - S:
                    (grad,) = torch.autograd.grad(y64[j] - y64[i], x64, retain_graph=True)
                    dirs.append(grad[0].float())
            pts = torch.stack([x[n] + r * (1 - 1e-4) * f * d / d.norm() for d in dirs for f in (0.5, 1.0)])
            top, vals = _top_sets(net, pts, k)
            for t in range(len(pts)):
                assert set(top[t].tolist()) == S, (n, k)
                if k < 8:
                    assert vals[t, k - 1] > vals[t, k]  # strictly separated
            checked += 1
    assert checked > 10


# --------------------------------------------------------------------------- reports
def test_dataset_report_has_the_relaxed_metrics():
    torch.manual_seed(1)
    net = gloronet.models.create("2c2f", (1, 28, 28), 10, 0.05)
    x = torch.rand(48, 1, 28, 28, generator=_gen(7))
    y = torch.randint(0, 10, (48,), generator=_gen(8))
    rep = certify_dataset(net, x, y, [0.1], top_k=3)
    rel = rep["relaxed"]
    cert = net.certify(x, top_k=3)
    in_set = [int(y[n]) in cert.classes[n, : int(cert.k[n])].tolist() for n in range(48)]
    assert rel["vra"]["0.05"] == pytest.approx(sum(in_set) / 48)
    assert rel["rejection"]["0.05"] == pytest.approx(float((cert.k == 0).double().mean()))
    assert sum(rel["k_counts"]["0.1"]) == 48 and rel["vra"]["0.1"] <= rel["vra"]["0.05"]
    assert rel["vra"]["0.05"] >= rep["vra"]["0.05"]  # relaxed VRA dominates the ordinary one
    assert rel["top_k_accuracy"]["3"] >= rel["top_k_accuracy"]["1"] == pytest.approx(rep["clean_accuracy"])
    assert "top_k" not in certify_dataset(net, x, y)
