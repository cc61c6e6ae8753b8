"""The price of sound certification on a GPU, in one call: the sound eval forward and ``certify``
against the fast settings a plain network would use there (issue 18).

For a registered architecture at CIFAR shape (random weights after a few training steps: speed
does not depend on accuracy), on one device, same batches, interleaved rounds, best of
``--repeats``, images/s of:

* ``plain fp32 (cuDNN, TF32)`` — the plain twin (``throughput.plain_twin``: ordinary
  ``nn.Conv2d`` / ``nn.Linear`` + MinMax, same shapes) under torch's defaults with cuDNN
  benchmarking and TF32 allowed: the baseline of every ratio;
* ``plain bf16 autocast`` and ``plain torch.compile`` (``--compile``) of the same twin;
* ``plain fp32 IEEE, no cuDNN`` — the twin under :func:`gloronet.kernels.sound_kernels`: what the
  sound settings alone cost, whatever gloronet does;
* ``net(x)`` — the sound eval forward (fused kernels, guarded), ``certify(x)`` and
  ``certify(x, fast=False)`` (the chunked program throughout).

Expected from the kernel choices (to be replaced by measurements): the sound sections run IEEE
float32 (no TF32: ~1/7 of the H100 / H200 dense TF32 tensor-core rate for GEMM-bound layers) and
switch cuDNN off, so convolutions fall back to ATen's im2col + cuBLAS GEMM kernels; ``net(x)``
should then be close to ``plain fp32 IEEE, no cuDNN`` (the guard is a few reductions over the
batch) and ``certify`` within ~0.9x of it (activation norms per layer, the float64 head). Against
the cuDNN + TF32 baseline expect ~0.15–0.5x for conv-heavy nets (LiResNet) and less against
bf16 / compile: the price of not letting the hardware round inner products as it likes.

    PYTHONPATH=src python benchmarks/certify_price_cuda.py --model liresnet-6l128w --batch 512 [--compile]
    PYTHONPATH=src python benchmarks/certify_price_cuda.py --device cpu --model 2c2f --in-shape 1x28x28 --batch 64 --repeats 1

Prints a Markdown table; asserts nothing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import _device_name, best_times, plain_twin  # noqa: E402

from gloronet import kernels, models  # noqa: E402


def _briefly_trained(name: str, in_shape, device, steps: int):
    torch.manual_seed(0)
    net = models.create(name, in_shape, 10, epsilon=36 / 255).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    for _ in range(steps):
        x = torch.rand(64, *in_shape, device=device)
        y = torch.randint(0, 10, (64,), device=device)
        loss = torch.nn.functional.cross_entropy(net.bottom_logits(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def measure(args) -> dict:
    device = torch.device(args.device)
    in_shape = tuple(int(s) for s in args.in_shape.split("x"))
    net = _briefly_trained(args.model, in_shape, device, args.train_steps)
    plain = plain_twin(net).to(device).eval()
    batches = [torch.rand(args.batch, *in_shape, device=device) for _ in range(args.batches)]
    compiled = torch.compile(plain) if args.compile else None

    def fast_defaults(fn):
        def run():
            cudnn, tf32 = torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32
            torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = True, True
            try:
                return [fn(b) for b in batches]
            finally:
                torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = cudnn, tf32
        return run

    def sound(b):
        with kernels.sound_kernels():
            return plain(b)

    def bf16(b):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return plain(b)

    fns = {
        "plain fp32 (cuDNN, TF32)": fast_defaults(plain),
        "plain bf16 autocast": fast_defaults(bf16),
        "plain fp32 IEEE, no cuDNN": lambda: [sound(b) for b in batches],
        "net(x)": lambda: [net(b) for b in batches],
        "certify": lambda: [net.certify(b) for b in batches],
        "certify fast=False": lambda: [net.certify(b, fast=False) for b in batches],
    }
    if compiled is not None:
        fns["plain torch.compile"] = fast_defaults(compiled)
    with torch.no_grad():
        times = best_times(fns, args.repeats, device)
    n = args.batch * args.batches
    return {k: n / v for k, v in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="liresnet-6l128w")
    p.add_argument("--in-shape", default="3x32x32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also torch.compile the plain twin")
    args = p.parse_args(argv)
    rates = measure(args)
    base = rates["plain fp32 (cuDNN, TF32)"]
    print(f"{args.model} at {args.in_shape}, batch {args.batch}, {_device_name(torch.device(args.device))}, "
          f"torch {torch.__version__}, best of {args.repeats}\n")
    print("| program | images/s | / plain fp32 (cuDNN, TF32) |")
    print("|---|---:|---:|")
    for k, v in rates.items():
        print(f"| {k} | {v:.0f} | {v / base:.2f} |")


if __name__ == "__main__":
    main()
