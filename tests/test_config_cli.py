"""Issue 8, items 1, 4 and 8: numbers parse as numbers, type errors read well, ``--key value``,
both spellings of dashed options, ε > 0, ``--version``, the config keys in ``train --help``."""
from __future__ import annotations

import pytest

import gloronet
from gloronet import cli
from gloronet.config import build_config


def test_numbers_are_numbers(tmp_path):
    cfg = build_config(None, ["--lr=5e-4", "--weight_decay=1e-4", "--grad_clip=1e1", "--epsilon=3e-1"])
    assert (cfg.lr, cfg.weight_decay, cfg.grad_clip, cfg.epsilon) == (5e-4, 1e-4, 10.0, 0.3)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: {kind: cosine, peak: 5e-4, final_factor: 1e-3}\nweight_decay: 1e-4\nepochs: 3\n")
    cfg = build_config(recipe)
    assert cfg.lr["peak"] == 5e-4 and cfg.lr["final_factor"] == 1e-3 and cfg.weight_decay == 1e-4
    assert build_config(None, ["--dataset=1e3"]).dataset == "1e3"  # string keys stay strings


def test_key_space_value_and_bare_flags():
    cfg = build_config(None, ["--epochs", "3", "--lr", "5e-4", "--lookahead", "--data-dir", "/d", "--seed", "7"])
    assert (cfg.epochs, cfg.lr, cfg.lookahead, cfg.data_dir, cfg.seed) == (3, 5e-4, True, "/d", 7)
    assert build_config(None, ["epochs=2"]).epochs == 2  # the old form still works


@pytest.mark.parametrize("override, words", [
    ("--epochs=abc", "epochs must be an integer, got 'abc'"),
    ("--epochs=2.5", "epochs must be an integer, got 2.5"),
    ("--batch_size=1.5", "batch_size must be an integer, got 1.5"),
    ("--seed=-1", "seed must be an integer >= 0, got -1"),
    ("--augment=foo", "augment must be a mapping"),
    ("--augment={crop: 2}", "augment has unknown key"),
    ("--augment={crop_padding:2}", "YAML needs a space after each colon"),
    ("--augment={crop_padding: -1}", "augment needs crop_padding"),
    ("--eval_every=0", "eval_every must be an integer >= 1"),
    ("--certify_epsilons=[0.1, -1]", "certify_epsilons must be a list of numbers > 0"),
    ("--lr=fast", "lr must be a positive number or a schedule"),
    ("--lr=0", "lr must be a positive number or a schedule"),
    ("--lr=nan", "lr must be a positive number or a schedule"),
])
def test_type_errors_read_well(override, words, tmp_path, capsys):
    with pytest.raises(ValueError, match=words.replace("{", r"\{").replace("(", r"\(")):
        build_config(None, [override])
    assert cli.main(["train", "--out", str(tmp_path / "r"), override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and not (tmp_path / "r").exists()


def test_eps_must_be_positive_and_options_take_both_spellings(tmp_path, capsys):
    for args in (["certify", str(tmp_path), "--eps", "0.3", "-1"], ["certify", str(tmp_path), "--eps", "0"],
                 ["attack", str(tmp_path), "--eps", "-0.5"]):
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "epsilon must be a finite number > 0" in err
    parser = cli.build_parser()
    for cmd in ("certify", "attack", "degrade", "privacy", "overfit", "tightness"):
        for spelling in ("--data-dir", "--data_dir"):
            args, _ = parser.parse_known_args([cmd, "run", spelling, "/d", "--batch_size", "8"])
            assert args.data_dir == "/d" and args.batch_size == 8


def test_version_and_train_help(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"gloronet {gloronet.__version__}"
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for line in ("lr = 0.001", "epochs = 10", "batch_size = 256", "tensorboard = False", "--resume", "--tensorboard"):
        assert line in out, line
