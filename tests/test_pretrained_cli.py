"""Issue 17 (with issue 16's package): every command that takes a run directory also takes the
name of a shipped model, opens its package directory read-only and writes reports / exports to
``--out``, by default ``./<name>/``; ``gloronet models --pretrained`` lists the cards (missing
entries shown as —). The shipped model here is a tiny trained run in a stand-in ``MODELS_DIR``."""
from __future__ import annotations

import hashlib
import json
import shutil
import sys

import numpy as np
import pytest
import torch

import gloronet.pretrained
from gloronet import cli
from gloronet.data import load_dataset

from test_train import data_dir  # noqa: F401  (module-scoped dataset fixture)

pytestmark = pytest.mark.usefixtures("single_thread")
NAME = "tiny-mnist-2c2f"


@pytest.fixture(scope="module")
def package(tmp_path_factory, data_dir):  # noqa: F811
    root = tmp_path_factory.mktemp("models")
    run = tmp_path_factory.mktemp("runs") / "run"
    assert cli.main(["train", "--out", str(run), f"--data_dir={data_dir}", "--epochs=1", "--train_limit=128",
                     "--test_limit=32", "--batch_size=64", "-q"]) == 0
    shipped = root / NAME
    shipped.mkdir()
    for name in ("config.yaml", "model.json", "model.safetensors"):
        shutil.copy(run / name, shipped / name)
    (shipped / "card.json").write_text(json.dumps({"name": NAME, "dataset": "mnist", "epsilon": 0.3,
                                                   "architecture": "2c2f", "clean_accuracy": 0.5}))  # no "vra"
    other = root / "half-card"
    shutil.copytree(shipped, other)
    (other / "card.json").write_text("{}")
    return root


def _digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def shipped(package, monkeypatch, tmp_path, data_dir):  # noqa: F811
    monkeypatch.setattr(gloronet.pretrained.registry, "MODELS_DIR", package)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # no PNGs: where the files go is the point here
    monkeypatch.setenv("GLORONET_DATA", str(data_dir))
    monkeypatch.chdir(tmp_path)
    before = _digest(package / NAME)
    (package / NAME).chmod(0o555)  # read-only, like an installed package
    yield package / NAME
    (package / NAME).chmod(0o755)
    assert _digest(package / NAME) == before  # nothing written into the package


def test_every_command_takes_a_pretrained_name(shipped, tmp_path, capsys):
    x, _ = load_dataset("mnist", "test", limit=2, dtype=torch.uint8)
    np.save(tmp_path / "two.npy", x.numpy())
    commands = [["certify", NAME, "--limit", "8", "-q"],
                ["tightness", NAME, "--limit", "8", "--iters", "2", "-q"],
                ["export", NAME, "--format", "torch"],
                ["predict", NAME, "two.npy", "--out", "p.json"]]
    for args in commands:
        assert cli.main(args) == 0, args
    out = tmp_path / NAME
    assert {p.name for p in out.iterdir()} >= {"certify-n8.json", "tightness-n8.json", "model.pt2",
                                              "model.pt2.card.json"}
    assert json.loads((out / "certify-n8.json").read_text())["run"] == NAME
    assert json.loads((tmp_path / "p.json").read_text())["model"] == NAME
    assert cli.main(["certify", NAME, "--limit", "8", "-q", "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "certify-n8.json").is_file()
    capsys.readouterr()
    assert cli.main(["certify", "no-such-model", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not found, nor a pretrained model" in err and NAME in err


def test_a_run_directory_wins_and_reports_go_beside_it(shipped, tmp_path):
    # ./<name>/ holds reports from before: the name still means the shipped model
    assert cli.main(["certify", NAME, "--limit", "8", "-q"]) == 0
    assert cli.main(["certify", NAME, "--limit", "16", "-q"]) == 0
    assert (tmp_path / NAME / "certify-n16.json").is_file()
    run = tmp_path / "my-run"
    shutil.copytree(shipped, run)
    run.chmod(0o755)
    assert cli.main(["certify", str(run), "--limit", "8", "-q"]) == 0  # an actual run directory: its own
    assert (run / "certify-n8.json").is_file()


def test_models_lists_the_pretrained_cards(shipped, capsys):
    assert cli.main(["models", "--pretrained"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith(f"| {NAME} "))
    assert row.split("|")[1:-1] == [f" {NAME} ", " mnist ", " 0.3 ", " 2c2f ", " 1×28×28 ", " 50.00% ", " — "]
    assert "| half-card | — | — | — | 1×28×28 | — | — |" in out
