"""The training loop: GloRo losses, ε / lr / λ schedules, AMP, DDP, atomic checkpoints, resume.

One readable function (nanoGPT style). Per step, at fractional epoch ``t``: set ε(t), lr(t),
λ(t); compute the loss from the training *estimate* of the Lipschitz constants; clip; step.
Each epoch ends with validation at the *target* ε using the *sound* bound, a CSV log row and a
checkpoint (``state.pt`` first, then the model files); ``resume=True`` continues from the last
checkpoint to the same result as an uninterrupted run (data order and augmentation are functions of
(seed, epoch)). A session holds the run's lock (:mod:`gloronet.runlock`), prints a header (versions,
device, data, model) and records itself in ``history.json`` (:mod:`gloronet.history`).
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from . import data, models, runlock
from .certify import certify_dataset
from .config import TrainConfig
from .device import resolve_device
from .gloro import GloroNet, bottom_logit
from .history import record_session
from .losses import make_loss
from .optim import make_optimizer
from .provenance import provenance
from .relaxed import make_relaxation
from .runs import (RunError, check_new_run, clean_temps, load_state, load_weights, read_config, read_model_files,
                   resume_config, save_model, save_state, set_aside, weights_hash, write_config, write_text)
from .schedules import make_schedule

LOG_FIELDS = ["epoch", "lr", "train_epsilon", "loss", "train_acc", "train_vra_est", "test_acc", "test_vra", "test_n",
              "train_subset_acc", "train_subset_vra", "lipschitz_bound", "seconds"]
# test_n: the test images behind test_acc / test_vra (a resumed run may change test_limit);
# train_subset_*: sound clean accuracy / VRA of the first `train_vra_subset` training images. Empty
# when not measured, and in logs written before the column existed (such logs still resume).
# Each column is documented in the README ("log.csv").


class _TrainStep(nn.Module):
    """Everything that touches parameters in one forward, so DDP sees all of it."""

    def __init__(self, net: GloroNet):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x), self.net.pairwise_lipschitz()


def autocast_for(cfg: TrainConfig, device: torch.device):
    """bf16 autocast for the network (Lipschitz computations stay fp32 inside the layers)."""
    use = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if use else contextlib.nullcontext()


def _distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def _csv_value(v):
    """7 significant digits for floats (float32 precision; no ``0.44999999999999996``). Resume
    reads the rows from ``state.pt`` at full precision, never from this file."""
    return format(v, ".7g") if isinstance(v, float) else v


def _write_log(out: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _csv_value(v) for k, v in row.items()} for row in rows)
    write_text(out / "log.csv", buf.getvalue())


def train_step(step_module: nn.Module, opt, loss_fn, x, y, eps: float, lam: float | None, cfg: TrainConfig, device,
               relax=None):
    """One optimizer step; returns (loss, logits, bottom_logits), all from the training estimate
    (the relaxed bottom logit for an RTK / affinity ``relax``)."""
    with autocast_for(cfg, device):
        logits, K = step_module(x)
    logits = logits.float()
    bottom = bottom_logit(logits, K, eps, relax)
    loss = loss_fn(logits=logits, bottom_logits=bottom, K=K, labels=y, epsilon=eps, lam=lam)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)
    opt.step()
    return loss, logits, bottom


def train(cfg: TrainConfig, out_dir: str | Path, resume: bool = False, progress: bool = True, restart: bool = False,
          command: str | None = None) -> dict:
    """Train ``cfg`` into ``out_dir``; returns the last log row.

    ``resume``: continue the run from its ``state.pt``. ``restart``: train the run again from epoch 0
    with its own config; its previous files are moved into ``out_dir/previous-<UTC time>/`` first
    (:func:`gloronet.runs.set_aside`). The process holds the run's lock (:mod:`gloronet.runlock`)
    throughout; ``command`` is recorded in ``history.json``."""
    cfg.validate()
    out = Path(out_dir)
    if resume and restart:
        raise ValueError("resume and restart exclude each other: --resume continues a run, --restart begins it again")
    rank, world, local_rank = _distributed()
    if (resume or restart) and not out.is_dir():
        raise RunError(f"cannot {'resume' if resume else 'restart'}: run directory {out} not found")
    if rank != 0:
        return _train(cfg, out, resume, progress, restart, command, (rank, world, local_rank))
    created = not out.exists()
    fd = runlock.acquire(out)
    try:
        return _train(cfg, out, resume, progress, restart, command, (rank, world, local_rank))
    finally:
        runlock.release(out, fd)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a run that failed to start leaves no directory behind


def _train(cfg: TrainConfig, out: Path, resume: bool, progress: bool, restart: bool, command: str | None,
           dist_info: tuple[int, int, int]) -> dict:
    rank, world, local_rank = dist_info
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes {world}")
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
    state = None
    before = read_config(out) if (out / "config.yaml").is_file() else None  # as the last session left it
    if resume:
        state, cfg = _resume(out, cfg, device, rank == 0)
    elif restart:
        cfg = resume_config(out, cfg, 0)
    elif rank == 0:
        check_new_run(out)
    tb = _TensorBoard(out) if cfg.tensorboard and rank == 0 else None
    # specs first: a bad schedule, loss, dataset name or relaxation fails before any data is loaded
    info = data.dataset_info(cfg.dataset)
    relax = make_relaxation(info.num_classes, cfg.top_k, cfg.affinity)
    horizon = cfg.schedule_epochs or cfg.epochs  # an extended run keeps its original schedule
    lr_at = make_schedule(cfg.lr, horizon)
    eps_at = make_schedule(cfg.train_epsilon, horizon, base=cfg.epsilon * (2 if cfg.degradation_defense else 1))
    lam_at = make_schedule(cfg.trades_lam, horizon) if cfg.trades_lam is not None else None
    loss_fn = make_loss(cfg.loss)

    torch.manual_seed(cfg.seed)
    x_train, y_train = data.load_dataset(info.name, "train", cfg.data_dir, cfg.train_limit, dtype=torch.uint8)
    x_test, y_test = data.load_dataset(info.name, "test", cfg.data_dir, cfg.test_limit, dtype=torch.uint8)
    augment = data.Augment(**cfg.augment) if cfg.augment else None
    loader = data.GPULoader(x_train, y_train, cfg.batch_size // world, augment=augment, device=device,
                            seed=cfg.seed, rank=rank, world_size=world)

    net = models.create(cfg.model, info.in_shape, info.num_classes, cfg.epsilon, **cfg.model_args).to(device)
    net.input_range = data.INPUT_RANGE
    net(x_train[:2].to(device).float().div(255))  # materialise lazily-sized buffers before DDP/optimizer
    opt = make_optimizer(net.parameters(), cfg.optimizer, cfg.weight_decay, cfg.lookahead)
    start_epoch, rows = 0, []
    if state is not None:
        load_weights(net, state["model"], f"cannot resume: {out / 'state.pt'} does not fit the model of config.yaml")
        opt.load_state_dict(state["optimizer"])
        start_epoch, rows = state["epoch"], state["log"]

    if rank == 0:  # set up without error: from here on the directory holds this run
        clean_temps(out)
        moved = set_aside(out) if restart else None
        write_config(out, cfg)
        sources = {split: {"path": str(data.find_dataset_dir(info.name, cfg.data_dir, split=split)), "n": len(x)}
                   for split, x in (("train", x_train), ("test", x_test))}
        kind = "resume" if resume else "restart" if restart else "new"
        record_session(out, kind, start_epoch, cfg.to_dict(), before, device, sources, command, moved)
        print(_header(out, kind, start_epoch, cfg, device, sources, net, moved), flush=True)
        if state is not None and _model_file_is_behind(out, state):  # its checkpoint was cut short
            save_model(out, net, {"dataset": info.name, "epoch": start_epoch, "provenance": provenance()})
        if state is not None and start_epoch >= cfg.epochs:
            print(f"{out} has trained all {cfg.epochs} epochs: pass --epochs=N to extend it", flush=True)
    step_module: nn.Module = _TrainStep(net)
    if world > 1:
        step_module = nn.parallel.DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda" else None)

    nb = len(loader)
    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        loader.set_epoch(epoch)
        t0 = time.perf_counter()
        sums = torch.zeros(6, device=device)  # loss, correct, vra_est, count; correct, count of the last tenth
        bar = tqdm(loader, total=nb, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress or rank != 0, leave=False)
        for b, (x, y) in enumerate(bar):
            t = epoch + b / nb
            eps, lr = eps_at(t), lr_at(t)
            for g in opt.param_groups:
                g["lr"] = lr
            loss, logits, bottom = train_step(step_module, opt, loss_fn, x, y, eps, lam_at(t) if lam_at else None, cfg, device,
                                              relax)
            with torch.no_grad():
                pred = bottom.argmax(1)
                hits = (logits.argmax(1) == y).sum()
                tail = b >= nb - max(1, nb // 10)
                sums += torch.stack([loss.detach() * len(y), hits, (pred == y).sum(), torch.tensor(len(y), device=device),
                                     hits * tail, torch.tensor(len(y) * tail, device=device)]).float()
            if progress and rank == 0 and (b % 10 == 0 or b == nb - 1):
                s = (sums / sums[3]).tolist()
                bar.set_postfix(loss=f"{s[0]:.3f}", acc=f"{s[1]:.3f}", vra_est=f"{s[2]:.3f}", eps=f"{eps:.3g}")
        if world > 1:
            dist.all_reduce(sums)
        s = (sums / sums[3]).tolist()
        if not math.isfinite(s[0]):  # every rank sees the same reduced loss
            raise RunError(f"training diverged in epoch {epoch + 1} of {out} (loss {s[0]}): nothing of this epoch was "
                           "saved; lower lr or set grad_clip")
        tail_acc, tail_n = (s[4] / s[5] if s[5] else 1.0), float(sums[5])
        if cfg.collapse_guard and collapsed(tail_acc, tail_n, rows, info.num_classes):
            raise RunError(
                f"training collapsed in epoch {epoch + 1} of {out}: accuracy over its last tenth of batches fell to "
                f"{tail_acc:.1%} (chance {1 / info.num_classes:.1%}) after {max(r['train_acc'] for r in rows):.1%} in "
                f"an earlier epoch; nothing of this epoch was saved (state.pt holds the last checkpoint); restart with "
                "a lower lr, grad_clip or a slower ε schedule, or set collapse_guard: false")
        row = {"epoch": epoch + 1, "lr": lr, "train_epsilon": eps, "loss": s[0], "train_acc": s[1],
               "train_vra_est": s[2], "test_acc": "", "test_vra": "", "test_n": "", "train_subset_acc": "",
               "train_subset_vra": "",
               "lipschitz_bound": "",
               "seconds": round(time.perf_counter() - t0, 3)}
        last = epoch + 1 == cfg.epochs
        if rank == 0 and (last or (epoch + 1) % cfg.eval_every == 0):
            rep = certify_dataset(net, x_test, y_test, batch_size=max(cfg.batch_size, 512), device=device)
            row.update(test_acc=rep["clean_accuracy"], test_vra=rep["vra"][f"{cfg.epsilon:g}"], test_n=rep["n"],
                       lipschitz_bound=rep["lipschitz_bound"])
            if cfg.train_vra_subset:  # fixed, un-augmented training images: robust overfitting
                n = cfg.train_vra_subset
                sub = certify_dataset(net, x_train[:n], y_train[:n], batch_size=max(cfg.batch_size, 512), device=device)
                row.update(train_subset_acc=sub["clean_accuracy"], train_subset_vra=sub["vra"][f"{cfg.epsilon:g}"])
        rows.append(row)
        if rank == 0:
            line = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if v != "")
            if progress:
                tqdm.write(line)
            else:
                print(line, flush=True)
            _write_log(out, rows)
            if tb is not None:
                tb.add_row(row)
            if last or (epoch + 1) % cfg.checkpoint_every == 0:  # state first: a run cut short here still resumes
                save_state(out, {"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1, "log": rows})
                save_model(out, net, {"dataset": info.name, "epoch": epoch + 1, "provenance": provenance()})
        if world > 1:
            dist.barrier()
    if tb is not None:
        tb.close()
    return rows[-1] if rows else {}


def collapsed(tail_acc: float, tail_n: float, rows: list[dict], num_classes: int) -> bool:
    """A run has collapsed when the accuracy of an epoch's last tenth of batches (``tail_n``
    images, at least ``max(100, 10·C)`` to judge) is at chance (``≤ 1.5/C``) although an earlier
    epoch reached ``3/C`` (capped at 0.5) — e.g. GloRo training at a large ε whose Lipschitz bound
    shrinks to nothing and the logits to a constant."""
    reached = max((r["train_acc"] for r in rows), default=0.0)
    enough = tail_n >= max(100, 10 * num_classes)
    return enough and reached >= min(0.5, 3 / num_classes) and tail_acc <= 1.5 / num_classes


def _header(out: Path, kind: str, start_epoch: int, cfg: TrainConfig, device, sources: dict, net: GloroNet,
            moved: Path | None) -> str:
    """What this session runs, in five lines: versions, run, device, data, model."""
    p = provenance()
    commit = f" · commit {p['git_commit'][:12]}{'+dirty' if p['git_commit'].endswith('+dirty') else ''}" \
        if p["git_commit"] else ""
    run = {"new": f"new run {out}", "resume": f"resuming {out} from epoch {start_epoch} of {cfg.epochs}",
           "restart": f"restarting {out} from epoch 0" + (f" (its previous files are in {moved})" if moved else "")}[kind]
    data_lines = " · ".join(f"{split} {d['n']:,} images from {d['path']}" for split, d in sources.items())
    params = sum(t.numel() for t in net.parameters())
    return "\n".join([
        f"gloronet {p['gloronet']} · torch {p['torch']} · python {p['python']}{commit}",
        run,
        f"device {device} · {torch.get_num_threads()} threads",
        f"data {cfg.dataset}: {data_lines}",
        f"model {cfg.model}: {params:,} parameters · input {'×'.join(map(str, net.config['in_shape']))} · "
        f"{net.num_classes} classes · ε = {cfg.epsilon:g}"])


def _model_file_is_behind(out: Path, state: dict) -> bool:
    """Do ``model.json`` / ``model.safetensors`` lack (or hold damaged) the weights of ``state.pt``
    (e.g. a checkpoint cut short after ``state.pt`` was written)?"""
    try:
        return weights_hash(read_model_files(out)[1]) != weights_hash(state["model"])
    except RunError:
        return True


def _resume(out: Path, cfg: TrainConfig, device, chatty: bool) -> tuple[dict | None, TrainConfig]:
    """``(state or None, cfg)`` to continue the run in ``out``: refuses what is not a run, a run
    whose weights have no ``state.pt`` beside them, and another experiment (:func:`resume_config`)."""
    if not (out / "config.yaml").is_file():
        raise RunError(f"cannot resume: {out} is not a gloronet run (no config.yaml); drop --resume to start a new run")
    if not (out / "state.pt").exists():
        if (out / "model.safetensors").exists():
            raise RunError(f"cannot resume {out}: it holds model.safetensors but no state.pt to continue from; "
                           f"`gloronet train --out {out} --restart` trains it again from epoch 0 (its files are "
                           "moved into a previous-<time>/ folder, nothing is deleted)")
        if chatty:
            print(f"{out} has no checkpoint yet: starting from epoch 0", flush=True)
        return None, resume_config(out, cfg, 0)
    state = load_state(out, map_location=device)
    return state, resume_config(out, cfg, state["epoch"])


class _TensorBoard:
    """Epoch rows as TensorBoard scalars in ``<run>/tensorboard`` (``tensorboard: true``; extra
    ``tensorboard``); the writer opens with the first row, so a run that fails to start leaves none."""

    def __init__(self, out: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RunError("tensorboard: true needs the tensorboard package: pip install 'gloronet[tensorboard]'") from None
        self.make, self.path, self.writer = SummaryWriter, out / "tensorboard", None

    def add_row(self, row: dict) -> None:
        self.writer = self.writer or self.make(log_dir=str(self.path))
        for k, v in row.items():
            if isinstance(v, (int, float)) and k != "epoch":
                self.writer.add_scalar(k, v, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
