"""BRO convolution (Lai et al., ICML 2025; issue 20): forward against a direct float64 evaluation
of the paper's per-frequency block reflector, the bound against the exact largest singular value of
the operator that runs (the rounded float32 circular kernel), the rounding inside its error model,
certificates under the rounding-search attack, no stale kernel after an edit, the registered net.

Oracles are independent of the layer's code paths: DFTs as explicit ``exp`` matrices (no
``torch.fft``), reflectors with an explicit inverse, the circular operator by index arithmetic
``A[(o,p),(i,q)] = w[o, i, (q − p) mod N]``, norms by full float64 SVD.
"""
from __future__ import annotations

import math

import pytest
import torch

import gloronet
from conftest import exact_norm
from gloronet.nn import AOLConv2d, BROConv2d, BROLinear, Flatten, LipLinear, MinMax, Sequential
from test_aol_sll import attack_briefly_trained
from test_state import _uncached

pytestmark = pytest.mark.usefixtures("single_thread")
D64, C128 = torch.float64, torch.complex128


def _dft(n: int) -> torch.Tensor:
    k = torch.arange(n, dtype=D64)
    return torch.polar(torch.ones(n, n, dtype=D64), -2 * math.pi * torch.outer(k, k) / n)


def _bro_conv_ref(v: torch.Tensor, hw, out: int, inp: int, x: torch.Tensor) -> torch.Tensor:
    """The paper's Eq. (BRO conv) in float64: per frequency ``ω`` of the ``H × W`` DFT,
    ``Ŵ(ω) = I − 2V̂(V̂ᴴV̂ + εI)⁻¹V̂ᴴ`` (ε = 10⁻⁵·mean diag, per frequency, as ntuaislab/BRONet),
    ``ŷ(ω) = Ŵ(ω)[:out, :in] x̂(ω)``, ``y = IDFT(ŷ)``."""
    h, w = hw
    fh, fw = _dft(h), _dft(w)
    vp = torch.zeros(*v.shape[:2], h, w, dtype=D64)
    vp[..., : v.shape[2], : v.shape[3]] = v.to(D64)
    vf = torch.einsum("ap,orpq,bq->abor", fh, vp.to(C128), fw)
    xf = torch.einsum("ap,nipq,bq->abin", fh, x.to(C128), fw)
    yf = torch.zeros(h, w, out, x.shape[0], dtype=C128)
    for a in range(h):
        for b in range(w):
            vv = vf[a, b]
            s = vv.conj().t() @ vv
            s = s + 1e-5 * s.diagonal().real.mean() * torch.eye(s.shape[0], dtype=C128)
            ww = torch.eye(vv.shape[0], dtype=C128) - 2 * vv @ torch.linalg.inv(s) @ vv.conj().t()
            yf[a, b] = ww[:out, :inp] @ xf[a, b]
    y = torch.einsum("ap,abon,bq->nopq", fh.conj(), yf, fw.conj()) / (h * w)
    assert float(y.imag.abs().max()) < 1e-9
    return y.real


def _circular_matrix(kernel: torch.Tensor) -> torch.Tensor:
    """(out·H·W, in·H·W) float64 matrix of ``y[o, p] = Σ_{i,v} w[o, i, v] x[i, (p + v) mod N]``."""
    co, ci, h, w = kernel.shape
    k = kernel.to(D64)
    p1, p2 = torch.arange(h), torch.arange(w)
    d1 = (p1[None, :] - p1[:, None]) % h  # [p, q] -> (q − p) mod H
    d2 = (p2[None, :] - p2[:, None]) % w
    a = k[:, :, d1[:, None, :, None], d2[None, :, None, :]]  # (co, ci, p1, p2, q1, q2)
    return a.permute(0, 2, 3, 1, 4, 5).reshape(co * h * w, ci * h * w)


def _randomised(layer: BROConv2d, scale: float = 0.5, seed: int = 0) -> BROConv2d:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.reflector.add_(scale * torch.randn(layer.reflector.shape, generator=gen))
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen))
    return layer


SHAPES = [  # in, out, (H, W), k, rank
    (4, 4, (6, 6), 3, None),
    (3, 5, (5, 7), 3, 2),
    (6, 4, (6, 5), 2, None),
    (2, 2, (4, 4), 1, 1),
]
IDS = ["square", "wider", "narrower-even-k", "1x1"]


