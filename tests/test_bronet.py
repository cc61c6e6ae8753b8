"""BRONet on the LiResNet backbone (issue 20; Lai et al., ICML 2025; ntuaislab/BRONet): the
registered nets build, the whole body's provable bound covers the exact norm of its linear part and
the Jacobian norms of the body, certificates survive the rounding-search attack, and it trains with
the LA loss.

Oracles: the body's linear part (every layer but MinMax, a valid composition of the same layers)
materialised by impulses through its own forward in float64 and its norm by full SVD
(:func:`conftest.impulse_matrix`, :func:`conftest.exact_norm`); Jacobians by autograd.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

import gloronet
from conftest import exact_norm, impulse_matrix
from gloronet.losses import logit_annealing_loss
from gloronet.nn import BROConv2d, BROLinear, ChordMLP, CholeskyOrthConv2d, CholeskyOrthLinear, LLNLinear, MinMax
from gloronet.nn.sequential import Sequential
from test_aol_sll import attack_briefly_trained
from test_bro_conv import _randomised

pytestmark = pytest.mark.usefixtures("single_thread")
TINY = {"depth": 2, "width": 4, "dense_width": 8, "dense_depth": 1}


def _tiny(in_shape, dense: str, seed: int, classes: int = 3) -> gloronet.GloroNet:
    """A tiny BRONet with random (non-identity) BRO kernels and reflectors."""
    torch.manual_seed(seed)
    net = gloronet.models.create("bronet", in_shape, classes, 0.05, dense=dense, **TINY)
    with torch.no_grad():
        for i, m in enumerate(net.modules()):
            if isinstance(m, BROConv2d):
                _randomised(m, 0.5, seed + i)
            elif isinstance(m, BROLinear):
                m.reflector.add_(0.5 * torch.randn_like(m.reflector))
    return net.eval()


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_bronet_mnist_builds_runs_and_certifies(shape):
    torch.manual_seed(1)
    net = gloronet.models.create("bronet-mnist", shape, 10, 1.58).eval()
    kinds = [type(m) for m in net.body]
    assert kinds.count(BROConv2d) == 4 and kinds.count(BROLinear) == 2 and isinstance(net.head, LLNLinear)
    convs = [m for m in net.body if isinstance(m, BROConv2d)]
    assert convs[0].input_hw == ((shape[1] + 1) // 2,) * 2 and convs[0].rank == 8  # after the stride-2 stem
    x = torch.rand(2, *shape)
    assert net(x).shape == (2, 10)
    if shape[0] == 1:  # the CIFAR-shaped bound takes seconds more: built and run only
        assert 0 < net.lipschitz_bound() < math.inf
        assert bool(torch.isfinite(net.certify(x).radius).all())


def test_the_paper_configuration_is_bronet_l():
    """``bronet-12l512w`` is BRONet-L of ntuaislab/BRONet configs/benchmark_reproduce/cifar10.yaml:
    12 BRO convs of width 512, rank 256 on 16×16 maps, a Cholesky neck to 2048, 8 Cholesky dense
    layers, an LLN head (built on the meta device: the structure, no weights)."""
    with torch.device("meta"):
        net = gloronet.models.create("bronet-12l512w", (3, 32, 32), 10, 36 / 255)
    convs = [m for m in net.body if isinstance(m, BROConv2d)]
    assert len(convs) == 12 and {(c.in_channels, c.out_channels, c.rank, c.input_hw, c.kernel_size)
                                 for c in convs} == {(512, 512, 256, (16, 16), 3)}
    kinds = [type(m) for m in net.body]
    i = kinds.index(CholeskyOrthConv2d)
    assert kinds[i + 2:i + 5] == [CholeskyOrthLinear, MinMax, ChordMLP] and kinds[i - 1] is MinMax
    mlp = net.body[i + 4]
    assert (mlp.features, mlp.depth) == (2048, 8) and net.body[i + 2].out_features == 2048
    assert isinstance(net.head, LLNLinear) and net.head.weight.shape == (10, 2048)
    # the reference's count (its code, cifar10.yaml) is 68,788,234: ours plus its 12·512 backbone
    # gains γ (our V is trained directly) less our 512 neck-conv biases
    assert sum(p.numel() for p in net.parameters()) == 68_788_234 - 12 * 512 + 512
    with pytest.raises(ValueError, match="fixes width=512"):
        gloronet.models.create("bronet-12l512w", (3, 32, 32), 10, width=256)


@pytest.mark.parametrize("dense", ["bro", "chord"])
def test_body_bound_covers_the_exact_norm_of_its_linear_part(dense):
    """The product of the layers' bounds covers the full-SVD norm of the body with MinMax dropped
    (the same layers composed) and the Jacobian norm of the body at random points."""
    net = copy.deepcopy(_tiny((2, 8, 8), dense, seed=3)).double()  # float64: one operator for bound and oracle
    linear = Sequential(*[m for m in net.body if not isinstance(m, MinMax)])
    bound = net.body.lipschitz_bound()
    exact = exact_norm(impulse_matrix(linear, (2, 8, 8)))
    assert 0.5 < exact <= bound <= 1.2 * math.prod(m.lipschitz_bound() for m in linear)
    x = torch.rand(4, 2, 8, 8, dtype=torch.float64)
    for b in range(4):
        jac = torch.autograd.functional.jacobian(lambda v: net.body(v[None])[0], x[b])
        assert exact_norm(jac.reshape(jac.shape[0], -1)) <= bound


def test_certified_points_survive_the_rounding_search(monkeypatch):
    """No certified point of a tiny BRONet flips; its BRO conv bounds understated 100x do."""
    net = _tiny((2, 6, 6), "bro", seed=9)
    attack_briefly_trained(net, lambda: monkeypatch.setattr(BROConv2d, "lipschitz_bound", lambda self: 0.05))


def test_trains_with_the_la_loss():
    """A few LA-loss steps: finite, decreasing, every BRO parameter moves; eval after train
    runs the new kernels (not a stale cache)."""
    net = _tiny((3, 8, 8), "bro", seed=5, classes=4)
    gen = torch.Generator().manual_seed(6)
    protos = torch.rand(4, 3, 8, 8, generator=gen)
    y = torch.arange(32) % 4
    x = (0.7 * protos[y] + 0.3 * torch.rand(32, 3, 8, 8, generator=gen)).clamp(0, 1)
    before = net(x).detach()
    bro = [m.reflector for m in net.modules() if isinstance(m, (BROConv2d, BROLinear))]
    start = [p.detach().clone() for p in bro]
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    losses = []
    for _ in range(6):
        loss = logit_annealing_loss(net(x), y, net.pairwise_lipschitz(), net.epsilon)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert all(not torch.equal(p, s) for p, s in zip(bro, start))
    net.eval()
    assert not torch.allclose(net(x), before)
