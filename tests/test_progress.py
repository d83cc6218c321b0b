"""An edit's `on_step` callback: every looped stage reports its steps, and an exception from the
callback stops the edit and leaves the editor as a fresh one would be for the next edit."""
from __future__ import annotations

import numpy as np
import pytest

from fastdrag import EditCancelled
from fastdrag.progress import Progress, as_progress


def _runs(calls):
    """[(stage, [done, ...]), ...] in the order the stages reported."""
    runs = []
    for stage, done, total in calls:
        if not runs or runs[-1][0] != stage:
            runs.append((stage, []))
        runs[-1][1].append((done, total))
    return runs


def test_steps_report_before_the_first_and_after_each_step_and_stop_with_the_loop():
    calls = []
    ran = []
    for index in Progress(bar=False, on_step=lambda *call: calls.append(call)).steps("drag", 5):
        if index == 3:
            break  # as the drag loop stops once the handles arrive
        ran.append(index)
    assert ran == [0, 1, 2]
    assert calls == [("drag", 0, 5), ("drag", 1, 5), ("drag", 2, 5), ("drag", 3, 5)]

    def refuse(stage, done, total):
        if done == 0:
            raise EditCancelled(stage)

    ran.clear()
    with pytest.raises(EditCancelled):
        for index in Progress(bar=False, on_step=refuse).steps("lora", 4):
            ran.append(index)
    assert ran == []  # cancelled before the first step ran
    assert as_progress(False) == Progress(bar=False) and as_progress(True).bar
    assert as_progress(Progress(False, refuse)).on_step is refuse


def test_an_edit_reports_each_looped_stage_in_order_and_a_repeated_edit_only_what_it_runs(editor, picture, fast):
    calls = []
    result = editor.edit(picture.image, picture.prompt, picture.points, mask=picture.mask,
                         on_step=lambda *call: calls.append(call), **fast)
    runs = _runs(calls)
    assert [stage for stage, _ in runs] == ["lora", "inversion", "drag", "denoise"]
    inversion_steps = round(fast["num_inference_steps"] * fast["inversion_strength"])
    totals = {"lora": fast["lora_steps"], "inversion": inversion_steps, "drag": fast["drag_steps"],
              "denoise": inversion_steps}
    for stage, reports in runs:
        done = [d for d, _ in reports]
        assert {t for _, t in reports} == {totals[stage]}
        assert done == list(range(len(done)))  # 0, then one report per step, in order
        if stage == "drag":  # stops once the host sees every handle arrive
            assert result.drag_steps <= done[-1] <= totals[stage]
        else:
            assert done[-1] == totals[stage]

    calls.clear()
    moved = [((x + 3, y), target) for (x, y), target in picture.points]
    again = editor.edit(picture.image, picture.prompt, moved, mask=picture.mask,
                        on_step=lambda *call: calls.append(call), **fast)
    assert again.lora_cached and [stage for stage, _ in _runs(calls)] == ["drag", "denoise"]
    calls.clear()
    editor.edit(picture.image, picture.prompt, moved, mask=picture.mask, **fast)  # no callback: none called
    assert calls == []
    key, cached = editor.train_lora(picture.image, "another prompt", on_step=lambda *call: calls.append(call),
                                    lora_steps=fast["lora_steps"])
    assert not cached and _runs(calls) == [("lora", [(d, fast["lora_steps"]) for d in range(fast["lora_steps"] + 1)])]


def _cancel_at(stage, step, exception=EditCancelled):
    def on_step(name, done, total):
        if name == stage and done == step:
            raise exception(f"stopped in {name} after {done} of {total} steps")
    return on_step


def _adapters(editor):
    return sorted(path.name for path in editor.cache.directory.rglob("*.safetensors"))


