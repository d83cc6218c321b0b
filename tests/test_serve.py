"""`fastdrag serve`: a warm editor answering JSON request lines, each answer the edit `edit` would make."""
import gc
import io
import json
import queue
import subprocess
import sys
import threading
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fastdrag.serve import serve


@pytest.fixture()
def files(tmp_path, picture):
    """The demo picture and its mask as files, and the request of its one drag."""
    picture.image.save(tmp_path / "in.png")
    Image.fromarray((picture.mask * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    (handle, target), = picture.points
    request = {"image": str(tmp_path / "in.png"), "prompt": picture.prompt, "points": [[list(handle), list(target)]],
               "mask": str(tmp_path / "mask.png")}
    return tmp_path, request


def run(editor, requests, defaults=None, progress_json=False, prune_to=None):
    """(answers, how many failed) of serving `requests` (dicts, or lines as they are)."""
    lines = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in requests)
    answers = io.StringIO()
    failed = serve(editor, io.StringIO(lines), answers, defaults, progress_json, prune_to)
    return [json.loads(line) for line in answers.getvalue().splitlines()], failed


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_served_edits_are_the_editors_and_a_repeated_one_reuses_the_lora(tiny, editor, files, fast, tmp_path):
    from fastdrag import DragEditor

    folder, request = files
    moved = {**request, "points": [[request["points"][0][0], [request["points"][0][0][0] - 6, request["points"][0][0][1]]]]}
    answers, failed = run(editor, [{**request, "id": "first", "output": str(folder / "a.png")},
                                   {**moved, "id": 2, "output": str(folder / "b.png"), "drag_steps": 3}], defaults=fast)
    assert failed == 0
    assert [a["id"] for a in answers] == ["first", 2]
    first, second = answers
    assert first["output"] == str(folder / "a.png") and not first["lora_cached"]
    assert second["lora_cached"] and second["drag_steps"] <= 3
    assert "vae_encode" not in second["timings_s"]  # the kept inversion: the image was not encoded again

    fresh = DragEditor(tiny, torch.device("cpu"), torch.float32, cache_dir=tmp_path / "fresh", progress=False)
    points = lambda r: [tuple(map(tuple, pair)) for pair in r["points"]]
    expected = fresh.edit(request["image"], request["prompt"], points(request), mask=request["mask"], **fast)
    assert np.array_equal(pixels(folder / "a.png"), np.asarray(expected.image, dtype=np.int16))
    assert first["handles"] == [[round(x, 2), round(y, 2)] for x, y in expected.handles]
    again = DragEditor(tiny, torch.device("cpu"), torch.float32, cache_dir=tmp_path / "again", progress=False)
    expected = again.edit(moved["image"], moved["prompt"], points(moved), mask=moved["mask"], **{**fast, "drag_steps": 3})
    assert np.abs(pixels(folder / "b.png") - np.asarray(expected.image, dtype=np.int16)).max() <= 1


def test_bad_requests_are_answered_and_serving_goes_on(editor, files, fast):
    folder, request = files
    (folder / "taken.png").write_bytes(b"kept")
    Image.new("L", (12, 10)).save(folder / "small.png")
    good = {**request, "output": str(folder / "out.png")}
    bad = [
        ("not json", None, "not valid JSON"),
        ("[1, 2]", None, "must be a JSON object"),
        ({**good, "id": 3, "drag_step": 2}, 3, "unknown request key(s) 'drag_step'"),
        ({k: v for k, v in good.items() if k != "points"} | {"id": 4}, 4, "request has no 'points'"),
        ({**good, "id": 5, "prompt": 7}, 5, "'prompt' must be a string"),
        ({**good, "id": 6, "points": [[[9999, 10], [20, 20]]]}, 6, "outside the"),
        ({**good, "id": 7, "points": {"handles": [[10, 10]], "targets": []}}, 7, "1 handles but 0 targets"),
        ({**good, "id": 8, "image": str(folder / "missing.png")}, 8, "does not exist"),
        ({**good, "id": 9, "output": str(folder / "taken.png")}, 9, 'taken.png exists; give "overwrite": true'),
        ({**good, "id": 10, "lora_lr": -1.0}, 10, "lora_lr and drag_lr must be > 0"),
        ({**good, "id": 11, "overwrite": "yes"}, 11, "'overwrite' must be true or false"),
        ({**good, "id": 13, "deadline_s": 0}, 13, "'deadline_s' must be a positive number of seconds"),
        ({**good, "id": 12, "mask": str(folder / "small.png")}, 12, "mask size 12x10 differs from the image size"),
    ]
    answers, failed = run(editor, [line for line, _, _ in bad] + ["", {**good, "id": "last"}], defaults=fast)
    assert failed == len(bad) and len(answers) == len(bad) + 1  # the blank line is no request
    for (_, ident, fragment), reply in zip(bad, answers[:-1], strict=True):
        assert fragment in reply["error"], (fragment, reply)
        assert reply.get("id") == ident and "output" not in reply
    assert answers[-1]["id"] == "last" and "error" not in answers[-1]
    assert sorted(p.name for p in folder.iterdir()) == ["in.png", "lora", "mask.png", "out.png", "small.png", "taken.png"]
    assert (folder / "taken.png").read_bytes() == b"kept"


def test_a_preloaded_image_is_edited_as_a_repeated_edit_is(tiny, editor, files, fast, tmp_path):
    """`"op": "preload"` trains the image's LoRA and inverts it before its points come: the edit that follows
    runs the drag, denoising and decoding only, and writes a fresh editor's picture."""
    from fastdrag import DragEditor

    folder, request = files
    ahead = {"op": "preload", "id": "p", "image": request["image"], "prompt": request["prompt"]}
    answers, failed = run(editor, [ahead, {**request, "id": "e", "output": str(folder / "out.png")},
                                   {**ahead, "id": "bad", "points": request["points"]}, {**ahead, "id": "x", "op": "undo"}],
                          defaults=fast)
    assert failed == 2
    preloaded, edited, bad, unknown = answers
    assert preloaded["id"] == "p" and preloaded["preloaded"] == request["image"]
    assert {"lora", "inversion"} <= set(preloaded["timings_s"]) and "drag" not in preloaded["timings_s"]
    assert edited["lora_cached"] and "vae_encode" not in edited["timings_s"]
    assert bad["error"].startswith("a preload takes no 'points'")
    assert unknown["error"].startswith("request's 'op' must be \"edit\" (the default), \"preload\" or \"release\"")
    fresh = DragEditor(tiny, torch.device("cpu"), torch.float32, cache_dir=tmp_path / "fresh", progress=False)
    expected = fresh.edit(request["image"], request["prompt"], [tuple(map(tuple, p)) for p in request["points"]],
                          mask=request["mask"], **fast)
    assert np.array_equal(pixels(folder / "out.png"), np.asarray(expected.image, dtype=np.int16))


def test_a_release_frees_the_kept_inversion_and_the_next_edit_makes_it_again(editor, files, fast):
    """`"op": "release"` runs `editor.release()` (before an idle spell): the image's next edit loads its LoRA
    from the cache but encodes and inverts the image again, and writes what the first edit wrote."""
    folder, request = files
    edit = lambda name: {**request, "id": name, "output": str(folder / f"{name}.png")}
    answers, failed = run(editor, [edit("first"), edit("kept"), {"op": "release", "id": "r"},
                                   {"op": "release", "image": request["image"]}, edit("after")], defaults=fast)
    assert failed == 1
    first, kept, released, refused, after = answers
    assert "vae_encode" in first["timings_s"] and "vae_encode" not in kept["timings_s"]  # the kept inversion
    assert released == {"id": "r", "released": True}
    assert refused == {"error": "a release takes only 'id' and 'op'; got 'image'"}
    assert after["lora_cached"] and {"vae_encode", "inversion"} <= set(after["timings_s"])
    assert np.array_equal(pixels(folder / "after.png"), pixels(folder / "first.png"))


def test_an_edit_past_its_deadline_is_cancelled_and_keeps_nothing(editor, files, fast):
    folder, request = files
    late = {**request, "id": "late", "output": str(folder / "late.png"), "deadline_s": 1e-9}
    answers, failed = run(editor, [late, {**late, "id": "on time", "deadline_s": 600}], defaults=fast)
    assert failed == 1
    assert answers[0] == {"id": "late", "error": "cancelled: past its deadline of 1e-09 s, in the lora stage at step 0 "
                                                 f"of {fast['lora_steps']}"}
    assert answers[1]["id"] == "on time" and not answers[1]["lora_cached"]  # the cancelled LoRA was not cached
    # the second request, without overwrite, could write late.png: the cancelled one had written nothing
    assert (folder / "late.png").is_file() and len(list((folder / "lora").glob("*.safetensors"))) == 1


def test_a_pruning_server_keeps_its_lora_cache_to_its_size_least_recently_used_first(tiny, editor, files, fast, tmp_path):
    from fastdrag import DragEditor

    folder, request = files
    Image.open(request["image"]).transpose(Image.FLIP_LEFT_RIGHT).save(folder / "other.png")
    probe = DragEditor(tiny, torch.device("cpu"), torch.float32, cache_dir=tmp_path / "probe", progress=False)
    key, _ = probe.train_lora(request["image"], request["prompt"], **fast)  # the first image's LoRA, and its size
    one_lora = probe.cache.path(key).stat().st_size
    first, second = {**request, "output": str(folder / "a.png")}, {**request, "image": str(folder / "other.png"),
                                                                   "output": str(folder / "b.png")}
    answers, failed = run(editor, [first, second, {**first, "output": str(folder / "again.png")}], defaults=fast,
                          prune_to=int(1.5 * one_lora))
    assert failed == 0
    # the second image's LoRA pushed the first one's out, so the first image's next edit trained it again
    assert [a["lora_cached"] for a in answers] == [False, False, False]
    assert list((folder / "lora").iterdir()) == [editor.cache.path(key)]  # and then pushed the second one's out


def finished_edit(lora_cached=False):
    """What a stand-in editor's edit returns: an `EditResult`'s fields that an answer reads."""
    return SimpleNamespace(image=Image.new("RGB", (8, 8)), handles=[(1.0, 2.0)], targets=[(3.0, 4.0)], drag_steps=1,
                           lora_cached=lora_cached, timings={"total": 0.1})


class Answering:
    """An editor whose edits all succeed at once, with a LoRA cache folder."""

    def __init__(self, cache_dir):
        self.cache = SimpleNamespace(directory=cache_dir)

    def edit(self, image, prompt, points, mask=None, on_step=None, **settings):
        return finished_edit(lora_cached=True)


def test_a_prune_that_fails_is_logged_and_serving_goes_on(files, monkeypatch, caplog):
    import fastdrag.cache_usage

    def refused(directory, max_bytes):
        raise PermissionError(13, "Permission denied", str(directory / "old.safetensors"))

    monkeypatch.setattr(fastdrag.cache_usage, "prune", refused)
    folder, request = files
    requests = [{**request, "id": n, "output": str(folder / f"{n}.png")} for n in range(2)]
    with caplog.at_level("WARNING", logger="fastdrag.serve"):
        answers, failed = run(Answering(folder / "lora"), requests, prune_to=1000)
    assert failed == 0 and [a["id"] for a in answers] == [0, 1]
    assert caplog.text.count(f"pruning the LoRA cache at {folder / 'lora'} failed: [Errno 13] Permission denied") == 2


def test_the_command_refuses_a_cache_size_it_cannot_read_before_loading_the_model(capsys):
    from fastdrag.cli import main

    assert main(["serve", "--model", "nowhere/none", "--prune-cache-to", "lots"]) == 2
    assert capsys.readouterr().err.strip() == ("fastdrag: error: size 'lots' is not a number with an optional unit "
                                               "(e.g. 20GB, 500MB, 1.5GiB, 0)")


class Feed:
    """A request stream whose lines arrive when the test sends them."""

    def __init__(self):
        self.lines = queue.Queue()

    def send(self, *lines):
        for line in lines:
            self.lines.put(line + "\n")

    def close(self):
        self.lines.put("")

    def readline(self):
        return self.lines.get()


class Blocking:
    """An editor whose first edit, once it runs, has the client send the rest of the lines (cancels included)
    and waits until the server has read them all; every edit then steps three times and finishes. Whether a
    cancel reached a request does not depend on timing."""

    def __init__(self, feed, rest):
        self.feed, self.rest, self.server, self.ran = feed, rest, None, []

    def edit(self, image, prompt, points, mask=None, on_step=None, **settings):
        self.ran.append(prompt)
        if len(self.ran) == 1:
            self.feed.send(*self.rest)
            self.feed.close()
        assert self.server.reader.input_ended.wait(60)
        for done in range(3):
            on_step("lora", done, 3)
        return finished_edit()


def test_a_cancel_line_stops_its_request_while_it_runs_or_before_it_runs(files, caplog):
    from fastdrag.serve import Server

    folder, request = files
    edit = lambda ident, prompt: json.dumps({**request, "id": ident, "prompt": prompt, "output": str(folder / f"{prompt}.png")})
    cancel = lambda ident: json.dumps({"op": "cancel", "id": ident})
    feed = Feed()
    feed.send(edit(1, "running"))
    rest = [cancel(1), edit("two", "kept"), edit([3], "waiting"), cancel([3]), cancel("nobody"),
            cancel(4), edit(4, "later")]  # a cancel reaches only requests read before it
    editor, answers = Blocking(feed, rest), io.StringIO()
    server = Server(editor, feed, answers)
    editor.server = server
    with caplog.at_level("WARNING", logger="fastdrag.serve"):
        assert server.run() == 2
    replies = [json.loads(line) for line in answers.getvalue().splitlines()]
    assert [r["id"] for r in replies] == [1, "two", [3], 4]  # cancel lines get no answer of their own
    assert replies[0]["error"] == "cancelled: by a cancel request, in the lora stage at step 0 of 3"
    assert replies[2]["error"] == "cancelled: by a cancel request, before it ran"
    assert "error" not in replies[1] and "error" not in replies[3]
    assert editor.ran == ["running", "kept", "later"]
    assert sorted(p.name for p in folder.glob("*.png")) == ["in.png", "kept.png", "later.png", "mask.png"]
    assert 'cancel of id "nobody": no request of that id is waiting or running' in caplog.text
    assert "cancel of id 4" in caplog.text


class GoneReader(io.StringIO):
    """Answers whose reader went away: every write is a broken pipe, as on a stdout the client closed."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")


class Editor:
    """Stands for the editor: only whether something still holds it matters."""


def readers():
    return [thread for thread in threading.enumerate() if thread.name == "fastdrag-serve-reader"]


def test_the_reader_thread_never_holds_the_editor_and_is_gone_when_the_input_ends():
    """The reader is a daemon thread that a client keeping stdin open leaves running after the server stops
    (its answers undeliverable) and when the process exits. Had it held the editor, its end would free the
    editor's tensors while the interpreter finalizes, which aborts the process (seen in CI)."""
    from fastdrag.serve import Server

    before = set(readers())
    feed, editor = Feed(), Editor()
    feed.send("not json")  # answered with an error, which cannot be delivered; stdin stays open
    held = weakref.ref(editor)
    with pytest.raises(BrokenPipeError):
        Server(editor, feed, GoneReader()).run()
    del editor
    gc.collect()
    running = [thread for thread in readers() if thread not in before]
    try:
        assert len(running) == 1 and running[0].is_alive()  # still waiting on the open input
        assert held() is None, gc.get_referrers(held())
    finally:
        feed.close()
        for thread in running:
            thread.join(60)
    assert not any(thread.is_alive() for thread in running)

    feed, answers = Feed(), io.StringIO()
    feed.send("not json")
    feed.close()
    assert Server(Editor(), feed, answers).run() == 1
    assert set(readers()) <= before  # the input ended: the reader is gone when run() returns
    assert json.loads(answers.getvalue())["error"].startswith("request is not valid JSON")


OUTLIVING_READER = """
import atexit, queue, sys
import torch
from fastdrag.serve import Server

class Feed:
    def __init__(self):
        self.lines = queue.Queue()
    def readline(self):
        return self.lines.get()

class Gone:
    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

class Editor:
    def __init__(self):
        self.tensors = [torch.rand(1) for _ in range(20000)]

feed = Feed()
feed.lines.put("not json\\n")
try:
    Server(Editor(), feed, Gone()).run()
except BrokenPipeError:
    pass
atexit.register(feed.lines.put, "")  # the input ends as the interpreter finalizes: the reader ends then
sys.exit(1)
"""


def test_a_process_exits_cleanly_when_its_reader_ends_as_the_interpreter_finalizes(tmp_path):
    """What CI saw, made certain: `fastdrag serve` stopped for a broken pipe and the reader thread ended as
    the process exited. A reader holding the editor freed its tensors then and the process aborted
    (`terminate called without an active exception`, exit -6) instead of exiting 1."""
    script = tmp_path / "outliving_reader.py"
    script.write_text(OUTLIVING_READER)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "terminate" not in done.stderr


def test_a_cancelled_edit_of_the_real_editor_keeps_nothing(editor, files, fast):
    folder, request = files
    lines = [json.dumps({**request, "id": 1, "output": str(folder / "one.png")}), json.dumps({"op": "cancel", "id": 1}),
             json.dumps({**request, "id": 2, "output": str(folder / "two.png")})]
    answers, failed = run(editor, lines, defaults=fast)
    # (the cancel may reach it before its first step or at one: the reader thread and the edit race)
    assert failed == 1 and answers[0]["error"].startswith("cancelled: by a cancel request")
    assert not answers[1]["lora_cached"]  # the cancelled edit's LoRA was not cached: the next one trained its own
    assert not (folder / "one.png").exists() and (folder / "two.png").is_file()


class Scripted:
    """An editor whose edit prints, fails or is interrupted as scripted (the protocol around the editor)."""

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)

    def edit(self, image, prompt, points, mask=None, on_step=None, **settings):
        outcome = self.outcomes.pop(0)
        print("a library's stray print")
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def test_failures_are_answered_and_stdout_carries_answers_only(files, capsys):
    folder, request = files
    good = {**request, "output": str(folder / "out.png")}
    answers, failed = run(Scripted(RuntimeError("boom"), torch.OutOfMemoryError("the drag stage ran out")),
                          [{**good, "id": 1}, {**good, "id": 2}])
    assert failed == 2
    assert answers == [{"id": 1, "error": "internal error: RuntimeError: boom"},
                       {"id": 2, "error": "out of memory: the drag stage ran out"}]
    streams = capsys.readouterr()
    assert streams.out == "" and streams.err.count("a library's stray print") == 2
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C stops the server (the command exits 130)
        run(Scripted(KeyboardInterrupt()), [good])
    assert not (folder / "out.png").exists()


