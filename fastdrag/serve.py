"""`fastdrag serve`: one warm editor answering edit requests, a JSON object a line on stdin, an answer a line on stdout.

Why: `fastdrag edit` loads the model for every edit, and a new process pays CUDA's and the kernels'
first calls again; a served editor pays them once, keeps its LoRA trainer, inversions and CUDA graphs
between requests, and a program in any language drives it through a pipe (as `export/cpp`'s
`fastdrag_edit serve` is driven).
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Dict, List, Optional, Set, Tuple

from .atomic import check_image_output, save_image
from .config import field_names
from .errors import FastDragError, InputError, OutputExistsError
from .inputs import points_from_json
from .progress import EditCancelled

if TYPE_CHECKING:
    from .editor import DragEditor, EditResult

logger = logging.getLogger(__name__)

REQUEST_KEYS = ("id", "op", "image", "prompt", "points", "mask", "output", "overwrite", "deadline_s")
EDIT_ONLY = ("points", "mask", "output", "overwrite")  # what a preload (its image's LoRA and inversion) does not take
TUPLE_FIELDS = ("size", "sup_res", "lora_targets")  # settings a request gives as JSON lists, the config holds as tuples


@dataclass
class Request:
    """One edit a client asked for (or, `op` "preload", an image's LoRA and inversion ahead of its edit; `op`
    "release", the editor's kept memory freed before an idle spell); `settings` are its stage parameters by
    name (`drag_steps`, ...)."""

    image: str
    prompt: str
    points: Optional[List[Any]] = None
    output: Optional[Path] = None
    op: str = "edit"
    mask: Optional[str] = None
    overwrite: bool = False
    deadline_s: Optional[float] = None  # seconds the edit may run; past them it stops at its next step
    settings: Dict[str, Any] = field(default_factory=dict)


def json_object(line: str) -> Dict[str, Any]:
    """A request line's JSON object, or an InputError saying what the line is instead."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"request is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError(f"request must be a JSON object; got {type(data).__name__}")
    return data


def parse_request(data: Dict[str, Any]) -> Request:
    """The Request of a JSON object; an InputError names a missing, mistyped or unknown key."""
    settings_names = field_names()
    unknown = sorted(key for key in data if key not in REQUEST_KEYS and key not in settings_names)
    if unknown:
        raise InputError(f"unknown request key(s) {', '.join(map(repr, unknown))}; a request takes "
                         f"{', '.join(REQUEST_KEYS)} and the edit settings (`fastdrag edit --help`)")
    op = data.get("op", "edit")
    if op not in ("edit", "preload", "release"):
        raise InputError(f"request's 'op' must be \"edit\" (the default), \"preload\" or \"release\"; got {op!r}")
    if op == "release":
        extra = sorted(key for key in data if key not in ("id", "op"))
        if extra:
            raise InputError(f"a release takes only 'id' and 'op'; got {', '.join(map(repr, extra))}")
        return Request(image="", prompt="", op=op)
    needed = ("image", "prompt", "points", "output") if op == "edit" else ("image", "prompt")
    for key in needed:
        if key not in data:
            raise InputError(f"request has no {key!r}")
    if op == "preload" and any(key in data for key in EDIT_ONLY):
        raise InputError(f"a preload takes no {', '.join(repr(k) for k in EDIT_ONLY if k in data)}: it trains the "
                         "image's LoRA and inverts it, for an edit that brings them")
    for key in ("image", "prompt", "output"):
        if key in needed and not isinstance(data[key], str):
            raise InputError(f"request's {key!r} must be a string; got {type(data[key]).__name__}")
    if not data["image"] or (op == "edit" and not data["output"]):
        raise InputError("request's 'image' and 'output' must be file paths, not empty strings")
    mask = data.get("mask")
    if mask is not None and not isinstance(mask, str):
        raise InputError(f"request's 'mask' must be a file path or null; got {type(mask).__name__}")
    overwrite = data.get("overwrite", False)
    if not isinstance(overwrite, bool):
        raise InputError(f"request's 'overwrite' must be true or false; got {overwrite!r}")
    deadline = data.get("deadline_s")
    if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, (int, float))
                                 or not math.isfinite(deadline) or deadline <= 0):
        raise InputError(f"request's 'deadline_s' must be a positive number of seconds; got {deadline!r}")
    settings = {key: tuple(value) if key in TUPLE_FIELDS and isinstance(value, list) else value
                for key, value in data.items() if key in settings_names}
    if op == "preload":
        return Request(image=data["image"], prompt=data["prompt"], op=op, deadline_s=deadline, settings=settings)
    return Request(image=data["image"], prompt=data["prompt"], points=points_from_json(data["points"], "request's 'points'"),
                   output=Path(data["output"]), mask=mask, overwrite=overwrite, deadline_s=deadline,
                   settings=settings)


