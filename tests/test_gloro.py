"""GloroNet: sound pairwise constants, exact radii for linear classifiers, the bottom logit,
regressions from the TF gloro library, non-finite handling, caching and validation.

Oracles: autograd gradient norms of margins (float64 copies), exact distances to a linear decision
boundary, SVDs of impulse-built layer matrices, float64 power iteration (a lower bound of the
truth) where those matrices would be too large.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gloronet
from conftest import exact_norm, impulse_matrix, power_norm
from gloronet.nn import Flatten, LipConv2d, LipLinear, LLNLinear, MinMax, Sequential

pytestmark = pytest.mark.usefixtures("single_thread")

D = torch.float64
REGISTRY_SHAPES = {"2c2f": (1, 28, 28), "4c3f": (1, 28, 28), "6c2f": (3, 32, 32), "8c2f": (3, 32, 32)}
EXACT_ORACLE_MAX_DIM = 3200  # layers up to this input/output size get the full-SVD oracle


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _perturb_(net, gen):
    """Random non-orthogonal weights: w <- c·(w + 0.3·std(w)·noise), c in [0.7, 1.4]; random biases."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("weight"):
                p.add_(0.3 * p.std() * torch.randn(p.shape, generator=gen))
                p.mul_(float(torch.empty(()).uniform_(0.7, 1.4, generator=gen)))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def test_registry_has_the_gloro_conv_nets():
    """The four GloRo conv architectures are registered (the registry tests below cover them;
    LiResNet / CHORD models are registered by their own module and tested with it)."""
    assert set(REGISTRY_SHAPES) <= set(gloronet.models.list_models())


@pytest.fixture(scope="module", params=[m for m in gloronet.models.list_models() if m in REGISTRY_SHAPES])
def registry_net(request, single_thread):
    """(name, in_shape, net, K, per-layer bounds) for each GloRo conv net, weights perturbed.

    Each layer's ``lipschitz_bound`` is recorded while ``lipschitz_constant()`` runs, so the
    (expensive) bounds are computed once."""
    name = request.param
    shape = REGISTRY_SHAPES[name]
    torch.manual_seed(0)
    net = gloronet.models.create(name, shape, 10, epsilon=0.1)
    _perturb_(net, _gen(1))
    recorded = {}
    for mod in net.body.modules():
        if isinstance(mod, (LipConv2d, LipLinear)):
            orig = mod.lipschitz_bound

            def rec(mod=mod, orig=orig):
                recorded[mod] = orig()
                return recorded[mod]

            mod.lipschitz_bound = rec
    K = net.lipschitz_constant()
    for mod in recorded:
        del mod.lipschitz_bound
    return name, shape, net, K, recorded


def test_registry_margin_gradients_within_K(registry_net):
    """For every registry model with random perturbed weights, at random inputs, the autograd
    gradient norm of every margin f_j - f_i (float64 copy of the net) is <= K_ji."""
    name, shape, net, K, _ = registry_net
    assert K.shape == (10, 10) and K.dtype == D
    net64 = copy.deepcopy(net).double().eval()
    x = torch.rand(2, *shape, dtype=D, generator=_gen(2)).requires_grad_(True)
    y = net64(x)
    jac = torch.stack([torch.autograd.grad(y[:, c].sum(), x, retain_graph=True)[0].flatten(1) for c in range(10)], 1)
    grad_norms = (jac[:, :, None, :] - jac[:, None, :, :]).norm(dim=-1)  # (B, C, C): ‖∇(f_j - f_i)‖
    assert torch.isfinite(grad_norms).all() and grad_norms.max() > 0
    assert (grad_norms <= K * (1 + 1e-9)).all(), float((grad_norms / (K + torch.eye(10))).max())


