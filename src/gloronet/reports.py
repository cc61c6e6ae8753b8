"""The report files of ``gloronet certify`` and the studies: what they are named and how they are
written (``<name>.json``, ``<name>.md``, ``<name>.png``, each atomically).

A report is named after what it measures, so that another evaluation never replaces it:
``<command>`` for the run's own dataset, its test split, every image and its ε; each setting that
differs is appended — the dataset (for runs that do not record theirs), ``train`` (the split),
``n<N>`` (``--limit N``), ``eps<ε>``, ``exact`` (``--arithmetic exact``), ``top<K>`` /
``affinity-<name>`` (a relaxation given on the command line). E.g. ``certify-n1000.json``,
``attack-eps0.5-n200.json``. The same evaluation run again replaces its own report.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from .runs import Run, write_json, write_text

PLOT_MISSING = "no PNG drawn: matplotlib is not installed (pip install 'gloronet[plot]')"


def report_name(command: str, run: Run, *, split: str = "test", limit: int | None = None,
                default_limit: int | None = None, epsilon: float | None = None, arithmetic: str = "float",
                top_k: int | None = None, affinity=None) -> str:
    """The file stem of a report (module docstring); ``epsilon`` / ``top_k`` / ``affinity`` are
    what the command line asked for (None: the run's own)."""
    parts = [command]
    if not run.recorded_dataset:
        parts.append(run.dataset)
    if split != "test":
        parts.append(split)
    if epsilon is not None and epsilon != run.trained_epsilon:
        parts.append(f"eps{epsilon:g}")
    if limit is not None and limit != default_limit:
        parts.append(f"n{limit}")
    if arithmetic != "float":
        parts.append(arithmetic)
    if top_k is not None:
        parts.append(f"top{top_k}")
    if affinity is not None:
        parts.append("affinity-" + (Path(affinity).stem if isinstance(affinity, (str, Path)) else "groups"))
    return "-".join(parts)


def report_files(name: str) -> list[str]:
    """Every file a report named ``name`` may consist of (their stale temporaries are removed)."""
    return [f"{name}{ext}" for ext in (".json", ".md", ".png", "-counterexamples.safetensors", "-attributions.png")]


def write_report(out_dir: str | Path, name: str, report: dict, markdown: str,
                 plot: Callable[[Path], bool] | None = None) -> dict[str, Path]:
    """``<name>.json`` (keys starting with ``_`` left out), ``<name>.md`` and, when ``plot`` draws
    one (matplotlib installed), ``<name>.png`` — each written atomically; returns their paths."""
    out = Path(out_dir)
    write_json(out / f"{name}.json", {k: v for k, v in report.items() if not k.startswith("_")})
    write_text(out / f"{name}.md", markdown)
    paths = {"json": out / f"{name}.json", "markdown": out / f"{name}.md"}
    if plot is not None and plot(out / f"{name}.png"):
        paths["plot"] = out / f"{name}.png"
    return paths


def note_missing_plot(command: str, paths: dict[str, Path]) -> None:
    """One line on stderr when a report came without its PNG because matplotlib is missing."""
    if "plot" not in paths:
        print(f"gloronet {command}: note: {PLOT_MISSING}", file=sys.stderr)
