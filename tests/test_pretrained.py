"""The shipped pretrained models (issue 16): present, within the size budget, hash-verified on
load, and certifying the shipped test split reproduces each model card — exactly on the CPU kind
the card was measured on, elsewhere within the card's borderline count
(:mod:`gloronet.pretrained.cards` derives that tolerance)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from gloronet import pretrained
from gloronet.certify import certify_dataset
from gloronet.data import SHIPPED_DIR, find_dataset_dir, load_dataset
from gloronet.pretrained.cards import machine, measure
from gloronet.runs import RunError, load_model

EXPECTED = ["fashion-mnist-2c2f-eps0.3", "mnist-2c2f-eps0.3", "mnist-4c3f-eps1.58"]
SHIPPED = pretrained.names()


def test_the_three_models_are_shipped_within_20_mb():
    assert SHIPPED == EXPECTED
    files = [f for f in pretrained.MODELS_DIR.rglob("*") if f.is_file()]
    files += [f for f in SHIPPED_DIR.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 20 * 2**20


def test_unknown_name_is_one_clear_error():
    assert pretrained.resolve("mnist-4c3f") is None and pretrained.resolve("../models") is None
    with pytest.raises(ValueError, match="no pretrained model named 'nope'; shipped: "):
        pretrained.load("nope")


def test_shipped_test_splits_are_found_offline(monkeypatch, tmp_path):
    """With no data directory, cache or download the test split comes from the package; the
    training split is never taken from there."""
    monkeypatch.delenv("GLORONET_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr("gloronet.data.SYSTEM_DIRS", {})
    for name in ("mnist", "fashion-mnist"):
        assert find_dataset_dir(name, download=False, split="test") == SHIPPED_DIR / name
        x, y = load_dataset(name, "test", download=False, dtype=torch.uint8)
        assert x.shape == (10000, 1, 28, 28) and torch.bincount(y).min() >= 800
        with pytest.raises(FileNotFoundError):
            find_dataset_dir(name, download=False, split="train")


@pytest.mark.parametrize("name", SHIPPED)
def test_card_matches_the_files(name):
    card = pretrained.card(name)
    meta = json.loads((pretrained.resolve(name) / "model.json").read_text())
    assert card["name"] == name and card["sha256"] == meta["sha256"] and card["epsilon"] == meta["epsilon"]
    assert card["architecture"] == meta["model"]["name"] and card["n"] == 10000
    net = pretrained.load(name)
    assert not net.training and net.epsilon == card["epsilon"] and net.input_range == (0.0, 1.0)


@pytest.mark.parametrize("name", SHIPPED)
def test_tampered_weights_are_refused(name, tmp_path):
    copy = tmp_path / name
    shutil.copytree(pretrained.resolve(name), copy)
    raw = bytearray((copy / "model.safetensors").read_bytes())
    raw[-5] ^= 0x01  # one bit of the last weight
    (copy / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(RunError, match="does not match the SHA-256"):
        load_model(copy)


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_certifying_the_test_split_reproduces_the_card(name):
    card = pretrained.card(name)
    net = pretrained.load(name)
    x, y = load_dataset(card["dataset"], "test", dtype=torch.uint8)
    got = measure(net, x, y)
    rep = certify_dataset(net, x, y, batch_size=1000)  # what `gloronet certify NAME` reports
    assert (rep["clean_accuracy"], rep["vra"][f"{net.epsilon:g}"]) == (got["clean_accuracy"], got["vra"])
    keys = ["correct", "certified_correct", "certified_correct_exact"]
    if machine() == card["measured_on"]:
        assert {k: got[k] for k in keys} == {k: card[k] for k in keys}
    else:
        assert abs(got["certified_correct"] - card["certified_correct"]) <= card["vra_borderline"]
        assert abs(got["correct"] - card["correct"]) <= card["clean_borderline"]
