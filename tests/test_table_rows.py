"""Every row of the published table runs end to end through `benchmarks/table_rows.py` — its
recipe's `gloronet train` command (LiResNet / CHORD at width 16; a constant lr, so that two
epochs are a valid run of every schedule), then the certification of the
test split and the result table — with tiny limits on synthetic data in the dataset's real file
format, so the commands in the README's table cannot rot. The real runs need the data and a GPU."""
from __future__ import annotations

import json

import pytest

from conftest import load_benchmark
from fake_datasets import write_fake
from gloronet.config import build_config

table_rows = load_benchmark("table_rows")

pytestmark = pytest.mark.usefixtures("single_thread")


def test_rows_cover_the_seed_table_and_name_existing_recipes():
    seed = {"mnist-1.58", "cifar10-liresnet", "cifar100-liresnet", "tiny-imagenet-liresnet", "imagenet-liresnet"}
    assert seed <= set(table_rows.ROWS)
    for row in table_rows.ROWS.values():
        assert (table_rows.REPO / "configs" / row.recipe).is_file()


def test_readme_lists_every_row_with_its_command():
    readme = (table_rows.REPO / "README.md").read_text()
    for name, row in table_rows.ROWS.items():
        assert f"table_rows.py {name} " in readme and row.recipe in readme, name


@pytest.mark.slow
@pytest.mark.parametrize("row", list(table_rows.ROWS))
def test_row_runs_end_to_end_with_tiny_limits(row, tmp_path, monkeypatch):
    if row.startswith(("tiny-imagenet", "imagenet")):
        pytest.importorskip("PIL")
    dataset = build_config(table_rows.REPO / "configs" / table_rows.ROWS[row].recipe).dataset
    write_fake(dataset, tmp_path / "data", n=4)
    monkeypatch.setenv("GLORONET_NO_DOWNLOAD", "1")
    out = tmp_path / "table"
    args = [row, "--out", str(out), "--smoke", f"--data_dir={tmp_path / 'data'}", "--epochs=2", "--lr=0.001", "--train_limit=4",
            "--test_limit=4", "--batch_size=2", "-q"]
    assert table_rows.main(args) == 0
    result = json.loads((out / row / "row.json").read_text())
    assert result["row"] == row and result["epochs"] == 2 and result["n_test"] == 4
    assert 0 <= result["vra"] <= result["vra_exact"] <= result["clean_accuracy"] <= 1
    assert f"| {row} |" in (out / "table.md").read_text()
    assert table_rows.main(args) == 0  # rerun: resumes the finished run, certifies again
