"""`fastdrag.file_lock.held`: one process at a time, a bounded wait, and a dead holder lets go."""
import subprocess
import sys
import threading
import time

import pytest
import torch

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


def test_a_holder_that_waited_on_a_removed_file_waits_for_the_one_that_locked_its_successor(tmp_path):
    """A lets go (removing the file) while B waits on it, and C at once makes and locks a new file: B's lock
    on the removed file is no lock, so B waits for C. No two blocks overlap."""
    path, spans = tmp_path / ".export.lock", {}
    first = held(path, "export", 60)
    first.__enter__()

    def hold(name, seconds):
        with held(path, "export", 60):
            start = time.monotonic()
            time.sleep(seconds)
            spans[name] = (start, time.monotonic())

    second = threading.Thread(target=hold, args=("B", 0.1))
    second.start()
    time.sleep(0.3)  # B is waiting, between its polls
    first.__exit__(None, None, None)
    hold("C", 1.0)  # before B's next poll: C makes the file anew and holds it
    second.join(60)
    assert spans["C"][1] <= spans["B"][0]


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


def test_the_wait_calls_while_waiting_and_ends_with_its_exception(tmp_path):
    from fastdrag import EditCancelled

    path, calls = tmp_path / ".export.lock", []

    def cancel_at_the_third():
        calls.append(True)
        if len(calls) == 3:
            raise EditCancelled("the client went away")

    with held(path, "export", 60), pytest.raises(EditCancelled), held(path, "export", 60, cancel_at_the_third):
        pass
    assert len(calls) == 3


@pytest.mark.timeout(300)  # without the reports, the wait would last the editor's LORA_WAIT_S
def test_an_edit_waiting_for_another_process_s_lora_training_can_be_cancelled(tiny, picture, fast, tmp_path):
    """The wait reports the stage's step 0 about twice a second, so a deadline or a cancel still stops it."""
    from fastdrag import DragEditor, EditCancelled

    probe = DragEditor(tiny, torch.device("cpu"), torch.float32, cache_dir=tmp_path / "probe", progress=False)
    key, _ = probe.train_lora(picture.image, picture.prompt, **fast)
    editor = DragEditor(tiny, torch.device("cpu"), torch.float32, cache_dir=tmp_path / "cache", progress=False)
    steps = []

    def on_step(stage, done, total):
        steps.append((stage, done, total))
        if len(steps) == 4:
            raise EditCancelled("past its deadline")

    with held(tmp_path / "cache" / f".{key}.lock", "training", 60):  # another process trains this LoRA
        with pytest.raises(EditCancelled, match="past its deadline"):
            editor.edit(picture.image, picture.prompt, picture.points, on_step=on_step, **fast)
    assert steps == [("lora", 0, fast["lora_steps"])] * 4
    assert not list((tmp_path / "cache").glob("*.safetensors"))
