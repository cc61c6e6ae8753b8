"""The run directory: atomic files, ``config.yaml``, the model files, ``state.pt`` and the rules
of resuming — shared by ``train``, ``certify``, ``export`` and the studies.

A run directory holds ``config.yaml`` (the full recipe: on ``--resume`` it is the truth),
``log.csv``, ``model.safetensors`` + ``model.json`` (architecture, ε, input range, SHA-256 of the
weights: enough to rebuild with :func:`load_model` alone), ``state.pt`` (optimizer, epoch, log),
``history.json`` (:mod:`gloronet.history`) and, while ``train`` writes it, ``.train.lock``
(:mod:`gloronet.runlock`). A command's RUN argument may also name a shipped model
(:func:`locate_run`).
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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import yaml
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from . import data, models
from .pretrained import registry as shipped
from .config import DEFAULTS, TrainConfig, build_config, parse_overrides, read_yaml
from .device import resolve_device
from .gloro import GloroNet, check_epsilon
from .runlock import LOCK_NAME

HISTORY = "history.json"
RUN_FILES = ("config.yaml", "log.csv", "model.safetensors", "model.json", "state.pt", HISTORY)
# keys a resumed run may change: where and how it runs and reports, never what it trains
RUN_SETTINGS = frozenset({"device", "data_dir", "eval_every", "checkpoint_every", "train_vra_subset", "test_limit",
                          "certify_epsilons", "tensorboard", "collapse_guard"})


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


def read_json(path: Path, kind: type = dict) -> Any:
    """A JSON file holding an object (``kind=dict``) or a list (``kind=list``); anything else, or
    invalid JSON, is one :class:`RunError` line naming the file."""
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path} is not valid JSON: {_cause(e)}") from None
    if not isinstance(meta, kind):
        raise RunError(f"{path} is not a JSON {'object' if kind is dict else 'list'}")
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


def read_model_files(run_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(model.json, the weights of model.safetensors)``, the weights checked against the SHA-256
    in ``model.json`` (when it has one); a missing, damaged or mismatched file is one :class:`RunError`."""
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
    return meta, state


def load_model(run_dir: str | Path, map_location: str | torch.device = "cpu") -> GloroNet:
    """Rebuild a GloroNet from ``model.json`` and ``model.safetensors``, in eval mode.

    The weights must match the SHA-256 in ``model.json`` (when it has one) and be finite;
    ``net.input_range`` is the range of inputs the model was trained on.
    """
    run_dir = Path(run_dir)
    meta, state = read_model_files(run_dir)
    weights_path = run_dir / "model.safetensors"
    cfg = dict(meta["model"])
    try:
        net = models.create(cfg.pop("name"), cfg.pop("in_shape"), cfg.pop("num_classes"), meta["epsilon"], **cfg)
    except (TypeError, ValueError, RuntimeError) as e:
        raise RunError(f"{run_dir / 'model.json'} describes a model that cannot be built: {_cause(e)}") from None
    load_weights(net, state, f"{weights_path} does not fit the model in model.json ({meta['model']['name']})")
    rng = meta.get("input_range", data.INPUT_RANGE if "dataset" in meta else None)  # older runs of `train`
    net.input_range = tuple(float(v) for v in rng) if rng is not None else None
    check_finite(net, str(weights_path))
    return net.to(map_location).eval()


