"""Relaxed robustness benchmark: train ordinary / RTK / affinity GloRo recipes with the same
budget and certify each trained model with every relaxation, mean ± std over seeds.

    GLORONET_DATA=../shared/data python benchmarks/relaxed.py --epochs 20 --seeds 0 1 2 \\
        --configs configs/fashion-mnist-2c2f-eps0.3.yaml configs/fashion-mnist-2c2f-rtk2-eps0.3.yaml \\
                  configs/fashion-mnist-2c2f-rtk3-eps0.3.yaml configs/fashion-mnist-2c2f-affinity-eps0.3.yaml \\
        --top-k 2 3 --affinity fashion-mnist-groups

Prints a Markdown table: clean and top-k accuracy, ordinary VRA, relaxed VRA (the label lies in
the certified top-k set) and rejection rate at the recipe's ε, all sound certificates (float
arithmetic) on the full test set. Schedules are compressed to the epoch budget.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from gloronet import data
from gloronet.certify import certify_dataset
from gloronet.checkpoint import load_model
from gloronet.config import build_config
from gloronet.train import train


def _fmt(xs: list[float]) -> str:
    xs = [100 * x for x in xs]
    return f"{statistics.mean(xs):.2f}" + (f" ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", required=True)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--top-k", type=int, nargs="*", default=[2, 3], help="RTK sizes to certify every model with")
    p.add_argument("--affinity", help="affinity set to certify every model with")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: other jobs on the machine do not thrash it)")
    p.add_argument("--out", help="keep run directories here (default: a temporary folder)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    evals = [(f"RTK-{k}", {"top_k": k}) for k in args.top_k] + ([("affinity", {"affinity": args.affinity})] if args.affinity else [])
    table: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        for path in args.configs:
            for seed in args.seeds:
                cfg = build_config(path, [f"epochs={args.epochs}", f"seed={seed}", f"eval_every={args.epochs}"])
                run = root / f"{Path(path).stem}-e{args.epochs}-s{seed}"
                train(cfg, run, resume=True, progress=False)  # finished runs are kept; interrupted ones continue
                net = load_model(run).eval()
                x, y = data.load_dataset(cfg.dataset, "test", cfg.data_dir)
                row = table.setdefault(Path(path).stem, {})
                key = f"{cfg.epsilon:g}"
                reports = {name: certify_dataset(net, x, y, batch_size=1000, **kw) for name, kw in evals}
                first = next(iter(reports.values()))
                widest = max(reports.values(), key=lambda r: r["relaxed"]["top_k"])["relaxed"]
                values = {"clean": first["clean_accuracy"], "VRA": first["vra"][key],
                          **{f"top-{k}": a for k, a in widest["top_k_accuracy"].items() if k != "1"}}
                for name, rep in reports.items():
                    values[f"{name} VRA"] = rep["relaxed"]["vra"][key]
                    values[f"{name} rejected"] = rep["relaxed"]["rejection"][key]
                for c, v in values.items():
                    row.setdefault(c, []).append(v)
                print(f"done {run.name}", flush=True)
    cols = ["clean", *[f"top-{k}" for k in sorted({int(c[4:]) for r in table.values() for c in r if c.startswith("top-")})],
            "VRA", *[c for name, _ in evals for c in (f"{name} VRA", f"{name} rejected")]]
    print(f"\n{args.epochs} epochs, seeds {args.seeds}, ε as in each recipe; % (mean ± std over seeds)\n")
    print("| recipe | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(_fmt(row[c]) if c in row else "—" for c in cols) + " |")


if __name__ == "__main__":
    main()