@pytest.mark.parametrize("stage,settings,exception", [
    ("lora", {}, EditCancelled),
    ("inversion", {}, KeyboardInterrupt),
    ("drag", {}, EditCancelled),
    ("denoise", {"keep_source_kv": True}, EditCancelled),  # a recording of the source's keys and values cut short
])
def test_an_edit_stopped_in_any_stage_leaves_the_editor_as_a_fresh_one(editor, picture, tmp_path, fast, stage,
                                                                        settings, exception):
    """Stopped mid-stage on a new image, and again on a repeated edit (new points, the same image), the
    editor's next edits are a fresh editor's, byte for byte; a LoRA stopped mid-training is not cached."""
    from fastdrag import DragEditor

    options = dict(fast, **settings)
    other = (np.random.default_rng(8).random((64, 64, 3)) * 255).astype(np.uint8)
    moved = [((x + 3, y), target) for (x, y), target in picture.points]
    editor.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, **options)  # a warm editor
    cached_before = _adapters(editor)

    with pytest.raises(exception):
        editor.edit(other, "another prompt", picture.points, mask=picture.mask, on_step=_cancel_at(stage, 2, exception),
                    **options)
    if stage == "lora":
        assert _adapters(editor) == cached_before  # the half-trained adapter is not kept
    else:
        assert len(_adapters(editor)) == len(cached_before) + 1  # the finished LoRA stage's adapter is
    resumed = editor.edit(other, "another prompt", picture.points, mask=picture.mask, **options)

    fresh = DragEditor(editor.components, editor.device, editor.dtype, cache_dir=tmp_path / "fresh", progress=False)
    expected = fresh.edit(other, "another prompt", picture.points, mask=picture.mask, **options)
    assert np.asarray(resumed.image).tobytes() == np.asarray(expected.image).tobytes()
    assert resumed.handles == expected.handles and resumed.drag_steps == expected.drag_steps

    if stage in ("drag", "denoise"):  # the stages a repeated edit runs
        with pytest.raises(exception):
            editor.edit(other, "another prompt", moved, mask=picture.mask, on_step=_cancel_at(stage, 2, exception), **options)
        repeated = editor.edit(other, "another prompt", moved, mask=picture.mask, **options)
        expected = fresh.edit(other, "another prompt", moved, mask=picture.mask, **options)
        assert np.asarray(repeated.image).tobytes() == np.asarray(expected.image).tobytes()
        assert repeated.handles == expected.handles


def test_a_callback_that_calls_the_editor_is_refused_and_the_editor_stays_usable(editor, picture, tmp_path, fast):
    """The lock is re-entrant for the editor's own calls, so without the guard a callback's `release()`
    or `edit()` would change the running edit's state under it."""
    from fastdrag import DragEditor

    def meddle(stage, done, total):
        if stage == "drag" and done == 1:
            editor.release()

    with pytest.raises(RuntimeError, match="on_step callback called DragEditor.release"):
        editor.edit(picture.image, picture.prompt, picture.points, on_step=meddle, **fast)
    after = editor.edit(picture.image, picture.prompt, picture.points, **fast)
    fresh = DragEditor(editor.components, editor.device, editor.dtype, cache_dir=tmp_path / "fresh", progress=False)
    expected = fresh.edit(picture.image, picture.prompt, picture.points, **fast)
    assert np.asarray(after.image).tobytes() == np.asarray(expected.image).tobytes()


def test_another_thread_calling_the_editor_during_a_callback_waits_its_turn(editor, picture, fast):
    """Only the edit's own thread is refused: another thread's call waits for the edit, as without a callback."""
    import threading
    import time

    outcome = {}

    def other_thread():
        try:
            outcome["text"] = editor.text_embeddings("another prompt")
        except Exception as exc:  # noqa: BLE001 - what the other thread met is the test's subject
            outcome["error"] = exc

    worker = threading.Thread(target=other_thread)

    def on_step(stage, done, total):
        if stage == "drag" and done == 1:
            worker.start()
            time.sleep(0.3)  # the other thread reaches the editor while this callback runs

    editor.edit(picture.image, picture.prompt, picture.points, on_step=on_step, **fast)
    worker.join(timeout=60)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["text"].shape[:2] == (1, 77)


def test_an_export_reports_its_lora_stage(editor, picture, fast, tmp_path, monkeypatch):
    from fastdrag.export import pipeline

    monkeypatch.setattr(pipeline, "export_loaded", lambda *args, **kwargs: "exported")  # the graphs: not this test's
    calls = []
    assert editor.export(picture.image, picture.prompt, tmp_path / "out", on_step=lambda *call: calls.append(call),
                         lora_steps=fast["lora_steps"]) == "exported"
    assert _runs(calls) == [("lora", [(d, fast["lora_steps"]) for d in range(fast["lora_steps"] + 1)])]
