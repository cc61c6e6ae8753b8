"""Where a result came from: the gloronet, torch and Python versions and, when gloronet runs from a
git checkout, its commit — recorded in ``model.json`` and ``history.json`` of every run.
"""
from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path

import torch

from .version import __version__

PACKAGE_DIR = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the git checkout gloronet is imported from (``+dirty`` when tracked files
    differ from it), or None: not a checkout of gloronet (an installed wheel inside some other
    repository reports None too), or no ``git``."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(PACKAGE_DIR), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        top = Path(git("rev-parse", "--show-toplevel")).resolve()
        if (top / "src" / "gloronet") != PACKAGE_DIR:
            return None
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ":/src")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def provenance() -> dict:
    """``{"gloronet", "torch", "python", "git_commit"}`` of this process."""
    return {"gloronet": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "git_commit": git_commit()}