def test_registry_layer_bounds_sound_and_tight(registry_net):
    """Every layer's bound is >= its exact norm (full SVD of the impulse matrix where it is at most
    ~3200-dimensional: all of 2c2f and every dense layer) and <= 1.05x the exact norm, or 1.05x a
    float64-evaluated power-iteration lower bound of it for the big convolutions. The body bound
    is the rounded-up product of the layer bounds."""
    name, shape, net, K, recorded = registry_net
    in_shapes = {}
    hooks = [m.register_forward_pre_hook(lambda m, a: in_shapes.__setitem__(m, tuple(a[0].shape[1:]))) for m in recorded]
    net(torch.zeros(1, *shape))
    for h in hooks:
        h.remove()
    n_exact = 0
    for mod, bound in recorded.items():
        in_shape = in_shapes[mod]
        d_in = math.prod(in_shape)
        if isinstance(mod, LipLinear):
            truth = exact_norm(mod.weight.detach().double())
            exact = True
        elif max(d_in, math.prod(mod.output_hw(mod.input_hw)) * mod.out_channels) <= EXACT_ORACLE_MAX_DIM:
            truth = exact_norm(impulse_matrix(mod, in_shape))
            exact = True
        else:
            truth = power_norm(mod, in_shape, iters=100, dtype=torch.float32)
            exact = False
        n_exact += exact
        assert bound >= truth, (mod, bound, truth)
        assert bound <= 1.05 * truth, (mod, bound / truth)
    if name == "2c2f":
        assert n_exact == len(recorded)  # every 2c2f layer checked against an exact SVD
    prod = 1.0
    for b in recorded.values():
        prod *= b
    L = net.lipschitz_bound()
    assert prod * (1 - 1e-12) <= L <= prod * (1 + 1e-12)


# --------------------------------------------------------------------------- linear classifiers
def _linear_net(body_kind, head_kind, gen, dim=6, classes=4):
    head = (LLNLinear if head_kind == "lln" else LipLinear)(dim, classes).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(classes, dim, generator=gen, dtype=D))
        head.bias.copy_(torch.randn(classes, generator=gen, dtype=D))
    if body_kind == "flatten":
        body, scale, q = Sequential(Flatten()), 1.0, torch.eye(dim, dtype=D)
    else:
        lin = LipLinear(dim, dim).double()
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=D))
        scale = 2.5
        with torch.no_grad():
            lin.weight.copy_(scale * q)
            lin.bias.copy_(torch.randn(dim, generator=gen, dtype=D))
        body = Sequential(Flatten(), lin)
    return gloronet.GloroNet(body, head, 0.0).double()


def _exact_linear_radius(net, x):
    """min_i ((w_j - w_i)·z + b_j - b_i) / ‖Jᵀ(w_j - w_i)‖ computed from the weights (float64)."""
    z = net.body(x)
    w = net.head.weight.detach()
    if isinstance(net.head, LLNLinear):
        w = w / w.norm(dim=1, keepdim=True)
    b = net.head.bias.detach()
    body_lin = [m for m in net.body if isinstance(m, LipLinear)]
    jac = body_lin[0].weight.detach() if body_lin else torch.eye(w.shape[1], dtype=D)
    y = z @ w.t() + b
    j = y.argmax(1)
    out = []
    for n in range(x.shape[0]):
        d = [((w[j[n]] - w[i]) @ z[n] + b[j[n]] - b[i]) / (jac.t() @ (w[j[n]] - w[i])).norm() for i in range(w.shape[0]) if i != j[n]]
        out.append(min(d))
    return torch.stack(out)


@pytest.mark.parametrize("body_kind", ["flatten", "scaled_orthogonal"])
@pytest.mark.parametrize("head_kind", ["linear", "lln"])
def test_linear_classifier_radius_is_exact_distance_to_boundary(body_kind, head_kind):
    """For an affine classifier the certified radius equals the exact L2 distance to the decision
    boundary (to 1e-7 relative; the rounding allowance is ~GRAM_SLACK·dim) and is never larger."""
    net = _linear_net(body_kind, head_kind, _gen(10))
    x = torch.randn(64, 6, generator=_gen(11), dtype=D)
    cert = net.certify(x)
    exact = _exact_linear_radius(net, x)
    assert (cert.radius <= exact).all()
    torch.testing.assert_close(cert.radius, exact, rtol=1e-7, atol=0)
    # certification at ε agrees with the exact distance away from the threshold
    for eps in (0.05, 0.3):
        c = net.certify(x, epsilon=eps)
        far = (exact - eps).abs() > 1e-6 * eps
        assert torch.equal(c.certified[far], (exact > eps)[far])
        assert (c.radius[c.certified] >= eps * (1 - 1e-12)).all()
    # and just beyond the radius the prediction really flips: walk to the closest boundary
    n = int(exact.argmin())
    z = x[n : n + 1]
    y = net(z)[0].detach()
    j = int(y.argmax())
    w = net.head.weight.detach()
    if head_kind == "lln":
        w = w / w.norm(dim=1, keepdim=True)
    jac = net.body[-1].weight.detach() if body_kind != "flatten" else torch.eye(6, dtype=D)
    dists = [float((y[j] - y[i]) / (jac.t() @ (w[j] - w[i])).norm()) if i != j else math.inf for i in range(4)]
    i = int(torch.tensor(dists).argmin())
    direction = -(jac.t() @ (w[j] - w[i]))
    direction = direction / direction.norm()
    assert int(net(z + exact[n] * (1 + 1e-6) * direction).argmax()) != j


