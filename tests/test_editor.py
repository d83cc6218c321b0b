import gc
import weakref

import numpy as np
import pytest

from fastdrag.errors import ConfigError, InputError


def test_edit_returns_image_handles_timings_and_config(editor, picture, fast):
    result = editor.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, **fast)
    assert result.image.size == picture.image.size and result.image.mode == "RGB"
    assert len(result.handles) == 1 and all(0 <= v <= 64 for v in result.handles[0])
    assert set(result.timings) >= {"lora", "inversion", "drag", "denoise", "vae_decode", "total"}
    assert result.config.drag.drag_steps == fast["drag_steps"] and result.config.lora.lora_steps == fast["lora_steps"]
    assert not result.lora_cached
    again = editor.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, **fast)
    assert again.lora_cached


def test_a_lora_cache_that_cannot_be_written_costs_the_cache_not_the_edit(editor, picture, fast, monkeypatch, caplog):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(editor.cache, "save", disk_full)
    with caplog.at_level("WARNING", logger="fastdrag.editor"):
        result = editor.edit(picture.image, picture.prompt, picture.points, **fast)
    assert result.image.size == picture.image.size and not result.lora_cached
    assert "could not be cached" in caplog.text and "No space left on device" in caplog.text
    monkeypatch.undo()
    again = editor.edit(picture.image, picture.prompt, picture.points, **fast)
    assert not again.lora_cached  # nothing was cached: trained again, and cached now
    assert np.asarray(again.image).tobytes() == np.asarray(result.image).tobytes()
    assert editor.edit(picture.image, picture.prompt, picture.points, **fast).lora_cached


def test_a_damaged_cached_lora_is_trained_again_and_replaced(editor, picture, fast, caplog):
    first = editor.edit(picture.image, picture.prompt, picture.points, **fast)
    [cached] = list(editor.cache.directory.glob("*.safetensors"))
    cached.write_bytes(cached.read_bytes()[:100])  # cut short, as a crash or a full disk leaves it
    editor.release()  # forget the adapter in the UNet: the next edit reads the cache
    with caplog.at_level("WARNING", logger="fastdrag.lora"):
        again = editor.edit(picture.image, picture.prompt, picture.points, **fast)
    assert "is unreadable" in caplog.text and not again.lora_cached
    assert np.asarray(again.image).tobytes() == np.asarray(first.image).tobytes()
    assert editor.cache.load(cached.stem) is not None  # replaced by a whole one


def test_same_seed_gives_the_same_bytes(editor, picture, tmp_path, fast):
    from fastdrag import DragEditor

    first = editor.edit(picture.image, picture.prompt, picture.points, **fast)
    fresh = DragEditor(editor.components, editor.device, editor.dtype, cache_dir=tmp_path / "other", progress=False)
    second = fresh.edit(picture.image, picture.prompt, picture.points, **fast)
    assert not second.lora_cached  # trained again from scratch, not read back
    assert np.asarray(first.image).tobytes() == np.asarray(second.image).tobytes()
    other_seed = fresh.edit(picture.image, picture.prompt, picture.points, seed=7, **fast)
    assert np.asarray(other_seed.image).tobytes() != np.asarray(first.image).tobytes()


def test_cuda_only_memory_options_change_nothing_on_the_cpu(editor, picture, tmp_path, fast):
    """`cuda_graph_vae` and `release_cached_memory` are CUDA-only: on the CPU the edit runs eagerly, the
    same bytes, and no VAE graph or pool is made (tests/test_gpu.py checks them on a GPU)."""
    from fastdrag import DragEditor

    plain = editor.edit(picture.image, picture.prompt, picture.points, cuda_graph_vae=False, **fast)
    other = DragEditor(editor.components, editor.device, editor.dtype, cache_dir=tmp_path / "other", progress=False,
                       release_cached_memory=True)
    asked = other.edit(picture.image, picture.prompt, picture.points, **fast)  # cuda_graph_vae on by default
    assert asked.config.cuda_graph_vae and not plain.config.cuda_graph_vae
    assert np.asarray(asked.image).tobytes() == np.asarray(plain.image).tobytes()
    assert not other._vae_graphs.graphs and other._graph_pool is None


def test_odd_sized_image_comes_back_at_its_size(editor, fast):
    image = (np.random.default_rng(3).random((50, 70, 3)) * 255).astype(np.uint8)
    result = editor.edit(image, "noise", [((30, 20), (45, 30))], **fast)
    assert result.image.size == (70, 50)


