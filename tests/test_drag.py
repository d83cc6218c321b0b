import copy

import torch

from fastdrag.config import DragConfig
from fastdrag.ddim import DdimSchedule
from fastdrag.denoiser import TorchDenoiser
from fastdrag.drag import DragLoop, drag
from fastdrag.features import unet_with_features
from fastdrag.inputs import prepare_inputs
from fastdrag.inversion import invert
from fastdrag.lean_blocks import install_lean_blocks
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


def _another_drag(inputs, text, z_t):
    """A second drag of the same shapes as the setting's: new latent, text, points and mask."""
    generator = torch.Generator().manual_seed(7)
    height, width = inputs.sup_res
    z_t = z_t + 0.3 * torch.randn(z_t.shape, generator=generator)
    text = text + 0.1 * torch.randn(text.shape, generator=generator)
    handles = (inputs.handles + torch.tensor([2.0, -1.0])).clamp(min=0)
    handles = torch.minimum(handles, torch.tensor([width - 1.0, height - 1.0]))
    targets = handles + torch.tensor([-5.0, 4.0])
    mask = torch.roll(inputs.mask, shifts=(3, -2), dims=(-2, -1))
    return z_t, text, handles, targets, mask


def _same_result(a, b):
    return (torch.equal(a.latent, b.latent) and torch.equal(a.handles, b.handles) and a.steps == b.steps
            and torch.equal(a.losses, b.losses))


def _lean(unet):
    """A copy of `unet` with the lean blocks, whose resnets and attention take the drag's kept
    conditioning (`fastdrag.fixed_conditioning`)."""
    lean = copy.deepcopy(unet)
    install_lean_blocks(lean)
    return lean


@pytest.mark.parametrize("with_mask, blocks", [(True, "stock"), (False, "stock"), (True, "lean")])
def test_restarted_loop_drags_as_a_fresh_loop_would(tiny, setting, with_mask, blocks):
    """A loop restarted in place (what a repeated edit does) gives bit for bit what a new loop gives,
    after a drag that ran its steps and after one that stopped early (its 'arrived' flag set); with the
    lean blocks its kept text keys and values are refreshed for the new text."""
    inputs, text, schedule, z_t = setting
    unet = tiny.unet if blocks == "stock" else _lean(tiny.unet)
    config = DragConfig(drag_steps=8)
    z_b, text_b, handles_b, targets_b, mask_b = _another_drag(inputs, text, z_t)
    mask_a, mask_b = (inputs.mask, mask_b) if with_mask else (None, None)
    near = inputs.handles + torch.tensor([[1.0, 1.0]])

    def fresh(*drag_args):
        return DragLoop(unet, drag_args[0], schedule.drag_timestep, *drag_args[1:], schedule, config,
                        inputs.sup_res).run(progress=False)

    drag_a = (z_t, text, inputs.handles, inputs.targets, mask_a)
    drag_b = (z_b, text_b, handles_b, targets_b, mask_b)
    early = (z_t, text, inputs.handles, near, mask_a)
    loop = DragLoop(unet, z_t, schedule.drag_timestep, text, inputs.handles, inputs.targets, mask_a, schedule,
                    config, inputs.sup_res)
    first = loop.run(progress=False)
    assert _same_result(first, fresh(*drag_a))
    for drag_args in (drag_b, early, drag_b, drag_a):
        assert loop.fits(unet, drag_args[0], schedule.drag_timestep, drag_args[1], drag_args[2], drag_args[4],
                         schedule, config, inputs.sup_res)
        loop.restart(*drag_args)
        again = loop.run(progress=False)
        expected = fresh(*drag_args)
        assert _same_result(again, expected), (again.steps, expected.steps, (again.latent - expected.latent).abs().max())
    assert fresh(*early).steps == 1 and fresh(*drag_b).steps == 8 and not _same_result(fresh(*drag_b), first)


