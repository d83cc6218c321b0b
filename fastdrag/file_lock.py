"""One process at a time: an advisory lock on a file, for work that processes sharing a folder would
otherwise each do (an export of the same graphs and engines into a shared cache: minutes of GPU time)."""
from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

logger = logging.getLogger(__name__)

POLL_S = 0.5


def _wait_for(lock_file, what: str, wait_s: float, while_waiting: Optional[Callable[[], None]]) -> bool:
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
            if while_waiting is not None:
                while_waiting()
            time.sleep(min(POLL_S, left))


@contextlib.contextmanager
def held(path: Path, what: str, wait_s: float, while_waiting: Optional[Callable[[], None]] = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (made if missing) for the block. A process that asks for it while
    another holds it logs that it waits for `what`, and waits, at most `wait_s` seconds: then it warns and
    runs the block without the lock (the holder may hang; one that dies lets go of it). `while_waiting` is
    called every `POLL_S` seconds of the wait: an exception it raises (a cancelled edit) ends it. The holder removes
    the file as it lets go, so none is left behind; a process that comes after that, while one that waited
    on the old file holds it, may overlap that one's block: the lock saves repeated work, and correctness
    never depends on it. Where
    the file cannot be made (a read-only folder) or POSIX `flock` is missing (Windows), the block runs
    without it."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_file = open(path, "a")
    except OSError as exc:  # a read-only cache: nothing to share, and nothing to lock
        logger.debug("no lock for the %s (%s)", what, exc)
        yield
        return
    with lock_file:
        locked = _wait_for(lock_file, what, wait_s, while_waiting)
        try:
            yield
        finally:
            if locked:  # the file goes with the lock: a process that waited on it takes the lock on it all the same
                with contextlib.suppress(OSError):
                    os.unlink(path)
                fcntl.flock(lock_file, fcntl.LOCK_UN)
