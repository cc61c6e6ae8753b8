"""What each ``gloronet`` command does, given its parsed arguments (the parser is :mod:`gloronet.cli`).

Every command returns its exit status; faults raise (``ValueError``, ``OSError``, ...) and
:func:`gloronet.cli.main` turns them into one line and exit status 2. The studies live in
:mod:`gloronet.evaluate`, imported only when one runs.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

STUDIES = ("attack", "degrade", "privacy", "overfit", "tightness")
# --limit when not given: all test images (None), or this many
DEFAULT_LIMITS = {"certify": None, "attack": None, "degrade": None, "privacy": 1000, "overfit": 1000, "tightness": 1000}


def train(args, overrides: list[str], argv: list[str]) -> int:
    from .runs import config_for_command
    from .train import train as run_training

    if args.tensorboard:
        overrides = [*overrides, "--tensorboard=true"]
    cfg = config_for_command(args.out, args.config, overrides, args.resume or args.restart)
    try:
        row = run_training(cfg, args.out, resume=args.resume, restart=args.restart, progress=not args.quiet,
                           command=shlex.join(["gloronet", *argv]))
    except KeyboardInterrupt:
        print(f"\ngloronet train: interrupted; continue from the last checkpoint with: "
              f"gloronet train --out {args.out} --resume", file=sys.stderr)
        return 130
    print(f"done: {args.out}  " + "  ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)))
    return 0


def relaxation(args, config: dict) -> tuple[int | None, object]:
    """``(top_k, affinity)`` to certify: what the command line asks for, else the run's own. Both
    on one command line are refused: together they would certify one merged relaxation (affinity
    sets of at most K classes), not the two tables one expects."""
    if args.top_k is not None and args.affinity is not None:
        raise ValueError("give --top-k or --affinity, not both: each certifies its own relaxation (run the command "
                         "once with each); together they would mean affinity sets of at most K classes")
    if args.top_k is not None or args.affinity is not None:
        return args.top_k, args.affinity
    return config.get("top_k"), config.get("affinity")


def _title(command: str, run, detail: str = "") -> str:
    return f"gloronet {command}: {run.net.config['name']} on {run.dataset}{detail} — {run.name}"


def certify(args) -> int:
    from .certify import certify_dataset, markdown_table, write_reports
    from .reports import note_missing_plot, report_files, report_name
    from .runs import check_writable, clean_temps, open_run

    eps = args.eps[0] if args.eps else None
    run = open_run(args.run_dir, args.device, args.dataset, args.data_dir, eps)
    top_k, affinity = relaxation(args, run.config)
    name = report_name("certify", run, split=args.split, limit=args.limit, epsilon=eps, arithmetic=args.arithmetic,
                       top_k=args.top_k, affinity=args.affinity)
    out = Path(args.out) if args.out else run.out_dir
    check_writable(out)  # before any work: a read-only run directory fails now, not after certifying
    clean_temps(out, report_files(name))
    net, cfg = run.net, run.config
    images, labels = run.load(args.split, args.limit)
    extra = list(args.eps or []) + list(cfg.get("certify_epsilons") or [])
    extra += [net.epsilon * f for f in (0.5, 1.5, 2.0)]
    report = certify_dataset(net, images, labels, extra, batch_size=args.batch_size, device=run.device,
                             progress=not args.quiet, arithmetic=args.arithmetic, top_k=top_k, affinity=affinity)
    report.update(run=run.name, dataset=run.dataset, split=args.split, limit=args.limit, model=net.config)
    title = _title("certify", run, f" ({args.split}{f', first {args.limit}' if args.limit else ''})")
    paths = write_reports(report, out, title=title, name=name)
    print(markdown_table(report, title))
    print("reports: " + ", ".join(str(p) for p in paths.values()))
    note_missing_plot("certify", paths)
    return 0


def predict(args) -> int:
    from . import predict as p
    from .device import resolve_device
    from .runs import check_writable

    outs = [p.check_output(o) for o in args.out or []]
    for o in outs:
        check_writable(o.parent)  # before any work
    net, name, class_names, config = p.open_model(args.run_dir, resolve_device(args.device))
    if args.eps is not None:
        net.epsilon = args.eps
    top_k, affinity = relaxation(args, config)
    rows = p.predict(net, p.read_inputs(net, args.files), class_names, top_k=top_k, affinity=affinity,
                     batch_size=args.batch_size)
    print(p.table(rows, net.epsilon), end="")
    meta = {"model": name, "epsilon": net.epsilon, "arithmetic": "float",
            "input_range": list(net.input_range) if net.input_range else None, "top_k": top_k, "affinity": affinity}
    written = [p.write_predictions(o, rows, meta) for o in outs]
    if written:
        print("predictions: " + ", ".join(map(str, written)))
    return 0


def export(args) -> int:
    from .export import export_run

    paths = export_run(args.run_dir, args.format, args.out)
    print("exported: " + ", ".join(str(p) for p in paths))
    return 0


def evaluate(args) -> int:
    """One study of :mod:`gloronet.evaluate` on a run: its report files in ``--out`` (default: the
    run directory, ``./<name>/`` for a shipped model). Exit status 1 when it found a soundness bug
    (the counterexamples are saved next to the report)."""
    from .evaluate import common, plots
    from .reports import note_missing_plot, report_files, report_name
    from .runs import check_writable, clean_temps

    cmd = args.command
    run = common.open_run(args.run_dir, args.device, args.dataset, args.data_dir, args.eps)

    def second(arg: str, role: str):  # --defended / --twin: a model of the same dataset
        return common.open_run(arg, args.device, run.dataset, args.data_dir, args.eps,
                               why=f"{role} must be a model of {run.dataset}, like {run.name}")

    limit, progress = args.limit, not args.quiet
    name = report_name(cmd, run, limit=limit, default_limit=DEFAULT_LIMITS[cmd], epsilon=args.eps)
    out = Path(args.out) if args.out else run.out_dir
    check_writable(out)  # before any work
    clean_temps(out, report_files(name))
    title = _title(cmd, run)
    extra, bug = [], ""
    if cmd in ("attack", "degrade"):
        from .evaluate.pgd import AttackConfig

        cfg = AttackConfig(args.steps, args.restarts, args.targets, args.seed).validate()
    if cmd == "attack":
        from .evaluate import attack

        report = attack.run_attack(run, *run.load("test", limit), cfg, args.batch_size, progress)
        md, draw = attack.markdown(report, title), plots.plot_attack
        if report["broken_certified"]:
            bug = f"{report['broken_certified']} certified points broken by the attack"
    elif cmd == "degrade":
        from .evaluate import degrade

        runs = {"model": run, **({"defended": second(args.defended, "--defended")} if args.defended else {})}
        reports = {k: degrade.run_degrade(r, *r.load("test", limit), cfg, args.batch_size, progress) for k, r in runs.items()}
        report = {**{k: {kk: v for kk, v in r.items() if not kk.startswith("_")} for k, r in reports.items()},
                  "runs": {k: r.name for k, r in runs.items()},
                  "_counterexamples": next((r["_counterexamples"] for r in reports.values() if "_counterexamples" in r), None)}
        md, draw = degrade.markdown(reports, title), lambda r, p, t: plots.plot_degrade(reports, p, t)
        if any(r["label_changed"] for r in reports.values()):
            bug = "a certified point changed its label within ε"
    elif cmd == "privacy":
        from .evaluate import privacy

        report = privacy.run_privacy(run, second(args.twin, "--twin") if args.twin else None, limit, args.seed, progress)
        md, draw = privacy.markdown(report, title), plots.plot_privacy
    elif cmd == "overfit":
        from .evaluate import overfit

        report = overfit.run_overfit(run, second(args.twin, "--twin") if args.twin else None, limit, args.images,
                                     args.ig_steps, progress=progress)
        md, draw = overfit.markdown(report, title), plots.plot_overfit
        if plots.plot_attributions(report, out / f"{name}-attributions.png", title):
            extra.append(out / f"{name}-attributions.png")
    else:
        from .evaluate import tightness

        report = tightness.run_tightness(run, run.load("test", limit or DEFAULT_LIMITS[cmd])[0], args.iters,
                                         args.batch_size, progress)
        md, draw = tightness.markdown(report, title), plots.plot_tightness
        if report["margin"]["slope_violations"]:
            bug = f"{report['margin']['slope_violations']} margins steeper than their certified Lipschitz constant"
    report["run"] = run.name
    written = common.write_report(out, name, report, md, lambda p: draw(report, p, title))
    saved = common.save_counterexamples(report, out, name)
    print(md)
    print("reports: " + ", ".join(str(p) for p in [*written.values(), *extra] + ([saved] if saved else [])))
    note_missing_plot(cmd, written)
    if bug:
        print(f"gloronet {cmd}: SOUNDNESS BUG: {bug}; counterexamples: {saved}", file=sys.stderr)
        return 1
    return 0


def models(args) -> int:
    if args.pretrained:
        print(_pretrained_table())
        return 0
    import torch

    from . import data
    from .models import create, list_models
    from .runs import shape_text

    info = data.dataset_info(args.dataset)
    print(f"architectures, with their parameters for {info.name} inputs ({shape_text(info.in_shape)}, "
          f"{info.num_classes} classes; --dataset for others):\n")
    print("| model | parameters |\n|---|---:|")
    for name in list_models():
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            net = create(name, info.in_shape, info.num_classes, 0.0)
        print(f"| {name} | {sum(p.numel() for p in net.parameters()):,} |")
    print("\nliresnet-<D>l<W>w and chord-<D>l<W>w build any depth D and width W. Shipped, trained models: "
          "gloronet models --pretrained")
    return 0


def _pretrained_table() -> str:
    """Name, dataset, ε, architecture, input shape, clean accuracy and VRA of every shipped model
    (from its card and model.json; a missing entry shows as —)."""
    from . import pretrained
    from .runs import RunError, read_model_meta, shape_text

    names = pretrained.names()
    if not names:
        return "no pretrained models are shipped in this version of gloronet"

    def pct(v) -> str:
        return f"{100 * v:.2f}%" if isinstance(v, (int, float)) and not isinstance(v, bool) and v <= 1 else (
            "—" if v is None else str(v))

    lines = ["| name | dataset | ε | architecture | input | clean accuracy | VRA |", "|---|---|---:|---|---|---:|---:|"]
    for name in names:
        try:
            card = pretrained.card(name)
        except ValueError:
            card = {}
        try:
            shape = shape_text(read_model_meta(pretrained.resolve(name))["model"]["in_shape"])
        except (RunError, KeyError, TypeError):
            shape = "—"
        eps = card.get("epsilon")
        lines.append(f"| {name} | {card.get('dataset', '—')} | {eps if eps is not None else '—'} | "
                     f"{card.get('architecture', '—')} | {shape} | {pct(card.get('clean_accuracy'))} | "
                     f"{pct(card.get('vra'))} |")
    return "\n".join(lines) + "\n\nuse a name wherever a command takes a run directory, e.g. gloronet certify " + names[0]
