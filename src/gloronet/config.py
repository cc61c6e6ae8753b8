"""Training configuration: typed defaults, overridden by a YAML file, then by ``--key=value``.

nanoGPT style: one flat dataclass; values may be numbers or small dicts (schedule / loss specs,
see :mod:`gloronet.schedules` and :mod:`gloronet.losses`). Unknown keys are errors.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml


def _key(default: Any = dataclasses.MISSING, help: str = "", *, factory=None):
    """A config key with its default and its one-line description (``gloronet train --help``)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # data
    dataset: str = _key("mnist", "mnist | fashion-mnist | cifar10 | cifar100 | tiny-imagenet | imagenet")
    data_dir: str | None = _key(None, "folder holding <dataset>/ (or the dataset folder itself); it must exist. "
                                      "Default: $GLORONET_DATA, then ~/.cache/gloronet (README: Datasets)")
    train_limit: int | None = _key(None, "train on the first N training images only (quick runs, tests); null: all")
    test_limit: int | None = _key(None, "validate on the first N test images only; null: all")
    augment: dict = _key(help="random crop and flip, e.g. {crop_padding: 4, flip: true}; {}: none", factory=dict)
    # model
    model: str = _key("2c2f", "architecture (gloronet models lists them)")
    model_args: dict = _key(help="extra arguments of the architecture, e.g. {head: lln, power_iters: 1}", factory=dict)
    # robustness
    epsilon: float = _key(0.3, "target L2 radius ε: validation and certification always use it")
    train_epsilon: Any = _key(None, "ε schedule for training, factors relative to epsilon "
                                    "(gloronet.schedules); null: constant epsilon")
    degradation_defense: bool = _key(False, "train for 2ε while certifying at ε, so ε-perturbations cannot make a "
                                            "point certified at 2ε abstain (Mangal et al.)")
    top_k: int | None = _key(None, "relaxed top-K (RTK) GloRo: train and certify the top-k set, k <= top_k")
    affinity: Any = _key(None, "affinity GloRo: a list of class lists, a named set (cifar100-superclasses, "
                               "fashion-mnist-groups) or a YAML/JSON file")
    loss: Any = _key("crossentropy", "crossentropy | trades | emma | la (logit annealing) | standard (non-robust "
                                     "twin) | {name: trades, lam: 1.5} | {name: la, gamma: 5, offset: 2, temperature: 0.75}")
    trades_lam: Any = _key(None, "schedule of the TRADES λ (overrides the loss's lam); null: the loss's own")
    # optimisation
    epochs: int = _key(10, "training epochs (--resume --epochs=N extends a run on its original schedule)")
    batch_size: int = _key(256, "images per step (over all processes)")
    optimizer: str = _key("adam", "adam | adamw | nadam")
    lr: Any = _key(1e-3, "learning rate: a number or a schedule mapping (gloronet.schedules)")
    weight_decay: float = _key(0.0, "weight decay (decoupled for adamw)")
    lookahead: Any = _key(False, "Lookahead: true (k=5, alpha=0.5) or {k: 6, alpha: 0.5}")
    grad_clip: float | None = _key(None, "clip the gradient norm to this value; null: no clipping")
    amp: str = _key("auto", "auto (bf16 on CUDA when supported) | bf16 | off")
    # run
    seed: int = _key(0, "seed of the initialisation, data order and augmentation")
    device: str = _key("auto", "auto | cpu | cuda | cuda:N")
    eval_every: int = _key(1, "certify the test images every N epochs (and after the last)")
    train_vra_subset: int = _key(0, "> 0: also certify the first N training images at each evaluation (log.csv "
                                    "train_subset_acc / train_subset_vra; gloronet overfit)")
    checkpoint_every: int = _key(1, "write model and state.pt every N epochs (and after the last)")
    certify_epsilons: list = _key(help="extra ε values for the final report", factory=list)
    schedule_epochs: int | None = _key(None, "length of the lr / ε / λ schedules; null: epochs (set by --resume "
                                             "with a larger --epochs, so an extension keeps the original schedule)")
    tensorboard: bool = _key(False, "also log each epoch to <run>/tensorboard (extra `tensorboard`)")
    collapse_guard: bool = _key(True, "stop, keeping the last checkpoint, when the accuracy of an epoch's last "
                                      "tenth of batches falls to chance (<= 1.5/classes) after an earlier epoch "
                                      "reached 3/classes")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "TrainConfig":
        """Types and ranges of every key; the first problem raises ``ValueError`` naming the key."""
        for name, kind in _TYPES.items():
            _check_type(name, getattr(self, name), kind)
        for name in ("epochs", "batch_size", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)}")
        for name in ("train_limit", "test_limit", "schedule_epochs", "top_k"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1 or null, got {getattr(self, name)}")
        if self.seed < 0 or self.train_vra_subset < 0:
            name = "seed" if self.seed < 0 else "train_vra_subset"
            raise ValueError(f"{name} must be an integer >= 0, got {getattr(self, name)}")
        if self.optimizer not in ("adam", "adamw", "nadam"):
            raise ValueError(f"optimizer must be 'adam', 'adamw' or 'nadam', got {self.optimizer!r}")
        from .optim import lookahead_args

        lookahead_args(self.lookahead)
        if self.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"amp must be 'auto', 'bf16' or 'off', got {self.amp!r}")
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"epsilon must be a positive number, got {self.epsilon!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"grad_clip must be positive or null, got {self.grad_clip}")
        unknown = set(self.augment) - AUGMENT_KEYS
        if unknown:
            colon = " (YAML needs a space after each colon: {crop_padding: 4})" if any(":" in str(k) for k in unknown) else ""
            raise ValueError(f"augment has unknown key(s) {sorted(unknown)}; known: {', '.join(sorted(AUGMENT_KEYS))}{colon}")
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) and math.isfinite(e) and e > 0
                   for e in self.certify_epsilons):
            raise ValueError(f"certify_epsilons must be a list of numbers > 0, got {self.certify_epsilons!r}")
        pad, flip = self.augment.get("crop_padding", 0), self.augment.get("flip", False)
        if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0 or not isinstance(flip, bool):
            raise ValueError(f"augment needs crop_padding: an integer >= 0 and flip: true or false, got {self.augment}")
        if not isinstance(self.lr, (int, float, dict)) or isinstance(self.lr, bool) or (
                not isinstance(self.lr, dict) and not (math.isfinite(self.lr) and self.lr > 0)):
            raise ValueError(f"lr must be a positive number or a schedule mapping, got {self.lr!r}")
        return self


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
DEFAULTS = TrainConfig().to_dict()
DESCRIPTIONS = {f.name: f.metadata["help"] for f in dataclasses.fields(TrainConfig)}
AUGMENT_KEYS = {"crop_padding", "flip"}
# the type every value must have after parsing: int, float, bool, str, dict, list; "?" = or null
_TYPES = {
    "dataset": "str", "data_dir": "str?", "train_limit": "int?", "test_limit": "int?", "augment": "dict",
    "model": "str", "model_args": "dict", "epsilon": "float", "degradation_defense": "bool", "top_k": "int?",
    "epochs": "int", "batch_size": "int", "optimizer": "str", "weight_decay": "float",
    "grad_clip": "float?", "amp": "str", "seed": "int", "device": "str", "eval_every": "int",
    "train_vra_subset": "int", "checkpoint_every": "int", "certify_epsilons": "list", "schedule_epochs": "int?",
    "tensorboard": "bool", "collapse_guard": "bool",
}
_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
          "dict": "a mapping like {key: value}", "list": "a list like [0.1, 0.5]"}
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(inf|nan)", re.IGNORECASE)


