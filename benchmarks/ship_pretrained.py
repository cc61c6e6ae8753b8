"""Copy a finished run into the package as a shipped pretrained model, with its model card.

    PYTHONPATH=src python benchmarks/ship_pretrained.py RUN_DIR --name mnist-4c3f-eps1.58 \
        --recipe configs/mnist-4c3f-eps1.58.yaml --commit 4a26f11 [--note "..."]

Writes ``src/gloronet/pretrained/models/<name>/`` = the run's ``config.yaml``, ``model.json``,
``model.safetensors`` (byte copies; the weights' SHA-256 is checked on the way) and ``card.json``:
recipe, training commit, epochs and training seconds (log.csv's ``seconds``, summed) with the thread count, and the counts of
:func:`gloronet.pretrained.cards.measure` on the full test split, measured here with the
machine facts of :func:`gloronet.pretrained.cards.machine`. ``tests/test_pretrained.py`` then
demands that certifying the shipped model reproduces the card.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import shutil
import sys
import tempfile
from pathlib import Path

import torch

import gloronet
from gloronet.data import load_dataset
from gloronet.pretrained import MODELS_DIR
from gloronet.pretrained.cards import machine, measure
from gloronet.runs import load_model, read_config, read_model_meta, write_json


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--name", required=True)
    ap.add_argument("--recipe", required=True, help="the configs/ file the run was trained with")
    ap.add_argument("--commit", required=True, help="gloronet commit the run was trained with")
    ap.add_argument("--threads", type=int, required=True, help="torch threads the run trained with")
    ap.add_argument("--note", default="", help="how it was trained, if not the recipe alone (e.g. --epochs=100)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    meta, cfg = read_model_meta(args.run_dir), read_config(args.run_dir)
    net = load_model(args.run_dir)  # verifies the SHA-256
    with open(args.run_dir / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    x, y = load_dataset(cfg["dataset"], "test", dtype=torch.uint8)
    counts = measure(net, x, y)
    card = {
        "name": args.name, "dataset": cfg["dataset"], "epsilon": net.epsilon, "architecture": meta["model"]["name"],
        "recipe": args.recipe, "note": args.note, "epochs": int(rows[-1]["epoch"]),
        "train_seconds": round(sum(float(r["seconds"]) for r in rows), 1),
        "train_threads": args.threads,
        "gloronet_commit": args.commit, "sha256": meta["sha256"],
        "test_split": f"{cfg['dataset']} test, all {counts['n']} images",
        **counts, "measured_on": machine(), "measured_with": f"gloronet {gloronet.__version__}",
        "measured": datetime.date.today().isoformat(),
        "reproduce": f"gloronet certify {args.name}",
    }
    dest = MODELS_DIR / args.name
    with tempfile.TemporaryDirectory(dir=MODELS_DIR.parent) as tmp:
        stage = Path(tmp) / args.name
        stage.mkdir()
        for f in ("config.yaml", "model.json", "model.safetensors"):
            shutil.copyfile(args.run_dir / f, stage / f)
        write_json(stage / "card.json", card)
        load_model(stage)  # the copy verifies too
        if dest.exists():
            shutil.rmtree(dest)
        MODELS_DIR.mkdir(exist_ok=True)
        stage.rename(dest)
    print(f"{dest}: clean {card['clean_accuracy']:.2%}, VRA {card['vra']:.2%} (exact arithmetic "
          f"{card['vra_exact']:.2%}), borderline {card['vra_borderline']} / {card['clean_borderline']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
