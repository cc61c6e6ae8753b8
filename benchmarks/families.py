"""Layer families side by side (issue 20): every model on Fashion-MNIST ε = 0.3 and MNIST ε = 1.58
at the same recipe and epoch budget, plus a CIFAR-shaped synthetic throughput row per model.

    PYTHONPATH=src python benchmarks/families.py --epochs 10 --seeds 3 --out runs/families \
        [--models 2c2f bro-mnist ...] [--tasks mnist-1.58] [--train_limit N] [--test_limit N] \
        [--synthetic] [--data_dir D] [--device cpu] [--key=value ...]   # extra keys: every run's config

Each (task, model, seed) is the task's recipe (``TASKS``: configs/fashion-mnist-2c2f-eps0.3.yaml,
configs/mnist-4c3f-eps1.58.yaml) with only ``model`` swapped (``model_args`` merged with
``MODEL_ARGS`` for the small LiResNet / CHORD) and ``epochs`` / ``seed`` / limits set; trained with
:func:`gloronet.train.train` into ``<out>/runs/<task>/<model>/s<seed>`` (resumed if interrupted),
then the test split (``--test_limit``) is certified: clean accuracy, VRA floating-point sound and in
exact arithmetic, median training s/epoch, the bound's time on a freshly loaded model (nothing
cached) and certification images/s (the bound then cached). ``--synthetic``: per model on random 3×32×32 data, the training
step (forward, pairwise K, TRADES, backward, Adam) in ms and certification images/s — no accuracy.

``<out>/families.json`` holds every finished measurement and is rewritten atomically after each
(:func:`gloronet.runs.write_json`): a rerun skips those, so an interrupted table resumes;
``<out>/families.md`` is the table (mean ± std over seeds).
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from table_rows import REPO, _device_name  # noqa: E402
from throughput import images_per_s  # noqa: E402

TASKS = {"fashion-mnist-0.3": "fashion-mnist-2c2f-eps0.3.yaml", "mnist-1.58": "mnist-4c3f-eps1.58.yaml"}
MODELS = ["2c2f", "4c3f", "liresnet-6l32w", "chord-6l32w", "aol-mnist", "sll-mnist", "bro-mnist", "bronet-mnist"]
MODEL_ARGS = {"liresnet-6l32w": {"dense_width": 256}, "chord-6l32w": {"dense_width": 256}}
SYNTHETIC_SHAPE = (3, 32, 32)
COLUMNS = [("clean", "clean %", 100), ("vra", "VRA fp-sound %", 100), ("vra_exact", "VRA exact %", 100),
           ("s_per_epoch", "s/epoch", 1), ("bound_s", "bound s", 1), ("certify_img_s", "certify img/s", 1)]


def run_config(task: str, model: str, seed: int, args, extra: dict):
    """The task's recipe with the model swapped (``model_args`` merged) and the run's settings."""
    from gloronet.config import build_config

    recipe = REPO / "configs" / TASKS[task]
    base = build_config(recipe)
    keys = {"model": model, "model_args": {**(base.model_args or {}), **MODEL_ARGS.get(model, {})},
            "epochs": args.epochs, "seed": seed, "train_limit": args.train_limit, "test_limit": args.test_limit}
    if args.data_dir:
        keys["data_dir"] = args.data_dir
    if args.device:
        keys["device"] = args.device
    return build_config(recipe, {**keys, **extra})


def measure_run(task: str, model: str, seed: int, args, extra: dict) -> dict:
    """Train (or resume) one run, certify its test split; the measurements of one seed."""
    from gloronet.certify import certify_dataset
    from gloronet.runs import open_run
    from gloronet.train import train

    run_dir = args.out / "runs" / task / model / f"s{seed}"
    cfg = run_config(task, model, seed, args, extra)
    train(cfg, run_dir, resume=(run_dir / "state.pt").is_file(), progress=False)
    run = open_run(run_dir)  # freshly loaded: nothing cached, the bound is computed from scratch
    x, y = run.load("test", cfg.test_limit)
    t0 = time.perf_counter()
    run.net.lipschitz_bound()
    bound_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fp = certify_dataset(run.net, x, y, batch_size=args.certify_batch, device=run.device)
    certify_s = time.perf_counter() - t0  # with the bound cached: certification proper
    exact = certify_dataset(run.net, x, y, batch_size=args.certify_batch, device=run.device, arithmetic="exact")
    seconds = _epoch_seconds(run_dir)
    key = f"{run.net.epsilon:g}"
    return {"task": task, "model": model, "seed": seed, "epochs": len(seconds), "n_test": len(y),
            "clean": fp["clean_accuracy"], "vra": fp["vra"][key], "vra_exact": exact["vra"][key],
            "s_per_epoch": statistics.median(seconds), "bound_s": bound_s, "certify_img_s": len(y) / certify_s,
            "device": _device_name(run.device)}


def _epoch_seconds(run_dir: Path) -> list[float]:
    with open(run_dir / "log.csv", newline="") as f:
        return [float(r["seconds"]) for r in csv.DictReader(f)]


def measure_synthetic(model: str, args) -> dict:
    """Training-step ms and certification images/s of ``model`` on random 3×32×32 data."""
    import gloronet
    from gloronet.gloro import bottom_logit
    from gloronet.losses import make_loss

    device = torch.device(args.device or "cpu")
    torch.manual_seed(0)
    net = gloronet.models.create(model, SYNTHETIC_SHAPE, 10, 36 / 255, **MODEL_ARGS.get(model, {})).to(device)
    x = torch.rand(args.synthetic_batch, *SYNTHETIC_SHAPE, device=device)
    y = torch.randint(0, 10, (args.synthetic_batch,), device=device)
    loss_fn = make_loss({"name": "trades", "lam": 1.5})
    opt = torch.optim.Adam(net.parameters(), 1e-4)

    def step():
        net.train()
        logits, k = net(x), net.pairwise_lipschitz()
        loss = loss_fn(logits=logits, bottom_logits=bottom_logit(logits, k, net.epsilon), K=k, labels=y,
                       epsilon=net.epsilon, lam=1.5)
        opt.zero_grad()
        loss.backward()
        opt.step()

    steps = args.synthetic_steps
    train_ms = 1000 * args.synthetic_batch / images_per_s(step, args.synthetic_batch, steps, 1, device)
    net.eval()
    net.lipschitz_bound()  # the bound is timed on the real tasks; here only certification
    cert = images_per_s(lambda: net.certify(x), args.synthetic_batch, steps, 1, device)
    return {"model": model, "shape": "x".join(map(str, SYNTHETIC_SHAPE)), "batch": args.synthetic_batch,
            "train_step_ms": train_ms, "certify_img_s": cert, "device": _device_name(device)}


def _fmt(values: list[float], scale: float) -> str:
    v = [scale * x for x in values]
    digits = 2 if scale == 100 or max(map(abs, v)) < 100 else 0
    text = f"{statistics.mean(v):.{digits}f}"
    return text + (f" ± {statistics.stdev(v):.{digits}f}" if len(v) > 1 else "")


def table(results: dict) -> str:
    """The markdown table: one row per (task, model), mean ± std over its seeds; then synthetic rows."""
    lines = ["| task | model | epochs | seeds | " + " | ".join(c[1] for c in COLUMNS) + " | device |",
             "|---|---|---:|---:|" + "---:|" * len(COLUMNS) + "---|"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results["runs"]:
        groups.setdefault((r["task"], r["model"]), []).append(r)
    for (task, model), rs in groups.items():
        cells = [_fmt([r[k] for r in rs], scale) for k, _, scale in COLUMNS]
        lines.append(f"| {task} | {model} | {rs[0]['epochs']} | {len(rs)} | " + " | ".join(cells) + f" | {rs[0]['device']} |")
    if results["synthetic"]:
        lines += ["", "| model (synthetic) | shape | batch | train step ms | certify img/s | device |",
                  "|---|---|---:|---:|---:|---|"]
        for r in results["synthetic"]:
            lines.append(f"| {r['model']} | {r['shape']} | {r['batch']} | {r['train_step_ms']:.1f} | "
                         f"{r['certify_img_s']:.0f} | {r['device']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from gloronet.config import parse_overrides
    from gloronet.runs import write_json, write_text

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--epochs", type=int, required=True)
    ap.add_argument("--seeds", type=int, default=1, help="seeds 0 .. K−1 per (task, model)")
    ap.add_argument("--train_limit", type=int)
    ap.add_argument("--test_limit", type=int)
    ap.add_argument("--data_dir")
    ap.add_argument("--device")
    ap.add_argument("--certify_batch", type=int, default=500)
    ap.add_argument("--synthetic", action="store_true", help="add the CIFAR-shaped throughput rows")
    ap.add_argument("--synthetic_batch", type=int, default=64)
    ap.add_argument("--synthetic_steps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("runs/families"))
    args, rest = ap.parse_known_args(argv)
    extra = parse_overrides(rest)
    path = args.out / "families.json"
    results = json.loads(path.read_text()) if path.is_file() else {"runs": [], "synthetic": []}
    done = {(r["task"], r["model"], r["seed"]) for r in results["runs"]}
    todo = [(t, m, s) for t in args.tasks for m in args.models for s in range(args.seeds) if (t, m, s) not in done]
    synth = [m for m in args.models if args.synthetic and m not in {r["model"] for r in results["synthetic"]}]
    total = len(todo) + len(synth)
    for i, item in enumerate(todo + [("synthetic", m, None) for m in synth], 1):
        task, model, seed = item
        print(f"[{i}/{total}] {task} {model}" + (f" seed {seed}" if seed is not None else ""), flush=True)
        if task == "synthetic":
            results["synthetic"].append(measure_synthetic(model, args))
        else:
            results["runs"].append(measure_run(task, model, seed, args, extra))
        write_json(path, results)
    write_text(args.out / "families.md", table(results))
    print((args.out / "families.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
