"""Membership-inference metrics on cases with known answers: identically distributed members and
non-members (AUC 1/2), Gaussians with a known shift (AUC Φ(μ/√2), advantage 2Φ(μ/2) − 1),
perfect separation, all-tied scores, a brute-force Mann-Whitney oracle — and the study itself on
a model whose members and non-members are the same images."""
from __future__ import annotations

import math

import pytest
import torch

from gloronet.evaluate import privacy

from test_evaluate_attack import linear_gloro_run, mid_gray_images


def _metrics(a, b):
    return privacy.attack_metrics(*privacy.roc_curve(a, b))


def _phi(t):
    return 0.5 * (1 + math.erf(t / math.sqrt(2)))


def test_identically_distributed_members_give_auc_one_half():
    g = torch.Generator().manual_seed(0)
    m = _metrics(torch.randn(20000, generator=g), torch.randn(20000, generator=g))
    assert m["auc"] == pytest.approx(0.5, abs=0.01)
    assert m["advantage"] < 0.03
    assert m["tpr_at_1%_fpr"] < 0.02 and m["tpr_at_0.1%_fpr"] < 0.005


def test_shifted_gaussians_match_the_closed_form():
    g = torch.Generator().manual_seed(1)
    mu = 1.0
    m = _metrics(torch.randn(20000, generator=g) + mu, torch.randn(20000, generator=g))
    assert m["auc"] == pytest.approx(_phi(mu / math.sqrt(2)), abs=0.01)
    assert m["advantage"] == pytest.approx(2 * _phi(mu / 2) - 1, abs=0.02)
    # TPR at FPR α for equal-variance Gaussians: 1 − Φ(Φ⁻¹(1 − α) − μ)
    assert m["tpr_at_1%_fpr"] == pytest.approx(1 - _phi(2.3263 - mu), abs=0.02)


def test_separation_ties_and_brute_force_oracle():
    sep = _metrics(torch.tensor([5.0, 6.0, 7.0]), torch.tensor([1.0, 2.0]))
    assert sep["auc"] == 1.0 and sep["advantage"] == 1.0 and sep["tpr_at_0.1%_fpr"] == 1.0
    tied = _metrics(torch.ones(10), torch.ones(7))
    assert tied["auc"] == 0.5 and tied["advantage"] == 0.0 and tied["tpr_at_1%_fpr"] == 0.0
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, 6, (40,), generator=g).double(), torch.randint(0, 6, (55,), generator=g).double()
    mw = ((a[:, None] > b[None]).double() + 0.5 * (a[:, None] == b[None]).double()).mean()
    assert _metrics(a, b)["auc"] == pytest.approx(float(mw), abs=1e-12)
    fpr, tpr = privacy.roc_curve(a, b)
    brute = max(float((a >= t).double().mean() - (b >= t).double().mean()) for t in torch.cat([a, b]).unique())
    assert float((tpr - fpr).max()) == pytest.approx(max(brute, 0.0))


def test_matches_scikit_learn_when_installed():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(500, generator=g) + 0.3, torch.randn(400, generator=g)
    y = [1] * len(a) + [0] * len(b)
    assert _metrics(a, b)["auc"] == pytest.approx(metrics.roc_auc_score(y, torch.cat([a, b]).numpy()))


@pytest.mark.usefixtures("single_thread")
def test_study_on_identical_member_and_non_member_sets():
    """Same images as members and non-members: every score ties pairwise, so AUC is exactly 1/2."""
    run = linear_gloro_run(3)
    images = mid_gray_images(64)
    labels = run.net(run.inputs(images)).argmax(1)
    metrics, rocs = privacy.study(run, (images, labels), (images, labels))
    for name in privacy.SCORES:
        assert metrics["attacks"][name]["auc"] == 0.5 and metrics["attacks"][name]["advantage"] == 0.0
        assert len(rocs[name][0]) == len(rocs[name][1])
    assert metrics["train_loss"] == metrics["test_loss"]
