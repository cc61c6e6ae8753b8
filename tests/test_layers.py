"""Lipschitz layers: each layer's claimed bound against its actual behaviour.

Activations and reshapes are checked on random pairs / Jacobians, Normalize against its exact
Jacobian, LipConv2d's input-size bookkeeping and state_dict, and the refusal to bound unknown
modules (there is no default of 1).
"""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gloronet
from conftest import exact_norm, impulse_matrix
from gloronet.nn import (
    Flatten,
    InvertibleDownsampling,
    LipConv2d,
    LipLinear,
    LLNLinear,
    MinMax,
    Normalize,
    Sequential,
    lipschitz_bound_of,
    lipschitz_estimate_of,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- MinMax
@pytest.mark.parametrize("shape", [(64, 6), (16, 4, 5, 3)])
def test_minmax_is_one_lipschitz(shape):
    """||f(x) - f(y)|| <= ||x - y|| on random pairs (far, close, and straddling ties), and the
    output is a per-pair permutation of the input (so norms are preserved exactly)."""
    g = _gen(1)
    mm = MinMax()
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    for scale in (1.0, 1e-3):
        y = x + scale * torch.randn(shape, generator=g, dtype=torch.float64)
        d_out = (mm(x) - mm(y)).flatten(1).norm(dim=1)
        d_in = (x - y).flatten(1).norm(dim=1)
        assert (d_out <= d_in * (1 + 1e-12)).all()
    # pairs straddling a tie a == b: the worst case for an unsorted implementation
    a, b = x.chunk(2, dim=1)
    x_tie = torch.cat([a, a + 1e-3], dim=1)
    y_tie = torch.cat([a, a - 1e-3], dim=1)
    assert ((mm(x_tie) - mm(y_tie)).flatten(1).norm(dim=1) <= (x_tie - y_tie).flatten(1).norm(dim=1) * (1 + 1e-12)).all()
    out = mm(x)
    hi, lo = out.chunk(2, dim=1)
    assert torch.equal(hi, torch.maximum(a, b)) and torch.equal(lo, torch.minimum(a, b))
    torch.testing.assert_close(out.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1), rtol=1e-14, atol=0)
    assert mm.lipschitz_bound() >= 1.0 and float(mm.lipschitz()) == 1.0


def test_minmax_training_gradient_routes_to_the_chosen_input():
    """The one-mask backward (training path) equals autograd's max/min backward away from ties and,
    at ties, hands each output's gradient whole to one input (so the input gradient is a
    permutation of the output gradient); forward values equal the no-grad path exactly."""
    g = _gen(2)
    x = torch.randn(8, 6, 5, 3, generator=g, dtype=torch.float64)
    x[:, 0] = x[:, 3]  # exact ties in one channel pair
    up = torch.randn(x.shape, generator=g, dtype=torch.float64)
    xa = x.clone().requires_grad_()
    out = MinMax()(xa)
    with torch.no_grad():
        assert torch.equal(out, MinMax()(x))
    out.backward(up)
    a, b = x.detach().chunk(2, dim=1)
    ref_x = x.clone().requires_grad_()
    ra, rb = ref_x.chunk(2, dim=1)
    torch.cat([torch.maximum(ra, rb), torch.minimum(ra, rb)], dim=1).backward(up)
    untied = torch.cat([a != b, a != b], dim=1)
    assert torch.equal(xa.grad[untied], ref_x.grad[untied])
    g_hi, g_lo = up.chunk(2, dim=1)
    ga, gb = xa.grad.chunk(2, dim=1)
    assert torch.equal(ga[:, 0], g_hi[:, 0]) and torch.equal(gb[:, 0], g_lo[:, 0])  # a >= b picks a as the max
    torch.autograd.gradcheck(MinMax(), (torch.randn(3, 4, 2, generator=g, dtype=torch.float64, requires_grad=True),))


