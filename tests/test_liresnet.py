"""LiResNet / CHORD layers and architectures: bounds against EXACT singular values (impulses fed
through the forward pass, full SVD), grouped power iteration, the Cholesky backward, training and
certification of tiny models, the registry."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import gloronet.models.liresnet as liresnet
from gloronet import bounds, models
from gloronet.losses import emma_loss
from gloronet.nn import orthogonal
from gloronet.nn.orthogonal import (
    CholeskyOrthConv2d,
    CholeskyOrthLinear,
    ChordLinear,
    ChordMLP,
    cholesky_orth,
    cholesky_orth_reference,
)
from gloronet.nn.residual import LiResBlock, LiResStack, power_iteration_conv2d_grouped

TIGHT = 1.05


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny problems: one thread is faster, and avoids OpenMP oversubscription on a shared box.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def exact_norm(layer, in_shape) -> float:
    """Largest singular value of an affine layer, from its explicit matrix (float64 impulses)."""
    layer = layer.double()
    d = math.prod(in_shape)
    with torch.no_grad():
        eye = torch.eye(d, dtype=torch.float64).view(d, *in_shape)
        zero = torch.zeros(1, *in_shape, dtype=torch.float64)
        m = (layer(eye) - layer(zero)).reshape(d, -1)
    return float(torch.linalg.svdvals(m).max())


def _perturb_(module, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype) / max(1, p.shape[-1]) ** 0.5)


# --------------------------------------------------------------------------- LiResBlock / stack
@pytest.mark.parametrize("width,hw,k", [(4, (8, 8), 3), (6, (5, 7), 3), (2, (6, 6), 5)])
def test_block_bound_sound_and_tight(width, hw, k):
    torch.manual_seed(0)
    block = LiResBlock(width, hw, depth=2, kernel_size=k, activation=False)
    _perturb_(block, 0.5)
    block.running_mean.normal_()
    block.double().eval()  # bound and explicit matrix of exactly the same float64 operator
    bound = block.lipschitz_bound()
    exact = exact_norm(block, (width, *hw))
    assert exact <= bound <= TIGHT * exact
    assert bound <= exact * (1 + 1e-6)  # small maps take the exact (explicit-matrix) path
    est = float(block.double().lipschitz(n_iter=300).detach())
    assert est <= bound and est >= 0.99 * exact


def test_block_fft_bound_tightness():
    """The FFT (circular canvas) bound used for big maps, at a 16×16 map, vs the exact norm."""
    torch.manual_seed(1)
    block = LiResBlock(4, (16, 16), depth=4, activation=False)
    _perturb_(block, 0.5)
    block.double().eval()
    fft = bounds.conv2d_norm_bound(block.kernel().detach(), block.input_hw, 1, block.pads, exact_max_dim=0)
    exact = exact_norm(block, (4, 16, 16))
    assert exact <= fft <= TIGHT * exact


def test_block_kernel_identity_and_gamma():
    block = LiResBlock(4, (5, 5), depth=4)
    with torch.no_grad():
        block.weight.zero_()
    x = torch.randn(2, 4, 5, 5)
    block.eval()
    assert torch.allclose(block.kernel()[:, :, 1, 1], torch.eye(4))
    assert torch.equal(F.conv2d(x, block.kernel(), padding=1), x)  # identity at the centre
    with torch.no_grad():
        block.weight.normal_()
        block.gamma.copy_(torch.arange(4.0).view(4, 1, 1, 1))
    res = block.kernel() - F.pad(torch.eye(4)[:, :, None, None], (1, 1, 1, 1))
    assert torch.allclose(res, 0.5 * torch.arange(4.0).view(4, 1, 1, 1) * block.weight)  # γ per out-channel


def test_eval_uses_running_mean():
    torch.manual_seed(0)
    block = LiResBlock(4, (6, 6), depth=2, momentum=0.1)
    _perturb_(block)
    x = torch.randn(8, 4, 6, 6) + 1.0
    block.train()
    y_train = block(x)
    r = F.conv2d(x, block.residual_kernel(), padding=1)
    batch_mean = r.mean(dim=(0, 2, 3))
    assert torch.allclose(block.running_mean, 0.1 * batch_mean.detach(), atol=1e-6)
    block.eval()
    y_eval = block(x)
    pre = F.conv2d(x, block.kernel(), padding=1) + (block.bias - block.running_mean).view(1, -1, 1, 1)
    assert torch.allclose(y_eval, block.act(pre), atol=1e-5)
    assert not torch.allclose(y_eval, y_train, atol=1e-3)
    # training mode: the residual branch is centred by the batch mean
    pre_train = x + r - batch_mean.view(1, -1, 1, 1) + block.bias.view(1, -1, 1, 1)
    assert torch.allclose(y_train, block.act(pre_train), atol=1e-5)
    with pytest.raises(ValueError, match="set up for 6x6"):
        block(torch.randn(1, 4, 7, 7))


def test_stack_grouped_estimate_matches_blocks():
    torch.manual_seed(0)
    depth, width, hw = 3, 4, (6, 5)
    stack = LiResStack(depth, width, hw)
    _perturb_(stack, 0.7)
    stack.train()
    for i, b in enumerate(stack.blocks):
        b.power_v.copy_(stack.power_v[:, i * width : (i + 1) * width])
    per_block = torch.stack([b.lipschitz(n_iter=4) for b in stack.blocks])
    grouped = stack.block_lipschitz(n_iter=4)
    assert torch.allclose(grouped, per_block, rtol=1e-5)
    for i, b in enumerate(stack.blocks):
        assert torch.allclose(stack.power_v[:, i * width : (i + 1) * width], b.power_v, atol=1e-5)
    # gradients of the product agree as well
    g1 = torch.autograd.grad(per_block.prod(), [b.weight for b in stack.blocks])
    g2 = torch.autograd.grad(stack.lipschitz(n_iter=0), [b.weight for b in stack.blocks])
    for a, c in zip(g1, g2):
        assert torch.allclose(a, c, rtol=1e-4, atol=1e-7)


def test_grouped_power_iteration_converges_to_exact():
    torch.manual_seed(0)
    stack = LiResStack(2, 2, (5, 5), activation=False)
    _perturb_(stack, 1.0)
    stack.double().eval()
    est = power_iteration_conv2d_grouped(stack.stacked_kernel(), stack.power_v, 2, stack.blocks[0].pads, 500)
    for e, b in zip(est.tolist(), stack.blocks):
        exact = exact_norm(b, (2, 5, 5))
        assert exact * 0.999 <= e <= exact * (1 + 1e-9)


def test_stack_bound_covers_composition():
    torch.manual_seed(0)
    stack = LiResStack(3, 4, (4, 4), activation=False)
    _perturb_(stack, 0.7)
    stack.double().eval()
    bound = stack.lipschitz_bound()
    assert bound == bounds.mul_up(*(b.lipschitz_bound() for b in stack.blocks))
    exact = exact_norm(stack, (4, 4, 4))
    assert exact <= bound <= TIGHT * math.prod(exact_norm(b, (4, 4, 4)) for b in stack.blocks)


# --------------------------------------------------------------------------- Cholesky orthogonalisation
@pytest.mark.parametrize("shape", [(3, 5), (4, 4), (2, 3, 6), (6, 3)])
def test_cholesky_gradcheck(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: cholesky_orth(t, 0.1, relative=False), (x,))


@pytest.mark.parametrize("relative", [True, False])
def test_cholesky_backward_matches_autograd(relative):
    torch.manual_seed(0)
    x = torch.randn(3, 8, 20, dtype=torch.float64)
    g = torch.randn(3, 8, 20, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    w1 = cholesky_orth(x1, 1e-3, relative)
    w2 = cholesky_orth_reference(x2, 1e-3, relative)
    assert torch.allclose(w1, w2, atol=1e-12)
    (w1 * g).sum().backward()
    (w2 * g).sum().backward()
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-8, atol=1e-10)


def test_cholesky_rows_orthonormal():
    torch.manual_seed(0)
    x = torch.randn(16, 40, dtype=torch.float64)
    w = cholesky_orth(x, 1e-9, relative=False)
    assert torch.allclose(w @ w.T, torch.eye(16, dtype=torch.float64), atol=1e-8)
    wt = cholesky_orth(x.T, 1e-9, relative=False)  # tall: orthonormal columns
    assert torch.allclose(wt.T @ wt, torch.eye(16, dtype=torch.float64), atol=1e-8)
    # with ε: the singular values are √(1 − ε/λᵢ(X Xᵀ + εI)) ≤ 1 in exact arithmetic
    w = cholesky_orth(x, 0.5, relative=False)
    lam = torch.linalg.eigvalsh(x @ x.T + 0.5 * torch.eye(16, dtype=torch.float64))
    expected = (1 - 0.5 / lam).sqrt().sort().values
    assert torch.allclose(torch.linalg.svdvals(w).sort().values, expected, atol=1e-12)


def test_chord_matrix_bound_covers_rounding_above_one():
    """σ_max of the float32 matrix actually produced exceeds 1 by rounding; the bound covers it."""
    torch.manual_seed(0)
    layer = ChordLinear(64, depth=4, eps=0.0, relative_eps=False)
    layer.eval()
    w = layer.produced_weight()
    assert w.dtype == torch.float32
    sigma = float(torch.linalg.svdvals(w.double()).max())
    assert sigma > 1.0  # not orthogonal in float32: "≤ 1" may not be assumed
    bound = layer.lipschitz_bound()
    assert sigma <= bound <= sigma * (1 + 1e-6)


@pytest.mark.parametrize(
    "make,in_shape",
    [
        (lambda: CholeskyOrthLinear(12, 8), (12,)),
        (lambda: CholeskyOrthLinear(6, 10), (6,)),  # wide output: orthonormal columns
        (lambda: ChordLinear(10, depth=3), (10,)),
        (lambda: ChordMLP(8, 3, activation=False), (8,)),
        (lambda: CholeskyOrthConv2d(3, 4, 2), (3, 5, 6)),  # odd size: 'same' zero padding
    ],
)
def test_cholesky_layer_bounds_exact(make, in_shape):
    torch.manual_seed(0)
    layer = make()
    _perturb_(layer, 0.5)
    layer.eval()
    bound = layer.lipschitz_bound()
    # the produced float32 matrix, evaluated exactly in float64 (no re-orthogonalisation in fp64)
    w = layer.produced_weight().double()
    if isinstance(layer, CholeskyOrthConv2d):
        k = layer.kernel_size
        x = torch.eye(math.prod(in_shape), dtype=torch.float64).view(-1, *in_shape)
        out = F.conv2d(F.pad(x, layer.pads(in_shape[1:])), w.view(4, 3, k, k), stride=k)
        exact = float(torch.linalg.svdvals(out.reshape(x.shape[0], -1)).max())
    elif w.dim() == 3:
        m = torch.eye(w.shape[-1], dtype=torch.float64)
        for wi in w:
            m = wi @ m
        exact = float(torch.linalg.svdvals(m).max())
    else:
        exact = float(torch.linalg.svdvals(w).max())
    assert exact <= bound <= TIGHT * exact
    # the forward pass uses exactly that matrix
    x = torch.randn(3, *in_shape)
    with torch.no_grad():
        if isinstance(layer, CholeskyOrthConv2d):
            ref = F.conv2d(F.pad(x, layer.pads(in_shape[1:])), layer.produced_weight().view(4, 3, k, k), layer.bias, stride=k)
        elif w.dim() == 3:
            ref = x
            for wi, b in zip(layer.produced_weight(), layer.bias):
                ref = F.linear(ref, wi, b)
        else:
            ref = F.linear(x, layer.produced_weight(), layer.bias)
        assert torch.equal(layer(x), ref)
    est = float(layer.lipschitz(n_iter=200).detach())
    assert est <= bound and est >= 0.999 * exact * (1 if w.dim() != 3 else 0.9)


def test_cholesky_fp32_under_autocast_and_eval_cache():
    torch.manual_seed(0)
    layer = CholeskyOrthLinear(16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.compute_weight().dtype == torch.float32
        y = layer(torch.randn(4, 16))
    assert y.dtype == torch.bfloat16
    x = torch.randn(4, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = cholesky_orth(x)
    assert w.dtype == torch.float32
    w.sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    layer.eval()
    w1 = layer._applied_weight()
    assert layer._applied_weight() is w1  # cached
    copy_ = layer.produced_weight()
    assert torch.equal(copy_, w1) and copy_ is not w1
    copy_.mul_(2)  # the public copy can be edited without touching what forward and bound read
    assert torch.equal(layer._applied_weight(), w1) and not torch.equal(copy_, w1)
    with torch.no_grad():
        layer.raw_weight.data[0, 0] += 1.0  # even a change through .data invalidates it
    w2 = layer._applied_weight()
    assert w2 is not w1 and not torch.equal(w1, w2)
    assert not w2.requires_grad


def test_training_orthogonalises_once_per_step(monkeypatch):
    calls = []
    real = orthogonal.cholesky_orth
    monkeypatch.setattr(orthogonal, "cholesky_orth", lambda *a, **k: calls.append(1) or real(*a, **k))
    mlp = ChordMLP(8, 2)
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1)
    mlp.train()
    for _ in range(2):
        loss = mlp(torch.randn(4, 8)).square().mean() + mlp.lipschitz()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert len(calls) == 2
    mlp.lipschitz()  # no fresh forward: recomputed, never a stale or freed graph
    assert len(calls) == 3


# --------------------------------------------------------------------------- architectures
def _synthetic(n=32, classes=4, hw=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(classes, 3, hw, hw, generator=g)
    y = torch.arange(n) % classes
    x = (0.7 * protos[y] + 0.3 * torch.rand(n, 3, hw, hw, generator=g)).clamp(0, 1)
    return x, y


@pytest.mark.parametrize(
    "name,kw",
    [("liresnet-2l8w", {"dense_width": 16}), ("chord-2l8w", {"dense_width": 16, "dense_depth": 2})],
)
def test_tiny_model_trains_and_certifies(name, kw):
    torch.manual_seed(0)
    net = liresnet.create(name, (3, 16, 16), 4, epsilon=0.05, **kw)
    x, y = _synthetic()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    losses = []
    for _ in range(12):
        logits = net(x)
        loss = emma_loss(logits, y, net.pairwise_lipschitz(), net.epsilon)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    bl = net.bottom_logits(x)
    assert bl.shape == (32, 5) and torch.isfinite(bl).all()

    K = net.lipschitz_constant()
    assert torch.isfinite(K).all() and (K.diagonal() == 0).all()
    net.eval()
    xr = torch.rand(6, 3, 16, 16, requires_grad=True)
    logits = net(xr)
    for b in range(6):
        j = int(logits[b].argmax())
        for i in range(4):
            if i == j:
                continue
            (g,) = torch.autograd.grad(logits[b, j] - logits[b, i], xr, retain_graph=True)
            assert float(g[b].norm()) <= float(K[j, i]) * (1 + 1e-6)
    cert = net.certify(xr.detach())
    assert cert.radius.shape == (6,) and (cert.radius >= 0).all()
    # the net rebuilds from its config alone
    cfg = dict(net.config)
    twin = models.create(cfg.pop("name"), cfg.pop("in_shape"), cfg.pop("num_classes"), 0.05, **cfg)
    twin.load_state_dict(net.state_dict())
    twin.eval()
    assert torch.allclose(twin(xr.detach()), net(xr.detach()))


def test_body_bound_sound_vs_explicit_linear_part():
    """Whole-body bound of a tiny CHORD net >= the empirical gradient norm at many points."""
    torch.manual_seed(0)
    net = models.create("chord", (3, 8, 8), 3, 0.1, depth=2, width=4, dense_width=8, dense_depth=1)
    net.eval()
    L = net.lipschitz_bound()
    x = torch.rand(16, 3, 8, 8, requires_grad=True)
    feats = net.body(x)
    for k in range(feats.shape[1]):
        (g,) = torch.autograd.grad(feats[:, k].sum(), x, retain_graph=True)
        assert (g.flatten(1).norm(dim=1) <= L).all()


def test_registry_names():
    names = models.list_models()
    for n in ("liresnet", "chord", "liresnet-18l256w", "chord-12l512w"):
        assert n in names
    assert liresnet.parse_name("LiResNet-18L256W") == ("liresnet", 18, 256)
    assert liresnet.parse_name("chord-12l512w") == ("chord", 12, 512)
    for bad, msg in [
        ("liresnet-18x256", "cannot parse"),
        ("resnet-18l256w", "unknown model family"),
        ("liresnet-0l256w", "depth must be >= 1"),
        ("chord-12l255w", "width must be even"),
        (18, "must be a string"),
    ]:
        with pytest.raises(ValueError, match=msg):
            liresnet.parse_name(bad)
    with pytest.raises(ValueError, match="cannot parse"):
        liresnet.create("liresnet18", (3, 16, 16), 4)
    with pytest.raises(ValueError, match="fixes depth=18"):
        models.create("liresnet-18l256w", (3, 32, 32), 10, depth=4)
    with pytest.raises(ValueError, match="CHORD dense layers"):
        liresnet.create("liresnet-2l8w", (3, 16, 16), 4, dense_depth=2)
    net = liresnet.create("chord-1l4w", (3, 8, 8), 3, dense_width=8, dense_depth=1)
    assert net.config["name"] == "chord" and net.config["depth"] == 1 and net.config["width"] == 4


def test_stems():
    small = liresnet.create("liresnet-1l6w", (3, 32, 32), 3, dense_width=8)
    assert small.body[1].kernel_size == 5 and small.body[1].stride == 2
    assert small.body[3].input_hw == (16, 16)
    big = liresnet.create("chord-1l12w", (3, 96, 96), 3, dense_width=8, dense_depth=1)
    stem = big.body[1]
    assert stem.kernel_size == stem.stride == 2  # patchify: round(√(12/3))
    assert big.body[3].input_hw == (48, 48)
    with torch.no_grad():
        assert big(torch.rand(2, 3, 96, 96)).shape == (2, 3)
    with pytest.raises(ValueError, match="stem must be"):
        liresnet.create("liresnet-1l6w", (3, 32, 32), 3, stem="bogus")


def test_amp_training_step():
    torch.manual_seed(0)
    net = models.create("chord", (3, 8, 8), 3, 0.1, depth=2, width=4, dense_width=8, dense_depth=2)
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = emma_loss(net(x).float(), y, net.pairwise_lipschitz(), net.epsilon)
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