def _rounded(timings: Dict[str, float]) -> Dict[str, float]:
    return {name: round(seconds, 3) for name, seconds in timings.items()}


def edit_summary(result: EditResult, output: Path) -> Dict[str, Any]:
    """What `fastdrag edit` prints and `serve` answers for a finished edit."""
    return {
        "output": str(output),
        "handles": [[round(x, 2), round(y, 2)] for x, y in result.handles],
        "targets": [[round(x, 2), round(y, 2)] for x, y in result.targets],
        "drag_steps": result.drag_steps,
        "lora_cached": result.lora_cached,
        "timings_s": _rounded(result.timings),
    }


def _on_step(ident: Dict[str, Any], progress_json: bool, deadline_s: Optional[float],
             cancelled: Callable[[], bool]) -> Callable:
    """The edit's `on_step`: a progress line with the request's id, and the checks of its deadline and of a
    cancel request for it."""
    ends = time.monotonic() + deadline_s if deadline_s is not None else math.inf

    def on_step(stage: str, done: int, total: int) -> None:
        if progress_json:
            print(json.dumps({**ident, "stage": stage, "done": done, "total": total}), file=sys.stderr, flush=True)
        if cancelled():
            raise EditCancelled(f"by a cancel request, in the {stage} stage at step {done} of {total}")
        if time.monotonic() > ends:
            raise EditCancelled(f"past its deadline of {deadline_s:g} s, in the {stage} stage at step {done} of {total}")

    return on_step


def answer(editor: DragEditor, line: str, defaults: Optional[Dict[str, Any]] = None, progress_json: bool = False,
           cancelled: Callable[[], bool] = lambda: False) -> Dict[str, Any]:
    """Run what one request line asks for (an edit, written to its output, a preload or a release); the
    answer echoes the request's `id`.

    A bad request, an edit refused for its input, past its `deadline_s` or out of memory is answered with
    `error`, as is an unexpected failure (its traceback logged), so that one request cannot stop the server;
    so is one that `cancelled()` says a client cancelled (before it ran, or at its next step).
    Anything a library prints goes to stderr: stdout carries answers only.
    """
    ident: Dict[str, Any] = {}
    try:
        data = json_object(line)
        ident = {"id": data["id"]} if "id" in data else {}
        request = parse_request(data)
        settings = {**(defaults or {}), **request.settings}
        if cancelled():
            raise EditCancelled("by a cancel request, before it ran")
        if request.op == "release":  # the kept graphs, inversions and exported denoisers: made again when needed
            editor.release()
            return {**ident, "released": True}
        on_step = _on_step(ident, progress_json, request.deadline_s, cancelled)
        if request.op == "edit":
            check_image_output(request.output, request.overwrite)
        with contextlib.redirect_stdout(sys.stderr):
            if request.op == "preload":
                timings = editor.preload(request.image, request.prompt, on_step=on_step, **settings)
                return {**ident, "preloaded": request.image, "timings_s": _rounded(timings)}
            result = editor.edit(request.image, request.prompt, request.points, mask=request.mask, on_step=on_step,
                                 **settings)
        save_image(result.image, request.output, request.overwrite)
        return {**ident, **edit_summary(result, request.output)}
    except OutputExistsError:  # (the editor's message names the command's option and the Python argument)
        return {**ident, "error": f"{request.output} exists; give \"overwrite\": true to replace it"}
    except FastDragError as exc:
        return {**ident, "error": str(exc)}
    except EditCancelled as exc:  # nothing of the stopped stage is kept: the next edit is a fresh editor's
        return {**ident, "error": f"cancelled: {exc}"}
    except Exception as exc:  # noqa: BLE001 (answered, and the server goes on; Ctrl-C is not an Exception)
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(exc, torch.OutOfMemoryError):
            return {**ident, "error": f"out of memory: {exc}"}
        logger.exception("request %s failed", ident.get("id", "without id"))
        return {**ident, "error": f"internal error: {type(exc).__name__}: {exc}"}