def test_lipconv_training_forward_equals_the_padded_map():
    """Training-mode LipConv2d (padding inside the kernel when symmetric, bias fused) computes the
    layer's map ``conv2d_apply`` + bias, for symmetric and asymmetric 'same' padding and 'valid'."""
    from gloronet.bounds import conv2d_apply

    g = _gen(3)
    for k, s, hw, padding in [(3, 1, (9, 7), "same"), (4, 2, (8, 8), "same"), (4, 1, (6, 6), "same"),
                              (3, 2, (7, 9), "same"), (3, 1, (6, 5), "valid"), (3, 1, (6, 5), 2)]:
        conv = LipConv2d(2, 4, k, stride=s, padding=padding, input_size=hw).double()
        with torch.no_grad():
            conv.bias.normal_(generator=g)
        x = torch.randn(3, 2, *hw, generator=g, dtype=torch.float64)
        ref = conv2d_apply(x, conv.weight, s, conv.pads(hw)) + conv.bias.view(1, -1, 1, 1)
        torch.testing.assert_close(conv.train()(x), ref, rtol=1e-12, atol=1e-12)


def test_minmax_rejects_odd_channels():
    """MinMax needs an even channel count in dim 1 (else it would silently drop a channel)."""
    with pytest.raises(ValueError):
        MinMax()(torch.randn(2, 5))
    with pytest.raises(ValueError):
        MinMax()(torch.randn(2, 3, 4, 4))


# --------------------------------------------------------------------------- reshapes
def test_flatten_and_invertible_downsampling_are_isometries():
    """Flatten and InvertibleDownsampling preserve norms and distances (linear permutations), so
    their bound of 1 is exact; downsampling is invertible (pixel_shuffle undoes it)."""
    g = _gen(2)
    x = torch.randn(5, 3, 8, 6, generator=g, dtype=torch.float64)
    y = torch.randn(5, 3, 8, 6, generator=g, dtype=torch.float64)
    for layer in (Flatten(), InvertibleDownsampling(2)):
        fx, fy = layer(x), layer(y)
        assert fx.numel() == x.numel()
        torch.testing.assert_close(fx.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1), rtol=1e-14, atol=0)
        torch.testing.assert_close((fx - fy).flatten(1).norm(dim=1), (x - y).flatten(1).norm(dim=1), rtol=1e-14, atol=0)
        assert sorted(fx.flatten().tolist()) == sorted(x.flatten().tolist())
        assert layer.lipschitz_bound() == 1.0
        assert exact_norm(impulse_matrix(layer, (3, 8, 6))) == pytest.approx(1.0, abs=1e-12)
    ds = InvertibleDownsampling(2)
    assert ds(x).shape == (5, 12, 4, 3)
    assert torch.equal(F.pixel_shuffle(ds(x), 2), x)
    with pytest.raises(ValueError):
        InvertibleDownsampling(4)(x)  # 6 is not divisible by 4


# --------------------------------------------------------------------------- Normalize
def test_normalize_bound_is_inverse_min_std():
    """Normalize's bound is >= 1/min(std) as an exact rational (std as stored in float32) and equals
    the spectral norm of its Jacobian (computed by autograd) to 1e-7."""
    std = [0.2470, 0.2435, 0.2616]
    layer = Normalize([0.4914, 0.4822, 0.4465], std)
    s_min = min(float(torch.tensor(s, dtype=torch.float32)) for s in std)
    b = layer.lipschitz_bound()
    assert Fraction(b) >= 1 / Fraction(s_min)
    assert b <= (1 / s_min) * (1 + 1e-15)
    x = torch.randn(1, 3, 2, 2, generator=_gen(3))
    jac = torch.autograd.functional.jacobian(lambda t: layer(t), x).reshape(12, 12)
    j_norm = exact_norm(jac)
    assert b >= j_norm * (1 - 1e-7)  # float32 division in the forward
    assert b == pytest.approx(j_norm, rel=1e-6)
    assert float(layer.lipschitz()) == pytest.approx(1 / s_min, rel=1e-6)
    for bad in ([0.1, 0.0, 0.2], [0.1, -0.2, 0.3], [0.1, math.nan, 0.2], [0.1, math.inf, 0.2]):
        with pytest.raises(ValueError):
            Normalize([0.0, 0.0, 0.0], bad)


