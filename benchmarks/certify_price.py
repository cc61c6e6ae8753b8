"""The price of floating-point-sound certification: VRA and throughput, measured in one run.

For each trained run directory (or a synthetic LiResNet at CIFAR shape with ``--liresnet``):

* VRA at the run's ε with ``certify(x)`` (sound for the float forward pass, the default) and
  with ``certify(x, arithmetic="exact")`` (the real-arithmetic test of the GloRo paper), the
  difference in points, and the median radius given up;
* VRA of ``certify(x, fast=False)`` (the certified program's own pass throughout: the
  "before" of issue 18);
* images/s of ``certify`` vs the model's own eval forward ``net(x)`` (fused kernels, guarded:
  predictions are those of the certified program with chunked sums, :mod:`gloronet.nn.accumulate`)
  and vs a plain twin — the same layer shapes as ordinary ``nn.Conv2d`` / ``nn.Linear`` + MinMax
  (``throughput.plain_twin``) — and of the chunked program itself and ``certify(x, fast=False)``;
  same batches, interleaved rounds, best of ``--repeats``; freed memory is reused as by the ``gloronet``
  command (:mod:`gloronet.allocator`; ``GLORONET_SYSTEM_MALLOC=1`` measures glibc's default).

    GLORONET_DATA=../shared/data python benchmarks/certify_price.py runs/price/mnist-2c2f-... [--limit N]
    python benchmarks/certify_price.py --liresnet --limit 512

Prints a Markdown table; asserts nothing. With ``PYTHONPATH=<older tree>/src`` it measures that
tree's gloronet (a tree from before issue 18, whose ``certify`` has no ``fast``, included), so
before / after tables come from one script on one machine.
"""
from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import plain_twin  # noqa: E402

from gloronet import models  # noqa: E402
from gloronet.allocator import reuse_freed_memory  # noqa: E402
from gloronet.checkpoint import load_model  # noqa: E402
from gloronet import kernels  # noqa: E402
from gloronet.data import load_dataset  # noqa: E402
from gloronet.nn import accumulate  # noqa: E402


