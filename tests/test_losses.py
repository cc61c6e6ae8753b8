"""Tests for gloronet.losses: values against hand computations, gradients against finite
differences, EMMA's stop-gradient, degenerate ε / K, and input / spec validation."""

import math

import pytest
import torch
import torch.nn.functional as F

from gloronet.losses import (
    GloroLoss,
    emma_loss,
    gloro_cross_entropy,
    logit_annealing_loss,
    make_loss,
    trades_kl,
    trades_loss,
)

D = torch.float64


def _lse(xs):
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def _softmax(xs):
    s = _lse(xs)
    return [math.exp(x - s) for x in xs]


def _bottom(logits, K, eps):
    """Test-local GloRo bottom logit: y_⊥ = max_{i≠j}(y_i + ε K[j, i]), j = argmax, mask by index."""
    j = logits.argmax(1)
    cand = logits + eps * K[j]
    cand = cand.masked_fill(F.one_hot(j, logits.shape[1]).bool(), float("-inf"))
    return torch.cat([logits, cand.max(1, keepdim=True).values], dim=1)


def _pairwise_K(C, gen, lo=1.0, hi=2.0):
    A = lo + (hi - lo) * torch.rand(C, C, generator=gen, dtype=D)
    K = (A + A.T) / 2
    K.fill_diagonal_(0.0)
    return K


# ----------------------------------------------------------------------------- GloRo CE


def test_gloro_ce_matches_hand_computation():
    rows = [[1.0, 2.0, 0.5, 2.5], [0.0, -1.0, 3.0, 1.0]]
    labels = [1, 2]
    expected = [_lse(r) - r[y] for r, y in zip(rows, labels)]
    z = torch.tensor(rows, dtype=D)
    lab = torch.tensor(labels)
    per = gloro_cross_entropy(z, lab, reduction="none")
    assert per.shape == (2,)
    assert torch.allclose(per, torch.tensor(expected, dtype=D), atol=1e-12)
    assert math.isclose(gloro_cross_entropy(z, lab).item(), sum(expected) / 2, abs_tol=1e-12)
    assert math.isclose(gloro_cross_entropy(z, lab, reduction="sum").item(), sum(expected), abs_tol=1e-12)


def test_gloro_ce_gradcheck_wrt_bottom_logits():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 4, generator=g, dtype=D, requires_grad=True)
    lab = torch.tensor([0, 1, 2, 1, 0])
    assert torch.autograd.gradcheck(lambda z: gloro_cross_entropy(z, lab), (z,))
    assert torch.autograd.gradcheck(lambda z: gloro_cross_entropy(z, lab, reduction="none"), (z,))


def test_gloro_ce_and_trades_gradcheck_through_bottom_logit_wrt_logits_and_K():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 4, generator=g, dtype=D, requires_grad=True)
    K = _pairwise_K(4, g).requires_grad_(True)
    lab = torch.tensor([0, 1, 2, 3, 1, 2])
    eps = 0.3
    assert torch.autograd.gradcheck(lambda l, K: gloro_cross_entropy(_bottom(l, K, eps), lab), (logits, K))
    assert torch.autograd.gradcheck(
        lambda l, K: trades_loss(l, _bottom(l, K, eps), lab, lam=1.7), (logits, K)
    )


# ----------------------------------------------------------------------------- TRADES


TRADES_LOGITS = [[1.0, 2.0, 0.0], [-0.5, 0.3, 1.2]]
TRADES_BOTTOM = [[1.0, 2.0, 0.0, 2.5], [-0.5, 0.3, 1.2, 0.1]]
TRADES_LABELS = [0, 2]


def _hand_trades(lam):
    out = []
    for y, z, t in zip(TRADES_LOGITS, TRADES_BOTTOM, TRADES_LABELS):
        p = _softmax(y)
        q = _softmax(z)
        ce = -math.log(p[t])
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q[:-1]))  # p_⊥ = 0 contributes 0
        out.append((ce, kl, ce + lam * kl))
    return out


