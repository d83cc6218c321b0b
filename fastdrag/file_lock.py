"""One process at a time: an advisory lock on a file, for work that processes sharing a folder would
otherwise each do (an export of the same graphs and engines into a shared cache: minutes of GPU time)."""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def held(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `path` (made if missing) for the block; a process that asks for it while
    another holds it logs that it waits for `what`, and waits. The lock goes with the process, however it
    ends. Where POSIX `flock` is missing (Windows), the block runs without it."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process's %s", what)
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        os.utime(path)  # in use: pruning the cache passes over a young hidden file
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
