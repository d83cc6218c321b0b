"""Kept source keys and values (`fastdrag.source_kv`): a repeated edit denoises the edited branch alone."""
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention

from fastdrag.attention import ReferenceAttnProcessor
from fastdrag.config import DenoiseConfig
from fastdrag.ddim import DdimSchedule
from fastdrag.denoise import denoise_edited, denoise_pair
from fastdrag.denoiser import TorchDenoiser
from fastdrag.source_kv import SourceKV


def make_attention(seed=0, dim=40, heads=5):
    torch.manual_seed(seed)
    return Attention(query_dim=dim, heads=heads, dim_head=dim // heads).eval()


def test_a_recorded_step_gives_the_edited_rows_what_the_pair_gave_them():
    attn = make_attention()
    store = SourceKV()
    steps = [(torch.randn(1, 23, 40), torch.randn(1, 23, 40)) for _ in range(3)]
    store.begin(torch.zeros(2, 4, 5, 3), steps=3, start_layer=0, recording=True)
    recorder = ReferenceAttnProcessor(source_kv=store, name="layer")
    pair_outputs = []
    with torch.no_grad():
        for index, (source, edited) in enumerate(steps):
            store.set_step(index)
            pair = torch.cat([source, edited])
            out = recorder(attn, pair)
            assert torch.equal(out, ReferenceAttnProcessor()(attn, pair))  # recording changes nothing
            pair_outputs.append(out)
        store.finish("key")
        assert store.holds("key") and not store.holds("other")
        store.begin(torch.zeros(1, 4, 5, 3), steps=3, start_layer=0, recording=False)
        reader = ReferenceAttnProcessor(source_kv=store, name="layer")
        for index in (2, 0, 1):  # any order: each step reads its own row
            store.set_step(index)
            edited_alone = reader(attn, steps[index][1])
            torch.testing.assert_close(edited_alone, pair_outputs[index][1:], rtol=1e-5, atol=1e-6)
        store.set_step(1)  # another step's keys give another answer: the rows are not all alike
        assert not torch.allclose(reader(attn, steps[2][1]), pair_outputs[2][1:], atol=1e-3)


def test_kept_rows_of_the_wrong_shape_or_an_unrecorded_layer_are_refused():
    attn = make_attention(1)
    store = SourceKV()
    store.begin(torch.zeros(2, 4, 5, 3), steps=1, start_layer=0, recording=True)
    store.set_step(0)
    with torch.no_grad():
        ReferenceAttnProcessor(source_kv=store, name="a")(attn, torch.randn(2, 7, 40))
        store.finish("key")
        store.begin(torch.zeros(1, 4, 5, 3), steps=1, start_layer=0, recording=False)
        with pytest.raises(ValueError, match="do not fit"):
            ReferenceAttnProcessor(source_kv=store, name="a")(attn, torch.randn(1, 9, 40))
        with pytest.raises(RuntimeError, match="no keys and values were recorded for layer b"):
            ReferenceAttnProcessor(source_kv=store, name="b")(attn, torch.randn(1, 7, 40))


def test_reading_needs_a_complete_recording_of_the_same_layout():
    store = SourceKV()
    with pytest.raises(RuntimeError, match="no complete recording"):
        store.begin(torch.zeros(1, 4, 5, 3), steps=2, start_layer=0, recording=False)
    store.begin(torch.zeros(2, 4, 5, 3), steps=2, start_layer=0, recording=True)
    store.finish("key")
    with pytest.raises(RuntimeError, match="no complete recording"):  # another latent size
        store.begin(torch.zeros(1, 4, 6, 3), steps=2, start_layer=0, recording=False)
    with pytest.raises(RuntimeError, match="no complete recording"):  # two edited rows for one recorded pair
        store.begin(torch.zeros(2, 4, 5, 3), steps=2, start_layer=0, recording=False)
    store.begin(torch.zeros(1, 4, 5, 3), steps=2, start_layer=0, recording=False)  # the recorded layout
    store.forget()
    with pytest.raises(RuntimeError, match="no complete recording"):
        store.begin(torch.zeros(1, 4, 5, 3), steps=2, start_layer=0, recording=False)


def _batch_sizes(unet):
    sizes = []
    handle = unet.register_forward_pre_hook(lambda module, args, kwargs: sizes.append(args[0].shape[0]),
                                            with_kwargs=True)
    return sizes, handle


@pytest.mark.parametrize("start_step", [0, 3])
def test_denoising_the_edited_branch_alone_matches_the_pair(tiny, start_step):
    """Latents of a size no power of two (10 x 6), the tiny UNet with its own weights, fp32: the kept
    keys and values give the pair's edited row, and every forward of the repeat runs one row."""
    unet = tiny.unet
    denoiser = TorchDenoiser(unet)
    schedule = DdimSchedule.from_scheduler(tiny.scheduler, 10, 7)
    config = DenoiseConfig(start_step=start_step)
    generator = torch.Generator().manual_seed(5)
    source, edited = (torch.randn(1, 4, 10, 6, generator=generator) for _ in range(2))
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    store = SourceKV()
    plain = denoise_pair(denoiser, source, edited, text, schedule, config, progress=False)
    recorded = denoise_pair(denoiser, source, edited, text, schedule, config, progress=False, record=store,
                            record_key="image")
    assert torch.equal(recorded, plain) and torch.isfinite(plain).all()
    assert store.holds("image") and len(store.slots) == 6  # transformer blocks 10-15
    swapped = len(schedule.denoise_timesteps) - start_step
    assert all(keys.shape[0] == swapped for keys, _ in store.slots.values())
    sizes, handle = _batch_sizes(unet)
    try:
        alone = denoise_edited(denoiser, edited, text, schedule, config, store, progress=False)
    finally:
        handle.remove()
    assert sizes == [1] * len(schedule.denoise_timesteps)
    torch.testing.assert_close(alone, plain[1:], rtol=1e-5, atol=1e-5)
    # the keys matter: another edited latent moves away from the pair's edited row
    other = denoise_edited(denoiser, source, text, schedule, config, store, progress=False)
    assert not torch.allclose(other, plain[1:], atol=1e-2)


def test_a_denoiser_that_cannot_keep_keys_and_values_is_refused(tiny):
    class Exported:  # an exported graph: the swap is inside the batch-2 graph
        def __call__(self, latents, timestep, text):
            return latents

    schedule = DdimSchedule.from_scheduler(tiny.scheduler, 10, 7)
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="cannot keep the source branch's keys and values"):
        denoise_pair(Exported(), x, x, torch.randn(1, 77, 32), schedule, DenoiseConfig(), progress=False,
                     record=SourceKV(), record_key="k")


