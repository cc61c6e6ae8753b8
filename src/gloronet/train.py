"""The training loop: GloRo losses, ε / lr / λ schedules, AMP, DDP, atomic checkpoints, resume.

One readable function (nanoGPT style). Per step, at fractional epoch ``t``: set ε(t), lr(t),
λ(t); compute the loss from the training *estimate* of the Lipschitz constants; clip; step.
Each epoch ends with validation at the *target* ε using the *sound* bound, a CSV log row and a
checkpoint; ``resume=True`` continues from the last checkpoint to the same result as an
uninterrupted run (data order and augmentation are functions of (seed, epoch)).
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

from . import data, models
from .certify import certify_dataset
from .config import TrainConfig
from .device import resolve_device
from .gloro import GloroNet, bottom_logit
from .losses import make_loss
from .optim import make_optimizer
from .relaxed import make_relaxation
from .runs import (RunError, check_new_run, clean_temps, load_state, resume_config, save_model, save_state,
                   write_config, write_text)
from .schedules import make_schedule

LOG_FIELDS = ["epoch", "lr", "train_epsilon", "loss", "train_acc", "train_vra_est", "test_acc", "test_vra",
              "train_subset_acc", "train_subset_vra", "lipschitz_bound", "seconds"]
# train_subset_*: sound clean accuracy / VRA of the first `train_vra_subset` training images (empty
# when off, and in logs written before the columns existed: such logs still resume).


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


def _write_log(out: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
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


def train(cfg: TrainConfig, out_dir: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Train ``cfg`` into ``out_dir``; returns the last log row."""
    cfg.validate()
    out = Path(out_dir)
    rank, world, local_rank = _distributed()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes {world}")
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
    state = None
    if resume:
        state, cfg = _resume(out, cfg, device, rank == 0)
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

    if rank == 0:  # set up without error: from here on the directory holds this run
        clean_temps(out)
        write_config(out, cfg)
    start_epoch, rows = 0, []
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, rows = state["epoch"], state["log"]
        if rank == 0:
            print(f"resuming {out} from epoch {start_epoch} of {cfg.epochs}" if start_epoch < cfg.epochs else
                  f"{out} has trained all {cfg.epochs} epochs: pass --epochs=N to extend it", flush=True)
    step_module: nn.Module = _TrainStep(net)
    if world > 1:
        step_module = nn.parallel.DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda" else None)

    nb = len(loader)
    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        loader.set_epoch(epoch)
        t0 = time.perf_counter()
        sums = torch.zeros(4, device=device)  # loss, correct, vra_est, count
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
                sums += torch.stack([loss.detach() * len(y), (logits.argmax(1) == y).sum(), (pred == y).sum(),
                                     torch.tensor(len(y), device=device)]).float()
            if progress and rank == 0 and (b % 10 == 0 or b == nb - 1):
                s = (sums / sums[3]).tolist()
                bar.set_postfix(loss=f"{s[0]:.3f}", acc=f"{s[1]:.3f}", vra_est=f"{s[2]:.3f}", eps=f"{eps:.3g}")
        if world > 1:
            dist.all_reduce(sums)
        s = (sums / sums[3]).tolist()
        if not math.isfinite(s[0]):  # every rank sees the same reduced loss
            raise RunError(f"training diverged in epoch {epoch + 1} of {out} (loss {s[0]}): nothing of this epoch was "
                           "saved; lower lr or set grad_clip")
        row = {"epoch": epoch + 1, "lr": lr, "train_epsilon": eps, "loss": s[0], "train_acc": s[1],
               "train_vra_est": s[2], "test_acc": "", "test_vra": "", "train_subset_acc": "", "train_subset_vra": "",
               "lipschitz_bound": "",
               "seconds": round(time.perf_counter() - t0, 3)}
        last = epoch + 1 == cfg.epochs
        if rank == 0 and (last or (epoch + 1) % cfg.eval_every == 0):
            rep = certify_dataset(net, x_test, y_test, batch_size=max(cfg.batch_size, 512), device=device)
            row.update(test_acc=rep["clean_accuracy"], test_vra=rep["vra"][f"{cfg.epsilon:g}"], lipschitz_bound=rep["lipschitz_bound"])
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
            if last or (epoch + 1) % cfg.checkpoint_every == 0:
                save_model(out, net, {"dataset": info.name, "epoch": epoch + 1})
                save_state(out, {"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1, "log": rows})
        if world > 1:
            dist.barrier()
    if tb is not None:
        tb.close()
    return rows[-1] if rows else {}


def _resume(out: Path, cfg: TrainConfig, device, chatty: bool) -> tuple[dict | None, TrainConfig]:
    """``(state or None, cfg)`` to continue the run in ``out``: refuses what is not a run, a run
    whose weights have no ``state.pt`` beside them, and another experiment (:func:`resume_config`)."""
    if not (out / "config.yaml").is_file():
        raise RunError(f"cannot resume: {out} is not a gloronet run (no config.yaml); drop --resume to start a new run")
    if not (out / "state.pt").exists():
        if (out / "model.safetensors").exists():
            raise RunError(f"cannot resume {out}: it holds model.safetensors but no state.pt to continue from")
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
