"""``gloronet train | certify | export | attack | degrade | privacy | overfit | tightness | models``
— the command-line entry point. The studies live in :mod:`gloronet.evaluate` (imported lazily).

Every fault ends in one line ``gloronet <command>: error: <file or argument>: <cause>`` on stderr
and exit status 2 (a soundness bug found by a study: 1; Ctrl-C: 130).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__


def _train(args, overrides: list[str]) -> int:
    from .runs import config_for_command
    from .train import train

    if args.tensorboard:
        overrides = [*overrides, "--tensorboard=true"]
    cfg = config_for_command(args.out, args.config, overrides, args.resume)
    try:
        row = train(cfg, args.out, resume=args.resume, progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"\ngloronet train: interrupted; continue from the last checkpoint with: "
              f"gloronet train --out {args.out} --resume", file=sys.stderr)
        return 130
    print(f"done: {args.out}  " + "  ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)))
    return 0


def _certify(args) -> int:
    from .certify import certify_dataset, markdown_table, write_reports
    from .runs import check_writable, clean_temps, open_run

    out = Path(args.out or args.run_dir)
    run = open_run(args.run_dir, args.device, args.dataset, args.data_dir, args.eps[0] if args.eps else None)
    check_writable(out)  # before any work: a read-only run directory fails now, not after certifying
    clean_temps(out, REPORTS["certify"])
    net, cfg = run.net, run.config
    images, labels = run.load(args.split, args.limit)
    extra = list(args.eps or []) + list(cfg.get("certify_epsilons") or [])
    extra += [net.epsilon * f for f in (0.5, 1.5, 2.0)]
    top_k = args.top_k if args.top_k is not None else cfg.get("top_k")
    affinity = args.affinity if args.affinity is not None else cfg.get("affinity")
    report = certify_dataset(net, images, labels, extra, batch_size=args.batch_size, device=run.device,
                             progress=not args.quiet, arithmetic=args.arithmetic, top_k=top_k, affinity=affinity)
    report.update(dataset=run.dataset, split=args.split, model=net.config)
    title = f"{net.config['name']} on {run.dataset} ({args.split})"
    paths = write_reports(report, out, title=title)
    print(markdown_table(report, title))
    print("reports: " + ", ".join(str(p) for p in paths.values()))
    return 0


def _export(args) -> int:
    from .export import export_run

    paths = export_run(args.run_dir, args.format, args.out)
    print("exported: " + ", ".join(str(p) for p in paths))
    return 0


STUDIES = ("attack", "degrade", "privacy", "overfit", "tightness")
REPORTS = {cmd: [f"{cmd}{ext}" for ext in (".json", ".md", ".png", "-counterexamples.safetensors", "-attributions.png")]
           for cmd in ("certify", *STUDIES)}  # the files each command writes (its stale temporaries are removed)


def _evaluate(args) -> int:
    """One study of :mod:`gloronet.evaluate` on a run: ``<cmd>.json``, ``<cmd>.md`` and PNG(s) in
    ``--out`` (default: the run directory). Exit status 1 when it found a soundness bug (the
    counterexamples are saved next to the report)."""
    from .evaluate import common, plots
    from .runs import check_writable, clean_temps

    def open_(path):
        return common.open_run(path, args.device, args.dataset, args.data_dir, args.eps)

    run = open_(args.run_dir)
    limit, progress, out = args.limit, not args.quiet, Path(args.out or run.path)
    check_writable(out)  # before any work
    clean_temps(out, REPORTS[args.command])
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


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``gloronet certify: error: ...``) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"epsilon must be a finite number > 0, got {text}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _option(parser, name: str, *more: str, **kw):
    """``--data-dir`` also answers to ``--data_dir`` (every dashed option takes both spellings)."""
    names = [name, *more] + (["--" + name[2:].replace("-", "_")] if "-" in name[2:] else [])
    return parser.add_argument(*names, **kw)


def _config_keys() -> str:
    from .config import DEFAULTS

    return "config keys (defaults; set with --key=value or --key value, YAML syntax):\n" + "\n".join(
        f"  {k} = {v!r}" for k, v in DEFAULTS.items())


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gloronet", description="Train and certify globally-robust (GloRo) networks.")
    p.add_argument("--version", action="version", version=f"gloronet {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="train a GloRo net from a YAML recipe", epilog=_config_keys(),
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Any config key can be overridden with --key=value or --key value (YAML syntax), "
                                   "e.g. --epochs=5 --lr=5e-4.")
    t.add_argument("-c", "--config", help="YAML recipe (see configs/)")
    t.add_argument("--out", required=True, help="run directory (checkpoints, log.csv, reports)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint, with "
                   "its own config.yaml (--epochs=N extends it on the original schedule)")
    t.add_argument("--tensorboard", action="store_true", help="also log every epoch to <out>/tensorboard")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bars (the epoch lines stay)")
    c = sub.add_parser("certify", help="certify a trained run on a dataset split (sound bound only)")
    c.add_argument("run_dir")
    c.add_argument("--eps", type=positive_float, nargs="+",
                   help="ε values; the first becomes the target (default: the run's ε)")
    c.add_argument("--dataset", help="default: the run's dataset")
    _option(c, "--data-dir", help="dataset directory (default: the run's, then GLORONET_DATA, caches)")
    c.add_argument("--split", default="test", choices=["train", "test"])
    c.add_argument("--limit", type=positive_int, help="certify only the first N examples")
    _option(c, "--batch-size", type=positive_int, default=512)
    c.add_argument("--device", default="auto")
    c.add_argument("--out", help="where to write certify.{json,md,png} (default: the run directory)")
    c.add_argument("--arithmetic", default="float", choices=["float", "exact"],
                   help="float (default): certificates sound for the floating-point forward pass; exact: the "
                        "real-arithmetic test of the GloRo paper, which ignores rounding (for comparison with papers)")
    _option(c, "--top-k", type=positive_int, help="also certify relaxed top-K robustness (default: the run's top_k)")
    c.add_argument("--affinity", help="also certify affinity robustness: a named set "
                   "(cifar100-superclasses, fashion-mnist-groups) or a YAML/JSON file of class lists (default: the run's)")
    c.add_argument("-q", "--quiet", action="store_true")
    e = sub.add_parser("export", help="export a run's model with its sound pairwise constants frozen in (ONNX or torch)")
    e.add_argument("run_dir")
    e.add_argument("--format", default="onnx", choices=["onnx", "torch"],
                   help="onnx: model.onnx (extra `export`); torch: model.pt2 (torch.export)")
    e.add_argument("--out", help="the exported file (default: the run directory's model.onnx / model.pt2); the "
                   "model card is written beside it as <file>.card.json")
    _add_studies(sub)
    sub.add_parser("models", help="list registered architectures")
    return p


def _add_studies(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("run_dir", help="a run directory written by `gloronet train`")
    common.add_argument("--eps", type=positive_float, help="ε (default: the run's)")
    common.add_argument("--limit", type=positive_int, help="use the first N test images (default: all for attack/degrade, 1000 "
                        "for overfit/tightness; privacy: N members and N non-members, default 1000)")
    common.add_argument("--out", help="where to write the reports (default: the run directory)")
    common.add_argument("--dataset", help="default: the run's dataset")
    _option(common, "--data-dir", help="dataset directory (default: the run's, then GLORONET_DATA, caches)")
    common.add_argument("--device", default="auto")
    _option(common, "--batch-size", type=positive_int, default=256)
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
    o.add_argument("--images", type=positive_int, default=8, help="images in the attribution grid")
    _option(o, "--ig-steps", type=positive_int, default=32, help="integrated-gradients steps")
    t = sub.add_parser("tightness", parents=[common], help="empirical Lipschitz lower bounds vs the sound bounds")
    t.add_argument("--iters", type=positive_int, default=50, help="power iterations")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if args.command != "train" and unknown:
            parser.parse_args(argv)  # the subcommand's parser names the unrecognised argument
    except SystemExit as e:  # --help, --version, or a usage error (already printed, one line)
        return int(e.code or 0)
    commands = {"train": lambda: _train(args, unknown), "certify": lambda: _certify(args),
                "export": lambda: _export(args), "models": lambda: _models(args)}
    try:
        return commands.get(args.command, lambda: _evaluate(args))()
    except (ValueError, OSError, RuntimeError, TypeError, ImportError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"gloronet {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # train prints its own hint; the others wrote nothing half-way
        print(f"\ngloronet {args.command}: interrupted", file=sys.stderr)
        return 130


def entry() -> int:
    """The ``gloronet`` program: :func:`main` after the process-wide allocator setting that a
    program (not a library call) may choose (:func:`gloronet.allocator.reuse_freed_memory`)."""
    from .allocator import reuse_freed_memory

    reuse_freed_memory()
    return main()


if __name__ == "__main__":
    sys.exit(entry())