def test_trades_matches_hand_computation_and_closed_form():
    lam = 1.5
    hand = _hand_trades(lam)
    y = torch.tensor(TRADES_LOGITS, dtype=D)
    z = torch.tensor(TRADES_BOTTOM, dtype=D)
    lab = torch.tensor(TRADES_LABELS)
    per = trades_loss(y, z, lab, lam=lam, reduction="none")
    assert torch.allclose(per, torch.tensor([h[2] for h in hand], dtype=D), atol=1e-12)
    assert math.isclose(trades_loss(y, z, lab, lam=lam).item(), sum(h[2] for h in hand) / 2, abs_tol=1e-12)
    kl = trades_kl(y, z, reduction="none")
    assert torch.allclose(kl, torch.tensor([h[1] for h in hand], dtype=D), atol=1e-12)
    # Closed form when bottom_logits[:, :C] == logits: KL = softplus(y_⊥ − logsumexp(y)).
    closed = [math.log1p(math.exp(zb[-1] - _lse(yr))) for yr, zb in zip(TRADES_LOGITS, TRADES_BOTTOM)]
    assert torch.allclose(kl, torch.tensor(closed, dtype=D), atol=1e-12)
    # Direction matters: KL(Q‖P) with P_⊥ = 0 would be infinite; ours is finite and positive.
    assert torch.isfinite(kl).all() and (kl > 0).all()


def test_trades_lam_zero_is_clean_cross_entropy():
    g = torch.Generator().manual_seed(2)
    y = torch.randn(7, 5, generator=g, dtype=D)
    z = torch.cat([y, torch.randn(7, 1, generator=g, dtype=D) + 3], 1)
    lab = torch.randint(0, 5, (7,), generator=g)
    hand = sum(_lse(r) - r[t] for r, t in zip(y.tolist(), lab.tolist())) / 7
    assert math.isclose(trades_loss(y, z, lab, lam=0.0).item(), hand, abs_tol=1e-12)
    assert math.isclose(trades_loss(y, z, lab, lam=0.0).item(), F.cross_entropy(y, lab).item(), abs_tol=1e-12)
    # and the KL term really contributes for lam > 0
    assert trades_loss(y, z, lab, lam=1.0).item() > hand + 1e-3


def test_trades_gradcheck_wrt_logits_and_bottom_logits():
    g = torch.Generator().manual_seed(3)
    y = torch.randn(4, 3, generator=g, dtype=D, requires_grad=True)
    z = torch.randn(4, 4, generator=g, dtype=D, requires_grad=True)  # independent inputs on purpose
    lab = torch.tensor([0, 2, 1, 2])
    assert torch.autograd.gradcheck(lambda y, z: trades_loss(y, z, lab, lam=1.3), (y, z))
    assert torch.autograd.gradcheck(lambda y, z: trades_kl(y, z, reduction="none"), (y, z))


def test_trades_lam_may_be_a_tensor():
    y = torch.tensor(TRADES_LOGITS, dtype=D)
    z = torch.tensor(TRADES_BOTTOM, dtype=D)
    lab = torch.tensor(TRADES_LABELS)
    a = trades_loss(y, z, lab, lam=torch.tensor(0.7, dtype=D))
    b = trades_loss(y, z, lab, lam=0.7)
    assert torch.allclose(a, b)


# ----------------------------------------------------------------------------- EMMA

EMMA_K = [[0.0, 2.0, 4.0], [2.0, 0.0, 1.0], [4.0, 1.0, 0.0]]
EMMA_EPS = 0.5
EMMA_LOGITS = [[3.0, 1.0, 2.5], [2.0, 0.0, 1.0], [0.0, 0.2, 1.0]]
EMMA_LABELS = [0, 1, 2]
# Raised logits worked out by hand (c = clip((f_y − f_i)/(ε K[y,i]), 0.01, 1); f̃_i = f_i + c ε K[y,i]):
#   row 0, y=0: i=1 gap 2, εK=1 -> c=1 -> 2.0 ; i=2 gap .5, εK=2 -> c=.25 -> 3.0
#   row 1, y=1: i=0 gap -2 -> c=.01 -> 2.01   ; i=2 gap -1, εK=.5 -> c=.01 -> 1.005
#   row 2, y=2: i=0 gap 1, εK=2 -> c=.5 -> 1.0; i=1 gap .8, εK=.5 -> c=1 -> 0.7
EMMA_RAISED = [[3.0, 2.0, 3.0], [2.01, 0.0, 1.005], [1.0, 0.7, 1.0]]


