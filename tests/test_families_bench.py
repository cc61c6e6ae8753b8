"""`benchmarks/families.py` (issue 20's side-by-side table) end to end on fake MNIST / Fashion-MNIST
files with tiny limits: every column and row of the table, the synthetic throughput rows, and
resumption (a rerun skips what families.json already holds)."""
from __future__ import annotations

import argparse
import json

import pytest

from conftest import load_benchmark
from fake_datasets import write_fake

families = load_benchmark("families")

pytestmark = pytest.mark.usefixtures("single_thread")


def test_defaults_name_registered_models_and_existing_recipes():
    import gloronet

    for model in families.MODELS:
        gloronet.models.create(model, (1, 28, 28), 10, 1.58, **families.MODEL_ARGS.get(model, {}))
    for task in families.TASKS:
        cfg = families.run_config(task, "bro-mnist", 3, argparse.Namespace(
            epochs=2, train_limit=4, test_limit=4, data_dir=None, device=None), {"lr": 0.001})
        assert (cfg.model, cfg.seed, cfg.epochs, cfg.lr) == ("bro-mnist", 3, 2, 0.001)
        assert cfg.dataset == task.rsplit("-", 1)[0] and cfg.epsilon == float(task.rsplit("-", 1)[1])


def test_table_runs_end_to_end_and_resumes(tmp_path, monkeypatch):
    for name in ("mnist", "fashion-mnist"):
        write_fake(name, tmp_path / "data", n=4)
    monkeypatch.setenv("GLORONET_NO_DOWNLOAD", "1")
    out = tmp_path / "fam"
    models = ["2c2f", "sll-mnist"]  # the mechanics; bro-mnist is tested in test_bro_conv.py
    tasks = ["mnist-1.58"]  # both tasks' recipes build: test_defaults_name_registered_models_and_existing_recipes
    args = ["--models", *models, "--tasks", *tasks, "--epochs", "2", "--seeds", "1", "--train_limit", "4", "--test_limit", "4",
            "--data_dir", str(tmp_path / "data"), "--out", str(out), "--synthetic", "--synthetic_batch", "2",
            "--synthetic_steps", "1", "--lr=0.001", "--batch_size=2"]
    assert families.main(args) == 0
    res = json.loads((out / "families.json").read_text())
    assert {(r["task"], r["model"], r["seed"]) for r in res["runs"]} == {
        (t, m, s) for t in tasks for m in models for s in (0,)}
    for r in res["runs"]:
        assert r["epochs"] == 2 and r["n_test"] == 4
        assert 0 <= r["vra"] <= r["vra_exact"] <= r["clean"] <= 1
        assert r["s_per_epoch"] > 0 and r["bound_s"] > 0 and r["certify_img_s"] > 0
    assert [r["model"] for r in res["synthetic"]] == models
    assert all(r["train_step_ms"] > 0 and r["certify_img_s"] > 0 for r in res["synthetic"])
    md = (out / "families.md").read_text().splitlines()
    header = md[0]
    for _, title, _ in families.COLUMNS:
        assert f"| {title} |" in header
    for task in tasks:
        for m in models:
            assert sum(line.startswith(f"| {task} | {m} | 2 | 1 |") for line in md) == 1
    assert sum(line.startswith(f"| {m} | 3x32x32 |") for line in md for m in models) == len(models)

    before = (out / "families.json").read_text()
    monkeypatch.setattr(families, "measure_run", lambda *a, **k: pytest.fail("a finished run was redone"))
    monkeypatch.setattr(families, "measure_synthetic", lambda *a, **k: pytest.fail("a finished row was redone"))
    assert families.main(args) == 0
    assert (out / "families.json").read_text() == before


def test_table_averages_seeds_per_task_and_model():
    runs = [{"task": "mnist-1.58", "model": "bro-mnist", "seed": s, "epochs": 3, "clean": c, "vra": v,
             "vra_exact": v, "s_per_epoch": 2.0, "bound_s": 0.5, "certify_img_s": 1000.0, "device": "cpu"}
            for s, c, v in ((0, 0.9, 0.5), (1, 0.8, 0.7))]
    md = families.table({"runs": runs, "synthetic": []})
    row = next(line for line in md.splitlines() if line.startswith("| mnist-1.58 | bro-mnist |"))
    assert "| 3 | 2 | 85.00 ± 7.07 | 60.00 ± 14.14 | 60.00 ± 14.14 | 2.00 ± 0.00 |" in row
