"""``RUN/history.json``: one entry per training session of a run (new, resumed or restarted), so
that what changed between sessions leaves a trace.

Each entry: ``session`` (1, 2, ...), ``started`` (UTC, ISO 8601), ``kind`` (``new`` | ``resume``
| ``restart``), ``start_epoch`` and ``epochs`` (the session trains epochs ``start_epoch + 1 ..
epochs``), ``command``, ``host``, ``device``, ``threads``, ``data`` (per split: the folder read and
the number of images), ``changed`` (``{key: [before, now]}`` for every config key this session
changed, e.g. a resumed run's ``test_limit``), ``set_aside`` (``--restart``: where the previous
files went) and the provenance of :func:`gloronet.provenance.provenance` (``gloronet``, ``torch``,
``python``, ``git_commit``).
"""
from __future__ import annotations

import datetime
import socket
from pathlib import Path

import torch

from .provenance import provenance
from .runs import HISTORY, RunError, read_json, write_json


def read_history(run_dir: str | Path) -> list[dict]:
    """The sessions recorded so far (``[]`` for a run without ``history.json``)."""
    path = Path(run_dir) / HISTORY
    try:
        return read_json(path, list) if path.is_file() else []
    except RunError as e:
        raise RunError(f"{e} (the run's other files do not depend on it: move it away to continue)") from None


def changes(before: dict | None, now: dict) -> dict:
    """``{key: [before, now]}`` for every key whose value differs (nothing for a new run)."""
    if before is None:
        return {}
    return {k: [before.get(k), v] for k, v in now.items() if before.get(k) != v}


def record_session(run_dir: str | Path, kind: str, start_epoch: int, config: dict, before: dict | None,
                   device: torch.device, data: dict, command: str | None = None, set_aside: Path | None = None) -> dict:
    """Append this session to ``history.json`` (atomically) and return its entry."""
    sessions = read_history(run_dir)
    entry = {
        "session": len(sessions) + 1, "kind": kind,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "start_epoch": start_epoch, "epochs": config["epochs"], "command": command, "host": socket.gethostname(),
        "device": str(device), "threads": torch.get_num_threads(), "data": data, "changed": changes(before, config),
        **({"set_aside": str(set_aside)} if set_aside is not None else {}), **provenance(),
    }
    write_json(Path(run_dir) / HISTORY, sessions + [entry])
    return entry
