import torch

from fastdrag.config import DragConfig
from fastdrag.ddim import DdimSchedule
from fastdrag.denoiser import TorchDenoiser
from fastdrag.drag import drag
from fastdrag.features import unet_with_features
from fastdrag.inputs import prepare_inputs
from fastdrag.inversion import invert
from fastdrag import kernels
from fastdrag.kernels.reference import bilinear, gather, resize, window_offsets
from fastdrag.vae import encode_posterior, encode_prompt
import pytest


@pytest.fixture()
def setting(tiny, picture):
    inputs = prepare_inputs(picture.image, picture.points, picture.mask)
    text = encode_prompt(tiny.tokenizer, tiny.text_encoder, picture.prompt)
    z0 = encode_posterior(tiny.vae, inputs.image).mean * tiny.scaling_factor
    schedule = DdimSchedule.from_scheduler(tiny.scheduler, 50, 35)
    z_t = invert(TorchDenoiser(tiny.unet), z0, text, schedule, progress=False)
    return inputs, text, schedule, z_t


def supervision_loss(tiny, latent, schedule, text, inputs, config):
    with torch.no_grad():
        _, feat = unet_with_features(tiny.unet, latent, schedule.drag_timestep, text, config.feature_block)
        return kernels.motion_supervision_loss(feat, inputs.handles, inputs.targets, config.r_m, inputs.sup_res).item()


def test_drag_lowers_the_loss_and_moves_handles_toward_targets(tiny, setting):
    inputs, text, schedule, z_t = setting
    config = DragConfig(drag_steps=40)
    result = drag(tiny.unet, z_t, schedule.drag_timestep, text, inputs.handles, inputs.targets, None, schedule,
                  config, inputs.sup_res, progress=False)
    assert result.latent.dtype == torch.float32 and torch.isfinite(result.latent).all()
    start = (inputs.targets - inputs.handles).norm(dim=-1)
    end = (inputs.targets - result.handles).norm(dim=-1)
    assert (end < start - 2).all(), (start, end)
    assert not any(p.grad is not None for p in tiny.unet.parameters())
    assert result.handles.device == z_t.device


def test_one_drag_step_lowers_the_motion_loss_against_its_anchor(tiny, setting):
    """After one Adam step, the features at q + d are closer to the step's stop-gradient anchor F_k[q]."""
    inputs, text, schedule, z_t = setting
    config = DragConfig(drag_steps=1)
    result = drag(tiny.unet, z_t, schedule.drag_timestep, text, inputs.handles, inputs.targets, None, schedule,
                  config, inputs.sup_res, progress=False)
    features = lambda z: resize(unet_with_features(tiny.unet, z, schedule.drag_timestep, text, 2)[1], inputs.sup_res)
    with torch.no_grad():
        before, after = features(z_t), features(result.latent)
    direction = (inputs.targets - inputs.handles) / (inputs.targets - inputs.handles).norm(dim=-1, keepdim=True)
    patch = inputs.handles.unsqueeze(1) + window_offsets(1, z_t.device).unsqueeze(0)
    anchor = gather(before, patch)
    shifted = patch + direction.unsqueeze(1)
    loss_before = (anchor - bilinear(before, shifted)).abs().mean()
    loss_after = (anchor - bilinear(after, shifted)).abs().mean()
    assert loss_after < loss_before, (loss_before, loss_after)
    assert result.losses[0].item() == pytest.approx(9 * loss_before.item(), rel=1e-4)


def test_mask_keeps_the_outside_closer_to_the_source(tiny, setting):
    inputs, text, schedule, z_t = setting
    config = DragConfig(drag_steps=15, lam=1.0, reach_distance=0.5)
    result = drag(tiny.unet, z_t, schedule.drag_timestep, text, inputs.handles, inputs.targets, inputs.mask, schedule,
                  config, inputs.sup_res, progress=False)
    mask = torch.nn.functional.interpolate(inputs.mask, size=z_t.shape[-2:], mode="nearest")[0, 0].bool()
    change = (result.latent - z_t).abs().mean(1)[0]
    assert change[mask].mean() > 3 * change[~mask].mean()


def test_early_stop_when_every_handle_arrived(tiny, setting):
    inputs, text, schedule, z_t = setting
    near = inputs.handles + torch.tensor([[1.0, 1.0]])
    result = drag(tiny.unet, z_t, schedule.drag_timestep, text, inputs.handles, near, None, schedule,
                  DragConfig(drag_steps=20), inputs.sup_res, progress=False)
    assert result.steps == 1 and torch.equal(result.latent, z_t.float())


def test_trainable_unet_is_refused(tiny, setting):
    inputs, text, schedule, z_t = setting
    tiny.unet.conv_out.weight.requires_grad_(True)
    try:
        with pytest.raises(RuntimeError, match="trainable"):
            drag(tiny.unet, z_t, schedule.drag_timestep, text, inputs.handles, inputs.targets, None, schedule,
                 DragConfig(drag_steps=2), inputs.sup_res, progress=False)
    finally:
        tiny.unet.conv_out.weight.requires_grad_(False)