# --------------------------------------------------------------------------- TF gloro regressions
def _flat_net(head_w, head_b, dtype=torch.float32):
    head = LipLinear(head_w.shape[1], head_w.shape[0]).to(dtype)
    with torch.no_grad():
        head.weight.copy_(head_w)
        head.bias.copy_(head_b)
    return gloronet.GloroNet(Sequential(Flatten()), head, 0.0).to(dtype)


def test_tied_top_logits_never_certify():
    """Exactly tied top logits (identical rows and biases, or different rows meeting exactly) do
    not certify at any ε, including 0, and get radius 0; the untied rows of the batch do."""
    w = torch.tensor([[1.0, 2.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    net = _flat_net(w, torch.tensor([0.5, 0.5, 0.0]))
    x = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    y = net(x)
    assert y[0, 0] == y[0, 1]
    for eps in (0.0, 1e-300, 1e-3, 0.5):
        c = net.certify(x, epsilon=eps)
        assert not bool(c.certified[0]) and float(c.radius[0]) == 0.0
        assert bool(c.certified[1]) == (eps < 4.5 / math.sqrt(6))  # margin 4.5, ‖w_2 − w_0‖ = √6
    net2 = _flat_net(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]), torch.zeros(3))
    x2 = torch.tensor([[0.25, 0.25]])
    assert net2(x2)[0, 0] == net2(x2)[0, 1]
    c = net2.certify(x2, epsilon=0.0)
    assert not bool(c.certified[0]) and float(c.radius[0]) == 0.0
    bl = net2.bottom_logits(x2, epsilon=0.0)
    assert bl[0, -1] >= bl[0, :-1].max()  # the tie shows up in the bottom logit, masked by index


def test_tiny_single_weight_layer_bound():
    """A body layer with a single weight 1e-5 (all others 0) has bound >= that weight; K reflects it."""
    lin = LipLinear(4, 4, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[2, 1] = 1e-5
    w = float(lin.weight.detach()[2, 1])
    net = gloronet.GloroNet(Sequential(lin), LipLinear(4, 3), 0.1)
    assert net.lipschitz_bound() >= w
    K = net.lipschitz_constant()
    hw = net.head.weight.detach().double()
    dist = (hw[:, None] - hw[None]).norm(dim=-1)
    assert (K >= w * dist).all()
    assert (K <= 1.0001 * w * dist + 1e-300).all()


def test_float64_head_tiny_row_difference_is_sound():
    """K_ji >= ‖w_j − w_i‖ for a float64 head whose two rows differ by 1e-170 (max |w| = 1), and the
    certified radius never exceeds the exact distance to the boundary (here 1)."""
    head = LipLinear(2, 2).double()
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 1e-170], [1.0, 0.0]], dtype=D))
        head.bias.zero_()
    net = gloronet.GloroNet(Sequential(Flatten()), head, 0.0).double()
    assert float(net.lipschitz_constant()[0, 1]) >= 1e-170
    c = net.certify(torch.tensor([[0.0, 1.0]], dtype=D))
    assert float(c.radius[0]) <= 1.0


def _scaling_net(scale):
    lin = LipLinear(4, 4, bias=False)
    head = LipLinear(4, 3)
    with torch.no_grad():
        lin.weight.copy_(scale * torch.eye(4))
        head.weight.copy_(torch.randn(3, 4, generator=_gen(20)))
    return gloronet.GloroNet(Sequential(lin), head, 0.1)


def _expected_K(net):
    """Independent K: SVD norm of the body weight times head row distances."""
    s = exact_norm(net.body[0].weight.detach().double())
    hw = net.head.weight.detach().double()
    return s * (hw[:, None] - hw[None]).norm(dim=-1)


