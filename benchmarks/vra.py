"""VRA benchmark: run a recipe for a given epoch budget; print clean accuracy, VRA at the recipe's
ε (sound certificates on the full test set) and seconds per epoch.

    python benchmarks/vra.py --config configs/mnist-2c2f-eps0.3.yaml --epochs 30 [--seeds 0 1 2]

Schedules are scaled to the budget (they are defined in fractions of the run). With several
seeds it reports mean ± std (airbench habit: never a single lucky run).
"""
from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
from pathlib import Path

from gloronet.config import build_config
from gloronet.train import train

PUBLISHED = {("mnist", "2c2f", 0.3): 95.7, ("mnist", "4c3f", 1.58): 62.8, ("cifar10", "6c2f", 0.1411764705882353): 60.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", help="keep run directories here (default: a temporary folder)")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        for seed in args.seeds:
            cfg = build_config(args.config, [f"epochs={args.epochs}", f"seed={seed}", *args.overrides])
            run = root / f"{Path(args.config).stem}-e{args.epochs}-s{seed}"
            last = train(cfg, run, progress=False)
            with open(run / "log.csv") as f:
                secs = [float(r["seconds"]) for r in csv.DictReader(f)]
            results.append((100 * last["test_acc"], 100 * last["test_vra"], statistics.mean(secs)))
    acc, vra, sec = (list(c) for c in zip(*results))

    def fmt(xs):
        return f"{statistics.mean(xs):.2f}" + (f" ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else "")

    pub = PUBLISHED.get((cfg.dataset, cfg.model, cfg.epsilon))
    print(f"| recipe | epochs | seeds | clean acc % | VRA % @ ε={cfg.epsilon:g} | s/epoch | published VRA % |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| {Path(args.config).stem} | {args.epochs} | {len(args.seeds)} | {fmt(acc)} | {fmt(vra)} | {fmt(sec)} | "
          f"{pub if pub is not None else '—'}{f' (ratio {statistics.mean(vra) / pub:.3f})' if pub else ''} |")


if __name__ == "__main__":
    main()
