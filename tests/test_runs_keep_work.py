"""Issue 17, items 3 and 4: runs and reports never lose work — one training process per run (a
live one refused, a killed one's lock stale), a disk-full checkpoint that still resumes, a way to
restart a run that has weights but no state, reports named after what they measured, and models
of another dataset refused with one line before any data is read."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

import gloronet
from gloronet import cli, runlock, runs
from gloronet.reports import report_name

from conftest import one_line_error, train_tiny_run
from test_train import data_dir  # noqa: F401  (module-scoped dataset fixture)

pytestmark = pytest.mark.usefixtures("single_thread")
TINY = ["--train_limit=128", "--test_limit=32", "--batch_size=64", "-q"]
SRC = str(Path(gloronet.__file__).resolve().parents[1])


def _train(out: Path, data_dir: Path, *extra: str) -> list[str]:  # noqa: F811
    return ["train", "--out", str(out), f"--data_dir={data_dir}", "--epochs=1", *TINY, *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):  # noqa: F811
    return train_tiny_run(tmp_path_factory.mktemp("runs") / "run", data_dir)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- the lock ------------------------------------------------------------------------------------
def test_a_live_run_is_refused_and_a_killed_ones_lock_is_stale(tmp_path, run, capsys):
    r = _copy(run, tmp_path / "r")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom gloronet import runlock\nrunlock.acquire(sys.argv[1])\n"
         "print('locked', flush=True)\ntime.sleep(120)", str(r)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": SRC})
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert cli.main(["train", "--out", str(r), "--resume", "--epochs=2", "-q"]) == 2
        one_line_error(capsys, f"{r} is being trained by pid {holder.pid}", "two processes must not write one run")
        assert cli.main(["train", "--out", str(r), "--restart", "-q"]) == 2
        one_line_error(capsys, "is being trained by")
        assert json.loads((r / runlock.LOCK_NAME).read_text())["pid"] == holder.pid
    finally:
        holder.kill()  # kill -9: the process cannot clean up
        holder.wait()
    assert (r / runlock.LOCK_NAME).exists()  # left behind, but its flock died with the process
    assert cli.main(["train", "--out", str(r), "--resume", "--epochs=2", "-q"]) == 0
    assert not (r / runlock.LOCK_NAME).exists()
    assert [h["kind"] for h in json.loads((r / "history.json").read_text())] == ["new", "resume"]


def test_without_flock_the_recorded_pid_and_host_decide(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "no locks available")

    monkeypatch.setattr(runlock.fcntl, "flock", no_flock)
    lock = tmp_path / runlock.LOCK_NAME
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = runlock.socket.gethostname()
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": host, "since": 0}))
    runlock.release(tmp_path, runlock.acquire(tmp_path))  # its process is gone: stale
    lock.write_text(json.dumps({"pid": os.getppid(), "host": host, "since": 0}))
    with pytest.raises(runlock.RunLockedError, match=f"pid {os.getppid()}"):
        runlock.acquire(tmp_path)
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": 0}))
    with pytest.raises(runlock.RunLockedError, match=f"delete {lock}"):
        runlock.acquire(tmp_path)


# -- checkpoints cut short, restart --------------------------------------------------------------
def _fail_once(monkeypatch, name: str) -> None:
    real = os.replace
    state = {"failed": False}

    def full(src, dst, *a, **k):
        if str(dst).endswith(name) and not state["failed"]:
            state["failed"] = True
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", full)


@pytest.mark.parametrize("full_at", ["state.pt", "model.safetensors"])
def test_a_disk_full_first_checkpoint_still_resumes(tmp_path, data_dir, capsys, monkeypatch, full_at):  # noqa: F811
    out = tmp_path / "run"
    _fail_once(monkeypatch, full_at)
    assert cli.main(_train(out, data_dir)) == 2
    one_line_error(capsys, f"cannot write {out / full_at}: No space left on device")
    assert cli.main(["train", "--out", str(out), "--resume", "-q"]) == 0  # no stuck run
    state = runs.load_state(out)
    net = runs.load_model(out)  # written, and it holds the weights of state.pt
    assert state["epoch"] == 1 and runs.weights_hash(state["model"]) == runs.weights_hash(net.state_dict())


def test_resume_rewrites_damaged_model_files_from_state(tmp_path, run, capsys):
    r = _copy(run, tmp_path / "r")
    good = (r / "model.safetensors").read_bytes()
    (r / "model.safetensors").write_bytes(good[:100])  # model.json still names the right SHA-256
    assert cli.main(["certify", str(r), "-q"]) == 2
    one_line_error(capsys, "model.safetensors is corrupt")
    assert cli.main(["train", "--out", str(r), "--resume", "-q"]) == 0  # all epochs trained: only the repair
    assert (r / "model.safetensors").read_bytes() == good
    (r / "history.json").write_text("[{")
    assert cli.main(["train", "--out", str(r), "--resume", "-q"]) == 2
    one_line_error(capsys, "history.json is not valid JSON", "move it away to continue")
    assert cli.main(["certify", str(r / "model.json"), "-q"]) == 2
    one_line_error(capsys, "model.json is a file: name the run directory that holds it")


def test_restart_a_run_with_weights_but_no_state(tmp_path, run, capsys):
    r = _copy(run, tmp_path / "r")
    (r / "state.pt").unlink()
    old_weights = (r / "model.safetensors").read_bytes()
    assert cli.main(["train", "--out", str(r), "--resume", "-q"]) == 2
    one_line_error(capsys, "no state.pt", f"gloronet train --out {r} --restart")
    assert cli.main(["train", "--out", str(r), "--restart", "--test_limit=16", "-q"]) == 0
    assert "restarting" in capsys.readouterr().out
    previous = list(r.glob("previous-*"))
    assert len(previous) == 1 and (previous[0] / "model.safetensors").read_bytes() == old_weights  # kept
    assert (r / "state.pt").is_file() and yaml.safe_load((r / "config.yaml").read_text())["test_limit"] == 16
    history = json.loads((r / "history.json").read_text())
    assert history[-1]["kind"] == "restart" and history[-1]["set_aside"] == str(previous[0])
    assert history[-1]["changed"] == {"test_limit": [32, 16]}
    assert cli.main(["train", "--out", str(r), "--restart", "--lr=0.5", "-q"]) == 2  # still the same experiment
    one_line_error(capsys, "another experiment", "lr")


# -- reports -------------------------------------------------------------------------------------
def test_reports_are_named_after_what_they_measure(tmp_path, run, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # JSON / Markdown only: the names are the point here
    r = _copy(run, tmp_path / "r")
    evaluations = {"certify-n8": ["--limit", "8"], "certify-n16": ["--limit", "16"],
                   "certify-train-n8": ["--split", "train", "--limit", "8"],
                   "certify-eps0.2-n8-exact": ["--eps", "0.2", "--limit", "8", "--arithmetic", "exact"]}
    for name, args in evaluations.items():
        assert cli.main(["certify", str(r), *args, "-q"]) == 0
        report = json.loads((r / f"{name}.json").read_text())
        assert report["n"] == int(args[args.index("--limit") + 1]) and report["split"] == (
            "train" if "train" in args else "test")
    assert sorted(p.stem for p in r.glob("certify*.json")) == sorted(evaluations)  # none replaced another
    assert cli.main(["certify", str(r), "--limit", "8", "--eps", "0.3", "0.1", "-q"]) == 0  # the same again: replaced
    assert json.loads((r / "certify-n8.json").read_text())["vra"].keys() >= {"0.1"}
    assert cli.main(["tightness", str(r), "--limit", "8", "--iters", "2", "-q"]) == 0
    assert (r / "tightness-n8.json").is_file()
    opened = runs.open_run(r)
    assert report_name("attack", opened, limit=200, epsilon=0.5) == "attack-eps0.5-n200"
    assert report_name("privacy", opened, limit=1000, default_limit=1000) == "privacy"
    assert report_name("certify", opened, top_k=2) == "certify-top2"
    assert report_name("certify", opened, affinity="fashion-mnist-groups") == "certify-affinity-fashion-mnist-groups"
    assert report_name("certify", opened, epsilon=opened.trained_epsilon) == "certify"


def _as_dataset(src: Path, dst: Path, dataset: str | None) -> Path:
    """A copy of a run that records another dataset (None: records none); the weights are unchanged."""
    r = _copy(src, dst)
    cfg, meta = yaml.safe_load((r / "config.yaml").read_text()), json.loads((r / "model.json").read_text())
    if dataset is None:
        (r / "config.yaml").unlink()
        meta.pop("dataset")
    else:
        cfg["dataset"] = meta["dataset"] = dataset
        (r / "config.yaml").write_text(yaml.safe_dump(cfg))
    (r / "model.json").write_text(json.dumps(meta))
    return r


def test_a_model_of_another_dataset_is_refused_before_any_data_is_read(tmp_path, run, capsys, monkeypatch):
    fashion = _as_dataset(run, tmp_path / "fashion", "fashion-mnist")
    bare = _as_dataset(run, tmp_path / "bare", None)
    import gloronet.data

    def never(*a, **k):
        raise AssertionError("read data before refusing")

    monkeypatch.setattr(gloronet.data, "load_dataset", never)
    cases = [
        (["certify", str(run), "--dataset", "fashion-mnist"], [f"{run} holds a model trained on mnist, not fashion-mnist"]),
        (["degrade", str(run), "--defended", str(fashion), "-q"], [f"{fashion} holds a model trained on fashion-mnist, not mnist",
                                                                  "--defended must be a model of mnist"]),
        (["overfit", str(run), "--twin", str(fashion), "-q"], ["--twin must be a model of mnist"]),
        (["privacy", str(run), "--twin", str(fashion), "-q"], ["--twin must be a model of mnist"]),
        (["certify", str(bare), "--dataset", "cifar10"], ["takes 1×28×28 inputs and 10 classes",
                                                          "cifar10 has 3×32×32 images"]),
        (["certify", str(bare)], ["has no config.yaml naming its dataset: pass --dataset"]),
    ]
    for args, words in cases:
        assert cli.main(args) == 2, args
        one_line_error(capsys, *words)


def test_a_run_trained_elsewhere_looks_its_data_up(tmp_path, run, data_dir, monkeypatch):  # noqa: F811
    r = _copy(run, tmp_path / "r")
    cfg = yaml.safe_load((r / "config.yaml").read_text())
    cfg["data_dir"] = str(tmp_path / "on-another-machine")
    (r / "config.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("GLORONET_DATA", str(data_dir))
    assert cli.main(["certify", str(r), "--limit", "8", "-q"]) == 0  # the recorded folder is gone: looked up
    assert cli.main(["certify", str(r), "--limit", "8", "-q", "--data-dir", str(tmp_path / "typo")]) == 2  # given: must exist
    assert load_file(str(r / "model.safetensors"))  # untouched
