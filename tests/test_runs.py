"""Issue 8, items 2, 3, 5, 6 and 8: the run directory never surprises — resume trusts the run's own
config, refuses what is not a run and another experiment, extends on the original schedule; every
fault is one line naming the file, exit status 2, nothing half-written; files respect the umask;
the input range and the weights are checked."""
from __future__ import annotations

import csv
import errno
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import gloronet
from gloronet import cli, runs
from gloronet.certify import certify_dataset
from gloronet.data import load_dataset

from test_train import data_dir, small  # noqa: F401  (module-scoped dataset fixture)

pytestmark = pytest.mark.usefixtures("single_thread")
TINY = ["--train_limit=128", "--test_limit=64", "--batch_size=64", "--eval_every=99", "-q"]


def _train_args(out: Path, data_dir: Path, *extra: str) -> list[str]:  # noqa: F811
    return ["train", "--out", str(out), f"--data_dir={data_dir}", "--epochs=1", *TINY, *extra]


def _one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):  # noqa: F811
    out = tmp_path_factory.mktemp("runs") / "run"
    assert cli.main(_train_args(out, data_dir, "--lr=5e-4")) == 0
    return out


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.is_file():
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


# -- item 2: resume ------------------------------------------------------------------------------
def test_resume_uses_the_runs_own_config_and_refuses_another_experiment(tmp_path, data_dir, capsys, monkeypatch):  # noqa: F811
    out = tmp_path / "run"
    import gloronet.train as train_mod

    real = train_mod.save_state

    def crash(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_state", crash)
    args = ["train", "--out", str(out), f"--data_dir={data_dir}", "--epochs", "2", "--lr=5e-4", *TINY]
    assert cli.main(args) == 130
    assert f"gloronet train --out {out} --resume" in capsys.readouterr().err  # the Ctrl-C hint
    monkeypatch.setattr(train_mod, "save_state", real)
    assert cli.main(["train", "--out", str(out), "--lr=1e-2", "--resume", "-q"]) == 2
    _one_line_error(capsys, "another experiment", "lr: 0.0005 -> 0.01")
    other = tmp_path / "other.yaml"
    other.write_text("dataset: mnist\nlr: 0.002\n")
    assert cli.main(["train", "-c", str(other), "--out", str(out), "--resume", "-q"]) == 2
    _one_line_error(capsys, str(other), "differs", "drop -c")
    assert cli.main(["train", "--out", str(out), "--resume", "-q"]) == 0  # launch overrides kept
    assert f"resuming {out} from epoch 1 of 2" in capsys.readouterr().out
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["lr"] == 5e-4 and saved["epochs"] == 2 and saved["train_limit"] == 128
    assert [r["epoch"] for r in csv.DictReader(open(out / "log.csv"))] == ["1", "2"]


def test_extension_keeps_the_original_schedule(tmp_path, data_dir, capsys):  # noqa: F811
    out = tmp_path / "run"
    lr = "--lr={kind: linear, start: 1e-3, end: 1e-4, ramp_fraction: 1.0}"
    assert cli.main(_train_args(out, data_dir, lr)) == 0
    assert cli.main(["train", "--out", str(out), "--resume", "-q"]) == 0
    assert "has trained all 1 epochs" in capsys.readouterr().out
    assert cli.main(["train", "--out", str(out), "--resume", "--epochs=2", "-q"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["epochs"] == 2 and saved["schedule_epochs"] == 1
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert float(rows[1]["lr"]) == pytest.approx(1e-4)  # held at the end, not re-stretched
    assert cli.main(["train", "--out", str(out), "--resume", "--epochs=1", "-q"]) == 2
    _one_line_error(capsys, "already trained 2 epochs")


def test_refuses_to_resume_a_non_run_and_to_overwrite_a_run(tmp_path, run, capsys):
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", tmp_path / "typo"):
        assert cli.main(["train", "--out", str(target), "--resume", "-q"]) == 2
        _one_line_error(capsys, "cannot resume", str(target))
        assert not (target / "config.yaml").exists()
    bare = _copy(run, tmp_path / "bare")
    (bare / "state.pt").unlink()
    assert cli.main(["train", "--out", str(bare), "--epochs=1", "-q"]) == 2
    _one_line_error(capsys, "already holds a run", "model.safetensors", "--resume")
    assert cli.main(["train", "--out", str(bare), "--resume", "-q"]) == 2
    _one_line_error(capsys, "no state.pt")
    assert (bare / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()
    early = tmp_path / "early"  # killed in its first epoch: only config.yaml
    early.mkdir()
    (early / "config.yaml").write_bytes((run / "config.yaml").read_bytes())
    assert cli.main(["train", "--out", str(early), "--resume", "-q"]) == 0
    assert "no checkpoint yet: starting from epoch 0" in capsys.readouterr().out and (early / "state.pt").is_file()


# -- item 3: faults ------------------------------------------------------------------------------
def test_disk_full_is_one_line_and_leaves_nothing_half_written(tmp_path, data_dir, capsys, monkeypatch):  # noqa: F811
    real = os.replace

    def full(src, dst, *a, **k):
        if str(dst).endswith("model.safetensors"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", full)
    out = tmp_path / "run"
    assert cli.main(_train_args(out, data_dir)) == 2
    _one_line_error(capsys, f"cannot write {out / 'model.safetensors'}: No space left on device")
    assert not (out / "model.safetensors").exists() and not list(out.glob(".*.tmp"))


def test_read_only_run_fails_before_certifying(run, capsys, monkeypatch):
    import gloronet.certify

    def denied(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    def never(*a, **k):
        raise AssertionError("certified before checking the output directory")

    monkeypatch.setattr(runs, "_open_new", denied)
    monkeypatch.setattr(gloronet.certify, "certify_dataset", never)
    assert cli.main(["certify", str(run), "-q", "--limit", "8"]) == 2
    _one_line_error(capsys, f"cannot write to {run}: Permission denied", "--out")


def test_damaged_files_are_one_line_errors(tmp_path, run, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\nlr: [1e-3\n")
    assert cli.main(["train", "-c", str(bad), "--out", str(tmp_path / "x")]) == 2
    _one_line_error(capsys, str(bad), "YAML syntax error at line")
    cases = {
        "state.pt": (b"", ["train", "--out", "{r}", "--resume", "-q"], "state.pt is empty or corrupt"),
        "model.safetensors": (b"\x00garbage", ["certify", "{r}", "-q"], "model.safetensors is corrupt"),
        "model.json": (b'{"model": {"name": "2c2f", "in_shape": [1, 28, 28], "num_classes": 10}}',
                       ["certify", "{r}", "-q"], "has no 'epsilon' entry"),
        "config.yaml": (b"dataset: [mnist\n", ["certify", "{r}", "-q"], "YAML syntax error"),
    }
    for i, (name, (content, args, words)) in enumerate(cases.items()):
        r = _copy(run, tmp_path / f"r{i}")
        (r / name).write_bytes(content)
        assert cli.main([a.format(r=r) for a in args]) == 2, name
        _one_line_error(capsys, str(r / name), words)


def test_stale_temps_cleaned_and_files_follow_the_umask(tmp_path, run, data_dir, capsys):  # noqa: F811
    r = _copy(run, tmp_path / "r")
    stale, report, mine = r / ".model.json.0badc0de.tmp", r / ".certify-n8.json.k3_x9abc.tmp", r / ".notes.tmp"
    for p in (stale, report, mine):
        p.write_text("half")
    assert cli.main(["certify", str(r), "--limit", "8", "-q"]) == 0
    assert not report.exists() and stale.exists()  # certify cleans only its own files' temporaries
    assert cli.main(["train", "--out", str(r), "--resume", "--epochs=2", "-q"]) == 0
    assert not stale.exists() and mine.exists()  # train owns the run directory; not our names: kept
    old = os.umask(0o022)
    try:
        out = tmp_path / "fresh"
        assert cli.main(_train_args(out, data_dir)) == 0
    finally:
        os.umask(old)
    for name in runs.RUN_FILES:
        assert (out / name).stat().st_mode & 0o777 == 0o644, name


# -- items 4, 5, 6: the Python API, input range, weights -----------------------------------------
def test_python_api_loads_an_eval_model_and_checks_inputs(run, data_dir):  # noqa: F811
    net = gloronet.checkpoint.load_model(run)
    assert not net.training and net.input_range == (0.0, 1.0)
    assert json.loads((run / "model.json").read_text())["input_range"] == [0.0, 1.0]
    x, y = load_dataset("mnist", "test", data_dir, 32)
    report = certify_dataset(net, x, y)
    assert report["n"] == 32 and 0 <= report["vra"]["0.3"] <= report["clean_accuracy"]
    with pytest.raises(ValueError, match=r"trained on inputs in \[0, 1\].*255"):
        certify_dataset(net, x * 255, y)
    with pytest.warns(UserWarning, match="trained on inputs in"):
        net.certify(x[:4] * 255)


def test_weights_are_hashed_and_must_be_finite(tmp_path, run, capsys):
    r = _copy(run, tmp_path / "r")
    state = load_file(str(r / "model.safetensors"))
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[name] = state[name].clone()
    state[name].view(-1)[0] += 1.0
    save_file(state, str(r / "model.safetensors"))
    assert cli.main(["certify", str(r), "-q"]) == 2
    _one_line_error(capsys, "does not match the SHA-256")
    state[name].view(-1)[0] = float("nan")
    save_file(state, str(r / "model.safetensors"))
    meta = json.loads((r / "model.json").read_text())
    meta["sha256"] = runs.weights_hash(state)
    (r / "model.json").write_text(json.dumps(meta))
    assert cli.main(["certify", str(r), "-q"]) == 2
    _one_line_error(capsys, name, "NaN or Inf")
    net = gloronet.checkpoint.load_model(run)
    with torch.no_grad():
        net.head.weight.view(-1)[0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        certify_dataset(net, torch.rand(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))


def test_quiet_keeps_epoch_lines_and_tensorboard(tmp_path, data_dir, capsys):  # noqa: F811
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert cli.main(_train_args(out, data_dir, "--tensorboard")) == 0
    captured = capsys.readouterr()
    assert "epoch=1 " in captured.out and "epoch 1/1" not in captured.err + captured.out
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert yaml.safe_load((out / "config.yaml").read_text())["tensorboard"] is True


def test_divergence_stops_before_saving(tmp_path, data_dir, capsys, monkeypatch):  # noqa: F811
    import gloronet.train as train_mod

    real = train_mod.make_loss
    monkeypatch.setattr(train_mod, "make_loss", lambda spec: lambda **kw: real(spec)(**kw) * float("nan"))
    out = tmp_path / "run"
    assert cli.main(_train_args(out, data_dir)) == 2
    _one_line_error(capsys, "training diverged in epoch 1", "lower lr")
    assert not (out / "model.safetensors").exists() and not (out / "state.pt").exists()


def test_collapse_stops_before_saving_and_keeps_the_last_checkpoint(tmp_path, data_dir, capsys, monkeypatch):  # noqa: F811
    """Epoch 1 learns (perfect logits), epoch 2 collapses (every prediction wrong): the run stops
    with one line, state.pt still holds epoch 1; with collapse_guard: false it carries on."""
    import gloronet.train as train_mod

    real, calls = train_mod.train_step, [0]

    def step(*args, **kwargs):
        loss, logits, bottom = real(*args, **kwargs)
        calls[0] += 1
        y = args[4]
        fake = torch.nn.functional.one_hot(y if calls[0] <= 32 else (y + 1) % logits.shape[1], logits.shape[1]).float()
        return loss, fake, bottom

    monkeypatch.setattr(train_mod, "train_step", step)
    out = tmp_path / "run"
    args = ["train", "--out", str(out), f"--data_dir={data_dir}", "--epochs=3", *TINY, "--train_limit=2048"]
    assert cli.main(args) == 2  # 2048 images / 64 per batch: 32 steps an epoch, the last tenth (3 steps, 192 images) judged
    _one_line_error(capsys, "training collapsed in epoch 2", "chance 10.0%", "after 100.0%", "collapse_guard: false")
    assert train_mod.load_state(out)["epoch"] == 1
    calls[0] = 0
    args[2] = str(tmp_path / "off")
    assert cli.main([*args, "--collapse_guard=false"]) == 0


def test_a_run_that_fails_to_start_leaves_no_run_behind(tmp_path, data_dir, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert cli.main(_train_args(out, data_dir, "--model_args={head: bogus}")) == 2
    _one_line_error(capsys, "head must be")
    assert not runs.run_files(out)
    assert cli.main(_train_args(out, data_dir)) == 0  # the corrected command needs no --resume
