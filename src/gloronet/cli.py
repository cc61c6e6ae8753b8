"""``gloronet train | certify | models`` — the command-line entry point."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml


def _train(args, overrides: list[str]) -> int:
    from .config import build_config
    from .train import train

    saved = Path(args.out) / "config.yaml"
    cfg = build_config(saved if args.resume and not args.config and saved.exists() else args.config, overrides)
    row = train(cfg, args.out, resume=args.resume, progress=not args.quiet)
    print(f"done: {args.out}  " + "  ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)))
    return 0


def _certify(args) -> int:
    import torch

    from . import data
    from .certify import certify_dataset, markdown_table, write_reports
    from .checkpoint import load_model
    from .train import resolve_device

    run = Path(args.run_dir)
    device = resolve_device(args.device)
    net = load_model(run, map_location=device)
    cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").exists() else {}
    dataset = args.dataset or cfg.get("dataset")
    if not dataset:
        raise SystemExit("error: the run has no config.yaml naming its dataset: pass --dataset")
    if args.eps is not None:
        net.epsilon = args.eps[0]
    images, labels = data.load_dataset(dataset, args.split, args.data_dir or cfg.get("data_dir"), args.limit, dtype=torch.uint8)
    extra = list(args.eps or []) + list(cfg.get("certify_epsilons") or [])
    extra += [net.epsilon * f for f in (0.5, 1.5, 2.0)]
    top_k = args.top_k if args.top_k is not None else cfg.get("top_k")
    affinity = args.affinity if args.affinity is not None else cfg.get("affinity")
    report = certify_dataset(net, images, labels, extra, batch_size=args.batch_size, device=device,
                             progress=not args.quiet, arithmetic=args.arithmetic, top_k=top_k, affinity=affinity)
    report.update(dataset=dataset, split=args.split, model=net.config)
    paths = write_reports(report, args.out or run, title=f"{net.config['name']} on {dataset} ({args.split})")
    print(markdown_table(report, f"{net.config['name']} on {dataset} ({args.split})"))
    print("reports: " + ", ".join(str(p) for p in paths.values()))
    return 0


def _models(_args) -> int:
    from .models import list_models

    print("\n".join(list_models()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gloronet", description="Train and certify globally-robust (GloRo) networks.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a GloRo net from a YAML recipe",
                       description="Any config key can be overridden with --key=value (YAML syntax), e.g. --epochs=5 --lr=5e-4.")
    t.add_argument("-c", "--config", help="YAML recipe (see configs/)")
    t.add_argument("--out", required=True, help="run directory (checkpoints, log.csv, reports)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    c = sub.add_parser("certify", help="certify a trained run on a dataset split (sound bound only)")
    c.add_argument("run_dir")
    c.add_argument("--eps", type=float, nargs="+", help="ε values; the first becomes the target (default: the run's ε)")
    c.add_argument("--dataset", help="default: the run's dataset")
    c.add_argument("--data-dir", help="dataset directory (default: the run's, then GLORONET_DATA, caches)")
    c.add_argument("--split", default="test", choices=["train", "test"])
    c.add_argument("--limit", type=int, help="certify only the first N examples")
    c.add_argument("--batch-size", type=int, default=512)
    c.add_argument("--device", default="auto")
    c.add_argument("--out", help="where to write certify.{json,md,png} (default: the run directory)")
    c.add_argument("--arithmetic", default="float", choices=["float", "exact"],
                   help="float (default): certificates sound for the floating-point forward pass; exact: the "
                        "real-arithmetic test of the GloRo paper, which ignores rounding (for comparison with papers)")
    c.add_argument("--top-k", type=int, help="also certify relaxed top-K robustness (default: the run's top_k)")
    c.add_argument("--affinity", help="also certify affinity robustness: a named set "
                   "(cifar100-superclasses, fashion-mnist-groups) or a YAML/JSON file of class lists (default: the run's)")
    c.add_argument("-q", "--quiet", action="store_true")
    sub.add_parser("models", help="list registered architectures")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command != "train" and unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        if args.command == "train":
            return _train(args, unknown)
        if args.command == "certify":
            return _certify(args)
        return _models(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, TypeError) as e:
        print(f"gloronet {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
