"""Reuse freed CPU memory instead of returning it to the kernel (glibc malloc), for programs.

glibc serves every allocation above ``M_MMAP_THRESHOLD`` (adaptive, at most 32 MiB) with fresh
``mmap`` pages and unmaps them on ``free``. A CPU training step allocates and frees tens of
activation tensors of 10-100 MB, so each step page-faults all of them in again: on the 2-core dev
VM that was more than half of a 4C3F training step (BENCHMARKS.md, "Where a CPU epoch goes").
:func:`reuse_freed_memory` raises the mmap and trim thresholds to 1 GiB (``mallopt``), so large
blocks come from the heap and stay there for the next step. The process keeps up to ~1 GiB of
freed memory mapped; nothing else changes.

This is a process-wide setting and therefore the *program's* choice: the ``gloronet`` command
calls it once at start-up; library functions never do. Python users can call it themselves, or
set the same thresholds with glibc's environment variables before Python starts
(``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824``). It does nothing when
the user set either variable, when ``GLORONET_SYSTEM_MALLOC=1``, or when the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import os
import platform
import threading

THRESHOLD = 1 << 30  # bytes
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
_GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")  # any value: the user chose
_lock = threading.Lock()
_applied: bool | None = None


def reuse_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds to :data:`THRESHOLD` once per process; True when they
    are (now or already) set by this function, False when skipped (see the module docstring)."""
    global _applied
    with _lock:
        if _applied is None:
            _applied = _apply()
        return _applied


def _apply() -> bool:
    if any(os.environ.get(name) for name in _GLIBC_VARIABLES) or _wants_system_malloc():
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, THRESHOLD))


def _wants_system_malloc() -> bool:
    """``GLORONET_SYSTEM_MALLOC`` set to anything but empty, ``0``, ``false``, ``no`` or ``off``."""
    return os.environ.get("GLORONET_SYSTEM_MALLOC", "").strip().lower() not in ("", "0", "false", "no", "off")