def test_a_loop_restarted_for_more_steps_drags_as_a_fresh_loop_of_that_many(tiny, setting):
    """What the editor does after `warm_up()`'s short drag: the loop (and on a GPU its graph) takes the
    edit's number of steps, and its losses have room for all of them."""
    inputs, text, schedule, z_t = setting
    t, far = schedule.drag_timestep, inputs.targets.clone()
    far[:, 1] = inputs.sup_res[0] - 1  # out of reach: every step runs
    loop = DragLoop(tiny.unet, z_t, t, text, inputs.handles, far, inputs.mask, schedule, DragConfig(drag_steps=2),
                    inputs.sup_res)
    assert loop.run(progress=False).steps == 2
    z_b, text_b, handles_b, _, mask_b = _another_drag(inputs, text, z_t)
    loop.restart(z_b, text_b, handles_b, far, mask_b, drag_steps=6)
    longer = loop.run(progress=False)
    expected = DragLoop(tiny.unet, z_b, t, text_b, handles_b, far, mask_b, schedule, DragConfig(drag_steps=6),
                        inputs.sup_res).run(progress=False)
    assert longer.steps == 6 and longer.losses.shape == (6,) and bool((longer.losses > 0).all())
    assert _same_result(longer, expected)
    loop.restart(z_t, text, inputs.handles, far, inputs.mask, drag_steps=3)
    assert loop.run(progress=False).steps == 3 and loop.config == DragConfig(drag_steps=3)


def _tensors(loop):
    """Every tensor a captured iteration reads or writes: the loop's own, the optimiser's state."""
    found = {name: value for name, value in vars(loop).items() if isinstance(value, torch.Tensor)}
    for state in loop.optimizer.state.values():
        found.update({f"adam.{key}": value for key, value in state.items()})
    found.update({f"fixed.{index}": value for index, value in enumerate(loop.fixed.values)})
    return found


def test_restart_refills_every_tensor_in_place(tiny, setting):
    """A CUDA graph reads its tensors by address, so a restart must not reallocate any of them."""
    inputs, text, schedule, z_t = setting
    config = DragConfig(drag_steps=3)
    loop = DragLoop(tiny.unet, z_t, schedule.drag_timestep, text, inputs.handles, inputs.targets, inputs.mask,
                    schedule, config, inputs.sup_res)
    loop.run(progress=False)
    before = {name: (tensor.data_ptr(), tensor.clone()) for name, tensor in _tensors(loop).items()}
    assert {"latent", "text", "handles", "targets", "mask", "x_prev0", "handle_feats", "adam.exp_avg"} <= set(before)
    z_b, text_b, handles_b, targets_b, mask_b = _another_drag(inputs, text, z_t)
    loop.restart(z_b, text_b, handles_b, targets_b, mask_b)
    after = _tensors(loop)
    assert set(after) == set(before)
    assert all(after[name].data_ptr() == pointer for name, (pointer, _) in before.items())
    changed = {name for name, (_, value) in before.items() if not torch.equal(after[name], value)}
    assert {"latent", "text", "handles", "targets", "mask", "x_prev0", "feat0", "handle_feats", "adam.exp_avg",
            "steps_run"} <= changed
    keys_and_values = {f"fixed.{index}" for index in range(len(loop.fixed.values))[-2 * len(loop.fixed.cross_attention):]}
    assert keys_and_values and keys_and_values <= changed  # of the new text
    assert loop.latent.requires_grad and torch.equal(loop.latent.detach(), z_b)


@pytest.mark.parametrize("with_mask", [True, False])
def test_a_restart_from_the_same_start_reuses_its_anchors(tiny, setting, with_mask):
    """A repeated edit drags the same z_t with the same text and weights: with `same_weights` the restart
    runs no UNet forward for F_0 and x_prev_0 and drags bit for bit as a fresh loop would. A z_t changed
    in place, another z_t, or no `same_weights` runs it again."""
    inputs, text, schedule, z_t = setting
    mask = inputs.mask if with_mask else None
    t, config = schedule.drag_timestep, DragConfig(drag_steps=4)
    z_t, text = z_t.clone(), text.clone()
    loop = DragLoop(tiny.unet, z_t, t, text, inputs.handles, inputs.targets, mask, schedule, config, inputs.sup_res)
    loop.run(progress=False)
    forwards = []
    hook = tiny.unet.register_forward_pre_hook(lambda *args: forwards.append(1))
    try:
        moved = inputs.handles + torch.tensor([[2.0, -1.0]])
        loop.restart(z_t, text, moved, inputs.targets, mask, same_weights=True)
        assert forwards == []  # the anchors are the last start's
        again = loop.run(progress=False)
        forwards.clear()
        expected = DragLoop(tiny.unet, z_t, t, text, moved, inputs.targets, mask, schedule, config,
                            inputs.sup_res).run(progress=False)
        assert _same_result(again, expected)
        for changed_start in ("in place", "other tensor", "weights not said to be the same"):
            forwards.clear()
            start = z_t
            if changed_start == "in place":
                z_t.mul_(1.0)  # the same values, but written: its version moves
            elif changed_start == "other tensor":
                start = z_t.clone()
            loop.restart(start, text, moved, inputs.targets, mask, same_weights=changed_start != "weights not said to be the same")
            assert len(forwards) == 1, changed_start
    finally:
        hook.remove()


