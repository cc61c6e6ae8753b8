"""Where a CPU training epoch goes: one GloRo training step (forward, power-iteration estimate of K,
bottom logit, loss, backward, Adam) against a plain twin with the same layer shapes (ReLU, one
fused conv per layer, cross-entropy), at the same batch, interleaved rounds in one process.

    PYTHONPATH=src python benchmarks/train_step.py --model 4c3f --batch 512 --threads 1 [--profile]
    # allocator effect: the same with GLORONET_SYSTEM_MALLOC=1 (glibc's defaults) vs without
    # code before/after: PYTHONPATH=<old checkout>/src python benchmarks/train_step.py ...

Prints ms/step (best of --repeats rounds of --steps steps), the ratio to the twin, and the
projected seconds per epoch of 60,000 images; ``--profile`` adds torch.profiler's top operators
of the GloRo step. The program's allocator setting (:mod:`gloronet.allocator`) is applied when
the source tree has it and ``GLORONET_SYSTEM_MALLOC`` is not set.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import gloronet
from gloronet.gloro import bottom_logit
from gloronet.losses import make_loss
from gloronet.models.convnets import CONV_NETS


def twin_of(name: str, in_shape, num_classes: int) -> nn.Module:
    """ReLU twin: same conv / dense shapes, PyTorch's own padding (symmetric for these nets)."""
    convs, denses = CONV_NETS[name]
    layers, c = [], in_shape[0]
    for out, k, s in convs:
        layers += [nn.Conv2d(c, out, k, s, padding=(k - 1) // 2 if s == 1 else (k - s + 1) // 2), nn.ReLU()]
        c = out
    layers.append(nn.Flatten())
    for width in denses:
        layers += [nn.LazyLinear(width), nn.ReLU()]
    return nn.Sequential(*layers, nn.LazyLinear(num_classes))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="4c3f", choices=sorted(CONV_NETS))
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--power-iters", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    try:
        from gloronet.allocator import reuse_freed_memory
        tuned = reuse_freed_memory()
    except ImportError:  # a source tree from before the allocator setting
        tuned = False
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = (1, 28, 28)
    x, y = torch.rand(args.batch, *shape), torch.randint(0, 10, (args.batch,))
    net = gloronet.models.create(args.model, shape, 10, 1.58, power_iters=args.power_iters).train()
    twin = twin_of(args.model, shape, 10)
    twin(x[:2])
    loss_fn = make_loss({"name": "trades", "lam": 1.5})
    opt_g, opt_t = torch.optim.Adam(net.parameters(), 1e-4), torch.optim.Adam(twin.parameters(), 1e-4)

    def gloro_step():
        logits, K = net(x), net.pairwise_lipschitz()
        loss = loss_fn(logits=logits, bottom_logits=bottom_logit(logits, K, 1.0), K=K, labels=y, epsilon=1.0, lam=1.5)
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()

    def twin_step():
        loss = F.cross_entropy(twin(x), y)
        opt_t.zero_grad()
        loss.backward()
        opt_t.step()

    best = {"twin": float("inf"), "gloro": float("inf")}
    for f in (twin_step, gloro_step):
        f()  # warm-up
    for _ in range(args.repeats):
        for name, f in (("twin", twin_step), ("gloro", gloro_step)):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                f()
            best[name] = min(best[name], (time.perf_counter() - t0) / args.steps)
    per_epoch = 60000 // args.batch
    print(f"{args.model}, batch {args.batch}, {args.threads} thread(s), allocator setting {'on' if tuned else 'off'}, "
          f"torch {torch.__version__}")
    for name in ("twin", "gloro"):
        print(f"  {name:6s} {1000 * best[name]:8.1f} ms/step  {best[name] / best['twin']:5.2f}x twin  "
              f"{best[name] * per_epoch:6.1f} s per 60k-image epoch")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                gloro_step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
