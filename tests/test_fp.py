"""Floating-point error bounds: γ_n, the rounding model against worst-order summation, the
chunked eval kernels' depth claim, |W| norms against exact SVDs, every layer's error model
against a float64 evaluation of the same exact map, and the kernel settings certify enforces.

Oracles: float64 evaluations built here from the layers' applied float32 tensors (widened, so the
same exact map), full SVDs, and an explicit worst-order sequential float32 summation.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gloronet
from conftest import exact_norm, impulse_matrix
from gloronet import bounds, fp
from gloronet.models.liresnet import InputShift
from gloronet.nn import (
    CholeskyOrthConv2d,
    CholeskyOrthLinear,
    ChordMLP,
    Flatten,
    InvertibleDownsampling,
    LiResBlock,
    LipConv2d,
    LipLinear,
    LLNLinear,
    MinMax,
    Normalize,
    accumulate,
)
from gloronet.nn.base import error_model_of, lipschitz_bound_of

pytestmark = pytest.mark.usefixtures("single_thread")
D = torch.float64
U32 = 2.0**-24


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- γ and the rounding model
def test_gamma_values():
    assert fp.gamma(1, torch.float32) >= U32 and fp.gamma(1, torch.float32) < 1.001 * U32
    assert fp.gamma(1000, torch.float32) >= 1000 * U32 / (1 - 1000 * U32)
    assert fp.gamma(10, torch.float64) < fp.gamma(10, torch.float32)
    assert math.isinf(fp.gamma(2**23, torch.float32))
    with pytest.raises(ValueError):
        fp.gamma(3, torch.float16)


def _worst_order_sum(terms: torch.Tensor) -> torch.Tensor:
    """Sequential float32 sum, largest |term| first (each term then passes the most roundings)."""
    order = terms.abs().argsort(dim=-1, descending=True)
    t = terms.gather(-1, order)
    acc = t[..., 0].clone()
    for k in range(1, t.shape[-1]):
        acc = acc + t[..., k]
    return acc


def _swamping_terms(n: int) -> torch.Tensor:
    """1 followed by n−1 copies of just under u/2: each is rounded away when added to ~1."""
    return torch.tensor([1.0] + [2.0**-25 * (1 - 2.0**-10)] * (n - 1), dtype=torch.float32)


@pytest.mark.parametrize("n", [64, 513])
def test_gamma_n_bounds_worst_order_and_is_nearly_attained(n):
    """|fl(Σ) − Σ| ≤ γ_n Σ|t| for the worst order; swamping attains about half of it, so a bound
    with depth n/4 would be wrong (the test of the depth argument can fail)."""
    terms = _swamping_terms(n)
    err = abs(float(_worst_order_sum(terms)) - float(terms.double().sum()))
    budget = fp.gamma(n, torch.float32) * float(terms.double().abs().sum())
    assert err <= budget
    assert err > 0.4 * budget
    assert err > fp.gamma(n // 4, torch.float32) * float(terms.double().abs().sum())


class _WorstOrderF:
    """Stand-in for torch.nn.functional inside gloronet.nn.accumulate: linear() sums every output
    sequentially in the worst order (bias first); everything else is the real F."""

    def __getattr__(self, name):
        return getattr(F, name)

    @staticmethod
    def linear(x, w, b=None):
        prods = x[..., None, :] * w  # (…, out, n) float32 products, each rounded once
        if b is not None:
            prods = torch.cat([b.expand(prods.shape[:-1])[..., None], prods], dim=-1)
        return _worst_order_sum(prods)


def test_chunked_linear_depth_claim_holds_for_any_kernel_order(monkeypatch):
    """accumulate.linear with a worst-order kernel inside each chunk: the error stays within
    γ_depth·Σ|terms| (depth = accumulate.rounding_depth) and is far below the unchunked worst case."""
    n = 1024
    monkeypatch.setattr(accumulate, "F", _WorstOrderF())
    terms = _swamping_terms(n)
    x = terms[None, :]
    w = torch.ones(1, n)
    b = torch.zeros(1)
    y = accumulate.linear(x, w, b)
    exact = float(terms.double().sum())
    err = abs(float(y[0, 0]) - exact)
    depth = accumulate.rounding_depth(n, n, True)
    assert depth < n // 4
    assert err <= fp.gamma(depth, torch.float32) * float(terms.double().abs().sum())
    unchunked = abs(float(_WorstOrderF.linear(x, w, b)[0, 0]) - exact)
    assert unchunked > 3 * err  # chunking is what keeps the rounding depth small


def test_chunked_kernels_compute_the_same_map():
    g = _gen(0)
    x = torch.randn(5, 300, generator=g)
    w, b = torch.randn(7, 300, generator=g), torch.randn(7, generator=g)
    torch.testing.assert_close(accumulate.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)
    for pads, stride, groups in [((1, 1, 1, 1), 1, 1), ((0, 1, 0, 1), 2, 1), ((2, 2, 2, 2), 1, 4), ((1, 2, 1, 2), 3, 1)]:
        xc = torch.randn(2, 64, 9, 9, generator=g)
        wc = torch.randn(16, 64 // groups, 4, 4, generator=g)
        bc = torch.randn(16, generator=g)
        ref = F.conv2d(F.pad(xc, pads), wc, bc, stride=stride, groups=groups)
        torch.testing.assert_close(accumulate.conv2d(xc, wc, bc, stride, pads, groups), ref, rtol=1e-5, atol=1e-3)


def test_rounding_depth_values():
    assert accumulate.rounding_depth(10, 10, True) == 11  # short sums are not split
    assert accumulate.rounding_depth(3136, 3136, True) == 196 + 15 + 1  # 16 chunks of 196 features
    assert accumulate.rounding_depth(64 * 9, 64, False) == 4 * 9 + 15  # 16 slices of 4 channels
    assert accumulate.rounding_depth(32 * 9, 32, False) == 4 * 9 + 8  # ⌈288 / 32⌉ = 9 chunks of ≤ 4 channels
    assert accumulate.chunk_count(4096, 3) == 3  # never more chunks than input slices
    with accumulate.fused():  # one kernel call: any order
        assert accumulate.chunk_count(3136, 3136) == 1 and accumulate.rounding_depth(3136, 3136, True) == 3137


# --------------------------------------------------------------------------- |W| norms
@pytest.mark.parametrize("kind", ["random", "orthogonal", "near_identity", "sparse", "tiny"])
def test_nonneg_norm_bound_is_sound_and_tight(kind):
    g = _gen(1)
    if kind == "random":
        a = torch.rand(37, 90, generator=g, dtype=D)
    elif kind == "orthogonal":
        a = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=D))[0].abs()
    elif kind == "near_identity":
        a = torch.eye(40, dtype=D) + 1e-3 * torch.rand(40, 40, generator=g, dtype=D)
    elif kind == "sparse":
        a = torch.rand(30, 30, generator=g, dtype=D) * (torch.rand(30, 30, generator=g, dtype=D) < 0.1)
    else:
        a = 1e-200 * torch.rand(20, 10, generator=g, dtype=D)
    truth = exact_norm(a)
    bound = bounds.nonneg_norm_bound(a)
    assert bound >= truth > 0
    assert bound <= 1.01 * truth
    assert bounds.nonneg_norm_bound(torch.zeros(3, 4)) == 0.0
    with pytest.raises(ValueError):
        bounds.nonneg_norm_bound(-a)


@pytest.mark.parametrize("stride,groups,padding,hw", [(1, 1, "same", (7, 7)), (2, 1, "same", (8, 9)), (3, 1, "valid", (9, 9)),
                                                      (1, 2, 1, (6, 6)), (2, 2, "same", (10, 10))])
def test_abs_conv_norm_bound_covers_exact_abs_operator(stride, groups, padding, hw):
    """‖|A|‖₂ of the explicit conv matrix (SVD of the impulse matrix of the conv with |w|) is below
    abs_conv2d_norm_bound, and within 1.6x of it (the bound is the circular norm at frequency 0)."""
    torch.manual_seed(2)
    conv = LipConv2d(4, 6, 3, stride=stride, padding=padding, groups=groups, bias=False, input_size=hw)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape))
    absconv = copy.deepcopy(conv)
    with torch.no_grad():
        absconv.weight.abs_()
    truth = exact_norm(impulse_matrix(absconv, (4, *hw)))
    bound = bounds.abs_conv2d_norm_bound(conv.weight, stride, groups)
    assert bound >= truth
    assert bound <= 1.6 * truth


# --------------------------------------------------------------------------- per-layer error models
def _orth_(w, gen):
    q = torch.linalg.qr(torch.randn(max(w.shape), max(w.shape), generator=gen))[0]
    w.copy_(q[: w.shape[0], : w.shape[1]])


def _dense_ref(w, b):
    return lambda a: F.linear(a, w.double(), None if b is None else b.double())


def _layer_cases():
    """(name, layer in eval mode, input shape, float64 reference of its exact map)."""
    g = _gen(3)
    cases = []
    lin = LipLinear(300, 40)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 300, generator=g) / 10)
        lin.bias.copy_(1e3 * torch.randn(40, generator=g))
    cases.append(("LipLinear", lin, (300,), _dense_ref(lin.weight, lin.bias)))
    lln = LLNLinear(200, 10)
    with torch.no_grad():
        lln.bias.copy_(torch.randn(10, generator=g))
    lln.eval()
    cases.append(("LLNLinear", lln, (200,), _dense_ref(lln.applied_weight(), lln.bias)))
    for stride, padding, groups in [(1, "same", 1), (2, "same", 1), (1, 1, 2), (3, "valid", 1)]:
        conv = LipConv2d(16, 8, 3, stride=stride, padding=padding, groups=groups, input_size=(11, 11))
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
            conv.bias.copy_(100 * torch.randn(8, generator=g))

        def ref(a, conv=conv):
            out = bounds.conv2d_apply(a, conv.weight.double(), conv.stride, conv.pads(conv.input_hw), conv.groups)
            return out + conv.bias.double().view(1, -1, 1, 1)

        cases.append((f"LipConv2d s{stride} {padding} g{groups}", conv, (16, 11, 11), ref))
    cases.append(("MinMax", MinMax(), (6, 5, 5), lambda a: MinMax()(a)))
    cases.append(("Flatten", Flatten(), (3, 4, 4), lambda a: a.flatten(1)))
    cases.append(("InvertibleDownsampling", InvertibleDownsampling(2), (3, 4, 4), lambda a: F.pixel_unshuffle(a, 2)))
    cases.append(("nn.ReLU", nn.ReLU(), (50,), torch.relu))
    norm = Normalize([0.3, -0.2, 0.1], [0.25, 0.5, 2.0])
    with torch.no_grad():
        norm.std[0, 1] = -0.5  # a negative std, as load_state_dict can set
    cases.append(("Normalize", norm, (3, 6, 6), lambda a, n=norm: (a - n.mean.double()) / n.std.double()))
    shift = InputShift(-0.1)
    s32 = float(torch.tensor(-0.1, dtype=torch.float32))
    cases.append(("InputShift", shift, (3, 4, 4), lambda a: a + s32))
    block = LiResBlock(8, (6, 6), depth=2)
    with torch.no_grad():
        block.weight.copy_(torch.randn(block.weight.shape, generator=g))
        block.bias.copy_(torch.randn(8, generator=g))
        block.running_mean.copy_(torch.randn(8, generator=g))
    block.eval()

    def block_ref(a, blk=block):
        r = blk.applied_residual_kernel().double()
        out = a + F.conv2d(F.pad(a, blk.pads), r) + blk.shift().double().view(1, -1, 1, 1)
        return MinMax()(out)

    cases.append(("LiResBlock", block, (8, 6, 6), block_ref))
    chol = CholeskyOrthLinear(80, 30).eval()
    cases.append(("CholeskyOrthLinear", chol, (80,), _dense_ref(chol._applied_weight(), chol.bias)))
    mlp = ChordMLP(16, 3).eval()
    with torch.no_grad():
        mlp.bias.copy_(torch.randn(3, 16, generator=g))

    def mlp_ref(a, m=mlp):
        for w, b in zip(m._applied_weight().unbind(0), m.bias.unbind(0)):
            a = MinMax()(F.linear(a, w.double(), b.double()))
        return a

    cases.append(("ChordMLP", mlp, (16,), mlp_ref))
    patch = CholeskyOrthConv2d(3, 12, 2).eval()

    def patch_ref(a, p=patch):
        kernel = p._applied_weight().double().reshape(12, 3, 2, 2)
        return F.conv2d(F.pad(a, p.pads(a.shape[-2:])), kernel, p.bias.double(), stride=2)

    cases.append(("CholeskyOrthConv2d", patch, (3, 5, 5), patch_ref))
    return cases


@pytest.mark.parametrize("case", _layer_cases(), ids=lambda c: c[0])
def test_layer_error_model_bounds_float32_rounding(case):
    """For every layer we ship, on random, large, offset and tiny inputs: the eval-mode float32
    output is within rel·‖a‖ + abs of the exact map (float64 from the same applied tensors), the
    exact map at 0 within offset, every output within the peak bound, and lip is the layer's bound."""
    name, layer, shape, ref = case
    layer.eval()
    lip = lipschitz_bound_of(layer)
    model = error_model_of(layer, shape, torch.float32, lip)
    assert lip <= model.lip <= lip * (1 + 1e-8)
    g = _gen(4)
    inputs = [torch.randn(6, *shape, generator=g), 1e4 * torch.randn(6, *shape, generator=g),
              torch.randn(6, *shape, generator=g) + 50.0, 1e-30 * torch.randn(6, *shape, generator=g)]
    with torch.no_grad():
        for a in inputs:
            y32 = layer(a).double().flatten(1)
            y = ref(a.double()).flatten(1)
            err = (y32 - y).norm(dim=1)
            budget = model.rel * a.double().flatten(1).norm(dim=1) + model.abs
            assert (err <= budget + 1e-12 * y.norm(dim=1)).all(), (name, float((err / budget).max()))
            peak = model.peak_rel * a.double().flatten(1).norm(dim=1) + model.peak_abs
            assert (y32.abs().amax(dim=1) <= peak).all()
        zero = ref(torch.zeros(1, *shape, dtype=D)).flatten(1).norm()
        assert float(zero) <= model.offset * (1 + 1e-12) + 1e-300