# --------------------------------------------------------------------------- LLN head
def test_lln_head_rows_are_unit_norm_in_forward():
    """LLNLinear multiplies by w_i/||w_i|| (checked against an independent formula); its
    head_weight rows have unit norm; its bound covers the normalised matrix (SVD)."""
    g = _gen(4)
    head = LLNLinear(7, 5)
    with torch.no_grad():
        head.weight.copy_(torch.randn(5, 7, generator=g) * torch.tensor([0.01, 1.0, 3.0, 10.0, 0.5])[:, None])
        head.bias.copy_(torch.randn(5, generator=g))
    x = torch.randn(9, 7, generator=g)
    w = head.weight.detach().double()
    ref = x.double() @ (w / w.norm(dim=1, keepdim=True)).t() + head.bias.detach().double()
    torch.testing.assert_close(head(x).double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.head_weight().detach().norm(dim=1), torch.ones(5), rtol=1e-6, atol=0)
    exact = exact_norm(impulse_matrix(head, (7,)))
    assert exact <= head.lipschitz_bound() <= 1.0001 * exact


# --------------------------------------------------------------------------- LipConv2d bookkeeping
def test_lipconv_learns_input_size_lazily_and_refuses_others():
    """Without input_size the bound is unavailable; the first forward fixes the size; any other size
    is refused (the bound depends on it); a layer built with input_size refuses others at once."""
    conv = LipConv2d(2, 4, 3, stride=2)
    assert conv.input_hw is None
    with pytest.raises(RuntimeError):
        conv.lipschitz_bound()
    conv(torch.randn(3, 2, 9, 7))
    assert conv.input_hw == (9, 7)
    assert conv.power_v.shape == (1, 2, 9, 7)
    exact = exact_norm(impulse_matrix(conv, (2, 9, 7)))
    assert exact <= conv.lipschitz_bound() <= 1.05 * exact
    for bad in [(9, 8), (7, 9), (10, 7)]:
        with pytest.raises(ValueError):
            conv(torch.randn(1, 2, *bad))
    with pytest.raises(ValueError):
        conv(torch.randn(1, 3, 9, 7))  # wrong channel count
    fixed = LipConv2d(2, 4, 3, input_size=(8, 8))
    with pytest.raises(ValueError):
        fixed(torch.randn(1, 2, 9, 9))
    with pytest.raises(ValueError):
        LipConv2d(2, 4, 5, padding="valid", input_size=(3, 3))  # no output pixel


def test_lipconv_state_dict_round_trip():
    """state_dict of a set-up layer loads into a fresh layer built without input_size: input size,
    power_v shape/values, weights, bound and outputs all survive."""
    g = _gen(5)
    src = LipConv2d(3, 6, 4, stride=2, padding=1, input_size=(11, 10))
    with torch.no_grad():
        src.weight.copy_(torch.randn(src.weight.shape, generator=g))
        src.bias.copy_(torch.randn(6, generator=g))
    src.train()
    src.lipschitz()  # move the power iterate
    fresh = LipConv2d(3, 6, 4, stride=2, padding=1)
    fresh.load_state_dict(src.state_dict())
    assert fresh.input_hw == (11, 10)
    assert fresh.power_v.shape == src.power_v.shape == (1, 3, 11, 10)
    assert torch.equal(fresh.power_v, src.power_v)
    assert fresh.lipschitz_bound() == src.lipschitz_bound()
    fresh.eval(), src.eval()
    assert float(fresh.lipschitz().detach()) == float(src.lipschitz().detach())
    x = torch.randn(2, 3, 11, 10, generator=g)
    assert torch.equal(fresh(x), src(x))
    with pytest.raises(ValueError):
        fresh(torch.randn(1, 3, 12, 10))


