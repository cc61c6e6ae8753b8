"""Whether ``torch.compile`` / ``torch.export`` is tracing the current call.

While tracing, data-dependent checks and caches are skipped (the graph computes the values) and
the eval forward does not switch kernels (the runtime that executes the graph sets them).
"""
from __future__ import annotations

import torch


def is_compiling() -> bool:
    """True while dynamo traces us (``torch.compiler.is_compiling``; ``torch._dynamo`` before torch 2.3)."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return bool(compiler.is_compiling())
    try:  # torch < 2.3
        import torch._dynamo as dynamo

        return bool(dynamo.is_compiling())
    except Exception:  # pragma: no cover - very old / stripped builds
        return False
