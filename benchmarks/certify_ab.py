"""Plain twin, ``net(x)`` and ``certify`` of one model, best of interleaved rounds: one process of
an A/B comparison of two source trees run alternately (the machine's drift hits both alike).

    GLORONET_DATA=../shared/data PYTHONPATH=<tree>/src OMP_NUM_THREADS=2 \\
        python benchmarks/certify_ab.py MODEL N ROUNDS [--batch B] [--threads T]

MODEL: a shipped model (``gloronet models --pretrained``) or ``liresnet`` (the synthetic LiResNet of
``certify_price.py``). Prints one line: the gloronet tree, ms per batch and the ratio to the plain
twin of each; asserts nothing. Alternate trees by running it once per tree, several times.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import certify_price  # noqa: E402  (run loading, timing rounds, the synthetic LiResNet)
from throughput import plain_twin  # noqa: E402

import gloronet  # noqa: E402
from gloronet.allocator import reuse_freed_memory  # noqa: E402

# the model files of this checkout, whichever tree is on PYTHONPATH: both trees of an A/B read the same weights
SHIPPED = Path(__file__).resolve().parents[1] / "src" / "gloronet" / "pretrained" / "models"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("n", type=int, help="test images")
    p.add_argument("rounds", type=int)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    reuse_freed_memory()
    if args.model == "liresnet":
        _, net, x, _ = certify_price._synthetic_liresnet(args.n, 60)
    else:
        net, _, x, _ = certify_price.load_run(SHIPPED / args.model, args.n)
    net.eval()
    batches = [x[i : i + args.batch] for i in range(0, args.n, args.batch)]
    plain = plain_twin(net).eval()
    with torch.no_grad():
        best = certify_price._best_times({
            "plain": lambda: [plain(b) for b in batches],
            "net(x)": lambda: [net(b) for b in batches],
            "certify": lambda: [net.certify(b) for b in batches],
        }, args.rounds)
    tree = Path(gloronet.__file__).resolve().parents[2]
    print(args.model, tree, " ".join(f"{k} {1e3 * v / len(batches):.1f} ms ({best['plain'] / v:.3f})"
                                     for k, v in best.items()), flush=True)


if __name__ == "__main__":
    main()