def _best_times(fns: dict, repeats: int) -> dict:
    """Best wall time of each function, measured in interleaved rounds with a rotating order (so
    drifts of a shared machine hit all of them alike)."""
    for fn in fns.values():
        fn()  # warm-up (bounds, caches)
    best = {k: float("inf") for k in fns}
    keys = list(fns)
    for rnd in range(repeats):
        for k in keys[rnd % len(keys):] + keys[: rnd % len(keys)]:  # rotate: no one always runs first
            t = time.perf_counter()
            fns[k]()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def _synthetic_liresnet(limit: int, train_steps: int):
    """A liresnet-6l128w at CIFAR shape trained for a few steps on a learnable synthetic task."""
    torch.manual_seed(0)
    net = models.create("liresnet-6l128w", (3, 32, 32), 10, epsilon=36 / 255)
    g = torch.Generator().manual_seed(1)
    protos = torch.rand(10, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (limit,), generator=g)
    x = (0.5 + 0.1 * (protos[y] - 0.5) + 0.3 * torch.randn(limit, 3, 32, 32, generator=g)).clamp(0, 1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    for step in range(train_steps):
        idx = torch.randint(0, limit, (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(net.bottom_logits(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return "liresnet-6l128w (synthetic CIFAR shape)", net.eval(), x, y


def load_run(run, limit: int):
    """``(net, dataset name, test images, labels)`` of a run directory (its own ``config.yaml``)."""
    dataset = yaml.safe_load((Path(run) / "config.yaml").read_text())["dataset"]
    return (load_model(str(run)), dataset, *load_dataset(dataset, "test", limit=limit))


def tree_agnostic(net) -> None:
    """Lets ``net.certify(b, fast=...)`` run on a gloronet from before issue 18 (``PYTHONPATH=<older
    tree>/src``), whose ``certify`` has no ``fast``: it runs the chunked program throughout, which is
    what ``fast=False`` means."""
    if "fast" not in inspect.signature(net.certify).parameters:
        certify = net.certify
        net.certify = lambda b, fast=True, **kw: certify(b, **kw)


def _run(name, net, x, y, batch: int, repeats: int) -> dict:
    net.eval()
    tree_agnostic(net)
    batches = [x[i : i + batch] for i in range(0, len(x), batch)]
    radii = {}
    for arithmetic in ("exact", "float"):
        radii[arithmetic] = torch.cat([net.certify(b, arithmetic=arithmetic).radius for b in batches])
    radii["chunked"] = torch.cat([net.certify(b, fast=False).radius for b in batches])
    pred = torch.cat([net.certify(b).pred for b in batches])
    correct = pred == y
    eps = net.epsilon
    vra = {k: 100 * float((correct & (r > eps)).double().mean()) for k, r in radii.items()}
    loss = (radii["exact"] - radii["float"])[correct]
    plain = plain_twin(net).eval()

    def chunked(b):
        with kernels.sound_kernels():
            return net.head(net.body(b))

    with torch.no_grad():
        t = _best_times({
            "plain": lambda: [plain(b) for b in batches],
            "forward": lambda: [net(b) for b in batches],
            "certify": lambda: [net.certify(b) for b in batches],
            "certify_exact": lambda: [net.certify(b, arithmetic="exact") for b in batches],
            "forward_chunked": lambda: [chunked(b) for b in batches],
            "certify_chunked": lambda: [net.certify(b, fast=False) for b in batches],
        }, repeats)
    n = len(x)
    return {"name": name, "n": n, "eps": eps, "vra_float": vra["float"], "vra_exact": vra["exact"],
            "vra_chunked": vra["chunked"],
            "radius_loss": float(loss.median()) if len(loss) else 0.0, **{k: n / v for k, v in t.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", help="run directories written by `gloronet train`")
    p.add_argument("--liresnet", action="store_true", help="also a liresnet-6l128w at CIFAR shape on synthetic data")
    p.add_argument("--limit", type=int, default=10000, help="test images per model")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (best is reported)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--train-steps", type=int, default=60, help="training steps of the synthetic LiResNet")
    p.add_argument("--max-chunks", type=int, help="override gloronet.nn.accumulate.MAX_CHUNKS (1: fused kernels)")
    args = p.parse_args()
    if args.max_chunks is not None:
        accumulate.MAX_CHUNKS = args.max_chunks
    if args.threads:
        torch.set_num_threads(args.threads)
    tuned = reuse_freed_memory()  # as the gloronet command does (GLORONET_SYSTEM_MALLOC=1: glibc's default)
    rows = []
    for run in args.runs:
        net, dataset, x, y = load_run(run, args.limit)
        rows.append(_run(f"{net.config['name']} on {dataset}", net, x, y, args.batch, args.repeats))
    if args.liresnet:
        rows.append(_run(*_synthetic_liresnet(args.limit, args.train_steps), args.batch, args.repeats))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, best of {args.repeats}, "
          f"at most {accumulate.MAX_CHUNKS} chunks per sum, malloc {'reusing freed memory' if tuned else 'glibc default'}\n")
    print("| model | n | ε | VRA exact-arith. % | VRA fp-sound % | lost (points) | VRA fast=False % | median radius lost "
          "| plain twin img/s | net(x) / plain | certify / plain | chunked program / plain | certify fast=False / plain "
          "| exact certify / plain |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = lambda k: r[k] / r["plain"]  # noqa: E731
        print(f"| {r['name']} | {r['n']} | {r['eps']:.4g} | {r['vra_exact']:.2f} | {r['vra_float']:.2f} | "
              f"{r['vra_exact'] - r['vra_float']:.2f} | {r['vra_chunked']:.2f} | {r['radius_loss']:.2e} | {r['plain']:.0f} | "
              f"{ratio('forward'):.2f} | {ratio('certify'):.2f} | {ratio('forward_chunked'):.2f} | "
              f"{ratio('certify_chunked'):.2f} | {ratio('certify_exact'):.2f} |")


if __name__ == "__main__":
    main()