def test_bad_options_are_named(editor, picture, fast):
    with pytest.raises(ConfigError, match="start_layer 40 is past"):
        editor.edit(picture.image, picture.prompt, picture.points, start_layer=40, **fast)
    with pytest.raises(InputError, match="prompt must be a string"):
        editor.edit(picture.image, None, picture.points, **fast)
    with pytest.raises(InputError, match="half precision runs on CUDA only"):
        from fastdrag import DragEditor
        DragEditor.from_pretrained("tiny", device="cpu", dtype="fp16")


def test_repeated_edit_reuses_the_inversion_and_drag_loop_and_matches_a_fresh_one(editor, picture, tmp_path, fast, monkeypatch):
    from fastdrag import DragEditor, editor as editor_module

    calls = []
    real_invert = editor_module.invert
    monkeypatch.setattr(editor_module, "invert", lambda *a, **k: calls.append(1) or real_invert(*a, **k))
    editor.edit(picture.image, picture.prompt, picture.points, **fast)
    loop = editor._drag_loop
    moved = [((x + 3, y), target) for (x, y), target in picture.points]  # another drag on the same image
    again = editor.edit(picture.image, picture.prompt, moved, **fast)
    assert len(calls) == 1 and editor._drag_loop is loop  # the drag loop restarted, not rebuilt
    fresh = DragEditor(editor.components, editor.device, editor.dtype, cache_dir=tmp_path / "other", progress=False)
    reference = fresh.edit(picture.image, picture.prompt, moved, **fast)
    assert np.asarray(again.image).tobytes() == np.asarray(reference.image).tobytes()


def test_a_preloaded_image_edits_as_a_repeated_edit_does_and_as_a_fresh_editor_would(editor, picture, tmp_path, fast,
                                                                                    monkeypatch):
    """`preload` trains the LoRA and inverts before the points are known: the edit that follows runs the drag,
    the denoising and the decoding only, and its picture is a fresh editor's, byte for byte."""
    from fastdrag import DragEditor, editor as editor_module

    calls, stages = [], []
    real_invert = editor_module.invert
    monkeypatch.setattr(editor_module, "invert", lambda *a, **k: calls.append(1) or real_invert(*a, **k))
    seconds = editor.preload(picture.image, picture.prompt, on_step=lambda stage, done, total: stages.append(stage), **fast)
    assert {"lora", "inversion", "total"} <= set(seconds) and sorted(set(stages)) == ["inversion", "lora"]
    assert len(calls) == 1 and "drag" not in stages
    result = editor.edit(picture.image, picture.prompt, picture.points, mask=picture.mask,
                         on_step=lambda stage, done, total: stages.append(stage), **fast)
    assert len(calls) == 1 and result.lora_cached and "vae_encode" not in result.timings  # nothing of the image again
    inversion_steps = round(fast["num_inference_steps"] * fast["inversion_strength"])
    assert stages.count("lora") == fast["lora_steps"] + 1 and stages.count("inversion") == inversion_steps + 1
    assert "drag" in stages and "denoise" in stages  # the edit reported its own stages, not the preloaded ones
    fresh = DragEditor(editor.components, editor.device, editor.dtype, cache_dir=tmp_path / "other", progress=False)
    reference = fresh.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, **fast)
    assert np.asarray(result.image).tobytes() == np.asarray(reference.image).tobytes()
    assert result.handles == reference.handles
    with pytest.raises(ConfigError, match="drag_stepz"):
        editor.preload(picture.image, picture.prompt, drag_stepz=3)


