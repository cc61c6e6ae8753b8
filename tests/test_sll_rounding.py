"""The SLL blocks' rounding-error model in scaled coordinates (:mod:`gloronet.nn.sll`, "Rounding").

1. Soundness: the float32 eval-mode output against a float64 evaluation of the same map (a float64
   deep copy, the same ``c``), ``‖φ̂(x) − φ(x)‖ ≤ rel·‖x‖ + abs`` for every example — under
   adversarial scale spreads (``c`` from 1e-6 to 1e3, a zero scale, tiny weight rows), random,
   large-norm, ReLU-near-tie, same-sign (no cancellation, biased rounding) and subnormal inputs,
   with gradual underflow and with flush-to-zero / denormals-are-zero.
2. Tightness: where ``max c·‖W‖²`` is large the scaled model is >= 10x tighter than the chain
   model, on a freshly initialised and on a briefly trained block.
"""
from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch

from gloronet import fp
from gloronet.nn import SLLConv2d, SLLLinear
from test_fp_attacks import _gen, _round_towards

pytestmark = pytest.mark.usefixtures("single_thread")
D64 = torch.float64


class _FixedLinear(SLLLinear):
    """An SLL block whose scales are a given vector (a buffer: ``.double()`` casts it exactly)."""

    def __init__(self, c: torch.Tensor, features: int, bias: bool = True):
        super().__init__(features, inner=c.numel(), bias=bias)
        self.register_buffer("fixed_c", c.clone())

    def compute_scales(self):
        return self.fixed_c


class _FixedConv(SLLConv2d):
    def __init__(self, c: torch.Tensor, channels: int, hw, kernel_size: int = 3, bias: bool = True):
        super().__init__(channels, hw, inner=c.numel(), kernel_size=kernel_size, bias=bias)
        self.register_buffer("fixed_c", c.clone())

    def compute_scales(self):
        return self.fixed_c


def _spread(n: int, gen: torch.Generator, zero: bool = True) -> torch.Tensor:
    """``n`` scales log-uniform in [1e-6, 1e3], the extremes included, one of them 0."""
    c = 10.0 ** (torch.rand(n, generator=gen, dtype=D64) * 9 - 6)
    c[0], c[1] = 1e-6, 1e3
    if zero:
        c[2] = 0.0
    return c.to(torch.float32)


def _adversarial_weights(layer, gen: torch.Generator) -> None:
    with torch.no_grad():
        w = layer.weight
        w.copy_(torch.randn(w.shape, generator=gen))
        w[3].mul_(1e-20)  # tiny rows
        w[4].mul_(1e-30)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen) * 3)
        layer.bias[5] = 1e4  # a large bias: û's rounding is that of the bias


def _build(kind: str, gen: torch.Generator):
    if kind == "dense":
        layer = _FixedLinear(_spread(12, gen), 40)
    elif kind == "dense-wide":  # long first sum (depth 80), short second one
        layer = _FixedLinear(_spread(8, gen), 1024)
    elif kind == "conv":
        layer = _FixedConv(_spread(8, gen), 3, (6, 5))
    else:  # "conv-k5"
        layer = _FixedConv(_spread(6, gen), 4, (5, 5), kernel_size=5)
    _adversarial_weights(layer, gen)
    return layer.eval()