@pytest.mark.parametrize("how", ["mul_", "data", "load_state_dict", "optimizer"])
def test_scaling_layer_weight_change_recomputes_K(how):
    """The cached K follows every way of changing weights after construction (TF gloro regression:
    a stale Lipschitz constant silently over-certifies)."""
    net = _scaling_net(2.0)
    K0 = net.lipschitz_constant()
    torch.testing.assert_close(K0, _expected_K(net), rtol=1e-6, atol=0)
    if how == "mul_":
        with torch.no_grad():
            net.body[0].weight.mul_(3.0)
    elif how == "data":
        net.body[0].weight.data = 7.0 * torch.eye(4)
    elif how == "load_state_dict":
        sd = copy.deepcopy(net.state_dict())
        sd["body.0.weight"] = 5.0 * torch.eye(4)
        net.load_state_dict(sd)
    else:
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        loss = net.body[0].weight.sum() * 2.0 + net(torch.ones(1, 4)).sum()
        loss.backward()
        opt.step()
    K1 = net.lipschitz_constant()
    assert not torch.allclose(K1, K0)
    torch.testing.assert_close(K1, _expected_K(net), rtol=1e-6, atol=0)


def test_negative_scale_gives_positive_bound():
    """A layer with weight -3·I has bound 3 (positive), and K = 3·‖w_j − w_i‖."""
    net = _scaling_net(-3.0)
    assert 3.0 <= net.lipschitz_bound() <= 3.0 * (1 + 1e-6)
    K = net.lipschitz_constant()
    assert (K >= 0).all()
    torch.testing.assert_close(K, _expected_K(net), rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- caching
def test_lipschitz_constant_is_cached_and_invalidated(monkeypatch):
    """lipschitz_constant() is (C,C) float64, symmetric, zero-diagonal, >= L_exact·‖w_j−w_i‖;
    repeated calls (and certify) reuse the cache without recomputing layer bounds; the returned
    tensor is a copy (mutating it cannot corrupt the cache); power-iteration buffers do not
    invalidate it; a weight change does."""
    calls = {"n": 0}
    orig = LipLinear.lipschitz_bound

    def counting(self):
        calls["n"] += 1
        return orig(self)

    monkeypatch.setattr(LipLinear, "lipschitz_bound", counting)
    torch.manual_seed(3)
    net = gloronet.GloroNet(Sequential(Flatten(), LipLinear(6, 8), MinMax(), LipLinear(8, 6)), LipLinear(6, 5), 0.1)
    _perturb_(net, _gen(4))
    K = net.lipschitz_constant()
    n_first = calls["n"]
    assert n_first == 2  # both body dense layers, once each
    assert K.shape == (5, 5) and K.dtype == D
    assert torch.equal(K, K.t()) and torch.equal(K.diagonal(), torch.zeros(5, dtype=D))
    L_exact = exact_norm(net.body[1].weight.detach().double()) * exact_norm(net.body[3].weight.detach().double())
    hw = net.head.weight.detach().double()
    ref = L_exact * (hw[:, None] - hw[None]).norm(dim=-1)
    assert (K >= ref).all()
    assert (K <= ref * 1.0001).all()
    K[0, 1] = 0.0
    K2 = net.lipschitz_constant()
    assert calls["n"] == n_first and float(K2[0, 1]) > 0
    net.certify(torch.randn(3, 6))
    net.train()
    net.bottom_logits(torch.randn(3, 6))  # moves power_u buffers
    assert torch.equal(net.lipschitz_constant(), K2) and calls["n"] == n_first
    with torch.no_grad():
        net.head.weight[0, 0] += 1.0
    K3 = net.lipschitz_constant()
    assert calls["n"] > n_first and not torch.equal(K3, K2)


class _Triple(nn.Module):
    def forward(self, x):
        return 3 * x


def test_cache_invalidated_by_module_swap():
    """Swapping a module of the body after K was computed must not reuse the old K."""
    net = gloronet.GloroNet(Sequential(Flatten(), LipLinear(4, 4), MinMax()), LipLinear(4, 3), 0.1)
    net.lipschitz_constant()
    net.body[2] = _Triple()
    with pytest.raises(gloronet.UnboundedLayerError):
        net.certify(torch.randn(2, 4))


# --------------------------------------------------------------------------- non-finite values
def _small_conv_net():
    torch.manual_seed(5)
    net = gloronet.GloroNet(
        Sequential(LipConv2d(1, 4, 3, input_size=(6, 6)), MinMax(), Flatten(), LipLinear(144, 8), MinMax()),
        LipLinear(8, 3),
        0.01,
    )
    _perturb_(net, _gen(6))
    with torch.no_grad():
        net.head.bias.copy_(torch.tensor([0.3, 0.0, -0.3]))
    return net


def test_non_finite_inputs_never_certify():
    """Rows with NaN / +Inf / -Inf get certified=False, radius 0; the other rows of the batch get
    exactly the result they get in a clean batch."""
    net = _small_conv_net()
    x = torch.randn(6, 1, 6, 6, generator=_gen(7))
    clean = net.certify(x, epsilon=1e-4)
    assert clean.certified.any()
    bad = x.clone()
    bad[1] = math.nan
    bad[2, 0, 3, 3] = math.inf
    bad[4, 0, 0, 5] = -math.inf
    c = net.certify(bad, epsilon=1e-4)
    for r in (1, 2, 4):
        assert not bool(c.certified[r]) and float(c.radius[r]) == 0.0
    for r in (0, 3, 5):
        assert bool(c.certified[r]) == bool(clean.certified[r])
        assert float(c.radius[r]) == pytest.approx(float(clean.radius[r]), rel=1e-6)
        assert int(c.pred[r]) == int(clean.pred[r])


def test_non_finite_input_with_finite_logits_never_certifies():
    """A -Inf pixel that the body maps to a finite value (ReLU(-inf) = 0) still never certifies:
    the input itself is checked, not only the logits."""
    head = LipLinear(4, 3)
    net = gloronet.GloroNet(Sequential(nn.ReLU(), Flatten()), head, 0.0)
    x = torch.tensor([[1.0, 2.0, 0.5, 0.0], [1.0, 2.0, 0.5, -math.inf]])
    c = net.certify(x)
    assert torch.isfinite(c.logits).all() and torch.equal(c.logits[0], c.logits[1])
    assert bool(c.certified[0]) and float(c.radius[0]) > 0
    assert not bool(c.certified[1]) and float(c.radius[1]) == 0.0


@pytest.mark.parametrize("where", ["head", "body"])
def test_nan_weights_certify_nothing(where):
    """A NaN anywhere in the head or body weights certifies nothing (radius 0 everywhere)."""
    net = _small_conv_net()
    with torch.no_grad():
        (net.head.weight if where == "head" else net.body[3].weight)[0, 0] = math.nan
    c = net.certify(torch.randn(5, 1, 6, 6, generator=_gen(8)), epsilon=0.0)
    assert not c.certified.any()
    assert torch.equal(c.radius, torch.zeros(5, dtype=D))


# --------------------------------------------------------------------------- validation & API
def test_epsilon_validation():
    """Negative / NaN / inf ε raise ValueError (constructor, setter, certify, bottom_logits);
    net.epsilon is settable and used as the default."""
    net = _small_conv_net()
    x = torch.randn(2, 1, 6, 6)
    for bad in (-1e-3, -1.0, math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError):
            gloronet.GloroNet(Sequential(Flatten()), LipLinear(36, 3), bad)
        with pytest.raises(ValueError):
            net.epsilon = bad
        with pytest.raises(ValueError):
            net.certify(x, epsilon=bad)
        with pytest.raises(ValueError):
            net.bottom_logits(x, epsilon=bad)
    net.epsilon = 0.25
    assert net.epsilon == 0.25
    assert net.certify(x).epsilon == 0.25
    net.epsilon = 0
    assert net.certify(x).epsilon == 0.0


def test_bottom_logits_formula_and_gradient():
    """bottom_logits is (B, C+1); its last column equals max_{i≠j}(y_i + ε·K_est[j,i]) with
    K_est = Π layer estimates · ‖w_j − w_i‖ (computed here independently), masked by index; the
    first C columns are the logits; it is differentiable w.r.t. body and head weights."""
    net = _small_conv_net().eval()  # eval: estimates use the stored iterates, no update
    eps = 0.7
    x = torch.randn(7, 1, 6, 6, generator=_gen(9))
    bl = net.bottom_logits(x, epsilon=eps)
    assert bl.shape == (7, 4)
    y = net(x).detach().double()
    torch.testing.assert_close(bl[:, :3].detach().double(), y, rtol=1e-6, atol=1e-6)
    L_est = 1.0
    for m in net.body:
        if isinstance(m, (LipConv2d, LipLinear)):
            L_est *= float(m.lipschitz().detach())
    w = net.head.weight.detach().double()
    K_est = L_est * torch.cdist(w, w)
    expected = []
    for n in range(7):
        j = int(y[n].argmax())
        expected.append(max(float(y[n, i] + eps * K_est[j, i]) for i in range(3) if i != j))
    torch.testing.assert_close(bl[:, -1].detach().double(), torch.tensor(expected, dtype=D), rtol=1e-5, atol=1e-5)
    bl[:, -1].sum().backward()
    for p in (net.head.weight, net.body[0].weight, net.body[3].weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # ε enters with the right sign and size: d(y_⊥)/dε = K_est[j, i*]
    bl0 = net.bottom_logits(x, epsilon=0.0)[:, -1].detach()
    assert (bl[:, -1].detach() > bl0).all()


def test_two_training_estimates_in_one_graph_backprop():
    """Summing GloRo losses of two batches before a single backward must work in train mode."""
    net = _small_conv_net().train()
    x1, x2 = torch.randn(3, 1, 6, 6), torch.randn(3, 1, 6, 6)
    loss = net.bottom_logits(x1).logsumexp(1).sum() + net.bottom_logits(x2).logsumexp(1).sum()
    loss.backward()


def test_certify_preserves_mode_and_radius_consistency():
    """certify leaves train/eval mode as it was; certified ⇔ margin > ε·K gives radius >= ε for
    certified rows and radius <= ε for finite uncertified ones; radius is float64, >= 0."""
    net = _small_conv_net()
    x = torch.randn(32, 1, 6, 6, generator=_gen(12))
    r = net.certify(x, epsilon=0.0).radius.sort().values
    eps = float(r[15] + r[16]) / 2  # between two radii: away from the 1-ulp rounding at a threshold
    for mode in (True, False):
        net.train(mode)
        c = net.certify(x, epsilon=eps)
        assert net.training == mode
        assert all(m.training == mode for m in net.modules())
    assert c.radius.dtype == D and (c.radius >= 0).all()
    assert c.logits.dtype == D and c.logits.shape == (32, 3)
    assert c.certified.any() and not c.certified.all()
    assert (c.radius[c.certified] >= eps * (1 - 1e-12)).all()
    assert (c.radius[~c.certified] <= eps * (1 + 1e-12)).all()
    K = net.lipschitz_constant()
    y = c.logits
    for n in range(32):
        j = int(c.pred[n])
        assert j == int(y[n].argmax())
        margins = [(float(y[n, j] - y[n, i]), float(K[j, i])) for i in range(3) if i != j]
        assert bool(c.certified[n]) == all(m > eps * k for m, k in margins)
        assert float(c.radius[n]) <= min(m / k for m, k in margins)


def test_certify_preserves_submodule_modes():
    """A net in train mode with one submodule frozen in eval mode keeps that exact configuration."""
    net = _small_conv_net().train()
    net.body[3].eval()
    net.certify(torch.randn(2, 1, 6, 6))
    assert net.training and not net.body[3].training


class _ModeProbe(gloronet.nn.LipschitzModule):
    """Identity (bound 1) that records the mode its forward ran in."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(self.training)
        return x

    def lipschitz(self):
        return torch.ones(())

    def lipschitz_bound(self):
        return 1.0

    def error_model(self, in_shape, dtype, lip):
        return gloronet.fp.exact_model(lip)


def test_certify_runs_forward_in_eval_mode():
    """The certifying forward pass runs in eval mode even when the net is training (train-mode
    behaviour such as batch statistics must not leak into a certificate); the mode is restored."""
    probe = _ModeProbe()
    net = gloronet.GloroNet(Sequential(Flatten(), probe, LipLinear(4, 4)), LipLinear(4, 3), 0.0).train()
    net.certify(torch.randn(3, 4))
    assert probe.seen == [False]
    assert net.training and probe.training


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_certify_rejects_low_precision_weights(dtype):
    """Certification with bfloat16/float16 weights raises ValueError (no silent low-precision certificate)."""
    net = _small_conv_net().to(dtype)
    with pytest.raises(ValueError):
        net.certify(torch.randn(2, 1, 6, 6, dtype=dtype))