@pytest.mark.parametrize("inp,out,hw,k,rank", SHAPES, ids=IDS)
def test_forward_matches_the_per_frequency_reflector(inp, out, hw, k, rank):
    """Training (differentiable FFTs) and eval (materialised circular kernel) both equal the paper's
    equations evaluated in float64 on the same ``V``."""
    torch.manual_seed(1)
    layer = _randomised(BROConv2d(inp, out, hw, k, rank=rank, init="orthogonal"), seed=2)
    x = torch.randn(3, inp, *hw)
    ref = _bro_conv_ref(layer.reflector.detach(), hw, out, inp, x) + layer.bias.detach().to(D64).view(1, -1, 1, 1)
    for mode in (True, False):
        layer.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(layer(x).to(D64), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("inp,out,hw,k,rank", SHAPES, ids=IDS)
@pytest.mark.parametrize("init", ["identity", "orthogonal"])
def test_bound_covers_the_applied_kernel_and_is_tight_at_init(inp, out, hw, k, rank, init):
    torch.manual_seed(3)
    layer = BROConv2d(inp, out, hw, k, rank=rank, init=init).eval()
    a = _circular_matrix(layer.applied_kernel())
    x = torch.randn(2, inp, *hw)
    torch.testing.assert_close(layer(x).to(D64).flatten(1), x.to(D64).flatten(1) @ a.t(), rtol=1e-5, atol=1e-5)
    exact = exact_norm(a)
    bound = layer.lipschitz_bound()
    assert exact <= bound <= 1.05 * exact
    _randomised(layer, scale=1.0, seed=4)  # a trained-looking V: still covered
    exact = exact_norm(_circular_matrix(layer.applied_kernel()))
    assert exact <= layer.lipschitz_bound() <= 1.05 * exact


def _interior(a: torch.Tensor, channels: tuple[int, int], hw, p: int) -> torch.Tensor:
    """``crop ∘ A ∘ pad``: the rows and columns of the canvas operator ``a`` at the pixels at least
    ``p`` from the canvas border (index arithmetic, as :func:`_circular_matrix`)."""
    h, w = hw
    keep = torch.zeros(h + 2 * p, w + 2 * p, dtype=torch.bool)
    keep[p:p + h, p:p + w] = True
    rows, cols = keep.flatten().repeat(channels[0]), keep.flatten().repeat(channels[1])
    return a[rows][:, cols]


PADDED = [(4, 4, (4, 4), 3, None, 1), (3, 5, (5, 3), 3, 2, 1), (2, 3, (3, 3), 2, 1, 2)]  # in, out, hw, k, rank, p


@pytest.mark.parametrize("inp,out,hw,k,rank,p", PADDED)
def test_zero_padded_forward_matches_the_reference_and_is_bounded(inp, out, hw, k, rank, p):
    """``padding=p`` (ntuaislab/BRONet ``zero_padding``): zero-pad by ``p``, the per-frequency
    reflector on the padded canvas, crop — training and eval against the float64 equations; the
    eval map is ``crop ∘ C ∘ pad`` of the applied kernel, its exact norm within the bound (tight
    at the identity init)."""
    torch.manual_seed(21)
    layer = BROConv2d(inp, out, hw, k, rank=rank, padding=p).eval()
    canvas = (hw[0] + 2 * p, hw[1] + 2 * p)
    exact = exact_norm(_interior(_circular_matrix(layer.applied_kernel()), (out, inp), hw, p))
    assert exact <= layer.lipschitz_bound() <= 1.05 * exact
    _randomised(layer, seed=22)
    x = torch.randn(3, inp, *hw)
    xz = torch.nn.functional.pad(x, (p, p, p, p))
    ref = _bro_conv_ref(layer.reflector.detach(), canvas, out, inp, xz)[:, :, p:p + hw[0], p:p + hw[1]]
    ref = ref + layer.bias.detach().to(D64).view(1, -1, 1, 1)
    for mode in (True, False):
        layer.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(layer(x).to(D64), ref, rtol=1e-5, atol=1e-5)
    a = _interior(_circular_matrix(layer.applied_kernel()), (out, inp), hw, p)
    b = layer.bias.detach().to(D64).repeat_interleave(hw[0] * hw[1])
    with torch.no_grad():
        torch.testing.assert_close(layer(x).to(D64).flatten(1), x.to(D64).flatten(1) @ a.t() + b, rtol=1e-5, atol=1e-5)
    assert exact_norm(a) <= layer.lipschitz_bound()


def test_the_bound_is_of_the_rounded_kernel():
    """The float32 kernel's operator exceeds 1 (rounding): a bound of the exact reflector
    ("1 by construction") or of the float64 kernel would not cover what runs."""
    torch.manual_seed(5)
    layer = _randomised(BROConv2d(4, 4, (6, 6), 3, init="orthogonal"), seed=6).eval()
    exact32 = exact_norm(_circular_matrix(layer.applied_kernel()))
    exact64 = exact_norm(_circular_matrix(layer.double().applied_kernel()))
    layer.float()
    assert exact32 > 1.0 and exact32 > exact64
    assert layer.lipschitz_bound() >= exact32


def test_one_channel_3x3_map_sums_taps_where_winograd_would_run(monkeypatch):
    """On builds that send 1-channel 3×3 convolutions to Winograd the layer sums taps itself; the
    map is the same circular operator."""
    torch.manual_seed(16)
    layer = _randomised(BROConv2d(1, 2, (3, 3), init="orthogonal"), seed=17).eval()
    x = torch.randn(4, 1, 3, 3)
    monkeypatch.setattr(gloronet.kernels, "winograd_depthwise_build", lambda arch=None: True)
    calls = []
    taps = gloronet.nn.depthwise.conv2d_taps
    monkeypatch.setattr(gloronet.nn.depthwise, "conv2d_taps", lambda *a: calls.append(1) or taps(*a))
    expected = x.to(D64).flatten(1) @ _circular_matrix(layer.applied_kernel()).t()
    expected += layer.bias.detach().to(D64).repeat_interleave(9)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).to(D64).flatten(1), expected, rtol=1e-5, atol=1e-5)
    assert calls == [1]


