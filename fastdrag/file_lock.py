"""One process at a time: an advisory lock on a file, for work that processes sharing a folder would
otherwise each do (an export of the same graphs and engines into a shared cache: minutes of GPU time)."""
from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

try:
    import fcntl
except ImportError:  # Windows: no flock, the blocks run unlocked
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

POLL_S = 0.5


def _wait_for(lock_file, what: str, deadline: float, while_waiting: Optional[Callable[[], None]]) -> bool:
    """Take the lock, waiting until `deadline` (monotonic) while another process holds it; whether it was taken."""
    waited = False
    while True:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if not waited:
                logger.info("waiting for another process's %s", what)
                waited = True
            if while_waiting is not None:
                while_waiting()
            time.sleep(min(POLL_S, left))


def _locked_file(path: Path, what: str, wait_s: float, while_waiting: Optional[Callable[[], None]]):
    """(the open lock file, whether it is locked). A holder removes the file as it lets go, so a lock taken
    on a file no longer at `path` is let go and the file there now is locked instead."""
    deadline = time.monotonic() + wait_s
    while True:
        lock_file = open(path, "a")
        try:
            if not _wait_for(lock_file, what, deadline, while_waiting):
                logger.warning("another process's %s is still going on after %.0f s: not waiting for it longer",
                               what, wait_s)
                return lock_file, False
            try:
                current = os.stat(path).st_ino == os.fstat(lock_file.fileno()).st_ino
            except FileNotFoundError:
                current = False
            if current:
                os.utime(path)  # in use: pruning the cache passes over a young hidden file
                return lock_file, True
        except BaseException:
            lock_file.close()
            raise
        lock_file.close()


@contextlib.contextmanager
def held(path: Path, what: str, wait_s: float, while_waiting: Optional[Callable[[], None]] = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (made if missing) for the block. A process that asks for it while
    another holds it logs that it waits for `what`, and waits, at most `wait_s` seconds: then it warns and
    runs the block without the lock (the holder may hang; one that dies lets go of it). `while_waiting` is
    called every `POLL_S` seconds of the wait: an exception it raises (a cancelled edit) ends it. The holder
    removes the file as it lets go, so none is left behind. Where the file cannot be made (a read-only
    folder) or POSIX `flock` is missing (Windows), the block runs without it."""
    if fcntl is None:
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_file, locked = _locked_file(path, what, wait_s, while_waiting)
    except OSError as exc:  # a read-only cache: nothing to share, and nothing to lock
        logger.debug("no lock for the %s (%s)", what, exc)
        yield
        return
    with lock_file:
        try:
            yield
        finally:
            if locked:  # remove the file, then let go: a process that waited on it looks for the one at `path`
                with contextlib.suppress(OSError):
                    os.unlink(path)
                fcntl.flock(lock_file, fcntl.LOCK_UN)
