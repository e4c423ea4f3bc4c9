"""One writer per run folder: an advisory lock held for the run's whole life.

``<folder>/.l2c.lock`` is locked with the ``filelock`` package (``flock`` on POSIX: the system releases
it when the holder dies, however it dies, so a stale lock of a killed process is simply taken over);
``<folder>/.l2c.lock.json`` beside it names the holder (PID, host, command, start time) for the
message a second run gets. Each folder has its own lock, so ``l2c pipeline`` holding its output folder
does not block the steps it runs as child processes in sub-folders of it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from l2c_llava.errors import CannotRunError
from l2c_llava.io import atomic_write_json, ensure_folder

logger = logging.getLogger(__name__)

LOCK_NAME = ".l2c.lock"
HOLDER_NAME = ".l2c.lock.json"


def _holder(folder: Path) -> dict:
    try:
        return json.loads((folder / HOLDER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _main_process() -> bool:
    """Only the first process of a distributed launch locks (the others write nothing of their own)."""
    return os.environ.get("RANK", "0") in ("", "0")


@contextmanager
def run_lock(folder: str | os.PathLike, what: str = "run") -> Iterator[Path]:
    """Hold the lock of `folder` (created, with a clear error when it cannot be) while the block runs.
    A second holder fails at once with :class:`CannotRunError` naming the first one's PID and command."""
    from filelock import FileLock, Timeout

    folder = ensure_folder(folder, what)
    if not _main_process():
        yield folder
        return
    lock = FileLock(str(folder / LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        h = _holder(folder)
        who = f"PID {h.get('pid', '?')}" + (f" on {h['host']}" if h.get("host") else "")
        cmd = f" (`{h['command']}`, started {h.get('started', '?')})" if h.get("command") else ""
        raise CannotRunError(
            f"{folder} is in use by another {h.get('what', 'run')}: {who}{cmd}. Wait for it to finish, stop it, "
            "or use another output folder"
        ) from None
    except PermissionError:
        raise CannotRunError(
            f"{folder}: no permission to create its lock file {LOCK_NAME}; choose a folder you can write to"
        ) from None
    try:
        old = _holder(folder)
        if old.get("pid") and old.get("pid") != os.getpid():
            logger.info("%s: taking over the lock left by PID %s, which is gone", folder, old["pid"])

        atomic_write_json(
            folder / HOLDER_NAME,
            {
                "pid": os.getpid(),
                "what": what,
                "host": socket.gethostname(),
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else what,
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
        )
        yield folder
    finally:
        try:
            (folder / HOLDER_NAME).unlink(missing_ok=True)
        finally:
            lock.release()