def _bytes(result):
    return np.asarray(result.image).tobytes()


def test_a_repeated_edit_denoises_one_branch_and_gives_the_same_image(editor, picture, fast, tmp_path, monkeypatch):
    from fastdrag import DragEditor
    from fastdrag import editor as editor_module

    plain = DragEditor(editor.components, editor.device, editor.dtype, cache_dir=tmp_path / "plain", progress=False)
    kept = dict(fast, keep_source_kv=True)
    first = editor.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, **kept)
    assert _bytes(first) == _bytes(plain.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, **fast))
    assert editor._source_kv.nbytes > 0
    calls = []
    monkeypatch.setattr(editor_module, "denoise_edited",
                        lambda *args, **kwargs: calls.append(1) or denoise_edited(*args, **kwargs))
    moved = [((hx + 4, hy - 2), (tx - 3, ty)) for (hx, hy), (tx, ty) in picture.points]
    repeated = editor.edit(picture.image, picture.prompt, moved, mask=picture.mask, **kept)
    assert calls == [1] and repeated.lora_cached
    expected = plain.edit(picture.image, picture.prompt, moved, mask=picture.mask, **fast)
    assert np.abs(np.asarray(repeated.image, dtype=int) - np.asarray(expected.image, dtype=int)).max() <= 1
    assert _bytes(repeated) != _bytes(first)  # the new points were dragged, not the first edit returned

    # what the keys and values came from changes: recorded again, not read
    editor.edit(picture.image, picture.prompt, moved, mask=picture.mask, start_layer=12, **kept)
    editor.edit(picture.image, "another prompt", moved, mask=picture.mask, start_layer=12, **kept)
    assert calls == [1]
    editor.edit(picture.image, "another prompt", picture.points, mask=picture.mask, start_layer=12, **kept)
    assert calls == [1, 1]

    editor.edit(picture.image, "another prompt", picture.points, mask=picture.mask, **fast)  # option off
    assert editor._source_kv.nbytes == 0 and calls == [1, 1]
    editor.edit(picture.image, "another prompt", picture.points, mask=picture.mask, **kept)
    assert editor._source_kv.nbytes > 0
    editor.release()
    assert editor._source_kv.nbytes == 0


def test_warm_up_with_kept_keys_and_values_forgets_them(editor, fast):
    editor.warm_up(keep_source_kv=True, num_inference_steps=fast["num_inference_steps"])
    assert editor._source_kv.nbytes > 0 and editor._source_kv.valid_for is None  # slots kept, warm-up forgotten
