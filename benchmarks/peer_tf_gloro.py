"""Peer benchmark: gloronet vs the reference TensorFlow library (klasleino/gloro 1.1.1), same recipe.

    # the reference's venv, outside the repo (both packages install offline from PyPI here)
    python3 -m venv /work/tfvenv && /work/tfvenv/bin/pip install tensorflow-cpu==2.15.1 gloro==1.1.1
    # one lane per library (one CPU thread each), then the table; DATA holds mnist/, fashion-mnist/
    python benchmarks/peer_tf_gloro.py --data-dir DATA --dataset fashion-mnist --libs gloronet &
    python benchmarks/peer_tf_gloro.py --data-dir DATA --dataset fashion-mnist --libs tf --tf-python /work/tfvenv/bin/python
    python benchmarks/peer_tf_gloro.py --data-dir DATA --dataset fashion-mnist --report

Recipe (both libraries): 2C2F (MinMax, orthogonal init), ε = 0.3, GloRo-TRADES (KL) λ = 1.5,
batch 512, Adam lr 1e-3, no augmentation; ε schedule ``"[0.01]-log-[50%:1.1]"`` and lr schedule
``"decay_after_half_to_0.000001"`` as gloro strings (the klasleino/gloro README's MNIST recipe,
``tools/README.md``). gloronet reads the same strings with ``kind: gloro``
(:mod:`gloronet.schedule_strings`), so ε and lr match the reference's per-batch values exactly.
Both run 5 warm-started power-iteration steps per training step (the reference's
``num_iterations=5``; gloronet's own default is 1: ``--power-iters 1``). What differs is each
library's own: gloronet certifies with a sound float64 bound plus floating-point error terms, the
reference with power iteration converged to 1e-4 (an estimate from below, not a bound); Adam ε is
each framework's default (Keras 1e-7, torch 1e-8); gloronet drops an epoch's last partial batch.
The column "VRA with power-iteration K" certifies gloronet's model the reference's way too
(converged power iteration, no floating-point terms): the gap to its sound VRA is the price of
soundness; for the reference it is its own VRA.

Each (library, seed) run writes ``OUT/<dataset>-<lib>[-pi<N>]-e<epochs>-s<seed>.json`` when it finishes;
finished runs are skipped, so an interrupted benchmark resumes (gloronet runs also resume
mid-run from their run directory). Every run is pinned to one CPU thread.
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

EPS, EPS_SCHEDULE, LAM = 0.3, "[0.01]-log-[50%:1.1]", 1.5
LR, LR_SCHEDULE, BATCH = 1e-3, "decay_after_half_to_0.000001", 512
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1",
              "TF_NUM_INTEROP_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
LABELS = {"gloronet": "gloronet (torch 2.13 CPU)", "tf": "gloro 1.1.1 (tensorflow-cpu 2.15.1)"}


def load_idx(data_dir: str, dataset: str, split: str):
    """uint8 images (N, 28, 28) and labels (N,) from the IDX .gz files in ``data_dir/dataset``."""
    import numpy as np

    prefix = "train" if split == "train" else "t10k"
    folder = Path(data_dir) / dataset

    def read(name, offset):
        with gzip.open(folder / name, "rb") as f:
            return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)

    x = read(f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    return x, read(f"{prefix}-labels-idx1-ubyte.gz", 8).astype("int64")


def power_iteration_vra(run_dir: Path, dataset: str, data_dir: str, calls: int = 200) -> float:
    """VRA % of a gloronet run certified the reference's way: K from power iteration run to
    convergence (``calls`` more warm-started steps per layer), margins in float64, no error terms."""
    import torch
    from gloronet import checkpoint, data

    net = checkpoint.load_model(run_dir).train()
    with torch.no_grad():
        for _ in range(calls):
            K = net.pairwise_lipschitz().double()  # each call advances every layer's iterate
        net.eval()
        x, y = data.load_dataset(dataset, "test", data_dir, None, dtype=torch.uint8)
        x = x.float().div(255)
        logits = torch.cat([net(x[i:i + 1000]) for i in range(0, len(x), 1000)]).double()
    pred = logits.argmax(1)
    margin = logits.gather(1, pred[:, None]) - logits
    ok = ((margin > EPS * K[pred]) | torch.nn.functional.one_hot(pred, K.shape[0]).bool()).all(1)
    return 100 * ((pred == y) & ok).double().mean().item()


def run_gloronet(args) -> dict:
    import torch

    torch.set_num_threads(1)
    from gloronet.config import build_config
    from gloronet.train import train

    cfg = build_config(None, {
        "dataset": args.dataset, "data_dir": args.data_dir, "model": "2c2f", "epsilon": EPS,
        "train_epsilon": {"kind": "gloro", "schedule": EPS_SCHEDULE},
        "loss": {"name": "trades", "lam": LAM}, "epochs": args.epochs, "batch_size": BATCH,
        "optimizer": "adam", "lr": {"kind": "gloro", "schedule": LR_SCHEDULE, "base": LR},
        "seed": args.seed, "device": "cpu", "amp": "off", "eval_every": args.epochs,
        "model_args": {"power_iters": args.power_iters}})
    run_dir = Path(args.result).with_suffix("")
    last = train(cfg, run_dir, resume=(run_dir / "state.pt").exists(), progress=False)
    import csv
    with open(run_dir / "log.csv") as f:
        secs = [float(r["seconds"]) for r in csv.DictReader(f)]
    return {"clean": 100 * last["test_acc"], "vra": 100 * last["test_vra"], "epoch_seconds": secs,
            "vra_power_iteration": power_iteration_vra(run_dir, args.dataset, args.data_dir),
            "lipschitz": last["lipschitz_bound"], "certificate": "sound float64 bound + fp error",
            "power_iters": args.power_iters, "versions": {"torch": torch.__version__}}


def run_tf(args) -> dict:
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.keras.utils.set_random_seed(args.seed)
    import gloro
    from gloro import GloroNet
    from gloro.layers import MinMax
    from gloro.training.callbacks import EpsilonScheduler, LrScheduler
    from tensorflow.keras import layers

    # klasleino/gloro tools/training/architectures.py::cnn_2C2F (MinMax, orthogonal init)
    x = layers.Input((28, 28, 1))
    z = MinMax()(layers.Conv2D(16, 4, strides=2, padding="same", kernel_initializer="orthogonal")(x))
    z = MinMax()(layers.Conv2D(32, 4, strides=2, padding="same", kernel_initializer="orthogonal")(z))
    z = MinMax()(layers.Dense(100, kernel_initializer="orthogonal")(layers.Flatten()(z)))
    y = layers.Dense(10, kernel_initializer="orthogonal")(z)
    g = GloroNet(x, y, epsilon=EPS)  # num_iterations=5 power iterations per step (the default)
    g.compile(loss=f"sparse_trades_kl.{LAM}", optimizer=tf.keras.optimizers.Adam(learning_rate=LR))

    secs = []

    class Timer(tf.keras.callbacks.Callback):  # last callback: includes the iterate refresh at epoch end
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            secs.append(round(time.perf_counter() - self.t0, 3))

    xtr, ytr = load_idx(args.data_dir, args.dataset, "train")
    xte, yte = load_idx(args.data_dir, args.dataset, "test")
    xtr = (xtr[..., None] / 255.0).astype("float32")
    xte = (xte[..., None] / 255.0).astype("float32")
    g.fit(xtr, ytr[:, None], batch_size=BATCH, epochs=args.epochs, shuffle=True, verbose=0,
          callbacks=[EpsilonScheduler(EPS_SCHEDULE, verbose=False), LrScheduler(LR_SCHEDULE, verbose=False), Timer()])
    out = g.predict(xte, batch_size=1000, verbose=0)  # [y, y_bot]; fit() ends by converging the iterates
    return {"clean": 100 * float(np.mean(out[:, :-1].argmax(1) == yte)), "vra": 100 * float(np.mean(out.argmax(1) == yte)),
            "epoch_seconds": secs, "lipschitz": float(np.max(g.lipschitz_constant())),  # max pairwise K (gloronet: body L)
            "certificate": "power iteration (not a sound bound)", "power_iters": 5,
            "vra_power_iteration": 100 * float(np.mean(out.argmax(1) == yte)),
            "versions": {"tensorflow": tf.__version__, "gloro": gloro.__version__}}


def worker(args) -> None:
    t0 = time.time()
    res = (run_gloronet if args.worker == "gloronet" else run_tf)(args)
    res.update(lib=args.worker, dataset=args.dataset, seed=args.seed, epochs=args.epochs,
               recipe={"epsilon": EPS, "eps_schedule": EPS_SCHEDULE, "trades_lam": LAM, "lr": LR,
                       "lr_schedule": LR_SCHEDULE, "batch_size": BATCH, "model": "2c2f"},
               threads=1, machine=f"{platform.machine()}, {os.cpu_count()} CPUs", python=platform.python_version(),
               finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               wall_seconds=round(time.time() - t0, 1))
    tmp = Path(args.result + ".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(args.result)  # atomic: a result file is always a finished run


def result_path(out: Path, dataset: str, lib: str, epochs: int, seed: int, power_iters: int = 1) -> Path:
    variant = f"-pi{power_iters}" if lib == "gloronet" and power_iters != 1 else ""
    return out / f"{dataset}-{lib}{variant}-e{epochs}-s{seed}.json"


def report(out: Path, dataset: str, epochs: int) -> str:
    def fmt(xs):
        return f"{statistics.mean(xs):.2f}" + (f" ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else "")

    lines = [f"{dataset} 2C2F, ε = {EPS}, {epochs} epochs, 1 CPU thread per run",
             "| library | power iterations / step | certificate | seeds | clean acc % | VRA % @ 0.3 | "
             "VRA % with power-iteration K | s/epoch | fastest epoch, s |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    groups: dict[tuple, list] = {}
    for p in sorted(out.glob(f"{dataset}-*-e{epochs}-s*.json")):
        r = json.loads(p.read_text())
        groups.setdefault((r["lib"] != "gloronet", r.get("power_iters", 1 if r["lib"] == "gloronet" else 5)), []).append(r)
    for (_, iters), rs in sorted(groups.items()):
        secs = [statistics.mean(r["epoch_seconds"]) for r in rs]
        lines.append(f"| {LABELS[rs[0]['lib']]} | {iters} | {rs[0]['certificate']} | {len(rs)} "
                     f"({', '.join(str(r['seed']) for r in rs)}) | {fmt([r['clean'] for r in rs])} | "
                     f"{fmt([r['vra'] for r in rs])} | {fmt([r.get('vra_power_iteration', r['vra']) for r in rs])} | "
                     f"{fmt(secs)} | {fmt([min(r['epoch_seconds']) for r in rs])} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="holds mnist/ and fashion-mnist/ IDX .gz files")
    p.add_argument("--dataset", default="fashion-mnist", choices=["mnist", "fashion-mnist"])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--libs", nargs="+", default=["gloronet", "tf"], choices=["gloronet", "tf"])
    p.add_argument("--out", default="bench-runs/peer", help="result JSONs (and gloronet run directories)")
    p.add_argument("--tf-python", default="/work/tfvenv/bin/python", help="python of the TF venv")
    p.add_argument("--power-iters", type=int, default=5,
                   help="gloronet's power-iteration steps per training step (5, as the reference; 1 is gloronet's default)")
    p.add_argument("--report", action="store_true", help="only print the table of finished runs")
    p.add_argument("--backfill", action="store_true",
                   help="add vra_power_iteration to finished gloronet results that lack it, then report")
    p.add_argument("--worker", choices=["gloronet", "tf"], help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.backfill:
        import torch

        torch.set_num_threads(1)
        for res in sorted(out.glob(f"{args.dataset}-gloronet*-e{args.epochs}-s*.json")):
            r = json.loads(res.read_text())
            if "vra_power_iteration" not in r:
                r["vra_power_iteration"] = power_iteration_vra(res.with_suffix(""), args.dataset, args.data_dir)
                res.with_suffix(".tmp").write_text(json.dumps(r, indent=1))
                res.with_suffix(".tmp").replace(res)
    elif not args.report:
        for seed in args.seeds:
            for lib in args.libs:
                res = result_path(out, args.dataset, lib, args.epochs, seed, args.power_iters)
                if res.exists():
                    print(f"skip {res.name} (done)", flush=True)
                    continue
                python = sys.executable if lib == "gloronet" else args.tf_python
                cmd = [python, __file__, "--worker", lib, "--seed", str(seed), "--result", str(res),
                       "--data-dir", args.data_dir, "--dataset", args.dataset, "--epochs", str(args.epochs),
                       "--power-iters", str(args.power_iters)]
                print(f"run {res.name}", flush=True)
                with open(res.with_suffix(".log"), "a") as log:
                    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **THREAD_ENV})
    print(report(out, args.dataset, args.epochs))


if __name__ == "__main__":
    main()
