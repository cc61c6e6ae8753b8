"""Issue 17, item 5: ``gloronet predict RUN FILES…`` certifies the user's own files — PNG / JPEG
(a folder too), ``.npy``, ``.npz`` — with the same radius ``certify_dataset`` gives the same pixels;
a shape or range mismatch is one line saying what the model expects; nothing is resized."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from gloronet import cli
from gloronet.checkpoint import load_model
from gloronet.data import load_dataset

from conftest import one_line_error, train_tiny_run
from test_train import data_dir  # noqa: F401  (module-scoped dataset fixture)

PIL = pytest.importorskip("PIL.Image")
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):  # noqa: F811
    return train_tiny_run(tmp_path_factory.mktemp("runs") / "run", data_dir)


@pytest.fixture(scope="module")
def pixels(data_dir):  # noqa: F811
    return load_dataset("mnist", "test", data_dir, 6, dtype=torch.uint8)


def _one_line(capsys, *words):
    assert one_line_error(capsys, *words).startswith("gloronet predict: error: ")


def test_files_folders_arrays_and_their_radii(run, pixels, tmp_path, capsys):
    x, y = pixels
    folder = tmp_path / "digits"
    folder.mkdir()
    for i in range(3):
        PIL.fromarray(x[i, 0].numpy()).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an input: skipped in a folder")
    np.save(tmp_path / "batch.npy", x[3:5].numpy())
    np.save(tmp_path / "floats.npy", x[5, 0].numpy().astype(np.float64) / 255)  # (H, W) floats in [0, 1]
    np.savez(tmp_path / "arch.npz", one=x[0].numpy(), two=x[1:3].numpy())
    outs = [tmp_path / "p.json", tmp_path / "p.csv"]
    args = ["predict", str(run), str(folder), str(tmp_path / "batch.npy"), str(tmp_path / "floats.npy"),
            str(tmp_path / "arch.npz"), "--out", str(outs[0]), "--out", str(outs[1])]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads(outs[0].read_text())
    rows = report["predictions"]
    names = [r["file"] for r in rows]
    assert names == [str(folder / f"{i}.png") for i in range(3)] + [
        f"{tmp_path / 'batch.npy'}[0]", f"{tmp_path / 'batch.npy'}[1]", str(tmp_path / "floats.npy"),
        f"{tmp_path / 'arch.npz'}:one", f"{tmp_path / 'arch.npz'}:two[0]", f"{tmp_path / 'arch.npz'}:two[1]"]
    # the oracle: the model certifying the same pixels / 255 itself, one file (one batch) at a time
    net = load_model(run)
    certs = [net.certify(x[i].float() / 255) for i in ([0], [1], [2], [3, 4], [5], [0], [1, 2])]
    pred, radius = torch.cat([c.pred for c in certs]), torch.cat([c.radius for c in certs])
    assert [r["class"] for r in rows] == pred.tolist()
    floats_row = 5  # float64 input: its radius may only shrink by the cast to float32
    for i, r in enumerate(rows):
        if i != floats_row:
            assert r["radius"] == float(radius[i]), r
        assert r["certified"] == (r["radius"] > net.epsilon) and r["class_name"] == str(r["class"])
    assert 0 <= rows[floats_row]["radius"] <= float(radius[floats_row])
    assert report["epsilon"] == net.epsilon and report["input_range"] == [0.0, 1.0]
    with open(outs[1], newline="") as f:
        table = list(csv.DictReader(f))
    assert [float(r["radius"]) for r in table] == [r["radius"] for r in rows]  # full precision
    assert "certified at ε = 0.3" in printed and printed.count(f"{folder}") == 3


def test_relaxed_sets_and_class_names(run, pixels, tmp_path, capsys):
    x, _ = pixels
    np.save(tmp_path / "b.npy", x.numpy())
    assert cli.main(["predict", str(run), str(tmp_path / "b.npy"), "--top-k", "3", "--eps", "0.05",
                     "--out", str(tmp_path / "p.json")]) == 0
    rows = json.loads((tmp_path / "p.json").read_text())["predictions"]
    cert = load_model(run).certify(x.float() / 255, 0.05, top_k=3)
    assert [r["certified_k"] for r in rows] == cert.k.tolist()
    for r, classes, k in zip(rows, cert.classes.tolist(), cert.k.tolist()):
        assert r["certified_set"] == classes[:k] and r["certified_set_names"] == [str(c) for c in classes[:k]]
    assert "certified set" in capsys.readouterr().out
    assert cli.main(["predict", str(run), str(tmp_path / "b.npy"), "--top-k", "2", "--affinity",
                     "fashion-mnist-groups"]) == 2
    _one_line(capsys, "--top-k or --affinity, not both")


@pytest.mark.parametrize("make, words", [
    (lambda p, x: PIL.fromarray(np.zeros((32, 32), np.uint8)).save(p / "big.png"),
     ["big.png is 32×32 pixels", "takes 1×28×28", "never resizes"]),
    (lambda p, x: PIL.fromarray(np.stack([x[0, 0].numpy(), x[1, 0].numpy(), x[2, 0].numpy()], -1)).save(p / "c.png"),
     ["c.png is a colour image", "grayscale"]),
    (lambda p, x: PIL.fromarray(np.zeros((28, 28, 2), np.uint8), "LA").save(p / "t.png"), ["transparent pixels"]),
    (lambda p, x: np.save(p / "hwc.npy", np.zeros((28, 28, 1), np.uint8)), ["shape (28, 28, 1)", "transpose"]),
    (lambda p, x: np.save(p / "f255.npy", x.numpy().astype(np.float32)), ["f255.npy", "[0, 255]", "divide", "by 255"]),
    (lambda p, x: np.save(p / "nan.npy", np.full((2, 1, 28, 28), np.nan, np.float32)), ["nan.npy", "NaN or Inf"]),
    (lambda p, x: np.save(p / "i64.npy", x.numpy().astype(np.int64)), ["int64", "uint8 pixels"]),
    (lambda p, x: np.save(p / "empty.npy", np.zeros((0, 1, 28, 28), np.uint8)), ["no inputs"]),
    (lambda p, x: (p / "notes.txt").write_text("hi"), ["unsupported file type .txt"]),
    (lambda p, x: (p / "bad.png").write_bytes(b"not a png"), ["bad.png: cannot read the image"]),
])
def test_a_mismatch_is_one_line_saying_what_the_model_expects(run, pixels, tmp_path, capsys, make, words):
    make(tmp_path, pixels[0])
    target = next(p for p in tmp_path.iterdir())
    assert cli.main(["predict", str(run), str(target), "--out", str(tmp_path / "p.json")]) == 2
    _one_line(capsys, *words)
    assert not (tmp_path / "p.json").exists()


def test_bad_outputs_and_folders_fail_before_any_work(run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["predict", str(run), str(tmp_path / "empty")]) == 2
    _one_line(capsys, "no images")
    assert cli.main(["predict", str(run), str(tmp_path / "missing.png")]) == 2
    _one_line(capsys, "missing.png: no such file")
    assert cli.main(["predict", str(run), str(tmp_path), "--out", str(tmp_path / "p.txt")]) == 2
    _one_line(capsys, "p.txt: predictions are written as .json or .csv")