def test_a_loop_fits_only_the_same_shapes_and_settings(tiny, setting):
    inputs, text, schedule, z_t = setting
    config = DragConfig(drag_steps=2)
    t = schedule.drag_timestep
    loop = DragLoop(tiny.unet, z_t, t, text, inputs.handles, inputs.targets, inputs.mask, schedule, config,
                    inputs.sup_res)
    z_b, text_b, handles_b, _, mask_b = _another_drag(inputs, text, z_t)
    assert loop.fits(tiny.unet, z_b, t, text_b, handles_b, mask_b, schedule, config, inputs.sup_res)
    longer = DragConfig(drag_steps=7)  # the host counts the steps: the same graph
    assert loop.fits(tiny.unet, z_b, t, text_b, handles_b, mask_b, schedule, longer, inputs.sup_res)
    other_schedule = DdimSchedule.from_scheduler(tiny.scheduler, 25, 18)  # the same t, another step size
    assert other_schedule.drag_timestep == t
    misfits = {
        "one more handle": dict(handles=torch.cat([handles_b, handles_b[:1]])),
        "no mask": dict(mask=None),
        "another latent size": dict(z_t=torch.randn(1, 4, z_t.shape[-2] + 2, z_t.shape[-1])),
        "another timestep": dict(timestep=t - 20),
        "another schedule": dict(schedule=other_schedule),
        "another learning rate": dict(config=DragConfig(drag_steps=2, drag_lr=0.02)),
        "another supervision size": dict(sup_res=(inputs.sup_res[0] + 2, inputs.sup_res[1])),
        "another UNet": dict(unet=torch.nn.Module()),
    }
    for reason, change in misfits.items():
        call = dict(unet=tiny.unet, z_t=z_b, timestep=t, text_embeddings=text_b, handles=handles_b, mask=mask_b,
                    schedule=schedule, config=config, sup_res=inputs.sup_res)
        call.update(change)
        assert not loop.fits(**call), reason
    # a loop that ran under autocast (CUDA) captured its norms as FASTDRAG_HALF_NORMS then said
    loop.autocast = True
    with pytest.MonkeyPatch.context() as env:
        env.delenv("FASTDRAG_HALF_NORMS", raising=False)
        assert loop.fits(tiny.unet, z_b, t, text_b, handles_b, mask_b, schedule, config, inputs.sup_res)
        env.setenv("FASTDRAG_HALF_NORMS", "1")
        assert not loop.fits(tiny.unet, z_b, t, text_b, handles_b, mask_b, schedule, config, inputs.sup_res)


def test_features_alone_match_the_full_forward_and_its_gradient(tiny):
    from fastdrag.features import unet_features

    generator = torch.Generator().manual_seed(5)
    z = torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 77, 32, generator=generator)
    weights = torch.randn(1, 32, 8, 8, generator=generator)
    gradients = []
    for alone in (False, True):
        latent = z.clone().requires_grad_(True)
        features = (unet_features(tiny.unet, latent, 601, text, 2) if alone
                    else unet_with_features(tiny.unet, latent, 601, text, 2)[1])
        (features * weights[:, :features.shape[1], :features.shape[2], :features.shape[3]]).sum().backward()
        gradients.append((features.detach(), latent.grad))
    (full, full_grad), (alone, alone_grad) = gradients
    assert torch.equal(alone, full) and torch.equal(alone_grad, full_grad) and full_grad.abs().sum() > 0
    with pytest.raises(IndexError, match="feature_block 4 out of range"):
        unet_features(tiny.unet, z, 601, text, 4)