def test_emma_matches_hand_computation():
    expected = [_lse(r) - r[t] for r, t in zip(EMMA_RAISED, EMMA_LABELS)]
    y = torch.tensor(EMMA_LOGITS, dtype=D)
    K = torch.tensor(EMMA_K, dtype=D)
    lab = torch.tensor(EMMA_LABELS)
    per = emma_loss(y, lab, K, EMMA_EPS, reduction="none")
    assert torch.allclose(per, torch.tensor(expected, dtype=D), atol=1e-12)
    assert math.isclose(emma_loss(y, lab, K, EMMA_EPS).item(), sum(expected) / 3, abs_tol=1e-12)


def test_emma_ignores_nonzero_diagonal_of_K():
    y = torch.tensor(EMMA_LOGITS, dtype=D)
    lab = torch.tensor(EMMA_LABELS)
    K = torch.tensor(EMMA_K, dtype=D)
    K_diag = K + 5.0 * torch.eye(3, dtype=D)
    assert torch.allclose(emma_loss(y, lab, K, EMMA_EPS), emma_loss(y, lab, K_diag, EMMA_EPS), atol=1e-14)


def _unsaturated_case(seed=4):
    """Every wrong-class ratio (f_y − f_i)/(εK[y,i]) strictly inside (0.01, 1)."""
    g = torch.Generator().manual_seed(seed)
    B, C = 5, 4
    lab = torch.randint(0, C, (B,), generator=g)
    y = 0.8 * torch.rand(B, C, generator=g, dtype=D) - 0.4  # others in (-0.4, 0.4)
    y[torch.arange(B), lab] = 0.5  # gaps in (0.1, 0.9)
    K = _pairwise_K(C, g)  # εK in [1, 2] -> ratios in (0.05, 0.9)
    return y, lab, K, 1.0


def _emma_reference(y, lab, K, eps, detach):
    """Independent re-implementation used to compare gradients; factor optionally NOT detached."""
    k = K[lab]
    gap = y.gather(1, lab[:, None]) - y
    c = (gap / (eps * k).clamp_min(1e-8)).clamp(0.01, 1.0)
    if detach:
        c = c.detach()
    add = torch.where(F.one_hot(lab, y.shape[1]).bool(), torch.zeros_like(k), c * eps * k)
    return F.cross_entropy(y + add, lab)


def test_emma_stopgrad_blocks_gradient_through_clip_factor():
    y0, lab, K0, eps = _unsaturated_case()
    # the case really is unsaturated (otherwise the test could not tell the versions apart)
    ratio = (y0.gather(1, lab[:, None]) - y0) / (eps * K0[lab]).clamp_min(1e-8)
    wrong = ~F.one_hot(lab, 4).bool()
    assert ((ratio[wrong] > 0.02) & (ratio[wrong] < 0.98)).all()

    def grads(fn):
        y = y0.clone().requires_grad_(True)
        K = K0.clone().requires_grad_(True)
        fn(y, K).backward()
        return y.grad, K.grad

    gy, gK = grads(lambda y, K: emma_loss(y, lab, K, eps))
    gy_nd, gK_nd = grads(lambda y, K: _emma_reference(y, lab, K, eps, detach=False))
    assert (gy - gy_nd).abs().max() > 1e-3
    assert (gK - gK_nd).abs().max() > 1e-3

    # Finite differences of the loss with the clip factor FROZEN at its value at (y0, K0).
    c0 = ratio.clamp(0.01, 1.0)

    def frozen(y, K):
        add = torch.where(wrong, c0 * eps * K[lab], torch.zeros_like(y))
        return F.cross_entropy(y + add, lab).item()

    def fd(which):
        x0 = y0 if which == "y" else K0
        out = torch.zeros_like(x0)
        h = 1e-6
        for idx in range(x0.numel()):
            xp, xm = x0.clone(), x0.clone()
            xp.view(-1)[idx] += h
            xm.view(-1)[idx] -= h
            if which == "y":
                out.view(-1)[idx] = (frozen(xp, K0) - frozen(xm, K0)) / (2 * h)
            else:
                out.view(-1)[idx] = (frozen(y0, xp) - frozen(y0, xm)) / (2 * h)
        return out

    assert torch.allclose(gy, fd("y"), atol=1e-7)
    assert torch.allclose(gK, fd("K"), atol=1e-7)


