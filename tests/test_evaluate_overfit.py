"""Attributions (integrated gradients exact on linear models, completeness on a MinMax net, agreement
with captum when installed; concentration metrics on known maps) and the robust-overfitting log:
the train-subset columns are written, read back, and a run whose log predates them still resumes."""
from __future__ import annotations

import csv

import pytest
import torch

import gloronet
from gloronet.config import build_config
from gloronet.evaluate import attributions as attr
from gloronet.evaluate.common import open_run
from gloronet.evaluate.overfit import read_curves
from gloronet.train import train

from test_train import data_dir, small  # noqa: F401  (module-scoped dataset fixture)

pytestmark = pytest.mark.usefixtures("single_thread")


def test_integrated_gradients_of_a_linear_model_are_exact():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(4, 12, generator=g, dtype=torch.float64)
    f = lambda x: x.flatten(1) @ W.t()  # noqa: E731
    x = torch.rand(5, 1, 3, 4, generator=g, dtype=torch.float64)
    c = torch.tensor([0, 1, 2, 3, 0])
    ig = attr.integrated_gradients(f, x, c, steps=3)
    assert torch.allclose(ig, x * W[c].view(5, 1, 3, 4), atol=1e-12)
    assert torch.allclose(attr.saliency(f, x, c), W[c].abs().view(5, 1, 3, 4))


def _minmax_net():
    torch.manual_seed(0)
    net = gloronet.models.create("2c2f", (1, 12, 12), 3, epsilon=0.1).double().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def test_integrated_gradients_complete_on_a_minmax_net():
    net = _minmax_net()
    x = torch.rand(6, 1, 12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    c = net(x).argmax(1)
    ig = attr.integrated_gradients(net, x, c, steps=256)
    delta = net(x).gather(1, c[:, None])[:, 0] - net(torch.zeros_like(x)).gather(1, c[:, None])[:, 0]
    assert torch.allclose(ig.flatten(1).sum(1), delta, rtol=2e-2, atol=1e-4)


def test_integrated_gradients_match_captum():
    captum = pytest.importorskip("captum.attr")
    net = _minmax_net()
    x = torch.rand(4, 1, 12, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    c = torch.tensor([0, 1, 2, 1])
    ours = attr.integrated_gradients(net, x, c, steps=16)
    theirs = captum.IntegratedGradients(net).attribute(x, target=c, n_steps=16, method="riemann_middle")
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-9)


def test_concentration_metrics_on_known_maps():
    uniform = torch.ones(2, 1, 10, 10)
    spike = torch.zeros(2, 1, 10, 10)
    spike[:, 0, 3, 4] = -5.0  # magnitudes count, not signs
    assert torch.allclose(attr.top_share(uniform), torch.full((2,), 0.1, dtype=torch.float64))
    assert torch.allclose(attr.top_share(spike), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(attr.gini(uniform), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(attr.gini(spike), torch.full((2,), 0.99, dtype=torch.float64))
    ramp = torch.arange(100.0).view(1, 1, 10, 10).expand(2, 1, 10, 10)  # smooth: neighbours move together
    assert (attr.neighbour_correlation(ramp) > 0.9).all()
    noise = torch.rand(2, 1, 100, 100, generator=torch.Generator().manual_seed(0))
    assert attr.neighbour_correlation(noise).abs().max() < 0.03


def test_train_subset_vra_is_logged_and_old_logs_resume(tmp_path, data_dir):  # noqa: F811
    cfg = small(data_dir, epochs=2, eval_every=1, train_vra_subset=64)
    run = tmp_path / "run"
    train(build_config(None, cfg), run, progress=False)
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert all(0 <= float(r["train_subset_vra"]) <= float(r["train_subset_acc"]) <= 1 for r in rows)
    curves = read_curves(open_run(run))
    assert curves["epoch"] == [1, 2] and curves["summary"]["best_epoch"] in (1, 2)

    # a run written before the columns existed: its state's log rows lack them
    old = tmp_path / "old"
    cfg_old = small(data_dir, epochs=1, eval_every=1)
    train(build_config(None, cfg_old), old, progress=False)
    state = torch.load(old / "state.pt", weights_only=False)
    for r in state["log"]:
        r.pop("train_subset_acc"), r.pop("train_subset_vra")
    torch.save(state, old / "state.pt")
    assert read_curves(open_run(old)) is None  # no train-subset numbers
    train(build_config(None, {**cfg_old, "epochs": 2, "train_vra_subset": 32}), old, resume=True, progress=False)
    rows = list(csv.DictReader(open(old / "log.csv")))
    assert [r["train_subset_vra"] == "" for r in rows] == [True, False]
    assert read_curves(open_run(old))["epoch"] == [2]


def test_standard_loss_is_plain_cross_entropy():
    """The non-robust twin's loss: cross-entropy of the clean logits, blind to ε and the bottom logit."""
    from gloronet.losses import make_loss

    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(8, 10, generator=g), torch.randint(0, 10, (8,), generator=g)
    loss = make_loss("standard")
    assert loss.needs == "clean" and loss.lam is None
    ref = torch.nn.functional.cross_entropy(logits, y)
    assert torch.equal(loss(logits=logits, labels=y, bottom_logits=torch.zeros(8, 11), epsilon=0.3), ref)
    with pytest.raises(ValueError, match="requires logits"):
        loss(bottom_logits=torch.zeros(8, 11), labels=y)
    with pytest.raises(ValueError, match="unknown key"):
        make_loss({"name": "standard", "lam": 1.0})