def test_error_models_compose_soundly():
    """A two-layer composition's model bounds the float32 error of the whole, as the first
    layer's error is amplified by the second's Lipschitz bound (ErrorModel.then)."""
    g = _gen(5)
    a_layer, b_layer = LipLinear(64, 64).eval(), LipLinear(64, 8).eval()
    with torch.no_grad():
        for lay in (a_layer, b_layer):
            lay.weight.mul_(3.0)
            lay.bias.copy_(100 * torch.randn(lay.bias.shape, generator=g))
    ma = error_model_of(a_layer, (64,), torch.float32, lipschitz_bound_of(a_layer))
    mb = error_model_of(b_layer, (64,), torch.float32, lipschitz_bound_of(b_layer))
    both = ma.then(mb)
    x = 1e3 * torch.randn(20, 64, generator=g)
    with torch.no_grad():
        y32 = b_layer(a_layer(x)).double()
        y = _dense_ref(b_layer.weight, b_layer.bias)(_dense_ref(a_layer.weight, a_layer.bias)(x.double()))
    err = (y32 - y).norm(dim=1)
    assert (err <= both.rel * x.double().norm(dim=1) + both.abs).all()
    assert both.lip >= ma.lip * mb.lip
    assert fp.compose([ma, mb]) == both


def test_error_model_turns_nan_into_no_bound():
    m = fp.ErrorModel(lip=float("nan"), rel=1.0)
    assert math.isinf(m.lip)
    with pytest.raises(ValueError):
        fp.ErrorModel(lip=1.0, rel=-1.0)


