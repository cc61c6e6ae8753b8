"""CPU thread control of the bound computations (one intra-op thread, big products excepted)."""
from __future__ import annotations

import functools
import threading

import torch

_threads = threading.local()  # the caller's intra-op thread count while a bound runs on one


def one_thread(fn):
    """Run a bound computation with one CPU intra-op thread (``torch.get_num_threads()`` is
    restored after). Bounds are many small operations and LAPACK calls: on a busy 2-core machine
    two threads made them 2x (Cholesky, small products) to 200x (eigensolver) slower, one thread
    never. The caller's thread count is kept for :func:`_matmul` (big products) and for
    side-by-side workers (:func:`_frequency_batch_bound`). GPU kernels are unaffected."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        threads = torch.get_num_threads()
        if threads == 1 or getattr(_threads, "outer", 0):
            return fn(*args, **kwargs)
        _threads.outer = threads
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
            _threads.outer = 0

    return run


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b``; a big product on the CPU inside :func:`one_thread` gets the caller's threads
    back (matrix products were measured no slower with two threads on a busy machine)."""
    threads = getattr(_threads, "outer", 0)
    if a.device.type != "cpu" or threads <= 1 or a.shape[-2] * a.shape[-1] * b.shape[-1] < 2**26:
        return a @ b
    torch.set_num_threads(threads)
    try:
        return a @ b
    finally:
        torch.set_num_threads(1)


def _workers(device: torch.device) -> int:
    """How many single-threaded workers may run side by side (the caller's CPU threads)."""
    return max(1, getattr(_threads, "outer", 0)) if device.type == "cpu" else 1
