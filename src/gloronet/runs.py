"""The run directory: atomic files, ``config.yaml``, the model files, ``state.pt`` and the rules
of resuming — shared by ``train``, ``certify``, ``export`` and the studies.

A run directory holds ``config.yaml`` (the full recipe: on ``--resume`` it is the truth),
``log.csv``, ``model.safetensors`` + ``model.json`` (architecture, ε, input range, SHA-256 of the
weights: enough to rebuild with :func:`load_model` alone) and ``state.pt`` (optimizer, epoch, log).
Every file is written to a temporary name (created with the user's umask) and renamed, so a crash
or a full disk never leaves a half-written file; temporaries a killed process left are removed
when a run is opened again. Every fault is a :class:`RunError` naming the file and the cause.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import yaml
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from . import data, models
from .config import DEFAULTS, TrainConfig, build_config, parse_overrides, read_yaml
from .device import resolve_device
from .gloro import GloroNet, check_epsilon

RUN_FILES = ("config.yaml", "log.csv", "model.safetensors", "model.json", "state.pt")
# keys a resumed run may change: where and how it runs and reports, never what it trains
RUN_SETTINGS = frozenset({"device", "data_dir", "eval_every", "checkpoint_every", "train_vra_subset", "test_limit",
                          "certify_epsilons", "tensorboard"})


class RunError(ValueError):
    """A problem with a run directory or one of its files (one line: the file and the cause)."""


_TEMP = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp")  # ours, and tempfile.mkstemp's of older versions


# -- atomic files --------------------------------------------------------------------------------
def _temp_name(path: Path) -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"


def _open_new(path: Path) -> int:
    """A new file for writing, mode 0666 minus the umask (``mkstemp`` would force 0600)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)