def test_images_edited_in_turn_keep_their_inversions(editor, picture, tmp_path, fast, monkeypatch):
    """A server's users taking turns: each image's next edit skips its inversion (the most recent
    `INVERSIONS_KEPT`), and gives a fresh editor's image; an adapter trained again is inverted again."""
    from fastdrag import DragEditor, editor as editor_module

    calls = []
    real_invert = editor_module.invert
    monkeypatch.setattr(editor_module, "invert", lambda *a, **k: calls.append(1) or real_invert(*a, **k))
    others = [(np.random.default_rng(seed).random((64, 64, 3)) * 255).astype(np.uint8) for seed in (8, 9)]
    images = [picture.image, *others]
    edit = lambda image, **extra: editor.edit(image, picture.prompt, picture.points, mask=picture.mask,
                                              **dict(fast, **extra))
    first = [edit(image) for image in images[:2]]
    assert len(calls) == 2
    again = edit(images[0])  # after the other image's edit: its adapter loaded again, its inversion kept
    assert len(calls) == 2 and again.lora_cached
    assert np.asarray(again.image).tobytes() == np.asarray(first[0].image).tobytes()
    fresh = DragEditor(editor.components, editor.device, editor.dtype, cache_dir=tmp_path / "fresh", progress=False)
    moved = [((x + 3, y), target) for (x, y), target in picture.points]
    turned = editor.edit(images[1], picture.prompt, moved, mask=picture.mask, **fast)  # another drag, kept inversion
    assert len(calls) == 2
    expected = fresh.edit(images[1], picture.prompt, moved, mask=picture.mask, **fast)  # (inverts: counted)
    assert np.asarray(turned.image).tobytes() == np.asarray(expected.image).tobytes()

    calls.clear()
    editor.cache.path(again.lora_key).unlink()  # pruned from the cache: the next edit trains it again
    edit(images[1])
    assert len(calls) == 0
    edit(images[0])
    assert len(calls) == 1  # trained again: inverted again
    monkeypatch.setattr(editor, "INVERSIONS_KEPT", 2)
    edit(images[2])  # a third image pushes out the least recent one (images[1])
    assert len(calls) == 2 and len(editor._inversions) == 2
    edit(images[1])
    assert len(calls) == 3


def test_a_new_image_restarts_the_kept_trainer_and_drag_loop_and_matches_a_fresh_editor(editor, picture, tmp_path, fast):
    """A new adapter is trained and merged in place, so the LoRA trainer and the drag loop (with their
    CUDA graphs on a GPU) carry over to the next image of the same size; a new adapter rank, whose
    tensors are new, rebuilds them."""
    from fastdrag import DragEditor

    assert editor.config.keep_lora_trainer is True  # the default
    editor.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, **fast)
    trainer, loop = editor._lora_trainer, editor._drag_loop
    assert trainer is not None and loop is not None
    other = (np.random.default_rng(8).random((64, 64, 3)) * 255).astype(np.uint8)
    new_image = editor.edit(other, "another prompt", picture.points, mask=picture.mask, **fast)
    assert not new_image.lora_cached and editor._lora_trainer is trainer and editor._drag_loop is loop
    fresh = DragEditor(editor.components, editor.device, editor.dtype, cache_dir=tmp_path / "fresh", progress=False)
    expected = fresh.edit(other, "another prompt", picture.points, mask=picture.mask, **fast)
    assert np.asarray(new_image.image).tobytes() == np.asarray(expected.image).tobytes()
    kept = weakref.ref(trainer), weakref.ref(loop)
    del trainer, loop
    gc.disable()  # the old trainer and loop (their graphs and memory on a GPU) go at once, not at a collection
    try:
        editor.edit(other, "another prompt", picture.points, mask=picture.mask, lora_rank=8, **fast)
        assert [ref() for ref in kept] == [None, None]
    finally:
        gc.enable()
    assert editor._lora_trainer is not None and editor._drag_loop is not None
    editor.edit(other, "a third prompt", picture.points, mask=picture.mask, **dict(fast, keep_lora_trainer=False))
    assert editor._lora_trainer is None


def test_channels_last_weights_edit_like_contiguous_ones(picture, tmp_path, fast):
    import torch

    from fastdrag import DragEditor

    plain = DragEditor.from_pretrained("tiny", device="cpu", cache_dir=tmp_path / "a", progress=False)
    nhwc = DragEditor.from_pretrained("tiny", device="cpu", cache_dir=tmp_path / "b", progress=False, channels_last=True)
    def layouts(editor):  # of the kernels larger than 1x1 (for which both layouts are the same)
        return [m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous()
                for m in editor.components.unet.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]

    assert layouts(nhwc) and all(layouts(nhwc)) and not any(layouts(plain))
    first = plain.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, **fast)
    second = nhwc.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, **fast)
    difference = np.abs(np.asarray(first.image, dtype=np.float32) - np.asarray(second.image, dtype=np.float32))
    assert difference.max() <= 2, difference.max()
    np.testing.assert_allclose(second.handles, first.handles, rtol=0, atol=1.0)


