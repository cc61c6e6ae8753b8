"""Every recipe in configs/ parses, builds its architecture for its dataset's input shape, and
takes one finite training step with its own loss, optimizer and schedules (synthetic data:
CIFAR/Tiny-ImageNet/ImageNet are not available offline). LiResNet/CHORD recipes keep their
depth but are built at width 16 (dense width 32), BRONet's too: full width costs minutes per step on 2 CPU
cores; the full-width builds are exercised by benchmarks/throughput.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gloronet import data, models
from gloronet.models import bronet, liresnet
from gloronet.config import build_config
from gloronet.losses import make_loss
from gloronet.optim import make_optimizer
from gloronet.relaxed import make_relaxation
from gloronet.schedules import make_schedule
from gloronet.train import _TrainStep, train_step

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_recipes_for_every_table_row():
    names = {p.stem for p in CONFIGS}
    for row in ["mnist-2c2f-eps0.3", "mnist-4c3f-eps1.58", "cifar10-6c2f-eps36", "tiny-imagenet-8c2f-eps36",
                "fashion-mnist-2c2f-eps0.3", "fashion-mnist-4c3f-eps1.58", "cifar10-liresnet-18l256w-eps36",
                "cifar10-chord-12l512w-eps36", "imagenet-chord-12l588w-eps36", "cifar100-6c2f-rtk5-eps36",
                "cifar100-6c2f-affinity-eps36", "fashion-mnist-2c2f-rtk2-eps0.3", "fashion-mnist-2c2f-affinity-eps0.3"]:
        assert row in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_recipe_builds_and_steps(path):
    cfg = build_config(path)
    info = data.dataset_info(cfg.dataset)
    info_shape = info.in_shape
    torch.manual_seed(0)
    if cfg.model in bronet.BRONETS:  # same depth and dense depth, narrow (as the LiResNet / CHORD ones)
        fixed = {**bronet.BRONETS[cfg.model], "width": 16, "dense_width": 32}
        net = models.create("bronet", info_shape, info.num_classes, cfg.epsilon, **fixed, **cfg.model_args)
    elif cfg.model.startswith(("liresnet-", "chord-")):
        family, depth, _ = liresnet.parse_name(cfg.model)
        kw = {"dense_width": 32} if family == "chord" else {}
        net = liresnet.create(f"{family}-{depth}l16w", info_shape, info.num_classes, cfg.epsilon, **kw, **cfg.model_args)
    else:
        net = models.create(cfg.model, info_shape, info.num_classes, cfg.epsilon, **cfg.model_args)
    eps = make_schedule(cfg.train_epsilon, cfg.epochs, base=cfg.epsilon)
    lr = make_schedule(cfg.lr, cfg.epochs)
    lam = make_schedule(cfg.trades_lam, cfg.epochs) if cfg.trades_lam is not None else None
    assert 0 <= eps(0) and eps(cfg.epochs) >= cfg.epsilon * 0.99 and lr(cfg.epochs / 2) > 0
    opt = make_optimizer(net.parameters(), cfg.optimizer, cfg.weight_decay, cfg.lookahead)
    for g in opt.param_groups:
        g["lr"] = lr(1.0)
    x = torch.rand(2, *info_shape)
    y = torch.tensor([0, 1])
    before = [p.detach().clone() for p in net.parameters()]
    relax = make_relaxation(info.num_classes, cfg.top_k, cfg.affinity)
    loss, logits, bottom = train_step(_TrainStep(net.train()), opt, make_loss(cfg.loss), x, y, eps(1.0),
                                      lam(1.0) if lam else None, cfg, torch.device("cpu"), relax)
    assert torch.isfinite(loss) and logits.shape == (2, info.num_classes) and bottom.shape == (2, info.num_classes + 1)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_recipe_header_names_its_source(path):
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(line.startswith("# Source:") for line in header), f"{path.name}: no '# Source:' line in the header"