def _pre_activation64(layer, x: torch.Tensor) -> torch.Tensor:
    """``u = Wx + b`` of the float64 copy's map, per inner coordinate (float64)."""
    twin = copy.deepcopy(layer).double()
    w, b = twin.weight.detach(), twin.bias.detach()
    if isinstance(layer, SLLLinear):
        return x.to(D64) @ w.t() + b
    return torch.nn.functional.conv2d(x.to(D64), w, b, padding=layer.kernel_size // 2)


def _inputs(layer, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Named batches: random, large-norm, near ReLU ties, same-sign products, subnormal."""
    shape = (layer.features,) if isinstance(layer, SLLLinear) else (layer.channels, *layer.input_hw)
    x = torch.randn(48, *shape, generator=gen)
    out = {"random": x, "large": x * 1e6, "huge": x[:8] * 1e25}
    # near ties: scale each x so that one pre-activation u_k(t·x) = t·(Wx)_k + b_k crosses 0,
    # then the float32 neighbours of that point (rounded towards the tie and away from it)
    wx = _pre_activation64(layer, x) - _pre_activation64(layer, torch.zeros_like(x[:1]))
    b = layer.bias.detach().to(D64)
    flat = wx.flatten(2) if wx.dim() == 4 else wx.unsqueeze(-1)  # (B, inner, positions)
    ties = []
    for k in range(b.numel()):
        t = (-b[k] / flat[:, k, 0]).clamp(-1e8, 1e8)  # position 0 of channel k
        xt = t.view(-1, *[1] * len(shape)) * x.to(D64)
        ties += [_round_towards(xt, torch.zeros_like(x), torch.float32), xt.to(torch.float32)]
    out["ties"] = torch.cat(ties)
    if isinstance(layer, SLLLinear):  # every product of one row positive: partial sums grow, rounding biased
        w = layer.weight.detach()
        mags = torch.rand(16, *shape, generator=gen) + 0.5
        out["same-sign"] = torch.cat([mags * torch.sign(w[k]) for k in range(w.shape[0])]) * 1e3
    tiny = torch.finfo(torch.float32).tiny
    out["subnormal"] = torch.rand(32, *shape, generator=gen) * tiny * torch.sign(x[:32])
    out["near-normal"] = x * (4 * tiny)  # products and sums underflow
    return out


@contextlib.contextmanager
def _flush_denormal(on: bool):
    if on and not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _worst_ratio(layer, batches: dict[str, torch.Tensor], ftz: bool = False) -> dict[str, float]:
    """``max ‖φ̂(x) − φ(x)‖ / (rel‖x‖ + abs)`` per batch; ``φ`` = the float64 copy, whose own error
    (its float64 model, 2⁻²⁹ of the float32 one) is added to the allowance."""
    shape = tuple(next(iter(batches.values())).shape[1:])
    model = layer.error_model(shape, torch.float32, layer.lipschitz_bound())
    twin = copy.deepcopy(layer).double()
    m64 = twin.error_model(shape, D64, twin.lipschitz_bound())
    worst = {}
    for name, x in batches.items():
        with torch.no_grad():
            ref = twin(x.to(D64)).flatten(1)
            with _flush_denormal(ftz):
                got = layer(x).to(D64).flatten(1)
        assert torch.isfinite(got).all(), name
        norm = x.to(D64).flatten(1).norm(dim=1)
        allowed = (model.rel + m64.rel) * norm + model.abs + m64.abs
        worst[name] = float(((got - ref).norm(dim=1) / allowed).max())
    return worst


KINDS = ["dense", "dense-wide", "conv", "conv-k5"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ftz", [False, True], ids=["gradual", "ftz"])
def test_scaled_model_bounds_float32_rounding(kind, ftz):
    gen = _gen(KINDS.index(kind))
    layer = _build(kind, gen)
    _, scaled = layer.error_models(_shape(layer), torch.float32, layer.lipschitz_bound())
    assert scaled is not None and layer.error_model(_shape(layer), torch.float32, layer.lipschitz_bound()) == scaled
    worst = _worst_ratio(layer, _inputs(layer, gen), ftz)
    assert max(worst.values()) <= 1.0, worst
    assert max(worst.values()) > 1e-3, worst  # not vacuous


def _tiny_blocks(gen: torch.Generator, features: int, inner: int, n: int = 8):
    """``n`` small blocks (scales 1e-3..1e3, weights and biases ~3): few roundings per output,
    so random inputs come close to the worst case."""
    for _ in range(n):
        layer = _FixedLinear((10.0 ** (torch.rand(inner, generator=gen, dtype=D64) * 6 - 3)).float(), features)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(inner, features, generator=gen) * 3)
            layer.bias.copy_(torch.randn(inner, generator=gen) * 3)
        yield layer.eval()


def _aligned(layer, gen: torch.Generator, n: int = 100_000) -> torch.Tensor:
    """Inputs whose products ``W_kt x_t`` all have the sign of ``b_k`` (a random row ``k``), sizes
    over 4 decades around it: no cancellation, so every rounding is relative to ``|u_k|``."""
    w, b = layer.weight.detach().to(D64), layer.bias.detach().to(D64)
    k = torch.randint(0, w.shape[0], (n,), generator=gen)
    mag = 10 ** (torch.rand(n, 1, generator=gen, dtype=D64) * 4 - 2)
    sign = torch.sign(w[k]) * torch.sign(b[k])[:, None]
    return (sign * mag * (torch.rand(n, w.shape[1], generator=gen, dtype=D64) + 0.5)).float()


@pytest.mark.parametrize("features,inner", [(1, 1), (2, 1), (1, 2)])
def test_scaled_model_is_nearly_attained_by_a_rounding_search(features, inner):
    """On blocks of 1-2 units a search over 10⁵ aligned inputs reaches > 40% of the bound (85% for
    1 × 1): the model is sound with little slack there, so dropping a term shows (e.g. the first
    sum's ``γ₁`` terms: ratio 1.23)."""
    gen = _gen(100 + 10 * features + inner)
    worst = max(_worst_ratio(layer, {"search": _aligned(layer, gen)})["search"]
                for layer in _tiny_blocks(gen, features, inner))
    assert 0.4 < worst <= 1.0


@pytest.mark.parametrize("features,inner", [(1, 1), (4, 1), (4, 3)])
def test_flushed_subnormals_scale_with_the_largest_scale(features, inner):
    """Flush-to-zero / denormals-are-zero: subnormal inputs read as 0, so ``û = 0`` while
    ``u = Wx ≈ λ‖w‖₁``; the branch then misses ``c·W_kᵀ(W_k x)``, up to ``c‖w‖₁‖w‖₂λ``: the first
    sum's flushed-operand terms in scaled coordinates carry ``s₊ = max √c`` (without it: 15-23x
    over the bound). Gradual underflow errs far less."""
    gen = _gen(7 * features + inner)
    layer = _FixedLinear(torch.full((inner,), 1e3), features, bias=False)
    with torch.no_grad():
        sign = torch.sign(torch.randn(inner, 1, generator=gen))
        layer.weight.copy_(sign * (30 + torch.rand(inner, features, generator=gen)))
    layer.eval()
    w, tiny = layer.weight.detach(), torch.finfo(torch.float32).tiny
    x = torch.cat([torch.sign(w[k]) * torch.rand(2000, features, generator=gen) * tiny for k in range(inner)])
    assert 0.5 < _worst_ratio(layer, {"subnormal": x}, ftz=True)["subnormal"] <= 1.0
    assert _worst_ratio(layer, {"subnormal": x}, ftz=False)["subnormal"] <= 1e-5


# ------------------------------------------------------------------------------------ (2) tightness
def _shape(layer) -> tuple[int, ...]:
    return (layer.features,) if isinstance(layer, SLLLinear) else (layer.channels, *layer.input_hw)


def _spread_out(layer) -> None:
    """A short first row with a large ``q``: ``T₀ ≈ ‖W₀‖²``, so ``c₀ = 2/T₀`` is large while
    ``‖W‖`` is not — ``max c·‖W‖²`` far above 10, though ``T ⪰ WWᵀ`` (the block is 1-Lipschitz)."""
    with torch.no_grad():
        layer.weight[0].mul_(0.05)
        layer.q[0] = 8.0


def _models(layer):
    layer.eval()
    chain, scaled = layer.error_models(_shape(layer), torch.float32, layer.lipschitz_bound())
    spread = float(layer.applied_scales().max()) * layer._norm_w() ** 2
    return chain, scaled, spread


def _train_a_few_steps(layer, gen: torch.Generator, steps: int = 20) -> None:
    """Adam on a random regression target (the block is trained through its training path)."""
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    layer.train()
    x = torch.randn(64, *_shape(layer), generator=gen)
    target = torch.randn(64, *_shape(layer), generator=gen)
    for _ in range(steps):
        loss = (layer(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer.eval()


@pytest.mark.parametrize("make", [lambda: SLLLinear(32, 24), lambda: SLLConv2d(4, (8, 8), inner=6)],
                         ids=["dense", "conv"])
def test_scaled_model_is_ten_times_tighter_where_max_c_times_norm_squared_is_large(make):
    torch.manual_seed(11)
    layer = make()
    with torch.no_grad():
        layer.bias.normal_()
    _spread_out(layer)
    for stage in ("fresh", "trained"):
        if stage == "trained":
            _train_a_few_steps(layer, _gen(12))
        chain, scaled, spread = _models(layer)
        assert spread > 10, (stage, spread)
        assert layer.lipschitz_bound() == 1.0  # the block is still provably 1-Lipschitz
        assert scaled is not None and 10 * scaled.rel <= chain.rel, (stage, scaled.rel, chain.rel)
        assert scaled.abs <= chain.abs and scaled.offset <= chain.offset
        assert layer.error_model(_shape(layer), torch.float32, 1.0) == scaled
        # its peaks are the chain branch's (actual units), never larger than the chain's
        assert scaled.peak_rel <= chain.peak_rel and scaled.peak_abs <= chain.peak_abs


def test_the_scaled_terms_follow_edits_of_the_weights_and_scales():
    """The cached ``N``, ``‖|B|‖``, ``s₊`` ... are keyed on the block's state: an in-place edit of
    ``W`` or of ``c`` gives a new model, never a stale one."""
    gen = _gen(5)
    layer = _FixedLinear(torch.tensor([1.0, 2.0, 4.0]), 6).eval()
    before = layer.error_model((6,), torch.float32, layer.lipschitz_bound())
    with torch.no_grad():
        layer.fixed_c.mul_(100)
    bigger_c = layer.error_model((6,), torch.float32, layer.lipschitz_bound())
    assert bigger_c.rel > 10 * before.rel
    with torch.no_grad():
        layer.weight.copy_(torch.randn(3, 6, generator=gen) * 10)
    assert layer.error_model((6,), torch.float32, layer.lipschitz_bound()).rel > bigger_c.rel


def test_without_a_proven_scaled_model_the_chain_model_is_used():
    """Non-finite or negative ``c`` (no bound at all) and a subnormal ``c`` (a DAZ unit reads it as
    0: a relative error in scaled coordinates) fall back to the chain model; all-zero ``c`` (the
    branch is 0) does not need to."""
    for c, applies in (([1.0, math.inf], False), ([1.0, -1.0], False), ([1.0, 1e-40], False), ([0.0, 0.0], True)):
        layer = _FixedLinear(torch.tensor(c), 4).eval()
        chain, scaled = layer.error_models((4,), torch.float32, 1.0)
        assert (scaled is not None) == applies, c
        assert layer.error_model((4,), torch.float32, 1.0) == (layer._pick(chain, scaled) if applies else chain), c



def test_subnormal_scales_read_as_zero_stay_inside_the_scale_model():
    """A subnormal ``c`` (the scaled model refuses it: the chain then runs :func:`gloronet.fp.scale_model`)
    read as 0 by a denormals-are-zero unit makes ``fl(c·a) = 0``: an error of ``|c·a|``, relative
    to ``a``, that the model must allow."""
    gen = _gen(99)
    c = torch.full((6,), 1e-39, dtype=torch.float32)  # subnormal in float32 (λ ≈ 1.18e-38)
    layer = _FixedLinear(c, 5).eval()
    assert layer.error_models((5,), torch.float32, layer.lipschitz_bound())[1] is None
    a = torch.rand(64, 6, generator=gen) * 1e30
    model = fp.scale_model(float(c.max()), 6, torch.float32)
    with _flush_denormal(True):
        got = (a * c).to(D64)
    assert bool((got == 0).all())  # the scales were read as 0
    err = (got - a.to(D64) * c.to(D64)).norm(dim=1)
    allowed = model.rel * a.to(D64).norm(dim=1) + model.abs
    assert bool((err <= allowed).all()) and float((err / allowed).max()) > 0.05