def _check_type(name: str, value, kind: str) -> None:
    base = kind.rstrip("?")
    if value is None and kind.endswith("?"):
        return
    ok = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str),
          "dict": lambda v: isinstance(v, dict), "list": lambda v: isinstance(v, list)}[base](value)
    if not ok:
        null = " or null" if kind.endswith("?") else ""
        raise ValueError(f"{name} must be {_NAMES[base]}{null}, got {value!r}")


def numbers(value: Any) -> Any:
    """Strings that spell a number become numbers, inside mappings and lists too: YAML 1.1 reads
    ``5e-4`` (no dot) as a string, so ``--lr=5e-4`` and ``lr: 5e-4`` would otherwise fail."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        number = float(value)
        return int(number) if number.is_integer() and re.fullmatch(r"[-+]?\d+", value.strip()) else number
    if isinstance(value, dict):
        return {k: numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [numbers(v) for v in value]
    return value


def _typed(values: dict) -> dict:
    """:func:`numbers` applied to every key but the string-valued ones (``dataset``, ``device``, ...)."""
    return {k: v if _TYPES.get(k, "").startswith("str") else numbers(v) for k, v in values.items()}


def _parse_value(text: str) -> Any:
    """``--lr=1e-3`` -> 0.001; ``--augment={flip: true}`` -> dict (YAML syntax)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"cannot read {text!r} as a YAML value: {' '.join(str(e).split())}") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["--lr=5e-4", "--epochs", "3", "--lookahead"]`` -> ``{"lr": "5e-4"...}`` (a bare flag is
    ``true``); dashes in keys become underscores (``--data-dir`` = ``--data_dir``)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(items):
        item = items[i]
        key, sep, text = item.lstrip("-").partition("=")
        if not key or not (item.startswith("--") or sep):
            raise ValueError(f"unexpected argument {item!r}: config keys are set with --key=value or --key value")
        if not sep:
            nxt = items[i + 1] if i + 1 < len(items) else None
            if nxt is None or nxt.startswith("--"):
                text = "true"
            else:
                text, i = nxt, i + 1
        out[key.replace("-", "_")] = _parse_value(text)
        i += 1
    return out


def read_yaml(path: str | Path) -> Any:
    """A YAML file's content; a syntax error raises ``ValueError`` naming the file and the line."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{path}: YAML syntax error{where}: {getattr(e, 'problem', None) or e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file") from None


def build_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """Defaults <- YAML file <- overrides (``["--key=value", "--key", "value", ...]`` or a dict)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        loaded = read_yaml(path) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config file must be a mapping of keys to values")
        values.update(loaded)
    values.update(overrides if isinstance(overrides, dict) else parse_overrides(list(overrides or [])))
    unknown = sorted(set(values) - FIELDS)
    if unknown:
        where = f"{path}: " if path is not None else ""
        raise ValueError(f"{where}unknown config key{'s' if len(unknown) > 1 else ''} "
                         + ", ".join(f"{k!r}{did_you_mean(k, FIELDS)}" for k in unknown)
                         + "; `gloronet train --help` lists every key")
    return TrainConfig(**_typed(values)).validate()


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'epochs'?)`` (options keep their dashes: ``--resume``) for the closest of
    ``choices`` (difflib), or ``""`` when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if not close:
        return ""
    return f" (did you mean {close[0] if close[0].startswith('-') else repr(close[0])}?)"
