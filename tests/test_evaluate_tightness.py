"""Tightness: the empirical lower bound of a dense layer's Lipschitz constant equals its exact
spectral norm (SVD) and never exceeds the sound bound; on a linear GloRo net every margin slope
equals its K (ratio 1, first-order distance = certified radius); on a 2C2F net no slope exceeds
its K and no layer's lower bound exceeds its bound."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gloronet
from gloronet.evaluate.common import Run
from gloronet.evaluate.tightness import _float64_copy, margin_slopes, power_lower_bound, run_tightness

from conftest import exact_norm
from test_evaluate_attack import linear_gloro_run, mid_gray_images

pytestmark = pytest.mark.usefixtures("single_thread")


def test_power_lower_bound_of_a_dense_layer_is_its_spectral_norm():
    torch.manual_seed(0)
    layer = gloronet.nn.LipLinear(30, 20)
    h = torch.randn(4, 30, dtype=torch.float64)
    lower = power_lower_bound(_float64_copy(layer), h, iters=100)
    exact = exact_norm(layer.weight.detach())
    assert (lower <= exact * (1 + 1e-9)).all() and (lower >= exact * (1 - 1e-6)).all()
    assert float(lower.max()) <= layer.lipschitz_bound()


def test_linear_gloro_net_margins_are_exactly_tight():
    run = linear_gloro_run(4)
    sl = margin_slopes(run, mid_gray_images(32), batch_size=16, progress=False)
    assert torch.allclose(sl["all"], torch.ones_like(sl["all"]), rtol=1e-5)
    assert torch.allclose(sl["r_lin"], sl["r_cert"], rtol=1e-5)


def test_tightness_report_on_2c2f():
    torch.manual_seed(0)
    net = gloronet.models.create("2c2f", (1, 12, 12), 3, epsilon=0.1).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    run = Run(Path("."), net, {}, "synthetic", None, torch.device("cpu"))
    images = torch.randint(0, 256, (24, 1, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rep = run_tightness(run, images, iters=30)
    assert rep["margin"]["slope_violations"] == 0 and rep["margin"]["ratio_max"] <= 1 + 1e-4
    for row in rep["layers"] + [rep["body"]]:
        assert 0 < row["lower"] <= row["bound"] * (1 + 1e-9), row
    assert rep["body"]["bound"] == pytest.approx(net.lipschitz_bound())
    for row in rep["layers"]:  # MinMax / Flatten: norm-preserving pieces, lower bound 1
        if row["type"] in ("MinMax", "Flatten"):
            assert row["lower"] == pytest.approx(1.0, rel=1e-6)
