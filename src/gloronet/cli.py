"""``gloronet train | certify | predict | export | attack | degrade | privacy | overfit | tightness |
models`` — the command-line parser and entry point; what each command does is in
:mod:`gloronet.commands` (the studies in :mod:`gloronet.evaluate`, imported lazily).

Every fault ends in one line ``gloronet <command>: error: <file or argument>: <cause>`` on stderr
and exit status 2 (a soundness bug found by a study: 1; Ctrl-C: 130). A bare ``gloronet`` or a
bare command prints its help (exit status 2); a mistyped command, option or config key is answered
with the closest one ("did you mean"). Every option's help states its default.
"""
from __future__ import annotations

import argparse
import sys

from . import commands
from .version import __version__
from .config import DEFAULTS, DESCRIPTIONS, FIELDS, did_you_mean, parse_overrides

RUN_HELP = "a run directory written by `gloronet train`, or the name of a pretrained model (gloronet models --pretrained)"
OUT_HELP = "where the reports go (default: the run directory; ./<name>/ for a pretrained model)"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``gloronet certify: error: ...``) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


class _Help(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout and appends ``(default: X)`` to every option whose help does not
    already say what its default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if action.option_strings and not unset and "default" not in text:
            text += " (default: %(default)s)"
        return text


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
    lines = ["config keys (set with --key=value or --key value, YAML syntax; a recipe file sets them the same way):"]
    for k, v in DEFAULTS.items():
        lines += [f"  {k} = {v!r}", f"      {DESCRIPTIONS[k]}"]
    return "\n".join(lines)


def _run_options(parser, out_help: str = OUT_HELP, out_files: bool = False) -> None:
    """RUN, --device, --out, -q: what every command that reads a run shares (``out_files``: one
    ``--out`` per file to write, repeatable)."""
    parser.add_argument("run_dir", metavar="RUN", help=RUN_HELP)
    parser.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--out", action="append" if out_files else "store", help=out_help)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _relaxation_options(parser, what: str) -> None:
    _option(parser, "--top-k", type=positive_int, help=f"also {what} relaxed top-K robustness (default: the run's "
            "top_k, if any; not with --affinity)")
    parser.add_argument("--affinity", help=f"also {what} affinity robustness: a named set (cifar100-superclasses, "
                        "fashion-mnist-groups) or a YAML/JSON file of class lists (default: the run's, if any; "
                        "not with --top-k)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gloronet", formatter_class=_Help,
                description="Train and certify globally-robust (GloRo) networks. `gloronet COMMAND --help` "
                            "describes each command.")
    p.add_argument("--version", action="version", version=f"gloronet {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    def command(name: str, help: str, **kw):
        return sub.add_parser(name, help=help, description=kw.pop("description", help), formatter_class=_Help, **kw)

    t = command("train", "train a GloRo net from a YAML recipe", epilog=_config_keys(),
                description="Train a GloRo net. Any config key can be set with --key=value or --key value (YAML "
                            "syntax), e.g. --epochs=5 --lr=5e-4; the keys are listed below.")
    t.add_argument("-c", "--config", help="YAML recipe, e.g. configs/mnist-2c2f-eps0.3.yaml (default: the "
                   "defaults listed below)")
    t.add_argument("--out", required=True, help="run directory: config.yaml, log.csv, history.json, model files, "
                   "state.pt (README: Output files)")
    again = t.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint, "
                       "with its own config.yaml (--epochs=N extends it on the original schedule)")
    again.add_argument("--restart", action="store_true", help="train the run in --out again from epoch 0 with its "
                       "own config.yaml; its previous files move into --out/previous-<time>/ (e.g. a run that has "
                       "weights but no state.pt)")
    t.add_argument("--tensorboard", action="store_true", help="also log every epoch to <out>/tensorboard")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bars (the epoch lines stay)")

    c = command("certify", "certify a trained model on a dataset split (sound bound only)")
    _run_options(c)
    c.add_argument("--eps", type=positive_float, nargs="+",
                   help="ε values; the first becomes the target (default: the run's ε)")
    c.add_argument("--dataset", help="for runs that do not record their dataset (default: the run's dataset)")
    _option(c, "--data-dir", help="dataset root folder; must exist (default: the run's, then $GLORONET_DATA, "
            "~/.cache/gloronet, ...)")
    c.add_argument("--split", default="test", choices=["train", "test"], help="dataset split")
    c.add_argument("--limit", type=positive_int, help="certify only the first N examples (default: all)")
    _option(c, "--batch-size", type=positive_int, default=512, help="images per forward pass")
    c.add_argument("--arithmetic", default="float", choices=["float", "exact"],
                   help="float (the default): certificates sound for the floating-point forward pass; exact: the "
                        "real-arithmetic test of the GloRo paper, which ignores rounding (for comparison with papers)")
    _relaxation_options(c, "certify")

    pr = command("predict", "classify your own images or arrays and certify each prediction",
                 description="Classify your own files and certify each prediction: PNG / JPEG images (8-bit, exactly "
                             "the model's size: never resized), .npy / .npz arrays (channels first; uint8 pixels or "
                             "floats in the model's input range), or folders of them. Prints a table; --out writes "
                             "it as JSON or CSV.")
    _run_options(pr, "also write the predictions to this .json or .csv file; repeat for both (default: print only)",
                 out_files=True)
    pr.add_argument("files", nargs="+", metavar="FILE", help="images, .npy / .npz files or folders of them")
    pr.add_argument("--eps", type=positive_float, help="certify at this ε (default: the run's ε)")
    _option(pr, "--batch-size", type=positive_int, default=256, help="inputs per forward pass")
    _relaxation_options(pr, "certify")

    e = command("export", "export a model with its sound pairwise constants frozen in (ONNX or torch)")
    e.add_argument("run_dir", metavar="RUN", help=RUN_HELP)
    e.add_argument("--format", choices=["onnx", "torch"],
                   help="onnx: a .onnx file (extra `export`); torch: a .pt2 file (torch.export) (default: the one "
                        "--out's suffix names, else onnx)")
    e.add_argument("--out", help="the exported file, .onnx or .pt2; the model card goes beside it as <file>.card.json "
                   "(default: model.onnx / model.pt2 in the run directory, or in ./<name>/ for a pretrained model)")
    _add_studies(command)
    m = command("models", "list the architectures (with parameter counts) or the shipped pretrained models")
    m.add_argument("--pretrained", action="store_true", help="list the shipped, trained models: name, dataset, ε, "
                   "clean accuracy, VRA")
    m.add_argument("--dataset", default="mnist", help="count parameters for this dataset's input shape and classes")
    return p


def _add_studies(command) -> None:
    common = argparse.ArgumentParser(add_help=False)
    _run_options(common)
    common.add_argument("--eps", type=positive_float, help="ε (default: the run's)")
    common.add_argument("--limit", type=positive_int, help="use the first N test images (default: all for "
                        "attack/degrade, 1000 for overfit/tightness; privacy: N members and N non-members, 1000)")
    common.add_argument("--dataset", help="for runs that do not record their dataset (default: the run's dataset)")
    _option(common, "--data-dir", help="dataset root folder; must exist (default: the run's, then $GLORONET_DATA, "
            "~/.cache/gloronet, ...)")
    _option(common, "--batch-size", type=positive_int, default=256, help="images per forward pass")
    attack = argparse.ArgumentParser(add_help=False)
    attack.add_argument("--steps", type=int, default=100, help="iterations per attack run")
    attack.add_argument("--restarts", type=int, default=2, help="PGD runs (the first from the clean point)")
    attack.add_argument("--targets", type=int, default=3, help="APGD-T target classes")
    attack.add_argument("--seed", type=int, default=0, help="random starts")
    command("attack", "PGD/APGD attacks at ε and at each certified radius (exit 1 if a certificate breaks)",
            parents=[common, attack])
    d = command("degrade", "degradation (DoS) attack on certification", parents=[common, attack])
    d.add_argument("--defended", help="a second run of the same dataset (e.g. trained with degradation_defense: true) "
                   "to compare (default: none)")
    p = command("privacy", "membership inference (loss, confidence, certified radius)", parents=[common])
    p.add_argument("--twin", help="the non-robust twin run (loss: standard) to compare (default: none)")
    p.add_argument("--seed", type=int, default=0, help="member / non-member sampling")
    o = command("overfit", "robust overfitting curves and attribution maps", parents=[common])
    o.add_argument("--twin", help="the non-robust twin run (loss: standard) to compare (default: none)")
    o.add_argument("--images", type=positive_int, default=8, help="images in the attribution grid")
    _option(o, "--ig-steps", type=positive_int, default=32, help="integrated-gradients steps")
    t = command("tightness", "empirical Lipschitz lower bounds vs the sound bounds", parents=[common])
    t.add_argument("--iters", type=positive_int, default=50, help="power iterations")


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Each command's parser, by name."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    return dict(action.choices)


def _option_names(parser: argparse.ArgumentParser) -> list[str]:
    return [s for a in parser._actions for s in a.option_strings if s.startswith("--")]  # noqa: SLF001


def _check_usage(parser, argv: list[str]) -> tuple[argparse.Namespace, list[str]] | int:
    """Parsed arguments and the train command's config overrides, or the exit status of a usage
    problem (already reported: help for a bare command, one line with "did you mean" otherwise)."""
    subs = subparsers(parser)
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    if not argv[0].startswith("-") and argv[0] not in subs:
        print(f"gloronet: error: unknown command {argv[0]!r}{did_you_mean(argv[0], subs)}; commands: "
              f"{', '.join(subs)}", file=sys.stderr)
        return 2
    if argv[0] in subs and len(argv) == 1 and any(a.required for a in subs[argv[0]]._actions):  # noqa: SLF001
        subs[argv[0]].print_help(sys.stderr)
        return 2
    try:
        args, unknown = parser.parse_known_args(argv)
        sub = subs[args.command]
        if args.command != "train" and unknown:
            first = unknown[0].split("=")[0]
            hint = did_you_mean(first, _option_names(sub)) if first.startswith("-") else ""
            sub.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
        if args.command == "train":
            try:
                keys = parse_overrides(unknown)
            except ValueError as err:
                sub.error(str(err))
            bad = [k for k in keys if k not in FIELDS]
            if bad:
                known = _option_names(sub) + [f"--{f}" for f in FIELDS]
                sub.error(f"unknown option or config key --{bad[0]}{did_you_mean('--' + bad[0], known)}; "
                          "`gloronet train --help` lists both")
    except SystemExit as e:  # --help, --version, or a usage error (already printed, one line)
        return int(e.code or 0)
    return args, unknown


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parsed = _check_usage(build_parser(), argv)
    if isinstance(parsed, int):
        return parsed
    args, unknown = parsed
    run = {"train": lambda: commands.train(args, unknown, argv), "certify": lambda: commands.certify(args),
           "predict": lambda: commands.predict(args), "export": lambda: commands.export(args),
           "models": lambda: commands.models(args)}
    try:
        return run.get(args.command, lambda: commands.evaluate(args))()
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