def test_emma_gradcheck_where_clip_is_saturated():
    # Every ratio is far outside [0.01, 1] (gap >= .5 with εK <= .2, or gap <= -.5), so the
    # detached factor is locally constant and finite differences must match autograd.
    K = torch.tensor([[0, 1, 2, 1.5], [1, 0, 1.2, 2], [2, 1.2, 0, 1], [1.5, 2, 1, 0]], dtype=D)
    y = torch.tensor(
        [[3.0, 1.0, 0.5, 2.0], [0.0, 2.0, 3.0, -1.0], [1.0, -1.0, 0.2, 4.0], [-2.0, 0.5, 1.5, -3.0]],
        dtype=D,
    )
    lab = torch.tensor([0, 1, 2, 3])
    eps = 0.1
    y.requires_grad_(True)
    K.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y, K: emma_loss(y, lab, K, eps), (y, K))
    assert torch.autograd.gradcheck(lambda y, K: emma_loss(y, lab, K, eps, reduction="none"), (y, K))


def test_emma_epsilon_zero_is_clean_cross_entropy():
    g = torch.Generator().manual_seed(5)
    y = torch.randn(6, 4, generator=g, dtype=D)
    lab = torch.randint(0, 4, (6,), generator=g)
    K = _pairwise_K(4, g)
    hand = sum(_lse(r) - r[t] for r, t in zip(y.tolist(), lab.tolist())) / 6
    assert math.isclose(emma_loss(y, lab, K, 0.0).item(), hand, abs_tol=1e-12)
    assert torch.allclose(emma_loss(y, lab, K, 0.0), F.cross_entropy(y, lab), atol=1e-14)
    assert emma_loss(y, lab, K, 0.5).item() > hand + 1e-3  # and ε > 0 does change it
    yr = y.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y: emma_loss(y, lab, K, 0.0), (yr,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eps", [0.0, 0.25])
def test_no_nan_with_zero_K_or_zero_epsilon(dtype, eps):
    g = torch.Generator().manual_seed(6)
    y = torch.randn(8, 5, generator=g).to(dtype).requires_grad_(True)
    lab = torch.randint(0, 5, (8,), generator=g)
    K = _pairwise_K(5, g).to(dtype)
    K[0, 1] = K[1, 0] = 0.0  # some zero pairs
    y.data[:, 1] = y.data[:, 0]  # ties, so some gaps are exactly 0 where K is 0
    K_zero = torch.zeros(5, 5, dtype=dtype)
    for KK in (K, K_zero):
        KK = KK.clone().requires_grad_(True)
        loss = emma_loss(y, lab, KK, eps)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(y.grad).all() and torch.isfinite(KK.grad).all()
        y.grad = None
    # zero K: EMMA is plain CE for any ε
    got = emma_loss(y, lab, K_zero, eps)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)  # low precision upcast
    assert torch.allclose(got, F.cross_entropy(y.to(got.dtype), lab), atol=1e-6)
    z = _bottom(y.detach().float(), K.float(), eps)
    yy = y.detach().float()
    for val in (gloro_cross_entropy(z, lab), trades_loss(yy, z, lab, lam=2.0)):
        assert torch.isfinite(val)


# ----------------------------------------------------------------------------- validation


def _ok_inputs():
    y = torch.zeros(3, 4)
    z = torch.zeros(3, 5)
    lab = torch.tensor([0, 1, 3])
    K = torch.ones(4, 4) - torch.eye(4)
    return y, z, lab, K