def _cause(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return " ".join(str(e).split()) or type(e).__name__


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename it over ``path`` (atomic on POSIX). A failure (full
    disk, read-only directory, ...) removes the temporary, keeps the old file and raises
    :class:`RunError` naming ``path``."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(_open_new(tmp))
        write(str(tmp))
        os.replace(tmp, path)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise RunError(f"cannot write {path}: {_cause(e)}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def clean_temps(folder: str | Path, names: Iterable[str] | None = None) -> list[Path]:
    """Remove the temporaries (``.<name>.<8 characters>.tmp``) an interrupted writer left in
    ``folder``: of the files ``names`` only (a command cleaning up after itself while another may
    be writing there), or all (``train``, which owns its run directory)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    wanted = set(names) if names is not None else None
    stale = []
    for p in folder.glob(".*.tmp"):
        m = _TEMP.fullmatch(p.name)
        if m and p.is_file() and (wanted is None or m["name"] in wanted):
            p.unlink(missing_ok=True)
            stale.append(p)
    return stale


def check_writable(folder: str | Path) -> None:
    """Fail now, before any work, if files cannot be created in ``folder`` (made if missing)."""
    folder = Path(folder)
    probe = _temp_name(folder / "write-check")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.close(_open_new(probe))
    except OSError as e:
        raise RunError(f"cannot write to {folder}: {_cause(e)} (use --out to write the reports elsewhere)") from e
    probe.unlink(missing_ok=True)


def read_json(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path} is not valid JSON: {_cause(e)}") from None
    if not isinstance(meta, dict):
        raise RunError(f"{path} is not a JSON object")
    return meta


# -- model files ---------------------------------------------------------------------------------
def weights_hash(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the weights: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_finite(net: GloroNet, where: str = "the model") -> None:
    """Refuse NaN / Inf weights (a bound of inf would certify nothing without saying why)."""
    for name, t in list(net.state_dict().items()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise RunError(f"{where}: weight {name} holds NaN or Inf values: nothing can be certified")


def save_model(run_dir: str | Path, net: GloroNet, extra: dict | None = None) -> None:
    """``model.safetensors`` and ``model.json`` (architecture, ε, input range, SHA-256) in ``run_dir``."""
    if net.config is None:
        raise ValueError("this GloroNet was not built by gloronet.models.create, so it cannot be rebuilt from a checkpoint")
    run_dir = Path(run_dir)
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    meta = {"model": net.config, "epsilon": net.epsilon, "input_range": _range_of(net), "sha256": weights_hash(state),
            **(extra or {})}
    write_bytes(run_dir / "model.safetensors", save_safetensors(state))
    write_json(run_dir / "model.json", meta)


def _range_of(net: GloroNet) -> list[float] | None:
    return list(net.input_range) if net.input_range is not None else None


def read_model_meta(run_dir: str | Path) -> dict:
    """``model.json`` of a run, checked for the keys :func:`load_model` needs."""
    run_dir = Path(run_dir)
    path = run_dir / "model.json"
    if not path.is_file():
        raise RunError(f"{path} not found: is {run_dir} a gloronet run directory (written by `gloronet train`)?")
    meta = read_json(path)
    for key in ("model", "epsilon"):
        if key not in meta:
            raise RunError(f"{path} has no {key!r} entry: not a model.json written by gloronet")
    cfg = meta["model"]
    if not isinstance(cfg, dict) or not {"name", "in_shape", "num_classes"} <= set(cfg):
        raise RunError(f"{path}: 'model' must name the architecture, in_shape and num_classes")
    return meta


def load_model(run_dir: str | Path, map_location: str | torch.device = "cpu") -> GloroNet:
    """Rebuild a GloroNet from ``model.json`` and ``model.safetensors``, in eval mode.

    The weights must match the SHA-256 in ``model.json`` (when it has one) and be finite;
    ``net.input_range`` is the range of inputs the model was trained on.
    """
    run_dir = Path(run_dir)
    meta = read_model_meta(run_dir)
    weights_path = run_dir / "model.safetensors"
    if not weights_path.is_file():
        raise RunError(f"{weights_path} not found: is {run_dir} a gloronet run directory (written by `gloronet train`)?")
    try:
        state = load_safetensors(weights_path.read_bytes())
    except Exception as e:
        raise RunError(f"{weights_path} is corrupt: {_cause(e)}") from None
    if "sha256" in meta and weights_hash(state) != meta["sha256"]:
        raise RunError(f"{weights_path} does not match the SHA-256 in model.json: the weights were changed or "
                       "damaged after training")
    cfg = dict(meta["model"])
    try:
        net = models.create(cfg.pop("name"), cfg.pop("in_shape"), cfg.pop("num_classes"), meta["epsilon"], **cfg)
        net.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError) as e:
        raise RunError(f"{weights_path} does not fit the model in model.json: {_cause(e)}") from None
    rng = meta.get("input_range", data.INPUT_RANGE if "dataset" in meta else None)  # older runs of `train`
    net.input_range = tuple(float(v) for v in rng) if rng is not None else None
    check_finite(net, str(weights_path))
    return net.to(map_location).eval()


# -- state.pt ------------------------------------------------------------------------------------
def save_state(run_dir: str | Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes(Path(run_dir) / "state.pt", buf.getvalue())


def load_state(run_dir: str | Path, map_location="cpu") -> dict:
    path = Path(run_dir) / "state.pt"
    if not path.is_file():
        raise RunError(f"cannot resume: {path} not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise RunError(f"cannot resume: {path} is empty or corrupt ({type(e).__name__}: {_cause(e)})") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "epoch", "log"} <= set(state):
        raise RunError(f"cannot resume: {path} is not a gloronet training state")
    return state


# -- config and resume ---------------------------------------------------------------------------
def run_files(out: str | Path) -> list[str]:
    out = Path(out)
    return [name for name in RUN_FILES if (out / name).exists()]


def check_new_run(out: str | Path) -> None:
    """Refuse to start a new run over an existing one."""
    found = run_files(out)
    if found:
        raise FileExistsError(f"{out} already holds a run ({', '.join(found)}): pass --resume to continue it, "
                              "or choose another --out")


def read_config(out: str | Path) -> dict:
    """The run's own ``config.yaml`` (for ``--resume``): refuses what is not a run."""
    out = Path(out)
    path = out / "config.yaml"
    if not out.is_dir():
        raise RunError(f"cannot resume: run directory {out} not found")
    if not path.is_file():
        raise RunError(f"cannot resume: {out} is not a gloronet run (no config.yaml); drop --resume to start a new run")
    saved = read_yaml(path)
    if not isinstance(saved, dict):
        raise RunError(f"{path}: a config file must be a mapping of keys to values")
    return saved


def write_config(out: str | Path, cfg: TrainConfig) -> None:
    write_text(Path(out) / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_changes(saved: TrainConfig, cfg: TrainConfig) -> list[str]:
    """``key: run -> now`` for every key that changes what is trained (``epochs`` not included)."""
    a, b = saved.to_dict(), cfg.to_dict()
    skip = RUN_SETTINGS | {"epochs", "schedule_epochs"}
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in DEFAULTS if k not in skip and a[k] != b[k]]


def resume_config(out: str | Path, cfg: TrainConfig, completed: int | None = None) -> TrainConfig:
    """``cfg`` checked against the run's ``config.yaml``: a change that would train another
    experiment is refused; a larger ``epochs`` extends the run on its original schedule
    (``schedule_epochs``); fewer epochs than already trained are refused."""
    saved = build_config(Path(out) / "config.yaml") if (Path(out) / "config.yaml").is_file() else cfg
    changes = config_changes(saved, cfg)
    if changes:
        raise RunError(f"cannot resume {out} with another experiment ({'; '.join(changes)}): the run's own "
                       "config.yaml is used on --resume; start a new run with another --out to change these")
    horizon = saved.schedule_epochs or saved.epochs
    if cfg.epochs < (completed or 0):
        raise RunError(f"cannot resume {out} with --epochs={cfg.epochs}: it has already trained {completed} epochs")
    cfg.schedule_epochs = horizon if cfg.epochs != horizon else saved.schedule_epochs
    return cfg.validate()


def config_for_command(out: str | Path, path: str | Path | None, overrides: list[str], resume: bool) -> TrainConfig:
    """The config ``gloronet train`` runs: the recipe + overrides for a new run; on ``--resume`` the
    run's own ``config.yaml`` + overrides (a ``-c`` recipe must agree with it)."""
    if not resume:
        return build_config(path, overrides)
    saved = read_config(out)
    if path is not None:
        changes = config_changes(build_config(Path(out) / "config.yaml"), build_config(path))
        if changes:
            raise RunError(f"{path} differs from the config.yaml of {out} ({'; '.join(changes)}): --resume uses the "
                           "run's own config; drop -c")
    return build_config(None, {**saved, **parse_overrides(overrides)})


# -- a run opened for evaluation -----------------------------------------------------------------
@dataclass
class Run:
    """A trained run opened for evaluation: the model in eval mode (parameters frozen), its
    recipe (``config``, ``{}`` when the run has none) and where its data comes from."""

    path: Path
    net: GloroNet
    config: dict
    dataset: str
    data_dir: str | None
    device: torch.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    @property
    def epsilon(self) -> float:
        return self.net.epsilon

    def load(self, split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images uint8 (N, C, H, W) on the CPU, labels (N,))``: the first ``limit`` of ``split``."""
        return data.load_dataset(self.dataset, split, self.data_dir, limit, dtype=torch.uint8)

    def training_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training images the run was trained on (the first ``train_limit``, if it had one)."""
        return self.load("train", self.config.get("train_limit"))

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 pixels -> the model's dtype on its device, in [0, 1] (what training fed it)."""
        return images.to(self.device).to(self.dtype).div_(255)


def open_run(path: str | Path, device: str = "auto", dataset: str | None = None, data_dir: str | None = None,
             epsilon: float | None = None) -> Run:
    """Load ``model.json`` / ``model.safetensors`` and ``config.yaml`` of a run directory.

    Raises ``FileNotFoundError`` (not a run directory) or ``ValueError`` (a damaged file, no
    dataset named, bad ε) with a message naming the problem.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {path} not found")
    dev = resolve_device(device)
    net = load_model(path, map_location=dev)
    for p in net.parameters():
        p.requires_grad_(False)
    cfg_path = path / "config.yaml"
    cfg = (read_yaml(cfg_path) or {}) if cfg_path.exists() else {}
    if not isinstance(cfg, dict):
        raise RunError(f"{cfg_path}: a config file must be a mapping of keys to values")
    dataset = dataset or cfg.get("dataset")
    if not dataset:
        raise ValueError(f"{path} has no config.yaml naming its dataset: pass --dataset")
    if epsilon is not None:
        net.epsilon = check_epsilon(epsilon)
        if net.epsilon == 0:
            raise ValueError("epsilon must be > 0")
    return Run(path, net, cfg, dataset, data_dir or cfg.get("data_dir"), dev)
