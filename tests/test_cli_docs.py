"""Issue 17, items 6 and 8: the command line documents itself — usage on a bare command, every
option's default, config keys with their meaning, "did you mean" for a mistyped command, option or
key, the subcommand named in every usage error, ``gloronet models`` with parameter counts and input
shape; a run header; provenance and a session history in the run files; the README documents every
output file's fields; LICENSE and CITATION.cff agree with pyproject."""
from __future__ import annotations

import csv
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

import gloronet
from gloronet import cli, models
from gloronet.config import DESCRIPTIONS, FIELDS, build_config
from gloronet.train import LOG_FIELDS

from conftest import train_tiny_run
from test_train import data_dir  # noqa: F401  (module-scoped dataset fixture)

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):  # noqa: F811
    return train_tiny_run(tmp_path_factory.mktemp("runs") / "run", data_dir)


def test_train_help_describes_every_config_key(capsys):
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert set(DESCRIPTIONS) == FIELDS and all(len(d) > 10 for d in DESCRIPTIONS.values())
    for key, text in DESCRIPTIONS.items():
        assert re.search(rf"^  {key} = .*\n {{6}}{re.escape(text[:30])}", out, flags=re.M), key


def test_every_option_states_its_default():
    for name, parser in cli.subparsers(cli.build_parser()).items():
        text = parser.format_help()
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0 or action.required:  # positionals, flags, --out of train
                continue
            formatted = parser._get_formatter()._format_action(action)
            assert "default" in " ".join(formatted.split()), (name, action.option_strings)
        assert "RUN" not in text or "pretrained model" in text, name


