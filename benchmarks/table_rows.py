"""Reproduce rows of the published GloRo table end to end: train a row's recipe, certify the full
test split (floating-point sound, and in exact arithmetic for comparison with the papers), and
write the result table.

    PYTHONPATH=src python benchmarks/table_rows.py ROW [ROW ...] --out runs/table [--data-dir D] \
        [--device cuda] [--key=value ...]      # extra keys go to every row's `gloronet train`
    PYTHONPATH=src python benchmarks/table_rows.py --list

Each row is exactly ``gloronet train -c configs/<recipe> --out <out>/<row>`` (resumed when the row's
directory already holds a run: rerun the same command after a crash) followed by the certification
of the whole test split. ``<out>/table.md`` and ``<out>/table.json`` collect every row under
``<out>`` that has finished: recipe, epochs, published VRA (and its source), our fp-sound and
exact-arithmetic VRA, clean accuracy, median s/epoch, total training hours and the device.
``--smoke`` builds LiResNet / CHORD rows at width 16 (CHORD dense width 32): the test suite runs
every row that way with tiny limits on synthetic data, so the commands cannot rot.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Row:
    recipe: str  # file in configs/
    published: float | None  # VRA % at the recipe's ε
    source: str


# Published VRA as collected in shared/DESIGN.md ("Published results"): GloRo = Leino, Wang &
# Fredrikson, ICML 2021; LiResNet = Hu et al., NeurIPS 2023; CHORD = Hu et al., ICLR 2024.
ROWS: dict[str, Row] = {
    "mnist-0.3": Row("mnist-2c2f-eps0.3.yaml", 95.7, "GloRo"),
    "mnist-1.58": Row("mnist-4c3f-eps1.58.yaml", 62.8, "GloRo"),
    "cifar10-6c2f": Row("cifar10-6c2f-eps36.yaml", 60.0, "GloRo"),
    "cifar10-liresnet": Row("cifar10-liresnet-18l256w-eps36.yaml", 70.1, "LiResNet"),
    "cifar10-chord": Row("cifar10-chord-12l512w-eps36.yaml", 69.8, "CHORD, no generated data"),
    "cifar100-liresnet": Row("cifar100-liresnet-18l256w-eps36.yaml", 41.5, "LiResNet"),
    "cifar100-chord": Row("cifar100-chord-12l512w-eps36.yaml", 50.1, "CHORD"),
    "tiny-imagenet-8c2f": Row("tiny-imagenet-8c2f-eps36.yaml", None, "GloRo (no published figure here)"),
    "tiny-imagenet-liresnet": Row("tiny-imagenet-liresnet-18l256w-eps36.yaml", 33.6, "LiResNet"),
    "tiny-imagenet-chord": Row("tiny-imagenet-chord-12l512w-eps36.yaml", 37.0, "CHORD"),
    "imagenet-liresnet": Row("imagenet-liresnet-12l588w-eps36.yaml", 35.0, "LiResNet"),
    "imagenet-chord": Row("imagenet-chord-12l588w-eps36.yaml", 38.3, "CHORD"),
}


def command(row: str, out: Path, extra: list[str], new_run: list[str] = ()) -> list[str]:
    """The row's ``gloronet train`` arguments (what the README's table prints); ``new_run`` are
    overrides for a fresh run only (a resumed run keeps its own config)."""
    run = out / row
    if (run / "config.yaml").is_file():
        return ["train", "--out", str(run), "--resume", *extra]
    return ["train", "-c", str(REPO / "configs" / ROWS[row].recipe), "--out", str(run), *new_run, *extra]


def smoke_overrides(recipe: Path) -> list[str]:
    """Width-16 LiResNet / CHORD (dense width 32; ImageNet-sized inputs patchified 16×16) for a CPU
    smoke run of the row's command."""
    from gloronet.config import build_config
    from gloronet.data import dataset_info
    from gloronet.models.liresnet import parse_name

    cfg = build_config(recipe)
    if not cfg.model.startswith(("liresnet-", "chord-")):
        return []
    family, depth, _ = parse_name(cfg.model)
    args = {"dense_width": 32} if family == "chord" else {}
    if max(dataset_info(cfg.dataset).in_shape[1:]) > 64:
        args["patch_size"] = 16
    return [f"--model={family}-{depth}l16w"] + ([f"--model_args={args}"] if args else [])