def line_id(line: str) -> Tuple[bool, Optional[str]]:
    """(whether the line is a cancel, `{"op": "cancel", "id": X}`; the id it names or cancels as JSON text,
    None if it has none)."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError:
        return False, None
    if not isinstance(data, dict):
        return False, None
    cancel = data.get("op") == "cancel"
    return cancel, json.dumps(data.get("id"), sort_keys=True) if cancel or "id" in data else None


class RequestReader:
    """The reading half of a `Server`: a daemon thread takes the request lines in order and marks the
    requests a cancel line names. It holds no editor: the thread can outlive the server (a client that
    keeps stdin open) and end as the process exits, and had it dropped the editor's last reference then,
    freeing a tensor (torch releases the GIL for it) would end the thread through torch's C++ frames and
    abort the process (`terminate called without an active exception`)."""

    def __init__(self, requests: IO[str]):
        self.requests = requests
        self.input_ended = threading.Event()  # set once every line is taken (cancels included)
        self._lines: "queue.Queue[Optional[Tuple[int, Optional[str], str]]]" = queue.Queue()
        self._lock = threading.Lock()
        self._waiting: Dict[str, Set[int]] = {}  # id (JSON text) -> numbers of its requests not yet answered
        self._cancelled: Set[int] = set()

    def start(self) -> threading.Thread:
        """Start reading on a thread of its own; return it."""
        thread = threading.Thread(target=self._read, name="fastdrag-serve-reader", daemon=True)
        thread.start()
        return thread

    def _read(self) -> None:
        number = 0
        try:
            for line in iter(self.requests.readline, ""):
                if not line.strip():
                    continue
                cancel, key = line_id(line)
                with self._lock:
                    if cancel:
                        found = self._waiting.get(key, set())
                        self._cancelled |= found
                        if not found:
                            logger.warning("cancel of id %s: no request of that id is waiting or running", key)
                        continue
                    number += 1
                    if key is not None:
                        self._waiting.setdefault(key, set()).add(number)
                self._lines.put((number, key, line))
        except Exception:  # noqa: BLE001 (unreadable input: serve what was read, then stop)
            logger.exception("reading the requests failed; answering those read so far")
        finally:
            self.input_ended.set()
            self._lines.put(None)

    def next_line(self) -> Optional[Tuple[int, Optional[str], str]]:
        """The next request's (number, id, line), waiting for it; None once the input has ended."""
        return self._lines.get()

    def is_cancelled(self, number: int) -> bool:
        with self._lock:
            return number in self._cancelled

    def answered(self, number: int, key: Optional[str]) -> None:
        """Request `number` is answered: a later cancel of its id no longer reaches it."""
        with self._lock:
            self._cancelled.discard(number)
            if key is not None:
                self._waiting[key].discard(number)
                if not self._waiting[key]:
                    del self._waiting[key]


class Server:
    """A warm editor answering request lines in order, on the calling thread, while a `RequestReader`'s
    thread reads them: a cancel line, `{"op": "cancel", "id": X}`, reaches request X while it waits or runs.
    A cancel line gets no answer of its own; the request it cancels is answered `cancelled: ...`. A cancel
    for no waiting or running request is logged and does nothing (it cancels no later request of that id).
    With `prune_to` (bytes), the editor's LoRA cache is pruned to it after each request served, least
    recently used first (`fastdrag.cache_usage.prune`): a long-running server's disk does not fill."""

    def __init__(self, editor: DragEditor, requests: IO[str], answers: IO[str], defaults: Optional[Dict[str, Any]] = None,
                 progress_json: bool = False, prune_to: Optional[int] = None):
        self.editor, self.answers = editor, answers
        self.defaults, self.progress_json, self.prune_to = defaults or {}, progress_json, prune_to
        self.reader = RequestReader(requests)

    def run(self) -> int:
        """Answer every request line until the input ends; return how many were answered with an error."""
        reading = self.reader.start()
        failed = 0
        while (item := self.reader.next_line()) is not None:
            number, key, line = item
            reply = answer(self.editor, line, self.defaults, self.progress_json,
                           functools.partial(self.reader.is_cancelled, number))
            self.reader.answered(number, key)
            failed += "error" in reply
            self.answers.write(json.dumps(reply) + "\n")
            self.answers.flush()
            if self.prune_to is not None and "error" not in reply:
                self._prune()
        reading.join()  # it has put its last line: gone before the caller goes on (or the process exits)
        return failed

    def _prune(self) -> None:
        """Prune the LoRA cache; a prune that fails (a file it may not remove) is logged, and serving goes on."""
        from .cache_usage import human, prune

        try:
            removed = prune(self.editor.cache.directory, self.prune_to)
        except OSError as exc:
            logger.warning("pruning the LoRA cache at %s failed: %s", self.editor.cache.directory, exc)
            return
        if removed:
            logger.info("LoRA cache pruned to %s: removed %d (%s), least recently used first", human(self.prune_to),
                        len(removed), human(sum(entry.size for entry in removed)))


def serve(editor: DragEditor, requests: IO[str], answers: IO[str], defaults: Optional[Dict[str, Any]] = None,
          progress_json: bool = False, prune_to: Optional[int] = None) -> int:
    """Answer each request line of `requests` on `answers`, in order, until the input ends (blank lines are
    skipped; cancel lines and `prune_to` are `Server`'s); return how many were answered with an error."""
    return Server(editor, requests, answers, defaults, progress_json, prune_to).run()