def test_bare_commands_show_their_usage(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: gloronet") and all(f"    {c}" in err for c in cli.subparsers(cli.build_parser()))
    assert cli.main(["certify"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: gloronet certify") and "--limit" in err
    assert cli.main(["models"]) == 0  # needs no argument: runs


@pytest.mark.parametrize("argv, line", [
    (["certfy", "r"], "gloronet: error: unknown command 'certfy' (did you mean 'certify'?)"),
    (["certify", "r", "--bogus"], "gloronet certify: error: unrecognized arguments: --bogus"),
    (["tightness", "r", "--lmit", "5"], "gloronet tightness: error: unrecognized arguments: --lmit 5 (did you mean --limit?)"),
    (["train", "--out", "r", "--epocs=3"], "gloronet train: error: unknown option or config key --epocs (did you mean --epochs?)"),
    (["train", "--out", "r", "--tensorbord"], "(did you mean --tensorboard?)"),
    (["train", "--out", "r", "--resume", "--restart"], "gloronet train: error: argument --restart: not allowed with argument --resume"),
])
def test_usage_errors_name_the_command_and_the_closest_word(argv, line, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and line in err, err
    assert not (tmp_path / "r").exists()


def test_an_unknown_key_in_a_recipe_gets_a_did_you_mean(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epocs: 3\nlearning_rate: 1e-3\n")
    with pytest.raises(ValueError, match=r"r.yaml: unknown config keys 'epocs' \(did you mean 'epochs'\?\), "
                                         r"'learning_rate'; `gloronet train --help` lists every key"):
        build_config(recipe)


def test_models_lists_parameters_and_input_shape(capsys):
    assert cli.main(["models", "--dataset", "cifar10"]) == 0
    out = capsys.readouterr().out
    assert "cifar10 inputs (3×32×32, 10 classes" in out
    counts = dict(re.findall(r"^\| (\S+) \| ([\d,]+) \|$", out, flags=re.M))
    assert set(counts) == set(models.list_models())
    real = sum(p.numel() for p in models.create("4c3f", (3, 32, 32), 10, 0.3).parameters())
    assert counts["4c3f"] == f"{real:,}"


def test_run_header_provenance_and_session_history(tmp_path, run, capsys):
    r = tmp_path / "r"
    r.mkdir()
    for p in run.iterdir():
        (r / p.name).write_bytes(p.read_bytes())
    assert cli.main(["train", "--out", str(r), "--resume", "--epochs=2", "--test_limit=16", "-q"]) == 0
    header = capsys.readouterr().out.splitlines()[:5]
    assert header[0].startswith(f"gloronet {gloronet.__version__} · torch {torch.__version__}")
    assert header[1] == f"resuming {r} from epoch 1 of 2"
    assert header[2] == f"device cpu · {torch.get_num_threads()} threads"
    assert re.fullmatch(r"data mnist: train 128 images from \S+ · test 16 images from \S+", header[3])
    params = sum(p.numel() for p in gloronet.checkpoint.load_model(r).parameters())
    assert header[4].startswith(f"model 2c2f: {params:,} parameters · input 1×28×28 · 10 classes")
    history = json.loads((r / "history.json").read_text())
    assert [h["kind"] for h in history] == ["new", "resume"] and history[1]["start_epoch"] == 1
    assert history[1]["changed"] == {"epochs": [1, 2], "schedule_epochs": [None, 1], "test_limit": [32, 16]}
    assert history[1]["data"]["test"]["n"] == 16 and history[0]["data"]["test"]["n"] == 32
    assert history[1]["command"].startswith(f"gloronet train --out {r} --resume")
    rows = list(csv.DictReader(open(r / "log.csv", newline="")))
    assert [row["test_n"] for row in rows] == ["32", "16"]  # the trace in log.csv itself
    meta = json.loads((r / "model.json").read_text())
    for entry in (meta["provenance"], history[1]):
        assert entry["gloronet"] == gloronet.__version__ and entry["torch"] == torch.__version__
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0 and (ROOT / "src" / "gloronet") == Path(gloronet.__file__).resolve().parent:
        assert meta["provenance"]["git_commit"].split("+")[0] == head.stdout.strip()


def _readme_table_keys(heading: str) -> set[str]:
    """The backquoted names in the first column of the README table after ``heading``."""
    section = README[README.index(heading):]
    table = section[: section.index("\n\n", section.index("|"))]
    return {k for line in table.splitlines() if line.startswith("| `") for k in re.findall(r"`([^`]+)`", line.split("|")[1])}


def _readme_paragraph(start: str) -> str:
    i = README.index(start)
    return README[i: README.index("\n\n", i)]


def test_readme_documents_every_output_field(run, capsys):
    assert _readme_table_keys("`log.csv` columns") == set(LOG_FIELDS)
    header = (run / "log.csv").read_text().splitlines()[0].split(",")
    assert header == LOG_FIELDS
    assert cli.main(["certify", str(run), "--limit", "8", "-q"]) == 0
    report = json.loads((run / "certify-n8.json").read_text())
    fields = _readme_paragraph("`certify.json` fields")
    assert all(f"`{k}`" in fields for k in report), [k for k in report if f"`{k}`" not in fields]
    meta = _readme_paragraph("`model.json`:")
    assert all(f"`{k}`" in meta for k in json.loads((run / "model.json").read_text()))
    history = _readme_paragraph("`history.json`:")
    assert all(f"`{k}`" in history for h in json.loads((run / "history.json").read_text()) for k in h)
    files = _readme_table_keys("A run directory (")
    assert {"config.yaml", "log.csv", "model.safetensors", "model.json", "state.pt", "history.json"} <= files
    assert "What the SHA-256 covers" in README and "name, dtype, shape and raw bytes" in README


def test_license_and_citation_agree_with_pyproject():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'license = { text = "MIT" }' in pyproject
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "MIT" and cff["version"] == gloronet.__version__
    assert cff["authors"] and cff["preferred-citation"]["title"] == "Globally-Robust Neural Networks"
    assert re.search(r'^version = "(.+)"$', pyproject, flags=re.M)[1] == gloronet.__version__
