"""A pipeline step's share of the CPU cores, followed while it runs.

``l2c pipeline`` with ``parallel: N`` starts a step beside others on its share of the cores
(``OMP_NUM_THREADS``) and names a file in ``L2C_THREADS_FILE`` that holds the share it may use now.
When the step beside it ends and nothing else can start, the pipeline writes every core there; the
step's long loops (training steps, encoding and evaluation batches) call :func:`follow_share` between
two steps and take the cores over. ``torch.set_num_threads`` must be called from the thread that runs
the work (OpenMP's count is per thread), which is why the loops call it and no watcher thread does.

Outside a pipeline (no ``L2C_THREADS_FILE``) :func:`follow_share` does nothing.
"""

from __future__ import annotations

import os
import time

THREADS_FILE_ENV = "L2C_THREADS_FILE"
CHECK_EVERY = 2.0  # seconds between two reads of the file

_last_check = float("-inf")


def read_share(path: str | os.PathLike) -> int | None:
    """The thread count in `path` (None if it is missing, empty or not a positive integer: keep what
    runs; the pipeline writes it atomically, so a half-written file is never read)."""
    try:
        with open(path, encoding="utf-8") as f:
            n = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return n if n > 0 else None


def follow_share(force: bool = False) -> int | None:
    """Under a parallel pipeline: adopt the thread count its file holds now, if it changed (read at
    most every :data:`CHECK_EVERY` seconds unless `force`). Returns the count set, else None."""
    global _last_check
    path = os.environ.get(THREADS_FILE_ENV)
    if not path:
        return None
    now = time.monotonic()
    if not force and now - _last_check < CHECK_EVERY:
        return None
    _last_check = now
    import torch  # here: the pipeline imports this module for its names, without torch

    n = read_share(path)
    if n is None or n == torch.get_num_threads():
        return None
    torch.set_num_threads(n)
    return n
