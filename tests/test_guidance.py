"""`guidance_scale` (`fastdrag.guidance`): classifier-free guidance of inversion and denoising, as DragDiffusion's
pipeline computes it; at the default of 1 nothing changes."""
import numpy as np
import pytest
import torch

from fastdrag.config import DenoiseConfig, EditConfig
from fastdrag.ddim import DdimSchedule, ddim_inversion_step, ddim_step
from fastdrag.denoise import denoise_pair
from fastdrag.denoiser import TorchDenoiser
from fastdrag.errors import ConfigError
from fastdrag.guidance import guided_noise
from fastdrag.inversion import invert
from fastdrag.vae import encode_prompt


class CountingDenoiser:
    """A denoiser that counts its calls and their batches, optionally taking fixed batches (as the exported graphs)."""

    def __init__(self, inner, fixed_batch=False):
        self.inner, self.fixed_batch, self.batches = inner, fixed_batch, []

    def __call__(self, latents, timestep, text):
        self.batches.append(latents.shape[0])
        return self.inner(latents, timestep, text)

    def reference_control(self, *args, **kwargs):
        return self.inner.reference_control(*args, **kwargs)


@pytest.fixture()
def case(tiny):
    """Fresh random latents (not square), the prompt's and the empty prompt's embeddings, and a schedule."""
    generator = torch.Generator().manual_seed(21)
    latents = torch.randn(1, 4, 8, 10, generator=generator)
    text = encode_prompt(tiny.tokenizer, tiny.text_encoder, "a photo of a cat")
    uncond = encode_prompt(tiny.tokenizer, tiny.text_encoder, "")
    schedule = DdimSchedule.from_scheduler(tiny.scheduler, 10, 7)
    return latents, text, uncond, schedule


def test_guided_noise_is_the_unconditional_noise_moved_by_the_scale_in_one_call_or_two(tiny, case):
    latents, text, uncond, _ = case
    x = torch.cat([latents, latents + 0.3])
    texts, unconds = text.expand(2, -1, -1), uncond.expand(2, -1, -1)
    plain = TorchDenoiser(tiny.unet)
    with torch.no_grad():
        eps_text, eps_uncond = plain(x, 500, texts), plain(x, 500, unconds)
        batched, fixed = CountingDenoiser(plain), CountingDenoiser(plain, fixed_batch=True)
        got = guided_noise(batched, x, 500, texts, unconds, 4.5)
        got_fixed = guided_noise(fixed, x, 500, texts, unconds, 4.5)
        unguided = guided_noise(batched, x, 500, texts, unconds, 1.0)
    expected = eps_uncond + 4.5 * (eps_text - eps_uncond)
    assert (eps_text - eps_uncond).abs().max() > 1e-3  # the prompt matters to this UNet
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_fixed, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unguided, eps_text, rtol=1e-5, atol=1e-5)
    assert batched.batches == [4, 2] and fixed.batches == [2, 2]  # scale 1: one call on the prompt alone


def test_guided_inversion_is_dragdiffusions_loop(tiny, case):
    """DragDiffusion's inversion with guidance, written plainly: both halves in one batch, split, combined."""
    latents, text, uncond, schedule = case
    with torch.no_grad():
        got = invert(TorchDenoiser(tiny.unet), latents, text, schedule, progress=False, unconditional=uncond,
                     guidance_scale=3.0)
        plain = invert(TorchDenoiser(tiny.unet), latents, text, schedule, progress=False)
        x = latents
        for t in schedule.inversion_timesteps:
            eps = tiny.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, text])).sample
            eps_uncond, eps_text = eps.chunk(2)
            x = ddim_inversion_step(schedule, x, eps_uncond + 3.0 * (eps_text - eps_uncond), t)
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got).all() and (got - plain).abs().max() > 1e-3


@pytest.mark.parametrize("start_step", [0, 3])
def test_a_guided_pair_attends_to_its_own_source_row_batched_or_in_two_calls(tiny, case, start_step):
    """The batch of 4 (`[uncond source, uncond edited, source, edited]`) under the K/V swap equals the two
    pairs run apart, as the exported graphs run them, and each pair's rows attend to their own source."""
    latents, text, uncond, schedule = case
    edited = latents + 0.2 * torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
    config = DenoiseConfig(start_step=start_step)
    with torch.no_grad():
        batched = CountingDenoiser(TorchDenoiser(tiny.unet))
        got = denoise_pair(batched, latents, edited, text, schedule, config, progress=False, unconditional=uncond,
                           guidance_scale=2.5)
        apart = denoise_pair(CountingDenoiser(TorchDenoiser(tiny.unet), fixed_batch=True), latents, edited, text,
                             schedule, config, progress=False, unconditional=uncond, guidance_scale=2.5)
        # the swap itself, written plainly for the last steps: a step of the source row alone is the pair's
        # source row (it attends to itself), so the guided source branch is plain guided denoising
        x = latents
        denoiser = TorchDenoiser(tiny.unet)
        for t in schedule.denoise_timesteps:
            x = ddim_step(schedule, x, guided_noise(denoiser, x, t, text, uncond, 2.5), t)
    assert set(batched.batches) == {4}
    torch.testing.assert_close(got, apart, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[:1], x, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got).all()


def test_an_edit_with_guidance_differs_keeps_its_own_inversion_and_is_refused_where_it_cannot_run(
        editor, picture, fast, tmp_path):
    plain = editor.edit(picture.image, picture.prompt, picture.points, **fast)
    guided = editor.edit(picture.image, picture.prompt, picture.points, guidance_scale=4.0, **fast)
    assert guided.config.inversion.guidance_scale == 4.0 and guided.lora_cached
    assert len(editor._inversions) == 2  # not the unguided one's inversion
    difference = np.abs(np.asarray(guided.image).astype(int) - np.asarray(plain.image).astype(int))
    assert difference.mean() > 0.5
    again = editor.edit(picture.image, picture.prompt, picture.points, **fast)  # the unguided inversion, kept
    assert np.array_equal(np.asarray(again.image), np.asarray(plain.image))
    with pytest.raises(ConfigError, match="keep_source_kv"):
        EditConfig().replace(guidance_scale=2.0, keep_source_kv=True)
    with pytest.raises(ConfigError, match="guidance_scale must be >= 0"):
        EditConfig().replace(guidance_scale=-1.0)
    with pytest.raises(ConfigError, match="guidance_scale 1"):
        editor.export(picture.image, picture.prompt, tmp_path / "export", guidance_scale=2.0, **fast)
    assert not (tmp_path / "export").exists()