# --------------------------------------------------------------------------- norms
def test_norm_upper_is_an_upper_bound():
    g = _gen(6)
    for h in [torch.randn(4, 5000, generator=g), 1e-30 * torch.randn(4, 300, generator=g),
              torch.randn(4, 3, 8, 8, generator=g).double(), torch.zeros(2, 7)]:
        truth = h.double().flatten(1).norm(dim=1)
        bound = fp.norm_upper(h)
        assert bound.dtype == D and (bound >= truth).all()
        assert (bound <= truth * 1.01 + 1e-15).all()
    huge = torch.full((2, 4), 1e30)  # squares overflow float32: measured again in float64
    assert (fp.norm_upper(huge) >= huge.double().norm(dim=1)).all() and torch.isfinite(fp.norm_upper(huge)).all()
    huge[1, 2] = math.inf
    assert torch.isinf(fp.norm_upper(huge)[1]) and torch.isfinite(fp.norm_upper(huge)[0])
    assert torch.isinf(fp.norm_upper(torch.tensor([[1.0, math.nan]]))).all()


# --------------------------------------------------------------------------- kernels
def test_sound_kernels_sets_and_restores_settings_after_the_new_precision_api():
    """The per-backend precision API (which makes the legacy getters raise) is handled; every
    setting is restored afterwards; inside, fp32 is IEEE everywhere and cuDNN / NNPACK are off."""
    b = torch.backends
    leaves = [leaf for leaf in (b.cuda.matmul, b.cudnn.conv, b.mkldnn.matmul, b.mkldnn.conv) if hasattr(leaf, "fp32_precision")]
    if not leaves:
        pytest.skip("this torch has no per-backend fp32_precision API")
    saved = [leaf.fp32_precision for leaf in leaves]
    saved_cudnn = b.cudnn.enabled
    try:
        b.cuda.matmul.fp32_precision = "tf32"
        b.mkldnn.conv.fp32_precision = "bf16"
        before = [leaf.fp32_precision for leaf in leaves]
        with fp.sound_kernels():
            assert all(leaf.fp32_precision == "ieee" for leaf in leaves)
            assert not b.cudnn.enabled and not torch._C._get_nnpack_enabled()
            net = gloronet.models.create("2c2f", (1, 28, 28), 10, 0.3)
        assert [leaf.fp32_precision for leaf in leaves] == before
        assert b.cudnn.enabled == saved_cudnn
        cert = net.certify(torch.rand(3, 1, 28, 28))  # used to raise "mix of the legacy and new APIs"
        assert cert.radius.shape == (3,)
        assert [leaf.fp32_precision for leaf in leaves] == before
    finally:
        for leaf, v in zip(leaves, saved):
            leaf.fp32_precision = v
