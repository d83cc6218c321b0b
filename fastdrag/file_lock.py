"""One process at a time: an advisory lock on a file, for work that processes sharing a folder would
otherwise each do (an export of the same graphs and engines into a shared cache: minutes of GPU time)."""
from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

POLL_S = 0.2


def _wait_for(lock_file, what: str, wait_s: float) -> bool:
    """Take the lock, waiting at most `wait_s` seconds while another process holds it; whether it was taken."""
    import fcntl

    deadline = time.monotonic() + wait_s
    waited = False
    while True:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                logger.warning("another process's %s is still going on after %.0f s: not waiting for it longer",
                               what, wait_s)
                return False
            if not waited:
                logger.info("waiting for another process's %s", what)
                waited = True
            time.sleep(min(POLL_S, left))


@contextlib.contextmanager
def held(path: Path, what: str, wait_s: float) -> Iterator[None]:
    """Hold an exclusive lock on `path` (made if missing) for the block. A process that asks for it while
    another holds it logs that it waits for `what`, and waits, at most `wait_s` seconds: then it warns and
    runs the block without the lock (the holder may hang; one that dies lets go of it). Where POSIX `flock`
    is missing (Windows), the block runs without it."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock_file:
        locked = _wait_for(lock_file, what, wait_s)
        if locked:
            os.utime(path)  # in use: pruning the cache passes over a young hidden file
        try:
            yield
        finally:
            if locked:
                fcntl.flock(lock_file, fcntl.LOCK_UN)
