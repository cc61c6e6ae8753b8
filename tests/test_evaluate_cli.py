"""The five study commands end to end on a tiny trained run and its non-robust twin: each writes
<cmd>.json / .md / .png; bad input is a one-line error with exit status 2; a broken certificate
(simulated by inflating the certified radii) exits 1 and saves the counterexamples."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import gloronet
from gloronet import cli
from gloronet.config import build_config
from gloronet.train import train

from test_train import data_dir, small  # noqa: F401  (module-scoped dataset fixture)

pytestmark = pytest.mark.usefixtures("single_thread")
FAST = ["--limit", "24", "-q", "--steps", "4", "--restarts", "1", "--targets", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):  # noqa: F811
    root = tmp_path_factory.mktemp("runs")
    train(build_config(None, small(data_dir, epochs=2, eval_every=1, train_vra_subset=32)), root / "robust", progress=False)
    train(build_config(None, small(data_dir, epochs=1, loss="standard")), root / "twin", progress=False)
    return root


def _outputs(folder, name):  # name: the report's file stem, <command>-n<limit>
    report = json.loads((folder / f"{name}.json").read_text())
    assert (folder / f"{name}.md").read_text().startswith(f"### gloronet {name.split('-')[0]}")
    pytest.importorskip("matplotlib")
    assert (folder / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return report


def test_attack_and_degrade(runs, tmp_path):
    assert cli.main(["attack", str(runs / "robust"), *FAST, "--out", str(tmp_path)]) == 0
    rep = _outputs(tmp_path, "attack-n24")
    assert rep["n"] == 24 and rep["broken_certified"] == 0 and rep["vra"] <= rep["robust_accuracy"] <= rep["clean_accuracy"]
    assert not (tmp_path / "attack-n24-counterexamples.safetensors").exists()
    assert cli.main(["degrade", str(runs / "robust"), *FAST, "--defended", str(runs / "twin"), "--out", str(tmp_path)]) == 0
    rep = _outputs(tmp_path, "degrade-n24")
    assert set(rep) >= {"model", "defended", "runs"} and rep["model"]["label_changed"] == 0
    assert 0 <= rep["model"]["fraction_degraded"] <= 1 and "| defended |" in (tmp_path / "degrade-n24.md").read_text()


def test_privacy_overfit_tightness(runs, tmp_path):
    robust, twin = str(runs / "robust"), str(runs / "twin")
    assert cli.main(["privacy", robust, "--twin", twin, "--limit", "40", "-q", "--out", str(tmp_path)]) == 0
    rep = _outputs(tmp_path, "privacy-n40")
    assert set(rep["models"]) == {"robust", "twin"} and rep["n_members"] == 40
    assert all(0 <= a["auc"] <= 1 for m in rep["models"].values() for a in m["attacks"].values())
    assert cli.main(["overfit", robust, "--twin", twin, "--limit", "32", "--images", "3", "--ig-steps", "4", "-q",
                     "--out", str(tmp_path)]) == 0
    rep = _outputs(tmp_path, "overfit-n32")
    assert rep["curves"]["epoch"] == [1, 2] and rep["twin_curves"] is None and set(rep["final"]) == {"robust", "twin"}
    assert (tmp_path / "overfit-n32-attributions.png").exists()
    assert cli.main(["tightness", robust, "--limit", "16", "--iters", "5", "-q", "--out", str(tmp_path)]) == 0
    rep = _outputs(tmp_path, "tightness-n16")
    assert rep["margin"]["slope_violations"] == 0 and rep["body"]["lower"] <= rep["body"]["bound"]


def test_bad_input_is_a_clear_error(runs, tmp_path, capsys, data_dir):  # noqa: F811
    robust = str(runs / "robust")
    other = tmp_path / "other"
    train(build_config(None, small(data_dir, epochs=1, train_limit=256)), other, progress=False)
    for args, words in [(["attack", str(tmp_path / "nope"), "-q"], "not found"),
                        (["tightness", robust, "--limit", "0", "-q"], "--limit"),
                        (["overfit", robust, "--images", "0", "-q"], "--images"),
                        (["degrade", robust, "--eps", "-1", "-q"], "epsilon"),
                        (["attack", robust, "--steps", "0", "-q"], "steps"),
                        (["privacy", robust, "--twin", str(other), "-q"], "train_limit")]:
        assert cli.main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and words in err, err


def test_a_broken_certificate_exits_1_with_counterexamples(runs, tmp_path, monkeypatch, capsys):
    real = gloronet.GloroNet.certify

    def inflated(self, x, *args, **kwargs):  # a "bug": radii 4x too large
        cert = real(self, x, *args, **kwargs)
        cert.radius = cert.radius * 4
        cert.certified = cert.radius > cert.epsilon
        return cert

    monkeypatch.setattr(gloronet.GloroNet, "certify", inflated)
    assert cli.main(["attack", str(runs / "robust"), *FAST, "--out", str(tmp_path)]) == 1
    assert "SOUNDNESS BUG" in capsys.readouterr().err
    rep = json.loads((tmp_path / "attack-n24.json").read_text())
    ce = load_file(str(tmp_path / "attack-n24-counterexamples.safetensors"))
    assert rep["broken_certified"] == len(ce["x"]) > 0
    assert (ce["distance"] < ce["radius"]).all()
    net = gloronet.checkpoint.load_model(runs / "robust").eval()
    with torch.no_grad():
        z = net(ce["x_adv"])
    own = z.gather(1, ce["pred"][:, None])[:, 0]
    assert (z.scatter(1, ce["pred"][:, None], -float("inf")).amax(1) >= own).all()
