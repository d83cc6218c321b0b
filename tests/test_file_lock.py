"""`fastdrag.file_lock.held`: one process at a time, a bounded wait, and a dead holder lets go."""
import subprocess
import sys
import threading
import time

import pytest

from fastdrag.file_lock import held

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the lock is POSIX flock's; Windows runs unlocked")


def test_a_second_holder_waits_until_the_first_lets_go(tmp_path, caplog):
    """(Two opens of the file in one process are two holders to flock, as two processes are.)"""
    path, order = tmp_path / ".export.lock", []
    first = held(path, "export", 60)
    first.__enter__()

    def let_go():
        time.sleep(0.5)
        order.append("first let go")
        first.__exit__(None, None, None)

    threading.Thread(target=let_go).start()
    with caplog.at_level("INFO", logger="fastdrag.file_lock"), held(path, "export to cache/exports/x", 60):
        order.append("second holds")
    assert order == ["first let go", "second holds"]
    assert "waiting for another process's export to cache/exports/x" in caplog.text
    assert "not waiting" not in caplog.text
    assert not path.exists()  # removed as the lock is let go: none is left behind


def test_a_folder_where_no_lock_can_be_made_runs_the_block_unlocked(tmp_path):
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    ran = []
    with held(tmp_path / "cache" / ".key.lock", "training", 60):
        ran.append(True)
    assert ran == [True]


def test_a_holder_that_does_not_let_go_is_waited_for_no_longer_than_asked(tmp_path, caplog):
    path = tmp_path / ".export.lock"
    with held(path, "export", 60):
        start = time.monotonic()
        with caplog.at_level("WARNING", logger="fastdrag.file_lock"), held(path, "export to x", 1.0):
            waited = time.monotonic() - start
    assert 1.0 <= waited < 10
    assert "another process's export to x is still going on after 1 s: not waiting for it longer" in caplog.text


def test_a_holder_that_dies_lets_go(tmp_path, caplog):
    path = tmp_path / ".export.lock"
    holder = subprocess.Popen([sys.executable, "-c", f"""
import time
from pathlib import Path
from fastdrag.file_lock import held
with held(Path({str(path)!r}), "export", 60):
    print("held", flush=True)
    time.sleep(600)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with caplog.at_level("INFO", logger="fastdrag.file_lock"), held(path, "export", 0.5):
            pass
        assert "still going on" in caplog.text  # held while the holder lives
        holder.kill()
        holder.wait(timeout=60)
        caplog.clear()
        with caplog.at_level("INFO", logger="fastdrag.file_lock"), held(path, "export", 60):
            pass
        assert caplog.text == ""  # taken at once
    finally:
        holder.kill()