# --------------------------------------------------------------------------- refusal of unknown modules
class _Doubler(nn.Module):
    def forward(self, x):
        return 2 * x


class _SneakyReLU(nn.ReLU):
    """Subclass of a known 1-Lipschitz module with a different forward: must not inherit '1'."""

    def forward(self, x):
        return 3 * super().forward(x)


@pytest.mark.parametrize(
    "make", [lambda: nn.Conv2d(2, 2, 3), lambda: nn.Linear(4, 4), lambda: nn.Tanh(), _Doubler, _SneakyReLU],
    ids=["Conv2d", "Linear", "Tanh", "custom", "ReLU-subclass"],
)
def test_unbounded_modules_are_refused(make):
    """lipschitz_bound_of raises UnboundedLayerError for modules without a proven bound (alone, in
    gloronet/torch Sequential); a GloroNet containing one refuses lipschitz_constant() and
    certify() (no silent default of 1)."""
    mod = make()
    for m in (mod, Sequential(Flatten(), mod), nn.Sequential(nn.Identity(), mod)):
        with pytest.raises(gloronet.UnboundedLayerError):
            lipschitz_bound_of(m)
    if isinstance(mod, nn.Conv2d):
        body = Sequential(mod, Flatten())
        head = LipLinear(2 * 2 * 2, 3)
        x = torch.randn(2, 2, 4, 4)
    else:
        body = Sequential(Flatten(), LipLinear(4, 4), mod)
        head = LipLinear(4, 3)
        x = torch.randn(2, 4)
    net = gloronet.GloroNet(body, head, 0.1)
    with pytest.raises(gloronet.UnboundedLayerError):
        net.lipschitz_constant()
    with pytest.raises(gloronet.UnboundedLayerError):
        net.certify(x)
    with pytest.raises(gloronet.UnboundedLayerError):
        lipschitz_estimate_of(body)


def test_known_stateless_modules_have_bound_one():
    """nn.Identity, nn.ReLU, nn.Flatten are accepted with bound exactly 1 (1-Lipschitz; ReLU on
    random pairs), also nested in torch and gloronet Sequentials (bound = product, rounded up)."""
    for m in (nn.Identity(), nn.ReLU(), nn.Flatten()):
        assert lipschitz_bound_of(m) == 1.0
    x, y = torch.randn(100, 8, generator=_gen(6)), torch.randn(100, 8, generator=_gen(7))
    assert ((F.relu(x) - F.relu(y)).norm(dim=1) <= (x - y).norm(dim=1)).all()
    lin = LipLinear(8, 8)
    with torch.no_grad():
        lin.weight.mul_(3.0)
    seq = nn.Sequential(nn.Identity(), lin, nn.ReLU(), nn.Flatten())
    b = lipschitz_bound_of(seq)
    exact = exact_norm(lin.weight.detach().double())
    assert exact <= b <= exact * (1 + 1e-6)  # Gram rounding allowance ~ GRAM_SLACK * rank
    seq2 = Sequential(lin, nn.ReLU(), lin)
    b2 = lipschitz_bound_of(seq2)
    lb = Fraction(lin.lipschitz_bound())
    assert Fraction(b2) >= lb * lb


def test_sequential_bound_is_rounded_up_product():
    """gloronet.nn.Sequential's bound is >= the exact rational product of its layers' bounds and
    >= the exact norm of the composed linear map."""
    g = _gen(8)
    layers = [LipLinear(6, 5), LipLinear(5, 7), LipLinear(7, 4)]
    for layer in layers:
        with torch.no_grad():
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.7)
    seq = Sequential(*layers)
    prod = Fraction(1)
    for layer in layers:
        prod *= Fraction(layer.lipschitz_bound())
    b = seq.lipschitz_bound()
    assert Fraction(b) >= prod
    assert b <= float(prod) * (1 + 1e-14)
    assert b >= exact_norm(impulse_matrix(seq, (6,)))
