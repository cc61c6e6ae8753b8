"""One training process per run directory: ``gloronet train`` holds ``RUN/.train.lock`` while it
writes the run, so a second ``train`` (``--resume`` or not) on a live run is refused.

The lock is ``flock(2)`` on that file: the kernel releases it when the process ends, however it
ends (``kill -9`` included), so a lock left behind by a killed process is stale by construction and
is taken over. The file holds ``{"pid", "host", "since"}`` only to make a refusal readable. Where
the filesystem has no ``flock`` (some network filesystems) the file's content decides: a lock whose
process no longer runs on this host is stale; one held on another host is refused, naming the file
to delete once that process is gone.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

LOCK_NAME = ".train.lock"


class RunLockedError(RuntimeError):
    """The run directory is being trained by another process."""


def _holder(path: Path) -> dict:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _describe(info: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"])) if "since" in info else "?"
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} (since {since})"


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError, OverflowError):
        return True  # someone else's live process, or a file we cannot read: assume held
    return True


def _write_info(fd: int) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)


def _refuse(run_dir: Path, info: dict, extra: str = "") -> RunLockedError:
    return RunLockedError(f"{run_dir} is being trained by {_describe(info)}: two processes must not write one run; "
                          f"wait for it to finish or stop it{extra}")


def acquire(run_dir: str | Path) -> int:
    """Lock ``run_dir`` (made if missing) for this process; returns the descriptor to pass to
    :func:`release`. Raises :class:`RunLockedError` naming the holder."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _refuse(run_dir, _holder(path)) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            _check_by_content(run_dir, path)  # no flock here: the recorded pid / host decide
        try:  # the holder may have released (and unlinked) the file between our open and flock
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            _write_info(fd)
            return fd
        os.close(fd)


def _check_by_content(run_dir: Path, path: Path) -> None:
    info = _holder(path)
    if not info or info.get("pid") == os.getpid():
        return
    if info.get("host") == socket.gethostname():
        if _alive(info.get("pid")):
            raise _refuse(run_dir, info)
        return  # stale: its process is gone
    raise _refuse(run_dir, info, f" (this filesystem has no flock: delete {path} once that process is gone)")


def release(run_dir: str | Path, fd: int) -> None:
    """Give the lock up and remove its file (while still holding it, so no one else's lock is removed)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(Path(run_dir) / LOCK_NAME)
    os.close(fd)


@contextlib.contextmanager
def locked(run_dir: str | Path) -> Iterator[None]:
    """``with locked(run_dir):`` — :func:`acquire` … :func:`release`."""
    fd = acquire(run_dir)
    try:
        yield
    finally:
        release(run_dir, fd)
