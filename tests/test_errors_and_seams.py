"""Issue 17, items 6 and 7: errors that read well — weights of another architecture, a missing
``--data-dir``, a NaN pixel, an empty input, uint8 given to ``net.certify`` — and the API seams:
``--top-k`` with ``--affinity`` never silently merged (also not with the run's own relaxation), a
relaxed certificate answers ``.pred`` / ``.certified`` like an ordinary one."""
from __future__ import annotations

import json
import math
import shutil
import sys

import pytest
import torch
import yaml

import gloronet
from gloronet import cli
from gloronet.certify import certify_dataset
from gloronet.data import DatasetNotFoundError, load_dataset

from conftest import one_line_error, train_tiny_run
from test_train import data_dir  # noqa: F401  (module-scoped dataset fixture)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):  # noqa: F811
    return train_tiny_run(tmp_path_factory.mktemp("runs") / "run", data_dir)


def test_weights_of_another_architecture_are_one_short_line(tmp_path, run, capsys):
    r = tmp_path / "r"
    shutil.copytree(run, r)
    meta = json.loads((r / "model.json").read_text())
    meta["model"]["name"] = "4c3f"
    (r / "model.json").write_text(json.dumps(meta))
    assert cli.main(["certify", str(r), "-q"]) == 2
    err = one_line_error(capsys, f"{r / 'model.safetensors'} does not fit the model in model.json (4c3f)", "missing (",
                    "unexpected (", "of another shape (")
    assert len(err) < 600, len(err)  # not torch's listing of every tensor


def test_a_data_dir_that_does_not_exist_is_refused(tmp_path, run, data_dir, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("GLORONET_DATA", str(data_dir))  # the data would be found elsewhere: no fall-through
    with pytest.raises(DatasetNotFoundError, match="data directory .*typo not found"):
        load_dataset("mnist", "test", tmp_path / "typo", limit=4)
    assert cli.main(["certify", str(run), "--data-dir", str(tmp_path / "typo"), "--limit", "4", "-q"]) == 2
    one_line_error(capsys, f"data directory {tmp_path / 'typo'} not found", "must name an existing folder")
    assert cli.main(["train", "--out", str(tmp_path / "new"), f"--data_dir={tmp_path / 'typo'}", "-q"]) == 2
    one_line_error(capsys, "not found")
    assert not (tmp_path / "new").exists()  # a run that fails to start leaves no directory


def test_nan_pixels_empty_inputs_and_uint8_read_well(run):
    net = gloronet.checkpoint.load_model(run)
    x = torch.rand(4, 1, 28, 28)
    x[2, 0, 5, 5] = float("nan")
    assert net.out_of_range(x) == "inputs hold NaN or Inf values (1 of 4 examples): such inputs never certify"
    inf = x.nan_to_num(0.5)
    inf[1, 0, 0, 0] = float("inf")  # an infinity alone, also where the known range is unbounded
    net.input_range, known = (-math.inf, math.inf), net.input_range
    assert net.out_of_range(inf) == "inputs hold NaN or Inf values (1 of 4 examples): such inputs never certify"
    net.input_range = known
    assert net.out_of_range(inf.clamp(0, 1)) is None
    with pytest.raises(ValueError, match=r"certify_dataset: inputs hold NaN or Inf values \(1 of 4 examples\)"):
        certify_dataset(net, x, torch.zeros(4, dtype=torch.long))
    with pytest.warns(UserWarning, match="NaN or Inf"):
        assert not net.certify(x).certified[2]
    with pytest.raises(ValueError, match="no images to certify"):
        certify_dataset(net, torch.zeros(0, 1, 28, 28, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    pixels = (x.nan_to_num(0.5) * 255).to(torch.uint8)
    with pytest.raises(ValueError, match=r"got a torch.uint8 tensor of shape \(4, 1, 28, 28\): convert uint8 pixels "
                                         r"with x.float\(\) / 255"):
        net.certify(pixels)
    report = certify_dataset(net, pixels, torch.zeros(4, dtype=torch.long))  # uint8 as is
    assert report["n"] == 4


def test_a_relaxed_certificate_has_pred_and_certified(run):
    net = gloronet.checkpoint.load_model(run)
    x = load_dataset("mnist", "test", limit=64)[0]
    plain = net.certify(x, 0.05, fast=False)  # the program relaxed certificates run throughout
    fast = net.certify(x, 0.05)  # also re-measures near-ε points (chunked, float64 centre): never fewer
    assert bool((fast.certified | ~plain.certified).all())
    for kwargs in ({"top_k": 1}, {"top_k": 3}, {"affinity": "fashion-mnist-groups"}):
        rel = net.certify(x, 0.05, **kwargs)
        assert torch.equal(rel.pred, plain.pred) and torch.equal(rel.pred, rel.classes[:, 0])
        assert torch.equal(rel.certified, rel.k > 0)
        if kwargs == {"top_k": 1}:
            assert torch.equal(rel.certified, plain.certified)
        assert bool((rel.certified | ~plain.certified).all())  # certified at k = 1 implies certified


def test_top_k_and_affinity_are_never_merged(tmp_path, run, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # reports without PNGs: faster
    r = tmp_path / "r"
    shutil.copytree(run, r)
    cfg = yaml.safe_load((r / "config.yaml").read_text())
    cfg["affinity"] = "fashion-mnist-groups"  # as if trained for affinity robustness
    (r / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main(["certify", str(r), "--limit", "16", "-q", "--top-k", "2", "--affinity", "fashion-mnist-groups"]) == 2
    one_line_error(capsys, "give --top-k or --affinity, not both")
    assert cli.main(["certify", str(r), "--limit", "16", "-q", "--top-k", "2"]) == 0
    rel = json.loads((r / "certify-n16-top2.json").read_text())["relaxed"]
    assert rel["kind"] == "rtk" and rel["top_k"] == 2 and "groups" not in rel  # not the run's affinity merged in
    assert cli.main(["certify", str(r), "--limit", "16", "-q"]) == 0
    assert json.loads((r / "certify-n16.json").read_text())["relaxed"]["kind"] == "affinity"  # the run's own
