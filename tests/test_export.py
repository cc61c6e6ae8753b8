"""Issue 8, item 8: ``gloronet export`` — the model with its sound pairwise constants frozen in.

A small 2C2F trained for one epoch on MNIST (real data when the dataset directory has it) is
exported; the ONNX file runs in onnxruntime on test images: its logits match the model's, its
certificates (``y_j > bottom_logit_exact``) are the real-arithmetic ones of
``net.certify(arithmetic="exact")`` and include every float-sound certificate of ``net.certify``.
"""
from __future__ import annotations

import json

import pytest
import torch

import gloronet
from gloronet import cli, kernels
from gloronet.data import load_dataset
from gloronet.export import FrozenGloro, certified, export_model

from test_train import data_dir  # noqa: F401  (module-scoped dataset fixture)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):  # noqa: F811
    out = tmp_path_factory.mktemp("export") / "run"
    args = ["train", "--out", str(out), f"--data_dir={data_dir}", "--epochs=1", "--train_limit=2048",
            "--test_limit=64", "--batch_size=64", "--eval_every=99", "--epsilon=0.3", "-q"]
    assert cli.main(args) == 0
    return out


def _check_certificates(net, x, logits, bottom):
    ours = certified(logits, bottom)
    exact = net.certify(x, arithmetic="exact")
    sound = net.certify(x)
    assert (logits.argmax(1) == exact.pred).all()
    assert not (sound.certified & ~ours).any()  # every float-sound certificate survives the export
    # the export's test is certify(arithmetic="exact"); rounding may flip points on the boundary only
    near = (exact.radius - net.epsilon).abs() <= 1e-4 * net.epsilon
    assert ((ours == exact.certified) | near).all()
    return ours


def test_onnx_export_matches_the_model_and_its_certificates(run, data_dir, tmp_path, capsys):  # noqa: F811
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    assert cli.main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    assert "m.onnx.card.json" in capsys.readouterr().out
    net = gloronet.checkpoint.load_model(run)
    x, _ = load_dataset("mnist", "test", data_dir, 300)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "bottom_logit_exact"]
    logits, bottom = (torch.from_numpy(a) for a in session.run(None, {"x": x.numpy()}))
    with torch.no_grad():
        torch.testing.assert_close(logits, net(x), rtol=0, atol=1e-4)
    ours = _check_certificates(net, x, logits, bottom)
    assert 0 < int(ours.sum()) < len(x)  # a real mix of certified and not
    card = json.loads((tmp_path / "m.onnx.card.json").read_text())
    meta = json.loads((run / "model.json").read_text())
    assert card["epsilon"] == 0.3 and card["weights_sha256"] == meta["sha256"] and card["opset"] == 18
    assert card["lipschitz_bound"] == net.lipschitz_bound() and card["training"]["train_limit"] == 2048
    assert card["input_range"] == [0.0, 1.0] and "NOT the floating-point-sound" in card["certificate"]


def test_torch_export_and_frozen_constants(run, data_dir, tmp_path):  # noqa: F811
    net = gloronet.checkpoint.load_model(run)
    path, card = export_model(net, tmp_path / "m.pt2", "torch")
    program = torch.export.load(str(path)).module()
    x, _ = load_dataset("mnist", "test", data_dir, 50)
    logits, bottom = program(x)
    with torch.no_grad(), kernels.sound_kernels():  # the exported graph is the certified (chunked) program
        torch.testing.assert_close(logits, net.head(net.body(x)), rtol=0, atol=0)
    with torch.no_grad():
        assert torch.equal(logits.argmax(1), net(x).argmax(1))  # net(x) runs fused kernels, same predictions
    _check_certificates(net, x, logits, bottom)
    frozen = FrozenGloro(net).eps_K.double()
    assert (frozen >= net.lipschitz_constant() * net.epsilon).all()  # rounded up, never down
    assert json.loads(card.read_text())["format"] == "torch"