def test_threads_sharing_an_editor_take_turns_and_get_their_own_edits(editor, picture, tmp_path, fast, monkeypatch):
    import threading
    import time

    from fastdrag import DragEditor, editor as editor_module

    active, most = [0], [0]
    real_run = editor_module.DragLoop.run

    def watched_run(*args, **kwargs):  # counts edits inside the drag stage at once
        active[0] += 1
        most[0] = max(most[0], active[0])
        time.sleep(0.05)  # widen the window another thread would need to slip in
        try:
            return real_run(*args, **kwargs)
        finally:
            active[0] -= 1

    monkeypatch.setattr(editor_module.DragLoop, "run", watched_run)
    results = {}

    def run(seed):
        results[seed] = editor.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, seed=seed, **fast)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert sorted(results) == [1, 2, 3] and most[0] == 1
    alone = DragEditor(editor.components, editor.device, editor.dtype, cache_dir=tmp_path / "alone", progress=False)
    for seed in (1, 2, 3):  # each thread got the edit of its own seed, as if it had run alone
        expected = alone.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, seed=seed, **fast)
        assert np.asarray(results[seed].image).tobytes() == np.asarray(expected.image).tobytes()


def test_warm_up_runs_every_stage_and_leaves_nothing_behind(editor, picture, tmp_path, fast):
    from fastdrag import DragEditor

    assert editor.warm_up(size=(96, 64))["drag"] > 0  # any size the model takes
    timings = editor.warm_up(**fast)  # the edit's settings below (its schedule: the drag loop's timestep)
    assert all(timings[stage] > 0 for stage in ("lora", "inversion", "drag", "denoise", "vae_decode"))
    assert not editor.cache.directory.exists() or not any(editor.cache.directory.iterdir())  # no LoRA cached
    trainer, loop = editor._lora_trainer, editor._drag_loop
    after = editor.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, **fast)
    assert not after.lora_cached
    # the warm-up's trainer and drag loop (their graphs, on a GPU) serve the edit, with its own step counts
    assert editor._lora_trainer is trainer and editor._drag_loop is loop and loop.config.drag_steps == fast["drag_steps"]
    fresh = DragEditor(editor.components, editor.device, editor.dtype, cache_dir=tmp_path / "fresh", progress=False)
    expected = fresh.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, **fast)
    assert np.asarray(after.image).tobytes() == np.asarray(expected.image).tobytes()


def test_release_drops_what_an_editor_keeps_and_the_next_edit_is_unchanged(editor, picture, tmp_path, fast):
    from fastdrag import DragEditor

    first = editor.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, **fast)
    assert editor._drag_loop is not None and editor._inversions
    editor.release()
    assert editor._drag_loop is None and not editor._inversions and not editor.denoiser.graphs
    again = editor.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, **fast)
    assert again.lora_cached  # from the cache on disk, which release() leaves alone
    assert np.asarray(again.image).tobytes() == np.asarray(first.image).tobytes()
    fresh = DragEditor(editor.components, editor.device, editor.dtype, cache_dir=tmp_path / "fresh", progress=False)
    expected = fresh.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, **fast)
    assert np.asarray(again.image).tobytes() == np.asarray(expected.image).tobytes()


def test_an_editor_keeps_the_two_most_recent_exported_denoisers(editor, picture, fast, monkeypatch, tmp_path):
    """Each exported denoiser (an ONNX Runtime session or TensorRT engine) holds a whole UNet, so a
    server editing many images must not keep one per image. The export itself is faked here (its
    own tests are in tests/test_export.py): the 'exported' denoiser is the PyTorch one."""
    from types import SimpleNamespace

    from fastdrag.export import pipeline, runtime

    loads = []

    def export_loaded(components, lora_key, *args, **kwargs):  # a manifest of graphs that hold this LoRA
        return SimpleNamespace(check_size=lambda w, h: None, data={"lora": {"key": lora_key}}, folder=tmp_path)

    monkeypatch.setattr(pipeline, "export_loaded", export_loaded)

    def load_denoiser(backend, manifest, overrides=None, device=None):
        loads.append((backend, device))  # the editor's device picks ONNX Runtime's GPU
        return editor.denoiser

    monkeypatch.setattr(runtime, "load_denoiser", load_denoiser)
    for seed in (1, 2, 1, 3, 1):  # a new seed is a new LoRA, so another exported denoiser
        editor.edit(picture.image, picture.prompt, picture.points, backend="onnxruntime", seed=seed, **fast)
        assert len(editor._graph_denoisers) <= 2
    assert loads == [("onnxruntime", editor.device)] * 3  # 3 displaced 2, the least recently used, so the last edit found 1 kept
    editor.release()
    assert not editor._graph_denoisers


