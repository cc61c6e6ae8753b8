"""Degradation attacks (Mangal et al.): the efficacy upper bound on hand-made radius
distributions, and the attack on a two-class linear GloRo net, where an ε-perturbation lowers the
radius by exactly ε — so exactly the certified points with r ≤ 2ε are degraded and the bound is
attained."""
from __future__ import annotations

import pytest
import torch

from gloronet import checkpoint
from gloronet.config import build_config
from gloronet.evaluate.degrade import efficacy_upper_bound, run_degrade
from gloronet.evaluate.pgd import AttackConfig
from gloronet.train import train

from test_evaluate_attack import linear_gloro_run, mid_gray_images
from test_train import data_dir, small  # noqa: F401  (module-scoped dataset fixture)

pytestmark = pytest.mark.usefixtures("single_thread")


def test_upper_bound_on_hand_made_radii():
    r = torch.tensor([0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.35, 0.7, 0.9], dtype=torch.float64)
    # certified at 0.1: 0.15, 0.2, 0.25, 0.35, 0.7, 0.9 (6); r > 0.2: 4 (r = 2ε exactly is degradable)
    assert efficacy_upper_bound(r, 0.1) == pytest.approx(1 - 4 / 6)
    assert efficacy_upper_bound(r, 0.5) == pytest.approx(1.0)  # 0.7, 0.9 certified, none above 1.0
    assert efficacy_upper_bound(r, 0.03) == pytest.approx(1 - 7 / 8)  # 0.05 only
    assert efficacy_upper_bound(r, 1.0) == 0.0  # nothing certified
    assert efficacy_upper_bound(torch.full((5,), 3.0, dtype=torch.float64), 1.0) == 0.0  # all immune


def test_degradation_of_a_linear_two_class_net_is_exactly_the_bound():
    run = linear_gloro_run(2, seed=1)
    images = mid_gray_images(300, seed=2)
    cert = run.net.certify(run.inputs(images))
    labels = cert.pred.clone()
    eps = float(cert.radius.quantile(0.3))
    r = cert.radius
    ambiguous = ((r / eps - 1).abs() < 1e-3) | ((r / (2 * eps) - 1).abs() < 1e-3)
    images, labels, r = images[~ambiguous], labels[~ambiguous], r[~ambiguous]
    run.net.epsilon = eps
    rep = run_degrade(run, images, labels, AttackConfig(steps=30, restarts=1, targets=1))
    certified = r > eps
    expected = int((certified & (r < 2 * eps)).sum())
    assert rep["attacked"] == int(certified.sum()) > 20 and expected > 5
    assert rep["degraded"] == expected
    assert rep["fraction_degraded"] == pytest.approx(rep["upper_bound"])
    assert rep["vra_after_attack"] == pytest.approx(rep["vra_2eps"]) and rep["vra_2eps"] < rep["vra"]
    assert rep["label_changed"] == 0 and rep["degraded_with_radius_above_2eps"] == 0


def test_degradation_defense_trains_at_twice_epsilon(tmp_path, data_dir):  # noqa: F811
    """`degradation_defense: true` scales the training-ε schedule to 2ε; the run still certifies at ε."""
    base = small(data_dir, epochs=1, train_limit=128, test_limit=32, train_epsilon=None)
    plain = train(build_config(None, base), tmp_path / "plain", progress=False)
    defended = train(build_config(None, {**base, "degradation_defense": True}), tmp_path / "defended", progress=False)
    assert plain["train_epsilon"] == pytest.approx(0.3) and defended["train_epsilon"] == pytest.approx(0.6)
    assert checkpoint.load_model(tmp_path / "defended").epsilon == 0.3
    with pytest.raises(ValueError, match="degradation_defense"):
        build_config(None, {"degradation_defense": "yes"})
