"""Issue 17, item 9: plots carry the command, model, dataset and run in their title, the degrade
plot's ε lines are in its legend, the attribution grid is titled by class name, ``overfit.png``
has no empty panel without the train subset, a missing matplotlib is said in one line;
``log.csv`` has LF endings and no float noise; an export's file name matches its format."""
from __future__ import annotations

import sys

import pytest

from gloronet import cli
from gloronet.export import format_of

from conftest import train_tiny_run
from test_train import data_dir  # noqa: F401  (module-scoped dataset fixture)

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.figure import Figure  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
FAST = ["--limit", "12", "-q", "--steps", "2", "--restarts", "1", "--targets", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):  # noqa: F811
    return train_tiny_run(tmp_path_factory.mktemp("runs") / "run", data_dir, "--lr=0.0015")


@pytest.fixture
def figures(monkeypatch):
    """Every figure saved while the test runs (drawn and written as usual)."""
    saved, real = [], Figure.savefig

    def keep(self, *a, **k):
        saved.append(self)
        return real(self, *a, **k)

    monkeypatch.setattr(Figure, "savefig", keep)
    return saved


def _texts(fig) -> dict:
    legends = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    return {"title": fig._suptitle.get_text() if fig._suptitle else "", "legends": legends,
            "axes": [ax.get_title() for ax in fig.axes]}


def test_titles_legends_and_panels(run, tmp_path, figures, capsys):
    assert cli.main(["certify", str(run), "--limit", "12", "-q", "--out", str(tmp_path)]) == 0
    assert cli.main(["degrade", str(run), *FAST, "--out", str(tmp_path)]) == 0
    assert cli.main(["overfit", str(run), "--limit", "12", "--images", "3", "--ig-steps", "2", "-q",
                     "--out", str(tmp_path)]) == 0
    certify, degrade, attributions, overfit = (_texts(f) for f in figures)  # the grid is drawn first
    for t, cmd in ((certify, "certify"), (degrade, "degrade"), (overfit, "overfit"), (attributions, "overfit")):
        assert t["title"].startswith(f"gloronet {cmd}: 2c2f on mnist") and t["title"].endswith(str(run)), t["title"]
    assert "ε = 0.3 (certified)" in degrade["legends"] and "2ε = 0.6 (immune to degradation)" in degrade["legends"]
    # overfit without train_vra_subset: the final model's numbers and gaps, in both panels
    a, b = figures[3].axes
    assert len(a.patches) == 4 and len(b.patches) == 2 and b.get_legend() is not None
    assert a.get_xlabel() == "" and "final model" in a.get_title()
    assert attributions["axes"][:3] == ["7", "2", "1"]  # MNIST names its classes by their digit
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["certify-n12.png", "degrade-n12.png",
                                                              "overfit-n12-attributions.png", "overfit-n12.png"]


def test_the_attribution_grid_uses_class_names(figures, tmp_path):
    import torch

    from gloronet.data import dataset_info
    from gloronet.evaluate.plots import plot_attributions

    names = list(dataset_info("fashion-mnist").class_names)
    grid = {"images": torch.rand(2, 1, 28, 28), "labels": torch.tensor([9, 0]), "class_names": names,
            "maps": {"robust IG": torch.rand(2, 1, 28, 28)}}
    assert plot_attributions({"_grid": grid}, tmp_path / "a.png", "t")
    assert [ax.get_title() for ax in figures[0].axes[:2]] == ["Ankle boot", "T-shirt/top"]


def test_without_matplotlib_the_reports_say_why_there_is_no_png(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["certify", str(run), "--limit", "8", "-q", "--out", str(tmp_path)]) == 0
    assert cli.main(["tightness", str(run), "--limit", "8", "--iters", "2", "-q", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [f"gloronet {c}: note: no PNG drawn: matplotlib is not installed (pip install 'gloronet[plot]')"
                   for c in ("certify", "tightness")]
    assert not list(tmp_path.glob("*.png")) and (tmp_path / "certify-n8.json").is_file()


def test_log_csv_has_lf_endings_and_no_float_noise(run):
    raw = (run / "log.csv").read_bytes()
    assert b"\r" not in raw and raw.endswith(b"\n")
    for value in raw.decode().splitlines()[1].split(","):
        if "." in value or "e" in value:
            digits = value.split("e")[0].replace(".", "").replace("-", "").lstrip("0")
            assert len(digits) <= 7, value  # e.g. 0.0015, not 0.0015000000000000000312


def test_an_export_file_name_matches_its_format(run, tmp_path, capsys):
    assert cli.main(["export", str(run), "--out", str(tmp_path / "m.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"gloronet export: error: {tmp_path / 'm.txt'}: an ONNX export is written to a .onnx file (name it m.onnx)"
    assert cli.main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "m.pt2")]) == 2
    assert "an ONNX export is written to a .onnx file" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    assert (format_of("a/m.pt2"), format_of("m.onnx"), format_of("m.txt")) == ("torch", "onnx", None)
