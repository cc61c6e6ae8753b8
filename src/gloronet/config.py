"""Training configuration: typed defaults, overridden by a YAML file, then by ``--key=value``.

nanoGPT style: one flat dataclass; values may be numbers or small dicts (schedule / loss specs,
see :mod:`gloronet.schedules` and :mod:`gloronet.losses`). Unknown keys are errors.
"""
from __future__ import annotations

import dataclasses
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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "TrainConfig":
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")
        if self.optimizer not in ("adam", "adamw", "nadam"):
            raise ValueError(f"optimizer must be 'adam', 'adamw' or 'nadam', got {self.optimizer!r}")
        from .optim import lookahead_args

        lookahead_args(self.lookahead)
        if self.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"amp must be 'auto', 'bf16' or 'off', got {self.amp!r}")
        if not (isinstance(self.epsilon, (int, float)) and self.epsilon > 0):
            raise ValueError(f"epsilon must be a positive number, got {self.epsilon!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer or null, got {self.top_k!r}")
        if not isinstance(self.degradation_defense, bool):
            raise ValueError(f"degradation_defense must be true or false, got {self.degradation_defense!r}")
        if isinstance(self.train_vra_subset, bool) or not isinstance(self.train_vra_subset, int) or self.train_vra_subset < 0:
            raise ValueError(f"train_vra_subset must be an integer >= 0, got {self.train_vra_subset!r}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive or null, got {self.grad_clip}")
        return self


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def _parse_value(text: str) -> Any:
    """``--lr=1e-3`` -> 0.001; ``--augment={flip: true}`` -> dict (YAML syntax)."""
    return yaml.safe_load(text)


def build_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """Defaults <- YAML file <- overrides (``["key=value", ...]`` or a dict)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config file must be a mapping of keys to values")
        values.update(loaded)
    if isinstance(overrides, dict):
        values.update(overrides)
    else:
        for item in overrides or []:
            key, sep, text = item.lstrip("-").partition("=")
            if not sep:
                raise ValueError(f"override {item!r} must look like --key=value")
            values[key.replace("-", "_")] = _parse_value(text)
    unknown = sorted(set(values) - FIELDS)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; known keys: {', '.join(sorted(FIELDS))}")
    return TrainConfig(**values).validate()
