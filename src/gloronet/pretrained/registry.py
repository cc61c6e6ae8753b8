"""Where the shipped models live and their names (nothing here loads a model, so
:mod:`gloronet.runs` can resolve a command's RUN argument without importing the loader)."""
from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "models"


def names() -> list[str]:
    """The shipped models' names, sorted."""
    if not MODELS_DIR.is_dir():
        return []
    return sorted(d.name for d in MODELS_DIR.iterdir() if (d / "card.json").is_file())


def resolve(name: str) -> Path | None:
    """The package directory of shipped model ``name`` (read it, never write into it), or None
    when ``name`` is not a shipped model."""
    return MODELS_DIR / name if isinstance(name, str) and name in names() else None