def test_edit_runs_the_frozen_lora_merged_and_gives_the_unet_back_as_it_was(editor, picture, fast):
    """`merge_lora` (the default): inversion, drag and denoising run the LoRA folded into the weights,
    never its branch; the edit matches the unmerged one up to rounding, the UNet leaves it unchanged,
    and a switch of mode drops the graphs and loop captured in the other."""
    import torch

    from fastdrag.lora import lora_layers

    unet = editor.components.unet
    editor.edit(picture.image, picture.prompt, picture.points, **fast)  # trains and caches the adapter
    weights = {n: p.detach().clone() for n, p in unet.named_parameters()}
    branch_calls = []
    hooks = [layer.lora_A["fastdrag"].register_forward_hook(lambda *a: branch_calls.append(1))
             for layer in lora_layers(unet)]
    try:
        merged = editor.edit(picture.image, picture.prompt, picture.points, **fast)
        assert not branch_calls and merged.lora_cached
        loop = editor._drag_loop
        unmerged = editor.edit(picture.image, picture.prompt, picture.points, merge_lora=False, **fast)
        assert branch_calls and editor._drag_loop is not loop  # the other mode: its own loop
    finally:
        for hook in hooks:
            hook.remove()
    assert all(torch.equal(p, weights[n]) for n, p in unet.named_parameters())
    difference = np.abs(np.asarray(merged.image, dtype=np.float32) - np.asarray(unmerged.image, dtype=np.float32))
    assert difference.max() <= 2, difference.max()
    np.testing.assert_allclose(merged.handles, unmerged.handles, rtol=0, atol=0.5)


def test_an_editor_on_a_cuda_device_makes_it_current_while_it_works(monkeypatch):
    """Triton kernels, current streams and graph captures take the current device: an editor on
    `cuda:1` makes cuda:1 current for each call (checked with a recording stand-in: no GPU here)."""
    import threading

    import torch

    from fastdrag import editor as editor_module

    entered = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("left")

    monkeypatch.setattr(torch.cuda, "device", Recorder)

    class Holder:
        def __init__(self, device):
            self.device, self._lock, self._in_callback = torch.device(device), threading.RLock(), False

        @editor_module._one_at_a_time
        def work(self):
            return list(entered)

    assert Holder("cuda:1").work() == [torch.device("cuda", 1)] and entered[-1] == "left"
    entered.clear()
    assert Holder("cpu").work() == [] and entered == []


def test_lora_targets_that_cannot_carry_a_lora_are_named_and_a_failed_adapter_leaves_the_editor_working(
        editor, picture, fast, monkeypatch):
    """Bad targets are refused before the UNet changes; and when adding an adapter fails anyway (here peft
    itself, after a rank change deleted the old adapter), the next edit adds one afresh: diffusers had marked
    an adapter loaded, and every later edit failed with "no attribute 'peft_config'"."""
    import peft

    from fastdrag.errors import ConfigError

    first = editor.edit(picture.image, picture.prompt, picture.points, **fast)
    for targets, words in [(("nope",), "'nope' names no module"),
                           (("time_embedding",), "time_embedding, a TimestepEmbedding: LoRA targets must be linear"),
                           (("to_q", "to_out"), r"'to_out' names .*to_out, a ModuleList")]:
        with pytest.raises(ConfigError, match=words):
            editor.edit(picture.image, picture.prompt, picture.points, lora_targets=targets, **fast)

    def broken(*args, **kwargs):
        raise RuntimeError("peft failed")

    with monkeypatch.context() as patched:
        patched.setattr(peft, "inject_adapter_in_model", broken)
        with pytest.raises(RuntimeError, match="peft failed"):
            editor.edit(picture.image, picture.prompt, picture.points, lora_rank=8, **fast)
    again = editor.edit(picture.image, picture.prompt, picture.points, **fast)
    assert np.asarray(again.image).tobytes() == np.asarray(first.image).tobytes()


def test_a_backend_or_export_format_this_machine_cannot_run_is_refused_before_the_lora_trains(editor, picture, fast,
                                                                                              tmp_path):
    import importlib.util

    from fastdrag.errors import ConfigError, FastDragError

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    with pytest.raises(ConfigError, match="backend tensorrt cannot run here: not installed"):
        editor.edit(picture.image, picture.prompt, picture.points, backend="tensorrt", **fast)
    with pytest.raises(FastDragError, match="TensorRT is not installed"):
        editor.export(picture.image, picture.prompt, tmp_path / "export", fmt="tensorrt", **fast)
    assert not list(editor.cache.directory.rglob("*.safetensors"))  # no LoRA was trained for either
    assert not (tmp_path / "export").exists()