def weight_mismatch(net: torch.nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """What keeps ``state`` from loading into ``net`` (missing / unexpected / reshaped weights, a
    few names each), or None when it fits."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
                for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]

    def few(names: list[str], what: str) -> str:
        more = f", … ({len(names) - 3} more)" if len(names) > 3 else ""
        return f"{len(names)} {what} ({', '.join(names[:3])}{more})" if names else ""

    parts = [p for p in (few(missing, "missing"), few(unexpected, "unexpected"), few(reshaped, "of another shape")) if p]
    return "; ".join(parts) or None


def load_weights(net: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """``net.load_state_dict(state)``; a mismatch is one :class:`RunError` line ``where: <what differs>``
    (not torch's full listing)."""
    problem = weight_mismatch(net, state)
    if problem:
        raise RunError(f"{where}: {problem}")
    try:
        net.load_state_dict(state)
    except (RuntimeError, ValueError) as e:
        raise RunError(f"{where}: {_cause(e)[:300]}") from None


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


def set_aside(out: str | Path) -> Path | None:
    """Move everything a run directory holds but its ``config.yaml``, ``history.json``, the
    training lock and earlier ``previous-*`` folders into ``out/previous-<UTC time>/`` (for
    ``gloronet train --restart``: nothing is deleted); returns that folder, None if nothing moved."""
    out = Path(out)
    keep = {"config.yaml", HISTORY, LOCK_NAME}
    move = [p for p in sorted(out.iterdir()) if p.name not in keep and not p.name.startswith("previous-")]
    if not move:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = out / f"previous-{stamp}"
    k = 1
    while dest.exists():
        k += 1
        dest = out / f"previous-{stamp}-{k}"
    try:
        dest.mkdir()
        for p in move:
            os.replace(p, dest / p.name)
    except OSError as e:
        raise RunError(f"cannot move the files of {out} into {dest}: {_cause(e)}") from e
    return dest


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
    recipe (``config``, ``{}`` when the run has none) and where its data comes from. A shipped
    model (:mod:`gloronet.pretrained`) opens read-only: ``pretrained`` is its name."""

    path: Path
    net: GloroNet
    config: dict
    dataset: str
    data_dir: str | None
    device: torch.device
    pretrained: str | None = None
    recorded_dataset: str | None = None  # the dataset named by the run's own files
    trained_epsilon: float | None = None  # the ε in model.json (net.epsilon may be overridden)

    @property
    def name(self) -> str:
        """The shipped model's name, or the run directory."""
        return self.pretrained or str(self.path)

    @property
    def out_dir(self) -> Path:
        """Where reports go unless ``--out`` says otherwise: the run directory, or ``./<name>/`` for
        a shipped model (never into the package)."""
        return Path(self.pretrained) if self.pretrained else self.path

    @property
    def class_names(self) -> list[str]:
        info = data.dataset_info(self.dataset)
        return [info.class_name(c) for c in range(self.net.num_classes)]

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


def locate_run(arg: str | Path) -> tuple[Path, str | None]:
    """``(directory, pretrained name or None)`` for a command's RUN argument: a run directory
    (it holds ``model.json``), else the name of a shipped model (its package directory)."""
    path = Path(arg)
    if (path / "model.json").is_file():
        return path, None
    package_dir = shipped.resolve(str(arg))
    if package_dir is not None:
        return package_dir, str(arg)
    if path.is_file():
        raise RunError(f"{arg} is a file: name the run directory that holds it")
    if not path.is_dir():
        known = ", ".join(shipped.names()) or "none shipped in this version"
        raise FileNotFoundError(f"run directory {arg} not found, nor a pretrained model of that name (pretrained: {known})")
    return path, None


def shape_text(shape) -> str:
    return "×".join(str(int(s)) for s in shape)


def check_dataset_fits(net: GloroNet, dataset: str, where: str | Path) -> None:
    """Refuse, before any data is read, a dataset whose images or classes the model cannot take."""
    info = data.dataset_info(dataset)
    cfg = net.config or {}
    shape, classes = tuple(cfg.get("in_shape", ())), cfg.get("num_classes")
    if shape != info.in_shape or classes != info.num_classes:
        raise RunError(f"{where}: the model takes {shape_text(shape)} inputs and {classes} classes; {info.name} has "
                       f"{shape_text(info.in_shape)} images and {info.num_classes} classes")


def open_run(path: str | Path, device: str = "auto", dataset: str | None = None, data_dir: str | None = None,
             epsilon: float | None = None, why: str = "--dataset is only for runs that do not record theirs") -> Run:
    """Load ``model.json`` / ``model.safetensors`` and ``config.yaml`` of a run directory (or of
    the shipped model named ``path``).

    ``dataset`` is the run's own unless the run records none; another dataset than the one it
    was trained on is refused (``why`` says why), as is one whose image shape or class count
    the model cannot take. The run's recorded ``data_dir`` is used only where it exists (a run
    trained on another machine looks its data up as usual); an explicit ``data_dir`` must exist.
    Raises ``FileNotFoundError`` (not a run) or ``ValueError`` (a damaged file, no or another
    dataset, bad ε) with a message naming the problem.
    """
    path, shipped = locate_run(path)
    dev = resolve_device(device)
    net = load_model(path, map_location=dev)
    trained_epsilon = net.epsilon
    for p in net.parameters():
        p.requires_grad_(False)
    cfg_path = path / "config.yaml"
    cfg = (read_yaml(cfg_path) or {}) if cfg_path.exists() else {}
    if not isinstance(cfg, dict):
        raise RunError(f"{cfg_path}: a config file must be a mapping of keys to values")
    label = shipped or path
    recorded = cfg.get("dataset") or read_model_meta(path).get("dataset")
    if dataset and recorded and data.dataset_info(dataset).name != data.dataset_info(recorded).name:
        raise RunError(f"{label} holds a model trained on {recorded}, not {dataset}: {why}")
    dataset = dataset or recorded
    if not dataset:
        raise ValueError(f"{label} has no config.yaml naming its dataset: pass --dataset")
    check_dataset_fits(net, dataset, label)
    if epsilon is not None:
        net.epsilon = check_epsilon(epsilon)
        if net.epsilon == 0:
            raise ValueError("epsilon must be > 0")
    own_dir = cfg.get("data_dir")
    if own_dir and not Path(own_dir).expanduser().is_dir():
        own_dir = None
    return Run(path, net, cfg, data.dataset_info(dataset).name, data_dir or own_dir, dev, shipped,
               recorded, trained_epsilon)

