"""Throughput of a GloRo LiResNet / CHORD model vs a plain network with the same layer shapes.

Measured in ONE run, on the same device and batch size, on synthetic data:

* training images/s — GloRo: forward, Lipschitz estimate (power iteration), EMMA loss on the
  pairwise constants, backward, optimizer step; plain: forward, cross-entropy, backward, step
  (ordinary ``nn.Conv2d`` / ``nn.Linear`` + MinMax, no Lipschitz machinery);
* certification images/s (``net.certify``: fp32, TF32 off, sound cached bound) vs the plain
  network's fp32 inference images/s;
* the sound bound ``net.lipschitz_bound()`` of a freshly built model (nothing cached) vs ONE
  forward pass of a batch through the same model: the eval-mode ``net(x)`` (the program that is
  certified: chunked sums) and the training-mode forward (one fused kernel per layer), both under
  ``no_grad``; interleaved rounds, best of ``--repeats``.

``--bound-only`` measures just the last item, for any registered model (``--model 4c3f``,
``8c2f``, ``liresnet-6l128w``, ``chord-12l512w`` ...) or for one LiResBlock (``--model block``,
``--width``, ``--image-size``; residual scale of a ``--depth``-block stack). Prints a table with
ratios; asserts nothing about timings. Examples (CPU)::

    PYTHONPATH=src python benchmarks/throughput.py --device cpu --width 32 --depth 4 --steps 3
    PYTHONPATH=src python benchmarks/throughput.py --bound-only --model 4c3f --in-shape 1x28x28
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import gloronet.liresnet as liresnet
from gloronet.losses import emma_loss
from gloronet.nn import Flatten, LipConv2d, LipLinear, MinMax
from gloronet.nn.orthogonal import CholeskyOrthConv2d, CholeskyOrthLinear, ChordMLP
from gloronet.nn.residual import LiResBlock, LiResStack


# --------------------------------------------------------------------------- the plain twin
def _plain_conv(conv: LipConv2d, hw) -> nn.Module:
    left, right, top, bottom = conv.pads(hw)
    layer = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, groups=conv.groups)
    if left == right and top == bottom:
        layer.padding = (top, left)
        return layer
    return nn.Sequential(nn.ZeroPad2d((left, right, top, bottom)), layer)


def plain_twin(net) -> nn.Module:
    """Ordinary conv / dense layers + MinMax with the same shapes as the GloRo net's body + head."""
    layers: list[nn.Module] = []
    for m in net.body:
        if isinstance(m, LipConv2d):
            layers.append(_plain_conv(m, m.input_hw))
        elif isinstance(m, LiResStack):
            for b in m.blocks:
                layers += [nn.Conv2d(b.width, b.width, b.kernel_size, padding=b.kernel_size // 2), MinMax()]
        elif isinstance(m, CholeskyOrthConv2d):
            layers.append(nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.kernel_size))
        elif isinstance(m, (LipLinear, CholeskyOrthLinear)):
            layers.append(nn.Linear(m.in_features, m.out_features))
        elif isinstance(m, ChordMLP):
            for _ in range(m.depth):
                layers += [nn.Linear(m.features, m.features), MinMax()]
        elif isinstance(m, MinMax):
            layers.append(MinMax())
        elif isinstance(m, Flatten):
            layers.append(nn.Flatten())
        # InputShift (x − ½) is dropped: no learnable shape
    layers.append(nn.Linear(net.head.in_features, net.head.out_features))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_s(fn, batch: int, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return batch * steps / (time.perf_counter() - t0)


def best_times(fns: dict, repeats: int, device: torch.device, setup: dict | None = None) -> dict:
    """Best wall time of each function over ``repeats`` interleaved rounds (rotating order, so a
    drifting shared machine hits all alike); one untimed warm-up call each first. ``setup[k]``,
    if given, runs untimed before every call of ``fns[k]``."""
    setup = setup or {}

    def call(k):
        if k in setup:
            setup[k]()
        _sync(device)
        t0 = time.perf_counter()
        fns[k]()
        _sync(device)
        return time.perf_counter() - t0

    for k in fns:
        call(k)
    best = {k: float("inf") for k in fns}
    keys = list(fns)
    for rnd in range(repeats):
        for k in keys[rnd % len(keys):] + keys[: rnd % len(keys)]:
            best[k] = min(best[k], call(k))
    return best


def bound_vs_forward(build, x: torch.Tensor, repeats: int, device: torch.device) -> dict:
    """Seconds of ``lipschitz_bound()`` on a freshly built model (built, untimed, before each call)
    and of one forward pass of ``x`` through one such model, eval mode and training mode."""
    net = build()
    fresh = []
    last = {}

    def forward(train: bool):
        def run():
            net.train(train)
            with torch.no_grad():
                return net(x)

        return run

    fns = {
        "bound": lambda: last.update(L=fresh.pop().lipschitz_bound()),
        "eval forward": forward(False),
        "train forward": forward(True),
    }
    times = best_times(fns, repeats, device, setup={"bound": lambda: fresh.append(build())})
    times["L"] = float(last["L"])
    return times


def _build_fn(args, device: torch.device, in_shape):
    if args.model == "block":
        return lambda: LiResBlock(args.width, args.image_size, depth=args.depth).to(device).eval()
    if args.model in ("chord", "liresnet"):
        name = f"{args.model}-{args.depth}l{args.width}w"
        kw = {"dense_width": args.dense_width or 4 * args.width}
        if args.model == "chord":
            kw["dense_depth"] = args.dense_depth
        return lambda: liresnet.create(name, in_shape, args.classes, args.epsilon, **kw).to(device).eval()
    return lambda: liresnet.create(args.model, in_shape, args.classes, args.epsilon).to(device).eval()


def bound_only(args, device: torch.device, in_shape) -> None:
    torch.manual_seed(0)
    build = _build_fn(args, device, in_shape)
    if args.model == "block":
        x = torch.rand(args.batch_size, args.width, args.image_size, args.image_size, device=device)
    else:
        x = torch.rand(args.batch_size, *in_shape, device=device)
    t = bound_vs_forward(build, x, args.repeats, device)
    label = args.model if args.model not in ("chord", "liresnet") else f"{args.model}-{args.depth}l{args.width}w"
    shape = "x".join(str(s) for s in x.shape[1:])
    print(
        f"| {label} ({shape}) | {t['bound']:.3f} | {t['eval forward']:.3f} | {t['bound'] / t['eval forward']:.2f}x "
        f"| {t['train forward']:.3f} | {t['bound'] / t['train forward']:.2f}x | {t['L']:.6g} | {_device_name(device)} |"
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="chord",
                   help="chord | liresnet (sized by --depth/--width), block (one LiResBlock), or a registered name")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--dense-width", type=int, default=None, help="neck/CHORD dense width (default 4·width = 2048 at width 512)")
    p.add_argument("--dense-depth", type=int, default=8, help="CHORD dense layers (chord only)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--epsilon", type=float, default=36 / 255)
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward+loss of both nets")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for training (certification stays fp32)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU intra-op threads (default: all cores)")
    p.add_argument("--in-shape", default=None, help="CxHxW of a registered model's inputs (default 3 x image-size²)")
    p.add_argument("--bound-only", action="store_true", help="only the sound bound vs one forward pass")
    p.add_argument("--repeats", type=int, default=3, help="rounds of the bound vs forward timing (best of)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    in_shape = tuple(int(v) for v in args.in_shape.split("x")) if args.in_shape else (3, args.image_size, args.image_size)
    if args.bound_only:
        bound_only(args, device, in_shape)
        return
    if args.model not in ("chord", "liresnet"):
        raise SystemExit("training/certification throughput is measured for --model chord or liresnet")
    torch.manual_seed(0)
    dense_width = args.dense_width or 4 * args.width
    name = f"{args.model}-{args.depth}l{args.width}w"
    kw = {"dense_width": dense_width}
    if args.model == "chord":
        kw["dense_depth"] = args.dense_depth

    def build():
        return liresnet.create(name, in_shape, args.classes, args.epsilon, **kw).to(device)

    net = build()
    plain = plain_twin(net).to(device)
    mf = torch.channels_last if args.channels_last else torch.contiguous_format
    net, plain = net.to(memory_format=mf), plain.to(memory_format=mf)
    x = torch.rand(args.batch_size, *in_shape, device=device).to(memory_format=mf)
    y = torch.randint(args.classes, (args.batch_size,), device=device)
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.amp)

    def gloro_loss():
        with amp:
            logits = net(x)
            return emma_loss(logits.float(), y, net.pairwise_lipschitz(), net.epsilon)

    def plain_loss():
        with amp:
            return F.cross_entropy(plain(x).float(), y)

    if args.compile:
        gloro_loss, plain_loss = torch.compile(gloro_loss), torch.compile(plain_loss)

    def trainer(model, loss_fn):
        opt = torch.optim.NAdam(model.parameters(), lr=1e-3)

        def step():
            loss = loss_fn()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    net.train()
    plain.train()
    train_gloro = images_per_s(trainer(net, gloro_loss), args.batch_size, args.steps, args.warmup, device)
    train_plain = images_per_s(trainer(plain, plain_loss), args.batch_size, args.steps, args.warmup, device)

    net.eval()
    plain.eval()

    def plain_infer():
        with torch.no_grad():
            plain(x)

    cert = images_per_s(lambda: net.certify(x), args.batch_size, args.steps, max(1, args.warmup), device)
    infer = images_per_s(plain_infer, args.batch_size, args.steps, args.warmup, device)

    # sound bound of a fresh model (nothing cached) vs one forward pass of the batch
    bt = bound_vs_forward(lambda: build().eval(), x, args.repeats, device)

    n_gloro = sum(p.numel() for p in net.parameters())
    n_plain = sum(p.numel() for p in plain.parameters())
    dev_name = _device_name(device)
    print(
        f"model {name} (dense {dense_width}" + (f"×{args.dense_depth}" if args.model == "chord" else "") + f"), "
        f"{in_shape[1]}x{in_shape[2]}x{in_shape[0]} inputs, {args.classes} classes, batch {args.batch_size}, "
        f"device {dev_name}, amp={args.amp}, channels_last={args.channels_last}, compile={args.compile}, "
        f"steps={args.steps} (+{args.warmup} warm-up)"
    )
    print(f"params: gloro {n_gloro / 1e6:.2f}M, plain {n_plain / 1e6:.2f}M")
    rows = [
        ("train images/s", train_gloro, train_plain),
        ("certify vs plain inference images/s", cert, infer),
    ]
    print(f"{'':38s} {'gloro':>12s} {'plain':>12s} {'plain/gloro':>12s}")
    for label, g, q in rows:
        print(f"{label:38s} {g:12.1f} {q:12.1f} {q / g:12.2f}x")
    print(f"{'sound bound, fresh model (s)':38s} {bt['bound']:12.3f}   (L_body = {bt['L']:.6g})")
    print(f"{'one eval forward / train forward (s)':38s} {bt['eval forward']:12.3f} {bt['train forward']:12.3f}")
    print(f"{'bound / one forward (eval, train)':38s} {bt['bound'] / bt['eval forward']:11.2f}x "
          f"{bt['bound'] / bt['train forward']:11.2f}x")


if __name__ == "__main__":
    main()
