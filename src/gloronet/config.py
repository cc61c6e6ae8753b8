"""Training configuration: typed defaults, overridden by a YAML file, then by ``--key=value``.

nanoGPT style: one flat dataclass; values may be numbers or small dicts (schedule / loss specs,
see :mod:`gloronet.schedules` and :mod:`gloronet.losses`). Unknown keys are errors.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class TrainConfig:
    # data
    dataset: str = "mnist"
    data_dir: str | None = None
    train_limit: int | None = None  # use the first N training examples (quick runs, tests)
    test_limit: int | None = None
    augment: dict = field(default_factory=dict)  # {crop_padding: 4, flip: true}
    # model
    model: str = "2c2f"
    model_args: dict = field(default_factory=dict)  # e.g. {head: lln, power_iters: 1}
    # robustness
    epsilon: float = 0.3  # target ε: validation and certification always use it
    train_epsilon: Any = None  # schedule spec, factors relative to `epsilon`; default: constant ε
    degradation_defense: bool = False  # train for 2ε (factors of train_epsilon apply to 2ε) while
    # certifying at ε: ε-perturbations cannot make a point certified at 2ε abstain (Mangal et al.)
    top_k: int | None = None  # relaxed top-K (RTK) GloRo: train and certify the top-k set, k <= top_k
    affinity: Any = None  # affinity GloRo: list of class lists, a named set or a file (gloronet.relaxed)
    loss: Any = "crossentropy"  # crossentropy | trades | emma | {name: trades, lam: 1.5}
    trades_lam: Any = None  # schedule spec for TRADES λ (overrides the loss's lam)
    # optimisation
    epochs: int = 10
    batch_size: int = 256
    optimizer: str = "adam"  # adam | adamw | nadam
    lr: Any = 1e-3  # number or schedule spec
    weight_decay: float = 0.0
    lookahead: Any = False  # true (k=5, alpha=0.5) | {k: 6, alpha: 0.5} (timm's default)
    grad_clip: float | None = None
    amp: str = "auto"  # auto (bf16 on CUDA when supported) | bf16 | off
    # run
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_every: int = 1
    train_vra_subset: int = 0  # > 0: also certify the first N training images at each eval epoch
    # (log.csv columns train_subset_acc / train_subset_vra; robust overfitting, `gloronet overfit`)
    checkpoint_every: int = 1
    certify_epsilons: list = field(default_factory=list)  # extra ε for the final report
    schedule_epochs: int | None = None  # length of the lr / ε / λ schedules (default: epochs); set
    # on resume with a larger --epochs, so the extension keeps the original run's schedule
    tensorboard: bool = False  # also log each epoch to <run>/tensorboard (extra `tensorboard`)

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
            raise ValueError(f"augment has unknown key(s) {sorted(unknown)}; known: {', '.join(sorted(AUGMENT_KEYS))}")
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
AUGMENT_KEYS = {"crop_padding", "flip"}
# the type every value must have after parsing: int, float, bool, str, dict, list; "?" = or null
_TYPES = {
    "dataset": "str", "data_dir": "str?", "train_limit": "int?", "test_limit": "int?", "augment": "dict",
    "model": "str", "model_args": "dict", "epsilon": "float", "degradation_defense": "bool", "top_k": "int?",
    "epochs": "int", "batch_size": "int", "optimizer": "str", "weight_decay": "float",
    "grad_clip": "float?", "amp": "str", "seed": "int", "device": "str", "eval_every": "int",
    "train_vra_subset": "int", "checkpoint_every": "int", "certify_epsilons": "list", "schedule_epochs": "int?",
    "tensorboard": "bool",
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
        raise ValueError(f"unknown config key(s) {unknown}; known keys: {', '.join(sorted(FIELDS))}")
    return TrainConfig(**_typed(values)).validate()