def test_shape_errors():
    y, z, lab, K = _ok_inputs()
    with pytest.raises(ValueError, match="exactly one more column"):
        trades_loss(y, torch.zeros(3, 4), lab, 1.0)
    with pytest.raises(ValueError, match="exactly one more column"):
        trades_loss(y, torch.zeros(3, 6), lab, 1.0)
    with pytest.raises(ValueError, match="same batch size"):
        trades_loss(y, torch.zeros(2, 5), lab, 1.0)
    with pytest.raises(ValueError, match=r"K must have shape \(C, C\) = \(4, 4\)"):
        emma_loss(y, lab, torch.ones(3, 3), 0.1)
    with pytest.raises(ValueError, match="K must have shape"):
        emma_loss(y, lab, torch.ones(4), 0.1)
    with pytest.raises(ValueError, match=r"logits must have shape \(B, classes\)"):
        emma_loss(torch.zeros(4), lab, K, 0.1)
    with pytest.raises(ValueError, match="bottom_logits must have shape"):
        gloro_cross_entropy(torch.zeros(3, 5, 1), lab)
    with pytest.raises(ValueError, match="floating-point"):
        gloro_cross_entropy(torch.zeros(3, 5, dtype=torch.long), lab)
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        gloro_cross_entropy(z, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        emma_loss(y, lab[:, None], K, 0.1)


def test_label_errors():
    y, z, lab, K = _ok_inputs()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\).*\[0, 4\]"):
        gloro_cross_entropy(z, torch.tensor([0, 1, 4]))  # 4 = the bottom class: never a label
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        trades_loss(y, z, torch.tensor([-1, 0, 0]), 1.0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        emma_loss(y, torch.tensor([0, 9, 0]), K, 0.1)
    with pytest.raises(ValueError, match="integer"):
        emma_loss(y, lab.float(), K, 0.1)
    with pytest.raises(ValueError, match="integer"):
        gloro_cross_entropy(z, lab.bool())
    # other integer dtypes are accepted
    assert torch.isfinite(gloro_cross_entropy(z, lab.int()))


def test_scalar_argument_errors():
    y, z, lab, K = _ok_inputs()
    with pytest.raises(ValueError, match="epsilon must be finite and >= 0"):
        emma_loss(y, lab, K, -0.1)
    with pytest.raises(ValueError, match="epsilon must be finite and >= 0"):
        emma_loss(y, lab, K, float("nan"))
    with pytest.raises(ValueError, match="lam must be finite and >= 0"):
        trades_loss(y, z, lab, -1.0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        gloro_cross_entropy(z, lab, reduction="avg")


# ----------------------------------------------------------------------------- make_loss


def test_make_loss_names_needs_and_dispatch():
    y = torch.tensor(TRADES_LOGITS, dtype=D)
    z = torch.tensor(TRADES_BOTTOM, dtype=D)
    lab = torch.tensor(TRADES_LABELS)
    K = torch.tensor(EMMA_K, dtype=D)

    for spec in ("crossentropy", "gloro_ce", "GloRo-CE", {"name": "crossentropy"}):
        loss = make_loss(spec)
        assert loss.name == "crossentropy" and loss.needs == "bottom" and loss.lam is None
        # arguments it does not need are ignored
        v = loss(logits=y, bottom_logits=z, K=K, labels=lab, epsilon=0.3, lam=5.0)
        assert torch.allclose(v, gloro_cross_entropy(z, lab))

    tr = make_loss("trades")
    assert tr.needs == "bottom+clean" and tr.lam == 1.0
    hand = _hand_trades(1.0)
    assert math.isclose(tr(logits=y, bottom_logits=z, labels=lab).item(), sum(h[2] for h in hand) / 2, abs_tol=1e-12)

    tr15 = make_loss({"name": "trades", "lam": 1.5})
    assert tr15.lam == 1.5
    assert torch.allclose(tr15(logits=y, bottom_logits=z, labels=lab, K=K), trades_loss(y, z, lab, 1.5))
    # lam at call time (schedule) overrides the spec default, including lam=0
    assert torch.allclose(tr15(logits=y, bottom_logits=z, labels=lab, lam=0.25), trades_loss(y, z, lab, 0.25))
    assert torch.allclose(tr15(logits=y, bottom_logits=z, labels=lab, lam=0.0), F.cross_entropy(y, lab))
    # logits may be omitted for TRADES: they are the first C columns of bottom_logits (as in gloro)
    zc = torch.cat([y, z[:, -1:]], 1)
    assert torch.allclose(tr15(bottom_logits=zc, labels=lab), trades_loss(y, zc, lab, 1.5))

    em = make_loss("emma")
    assert em.needs == "pairwise" and em.lam is None
    ye = torch.tensor(EMMA_LOGITS, dtype=D)
    le = torch.tensor(EMMA_LABELS)
    assert torch.allclose(
        em(logits=ye, K=K, labels=le, epsilon=EMMA_EPS, bottom_logits=None, lam=3.0),
        emma_loss(ye, le, K, EMMA_EPS),
    )
    assert torch.allclose(
        em(logits=ye, K=K, labels=le, epsilon=EMMA_EPS, reduction="none"),
        emma_loss(ye, le, K, EMMA_EPS, reduction="none"),
    )
    assert make_loss(em) is em
    assert "trades" in repr(tr15) and "1.5" in repr(tr15)


def test_make_loss_missing_call_arguments():
    y = torch.tensor(EMMA_LOGITS, dtype=D)
    lab = torch.tensor(EMMA_LABELS)
    with pytest.raises(ValueError, match="requires bottom_logits="):
        make_loss("crossentropy")(logits=y, labels=lab)
    with pytest.raises(ValueError, match="requires K="):
        make_loss("emma")(logits=y, labels=lab, epsilon=0.1)
    with pytest.raises(ValueError, match="requires epsilon="):
        make_loss("emma")(logits=y, labels=lab, K=torch.tensor(EMMA_K, dtype=D))
    with pytest.raises(ValueError, match="requires labels="):
        make_loss("trades")(logits=y, bottom_logits=torch.zeros(3, 4, dtype=D))
    with pytest.raises(TypeError):
        make_loss("emma")(y, lab)  # keyword-only
    with pytest.raises(TypeError):
        make_loss("emma")(logits=y, labels=lab, epsilon=0.1, K=None, eps=0.1)  # typo'd keyword


def test_make_loss_spec_errors():
    with pytest.raises(ValueError, match="unknown loss 'hinge'; allowed: crossentropy, gloro_ce, trades, emma"):
        make_loss("hinge")
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss({"name": "trade"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lambda'\] for loss 'trades'; allowed keys: name, lam"):
        make_loss({"name": "trades", "lambda": 2.0})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lam'\] for loss 'emma'; allowed keys: name"):
        make_loss({"name": "emma", "lam": 2.0})
    with pytest.raises(ValueError, match="needs a 'name' key"):
        make_loss({"lam": 2.0})
    with pytest.raises(ValueError, match="lam must be finite and >= 0"):
        make_loss({"name": "trades", "lam": -1})
    with pytest.raises(ValueError, match="lam must be a real number"):
        make_loss({"name": "trades", "lam": "big"})
    with pytest.raises(ValueError, match="loss spec must be a name"):
        make_loss(3)
    with pytest.raises(ValueError, match="takes no 'lam'"):
        GloroLoss("emma", lam=1.0)


def test_trades_ce_robust_term_is_the_snapshot_crossentropy():
    # ICML 2021 snapshot (klasleino/gloro snapshots/leino21_snapshot.zip, train_margin_models_clean.py
    # MarginTradesLoss): CE(y, label) + lam * CategoricalCrossentropy(from_logits=True)([softmax(y), 0], [y, y_bot])
    g = torch.Generator().manual_seed(3)
    y = torch.randn(6, 4, generator=g, dtype=torch.float64)
    bottom = torch.cat([y, torch.randn(6, 1, generator=g, dtype=torch.float64)], 1)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    p = torch.cat([torch.softmax(y, 1), torch.zeros(6, 1, dtype=torch.float64)], 1)
    expected = torch.nn.functional.cross_entropy(y, labels) + 0.7 * (-(p * torch.log_softmax(bottom, 1)).sum(1)).mean()
    loss = make_loss({"name": "trades", "lam": 0.7, "robust": "ce"})
    assert torch.allclose(loss(logits=y, bottom_logits=bottom, labels=labels), expected, rtol=1e-12, atol=0)
    kl = make_loss({"name": "trades", "lam": 0.7})(logits=y, bottom_logits=bottom, labels=labels)
    assert kl < expected  # the CE term adds the entropy of the clean prediction
    with pytest.raises(ValueError, match="'kl' or 'ce'"):
        make_loss({"name": "trades", "robust": "js"})
    with pytest.raises(ValueError, match="only 'trades'"):
        GloroLoss("emma", robust="ce")


# ----------------------------------------------------------------------------- logit annealing (LA)
def _hand_la(y, lab, K, eps, gamma, offset, T):
    """BRONet's LA loss (Lai et al., ICML 2025; bronet/models/margin_layer.py) by hand, per example:
    EMMA-raised logits, true logit − offset, ÷ T, CE, then T·(1 − e^{−CE})^γ·CE."""
    out = []
    for row, t, in zip(y.tolist(), lab.tolist()):
        z = []
        for i, v in enumerate(row):
            if i == t:
                z.append((v - offset) / T)
                continue
            gain = eps * float(K[t, i])
            c = min(max((row[t] - v) / max(gain, 1e-8), 0.01), 1.0)
            z.append((v + c * gain) / T)
        ce = _lse(z) - z[t]
        out.append(T * (1 - math.exp(-ce)) ** gamma * ce)
    return out


def test_la_matches_hand_computation_and_is_emma_without_annealing():
    g = torch.Generator().manual_seed(11)
    y = torch.randn(7, 4, generator=g, dtype=D) * 2
    lab = torch.randint(0, 4, (7,), generator=g)
    K = _pairwise_K(4, g)
    for gamma, offset, T in [(5.0, 2.0, 0.75), (2.0, 0.5, 1.3)]:
        hand = _hand_la(y, lab, K, 0.4, gamma, offset, T)
        got = logit_annealing_loss(y, lab, K, 0.4, gamma=gamma, offset=offset, temperature=T, reduction="none")
        assert torch.allclose(got, torch.tensor(hand, dtype=D), rtol=1e-12, atol=1e-14)
    assert torch.allclose(logit_annealing_loss(y, lab, K, 0.4, gamma=0.0, offset=0.0, temperature=1.0),
                          emma_loss(y, lab, K, 0.4), rtol=1e-12)
    default = logit_annealing_loss(y, lab, K, 0.4)
    assert math.isclose(default.item(), sum(_hand_la(y, lab, K, 0.4, 5.0, 2.0, 0.75)) / 7, rel_tol=1e-12)


def test_la_gradcheck_float64():
    # EMMA's factor is a stop-gradient: keep every ratio saturated (true logit ≥ 1 above or below
    # all others, ε·K ≤ 0.6), where it is locally constant and finite differences must match.
    g = torch.Generator().manual_seed(12)
    y = torch.randn(6, 4, generator=g, dtype=D)
    lab = torch.randint(0, 4, (6,), generator=g)
    rows = torch.arange(6)
    y[rows, lab] = torch.where(rows % 2 == 0, y.max(1).values + 1, y.min(1).values - 1)
    y.requires_grad_(True)
    K = _pairwise_K(4, g).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y, K: logit_annealing_loss(y, lab, K, 0.3), (y, K))
    assert torch.autograd.gradcheck(
        lambda y, K: logit_annealing_loss(y, lab, K, 0.3, gamma=2.0, offset=1.0, temperature=0.5, reduction="none"),
        (y, K))


def test_make_loss_la():
    g = torch.Generator().manual_seed(13)
    y = torch.randn(4, 3, generator=g, dtype=D)
    lab = torch.tensor([0, 1, 2, 1])
    K = _pairwise_K(3, g)
    for spec in ("la", "logit-annealing", {"name": "la"}):
        loss = make_loss(spec)
        assert loss.name == "la" and loss.needs == "pairwise"
        assert torch.equal(loss(logits=y, labels=lab, K=K, epsilon=0.2), logit_annealing_loss(y, lab, K, 0.2))
    custom = make_loss({"name": "la", "gamma": 2, "offset": 1.0, "temperature": 0.5})
    assert "gamma=2.0" in repr(custom)
    assert torch.equal(custom(logits=y, labels=lab, K=K, epsilon=0.2),
                       logit_annealing_loss(y, lab, K, 0.2, gamma=2.0, offset=1.0, temperature=0.5))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['beta'\] for loss 'la'"):
        make_loss({"name": "la", "beta": 1.0})
    with pytest.raises(ValueError, match="only 'la' takes"):
        GloroLoss("emma", gamma=1.0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        logit_annealing_loss(y, lab, K, 0.2, temperature=0.0)
    with pytest.raises(ValueError, match="gamma must be finite and >= 0"):
        logit_annealing_loss(y, lab, K, 0.2, gamma=-1.0)
