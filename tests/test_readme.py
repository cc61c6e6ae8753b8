"""Issue 8, item 9: the README runs as written — every ``gloronet`` command line parses (its
recipe exists, its overrides are valid config), and its self-contained Python blocks run (the
Python API block on a tiny ``runs/demo``)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path


from gloronet import cli
from gloronet.config import build_config

from test_train import data_dir  # noqa: F401  (module-scoped dataset fixture)

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_every_command_line_parses():
    lines = [line.split("  #")[0].strip() for block in _blocks("bash") for line in block.splitlines()]
    commands = [shlex.split(line) for line in lines if line.startswith("gloronet ")]
    assert len(commands) >= 10
    parser = cli.build_parser()
    for argv in commands:
        if argv[1:] in (["--version"], ["train", "--help"]):
            continue
        args, unknown = parser.parse_known_args(argv[1:])
        if args.command == "train":
            if args.config:
                assert (ROOT / args.config).is_file(), argv
            build_config(ROOT / args.config if args.config else None, unknown)
        else:
            assert not unknown, argv


def test_python_blocks_run(tmp_path, monkeypatch, data_dir):  # noqa: F811
    blocks = [b for b in _blocks("python") if b.startswith("import")]
    assert len(blocks) >= 2 and any("load_model" in b for b in blocks)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GLORONET_DATA", str(data_dir))
    argv = ["train", "-c", str(ROOT / "configs/demo-mnist.yaml"), "--out", "runs/demo", "--epochs=1",
            "--train_limit=256", "--test_limit=32", "-q"]
    assert cli.main(argv) == 0
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    assert (tmp_path / "runs/demo/model.pt2.card.json").is_file()
