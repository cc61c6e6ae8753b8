"""``gloronet train | certify | attack | degrade | privacy | overfit | tightness | models`` — the
command-line entry point. The studies live in :mod:`gloronet.evaluate` (imported lazily)."""
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


STUDIES = ("attack", "degrade", "privacy", "overfit", "tightness")


def _evaluate(args) -> int:
    """One study of :mod:`gloronet.evaluate` on a run: ``<cmd>.json``, ``<cmd>.md`` and PNG(s) in
    ``--out`` (default: the run directory). Exit status 1 when it found a soundness bug (the
    counterexamples are saved next to the report)."""
    from .evaluate import common, plots

    def open_(path):
        return common.open_run(path, args.device, args.dataset, args.data_dir, args.eps)

    for name in ("limit", "batch_size", "images", "ig_steps", "iters"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    run = open_(args.run_dir)
    limit, progress, out = args.limit, not args.quiet, Path(args.out or run.path)
    title = f"gloronet {args.command}: {run.net.config['name']} on {run.dataset}"
    extra, bug = [], ""
    if args.command in ("attack", "degrade"):
        from .evaluate.pgd import AttackConfig

        cfg = AttackConfig(args.steps, args.restarts, args.targets, args.seed).validate()
    if args.command == "attack":
        from .evaluate import attack

        report = attack.run_attack(run, *run.load("test", limit), cfg, args.batch_size, progress)
        md, draw = attack.markdown(report, title), lambda p: plots.plot_attack(report, p)
        if report["broken_certified"]:
            bug = f"{report['broken_certified']} certified points broken by the attack"
    elif args.command == "degrade":
        from .evaluate import degrade

        runs = {"model": run, **({"defended": open_(args.defended)} if args.defended else {})}
        reports = {k: degrade.run_degrade(r, *r.load("test", limit), cfg, args.batch_size, progress) for k, r in runs.items()}
        report = {**{k: {kk: v for kk, v in r.items() if not kk.startswith("_")} for k, r in reports.items()},
                  "runs": {k: str(r.path) for k, r in runs.items()},
                  "_counterexamples": next((r["_counterexamples"] for r in reports.values() if "_counterexamples" in r), None)}
        md, draw = degrade.markdown(reports, title), lambda p: plots.plot_degrade(reports, p)
        if any(r["label_changed"] for r in reports.values()):
            bug = "a certified point changed its label within ε"
    elif args.command == "privacy":
        from .evaluate import privacy

        report = privacy.run_privacy(run, open_(args.twin) if args.twin else None, limit, args.seed, progress)
        md, draw = privacy.markdown(report, title), lambda p: plots.plot_privacy(report, p)
    elif args.command == "overfit":
        from .evaluate import overfit

        report = overfit.run_overfit(run, open_(args.twin) if args.twin else None, limit, args.images, args.ig_steps,
                                     progress=progress)
        md, draw = overfit.markdown(report, title), lambda p: plots.plot_overfit(report, p)
        if plots.plot_attributions(report, out / "overfit-attributions.png"):
            extra.append(out / "overfit-attributions.png")
    else:
        from .evaluate import tightness

        report = tightness.run_tightness(run, run.load("test", limit or 1000)[0], args.iters, args.batch_size, progress)
        md, draw = tightness.markdown(report, title), lambda p: plots.plot_tightness(report, p)
        if report["margin"]["slope_violations"]:
            bug = f"{report['margin']['slope_violations']} margins steeper than their certified Lipschitz constant"
    paths = list(common.write_outputs(out, args.command, report, md, draw).values()) + extra
    saved = common.save_counterexamples(report, out, args.command)
    print(md)
    print("reports: " + ", ".join(str(p) for p in paths + ([saved] if saved else [])))
    if bug:
        print(f"gloronet {args.command}: SOUNDNESS BUG: {bug}; counterexamples: {saved}", file=sys.stderr)
        return 1
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
    _add_studies(sub)
    sub.add_parser("models", help="list registered architectures")
    return p


def _add_studies(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("run_dir", help="a run directory written by `gloronet train`")
    common.add_argument("--eps", type=float, help="ε (default: the run's)")
    common.add_argument("--limit", type=int, help="use the first N test images (default: all for attack/degrade, 1000 "
                        "for overfit/tightness; privacy: N members and N non-members, default 1000)")
    common.add_argument("--out", help="where to write the reports (default: the run directory)")
    common.add_argument("--dataset", help="default: the run's dataset")
    common.add_argument("--data-dir", help="dataset directory (default: the run's, then GLORONET_DATA, caches)")
    common.add_argument("--device", default="auto")
    common.add_argument("--batch-size", type=int, default=256)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    attack = argparse.ArgumentParser(add_help=False)
    attack.add_argument("--steps", type=int, default=100, help="iterations per attack run")
    attack.add_argument("--restarts", type=int, default=2, help="PGD runs (the first from the clean point)")
    attack.add_argument("--targets", type=int, default=3, help="APGD-T target classes")
    attack.add_argument("--seed", type=int, default=0)
    sub.add_parser("attack", parents=[common, attack], help="PGD/APGD attacks at ε and at each certified radius "
                   "(exit 1 if a certificate breaks)")
    d = sub.add_parser("degrade", parents=[common, attack], help="degradation (DoS) attack on certification")
    d.add_argument("--defended", help="a second run (e.g. trained with degradation_defense: true) to compare")
    p = sub.add_parser("privacy", parents=[common], help="membership inference (loss, confidence, certified radius)")
    p.add_argument("--twin", help="the non-robust twin run (loss: standard) to compare")
    p.add_argument("--seed", type=int, default=0, help="member / non-member sampling")
    o = sub.add_parser("overfit", parents=[common], help="robust overfitting curves and attribution maps")
    o.add_argument("--twin", help="the non-robust twin run (loss: standard) to compare")
    o.add_argument("--images", type=int, default=8, help="images in the attribution grid")
    o.add_argument("--ig-steps", type=int, default=32, help="integrated-gradients steps")
    t = sub.add_parser("tightness", parents=[common], help="empirical Lipschitz lower bounds vs the sound bounds")
    t.add_argument("--iters", type=int, default=50, help="power iterations")


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
        if args.command in STUDIES:
            return _evaluate(args)
        return _models(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, TypeError) as e:
        print(f"gloronet {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