def run_row(row: str, out: Path, extra: list[str], new_run: list[str] = (), batch_size: int = 500) -> dict:
    """Train (or resume) and certify one row; returns its result and writes ``<out>/<row>/row.json``."""
    from gloronet import cli
    from gloronet.certify import certify_dataset
    from gloronet.runs import open_run, write_json

    if cli.main(command(row, out, extra, new_run)) != 0:
        raise SystemExit(f"{row}: gloronet train failed (its message is above)")
    run = open_run(out / row)
    x, y = run.load("test", run.config.get("test_limit"))
    t0 = time.perf_counter()
    fp = certify_dataset(run.net, x, y, batch_size=batch_size, device=run.device)
    certify_s = time.perf_counter() - t0
    exact = certify_dataset(run.net, x, y, batch_size=batch_size, device=run.device, arithmetic="exact")
    with open(out / row / "log.csv", newline="") as f:
        seconds = [float(r["seconds"]) for r in csv.DictReader(f)]
    key = f"{run.net.epsilon:g}"
    result = {"row": row, "recipe": ROWS[row].recipe, "published_vra": ROWS[row].published, "source": ROWS[row].source,
              "epochs": len(seconds), "epsilon": run.net.epsilon, "n_test": len(y),
              "clean_accuracy": fp["clean_accuracy"], "vra": fp["vra"][key], "vra_exact": exact["vra"][key],
              "s_per_epoch": statistics.median(seconds), "train_hours": sum(seconds) / 3600,
              "certify_seconds": certify_s, "device": _device_name(run.device), "extra_args": extra}
    write_json(out / row / "row.json", result)
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def write_table(out: Path) -> Path:
    """``table.md`` / ``table.json`` from every finished row under ``out``, in table order."""
    from gloronet.runs import write_json, write_text

    results = [json.loads((out / r / "row.json").read_text()) for r in ROWS if (out / r / "row.json").is_file()]
    lines = ["| row | recipe | epochs | published VRA | VRA (fp-sound) | VRA (exact) | clean | s/epoch | train h | device |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        pub = f"{r['published_vra']:.1f}% ({r['source']})" if r["published_vra"] is not None else "—"
        lines.append(f"| {r['row']} | `{r['recipe']}` | {r['epochs']} | {pub} | {100 * r['vra']:.2f}% | "
                     f"{100 * r['vra_exact']:.2f}% | {100 * r['clean_accuracy']:.2f}% | {r['s_per_epoch']:.1f} | "
                     f"{r['train_hours']:.2f} | {r['device']} |")
    write_text(out / "table.md", "\n".join(lines) + "\n")
    write_json(out / "table.json", results)
    return out / "table.md"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rows", nargs="*", metavar="ROW", help=f"any of: {', '.join(ROWS)}")
    ap.add_argument("--out", type=Path, default=Path("runs/table"))
    ap.add_argument("--list", action="store_true", help="print the rows and their recipes")
    ap.add_argument("--smoke", action="store_true", help="LiResNet / CHORD at width 16 (CPU smoke runs)")
    args, extra = ap.parse_known_args(argv)
    if args.list or not args.rows:
        for name, row in ROWS.items():
            pub = f"{row.published}%" if row.published is not None else "—"
            print(f"{name:24s} configs/{row.recipe:42s} published {pub} ({row.source})")
        return 0
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown row(s) {', '.join(unknown)}; known: {', '.join(ROWS)}")
    for row in args.rows:
        smoke = smoke_overrides(REPO / "configs" / ROWS[row].recipe) if args.smoke else []
        r = run_row(row, args.out, extra, smoke)
        print(f"{row}: VRA {r['vra']:.2%} fp-sound, {r['vra_exact']:.2%} exact, clean {r['clean_accuracy']:.2%}, "
              f"{r['s_per_epoch']:.1f} s/epoch")
    print(write_table(args.out).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