@pytest.mark.parametrize("p", [0, 1])
def test_rounding_within_its_error_model(p):
    """``‖ŷ − y‖ ≤ rel·‖x‖ + abs``, ``y`` the float64 circular convolution with the same kernel
    (``crop ∘ C ∘ pad`` with padding)."""
    torch.manual_seed(7)
    layer = _randomised(BROConv2d(5, 5, (6, 6), 3, init="orthogonal", padding=p), seed=8).eval()
    model = layer.error_model((5, 6, 6), torch.float32, layer.lipschitz_bound())
    a = _interior(_circular_matrix(layer.applied_kernel()), (5, 5), (6, 6), p)
    b = layer.bias.detach().to(D64).repeat_interleave(36)
    x = torch.randn(64, 5, 6, 6) * 10
    xf = x.to(D64).flatten(1)
    with torch.no_grad():
        err = (layer(x).to(D64).flatten(1) - (xf @ a.t() + b)).norm(dim=1)
    allowed = model.rel * xf.norm(dim=1) + model.abs
    assert bool((err <= allowed).all()) and float((err / allowed).max()) > 1e-3  # sound, not vacuous


def test_training_path_is_differentiable_and_refuses_other_sizes():
    layer = BROConv2d(3, 3, (5, 5), init="orthogonal")
    layer(torch.randn(2, 3, 5, 5)).square().sum().backward()
    assert layer.reflector.grad is not None and float(layer.reflector.grad.abs().max()) > 0
    with pytest.raises(ValueError, match="5, 5"):
        layer(torch.randn(2, 3, 6, 6))


def _bro_net(seed: int) -> gloronet.GloroNet:
    torch.manual_seed(seed)
    body = Sequential(
        BROConv2d(2, 4, (6, 6), init="orthogonal"),
        MinMax(),
        AOLConv2d(4, 4, 3, stride=2, input_size=(6, 6)),
        MinMax(),
        BROConv2d(4, 4, (3, 3)),
        MinMax(),
        Flatten(),
        BROLinear(36, 12),
        MinMax(),
    )
    return gloronet.GloroNet(body, LipLinear(12, 3), epsilon=0.05).eval()


def test_certified_points_survive_the_rounding_search(monkeypatch):
    """No certified point of a BRO net flips; the BRO conv bound understated 100x does."""
    attack_briefly_trained(_bro_net(9), lambda: monkeypatch.setattr(BROConv2d, "lipschitz_bound", lambda self: 0.01))


def test_in_place_edits_and_accessor_copies():
    net = _bro_net(11)
    layer = net.body[0]
    x = torch.randn(6, 2, 6, 6, generator=torch.Generator().manual_seed(12))
    before, out = net.lipschitz_bound(), layer(x)
    net.certify(x)
    layer.applied_kernel().mul_(5.0)  # a copy: the map and bound stay
    assert torch.equal(layer(x), out) and net.lipschitz_bound() == before
    with torch.no_grad():
        layer.reflector[0].mul_(3.0).add_(0.5)
    fresh = _uncached(net)
    assert torch.equal(net(x), fresh(x)) and not torch.equal(layer(x), out)
    assert net.lipschitz_bound() == fresh.lipschitz_bound() != before
    assert torch.equal(net.certify(x).radius, fresh.certify(x).radius)


def test_registered_bro_net_builds_and_certifies():
    torch.manual_seed(14)
    net = gloronet.models.create("bro-mnist", (1, 28, 28), 10, 1.58).eval()
    assert {BROConv2d, BROLinear} <= {type(m) for m in net.modules()}
    x = torch.rand(2, 1, 28, 28)
    assert net(x).shape == (2, 10)
    assert 0 < net.lipschitz_bound() < math.inf
    assert bool(torch.isfinite(net.certify(x).radius).all())