def test_the_command_serves_with_its_options_as_defaults_and_reports_progress(files, picture):
    folder, request = files
    requests = [{**request, "id": "defaults", "output": str(folder / "a.png")},
                {**request, "id": "no drag", "output": str(folder / "b.png"), "drag_steps": 0},
                {"id": "bad"}]
    done = subprocess.run(
        [sys.executable, "-m", "fastdrag", "serve", "--model", "tiny", "--cache-dir", str(folder / "c"),
         "--lora-steps", "2", "--num-inference-steps", "10", "--drag-steps", "2", "--progress-json", "--warm-up"],
        input="".join(json.dumps(r) + "\n" for r in requests), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert [a["id"] for a in answers] == ["defaults", "no drag", "bad"]
    assert answers[0]["drag_steps"] == 2 and answers[1]["drag_steps"] == 0  # the command's --drag-steps, then the request's
    assert "request has no 'image'" in answers[2]["error"]
    assert Image.open(folder / "a.png").size == picture.image.size and (folder / "b.png").is_file()
    progress = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    lora = [(p["done"], p["total"]) for p in progress if p.get("id") == "defaults" and p["stage"] == "lora"]
    assert lora == [(0, 2), (1, 2), (2, 2)]  # the warm-up reports nothing; the first request trains its LoRA
    assert {p["id"] for p in progress} == {"defaults", "no drag"}
    assert "warmed up in" in done.stderr


def test_the_command_stops_with_one_line_when_its_answers_cannot_be_delivered(files):
    """A client that closed its end of stdout gets no answers: the server says so in one line and exits 1."""
    folder, _ = files
    server = subprocess.Popen([sys.executable, "-m", "fastdrag", "serve", "--model", "tiny", "--quiet",
                               "--cache-dir", str(folder / "c")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server.stdout.close()  # the reader goes away before the first answer
    _, err = server.communicate("not json\n", timeout=300)
    assert server.returncode == 1, err
    assert err.strip().splitlines() == ["fastdrag: error: the reader of the answers (stdout) went away; stopped serving"]


def test_a_waiting_server_stops_on_sigterm_with_one_line(files):
    """A service manager stops an idle server (waiting for its next request) with SIGTERM: exit 143, one line."""
    import signal

    folder, _ = files
    server = subprocess.Popen([sys.executable, "-m", "fastdrag", "serve", "--model", "tiny", "--quiet",
                               "--cache-dir", str(folder / "c")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        server.stdin.write('{"op": "release"}\n')
        server.stdin.flush()
        assert json.loads(server.stdout.readline()) == {"released": True}  # serving, and now waiting
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 143
    finally:
        server.kill()
    assert server.stderr.read().strip().splitlines() == ["fastdrag: terminated"]
