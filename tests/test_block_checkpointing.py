"""`lora_checkpointing` (`fastdrag.block_checkpointing`): a LoRA step whose UNet blocks run again in the
backward gives the gradients, the adapter and the edit of one that keeps them, and keeps less."""
import contextlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft.helpers import disable_input_dtype_casting
from torch.utils.checkpoint import checkpoint

from fastdrag.block_checkpointing import checkpointed_blocks, checkpointing_blocks
from fastdrag.config import LoraConfig
from fastdrag.fused_blocks import install_fused_blocks
from fastdrag.lean_blocks import lean_lora_layers
from fastdrag.lora_casts import half_weights
from fastdrag.lora import LoraTrainer, adapter_state, lora_backward, run_trainer
from fastdrag.vae import encode_posterior, encode_prompt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from op_count import CudaNormPolicy, cuda_like_autocast  # noqa: E402
from test_lora_casts import lora_case  # noqa: E402


def step_case(tiny, dtype=torch.float32, lean=True):
    """The tiny UNet in `dtype` as on CUDA (channels-last, frozen convolutions, lean blocks if asked) with a
    trained-looking fp32 adapter, and a LoRA step's inputs (`tests/test_lora_casts.py`)."""
    return lora_case(tiny, dtype, lean=lean, frozen_conv=True)


def gradients(unet, params, arguments, checkpointing, prediction_type="epsilon"):
    for param in params:
        param.grad = None
    loss = lora_backward(unet, *arguments, prediction_type=prediction_type, checkpointing=checkpointing)
    return loss, [param.grad.clone() for param in params]


@pytest.mark.parametrize("blocks", ["lean", "stock", "fused"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_checkpointed_blocks_give_the_same_loss_and_gradients(tiny, blocks, prediction_type):
    """Each kind of block the editor may run (`fused`: `fastdrag.fused_blocks`' autograd functions, on their
    reference path here) recomputes what it computed."""
    unet, params, arguments = step_case(tiny, lean=blocks != "stock")
    if blocks == "fused":
        assert sum(install_fused_blocks(unet).values()) > 0
    loss, grads = gradients(unet, params, arguments, False, prediction_type)
    checkpointed_loss, checkpointed = gradients(unet, params, arguments, True, prediction_type)
    assert torch.isfinite(loss) and torch.equal(loss, checkpointed_loss)
    assert grads and all(g.abs().sum() > 0 and torch.equal(g, c) for g, c in zip(grads, checkpointed, strict=True))
    assert not any(block.gradient_checkpointing for block in checkpointing_blocks(unet))  # off again after


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_checkpointed_blocks_recompute_under_the_forwards_autocast_and_half_weights(tiny, dtype, monkeypatch):
    """Under CUDA-like autocast (fp32 norms, the adapters' half weights made in one pass, peft's input cast
    off), the recomputed blocks run as their forward ran: the same loss and gradients, bit for bit.

    Each block's recomputation sees the forward's half adapter weights (made once per step, outside the
    blocks), so the backward ran inside the step's contexts. The CPU's stand-in for CUDA's fp32 norms is a
    torch function mode, which PyTorch does not carry into a recomputation (CUDA autocast's own norm policy
    needs none): the test re-enters it there."""
    import fastdrag.block_checkpointing as module

    runs, blocks = [], []

    def recomputed(block, *args):
        blocks.append(block)

        def run(*inputs):
            runs.append(all(half_weights(layer, adapter) is not None for layer, adapter in lean_lora_layers(block)))
            return block(*inputs)

        return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=False,
                          context_fn=lambda: (contextlib.nullcontext(), CudaNormPolicy()))

    monkeypatch.setattr(module, "_recomputed", recomputed)
    unet, params, arguments = step_case(tiny, dtype)
    with cuda_like_autocast(dtype), disable_input_dtype_casting(unet):
        gradients(unet, params, arguments, False)  # the norms' fp32 weights are made at a first step
        loss, grads = gradients(unet, params, arguments, False)
        checkpointed_loss, checkpointed = gradients(unet, params, arguments, True)
    # each block's forward, then the recomputations the backward asks for (none of blocks it does not reach)
    assert len(blocks) < len(runs) and all(runs)
    assert torch.isfinite(loss) and torch.equal(loss, checkpointed_loss)
    assert grads and all(torch.isfinite(g).all() and g.abs().sum() > 0 and torch.equal(g, c)
                         for g, c in zip(grads, checkpointed, strict=True))


def test_checkpointed_blocks_are_what_the_unet_runs_under_checkpoint_and_are_restored(tiny, monkeypatch):
    """Inside, each block with diffusers' flag runs its parts through the package's checkpoint, which the
    forward calls (once per resnet and transformer block of the tiny UNet); outside, a flag set before
    (by diffusers' own `enable_gradient_checkpointing`) is as it was."""
    import fastdrag.block_checkpointing as module

    unet, params, arguments = step_case(tiny)
    calls = []
    recomputed = module._recomputed
    monkeypatch.setattr(module, "_recomputed", lambda block, *args: calls.append(type(block).__name__)
                        or recomputed(block, *args))
    resnets = sum(type(m).__name__ == "ResnetBlock2D" for m in unet.modules())
    transformer_blocks = sum(type(m).__name__ == "BasicTransformerBlock" for m in unet.modules())
    gradients(unet, params, arguments, True)
    assert calls.count("BasicTransformerBlock") == transformer_blocks > 0
    assert 0 < calls.count("ResnetBlock2D") <= resnets  # (down and up blocks' resnets; the first down block's too)
    unet.enable_gradient_checkpointing()
    own = [vars(block)["_gradient_checkpointing_func"] for block in checkpointing_blocks(unet)]
    with checkpointed_blocks(unet) as count:
        assert count == len(own) > 0
    assert all(block.gradient_checkpointing and vars(block)["_gradient_checkpointing_func"] is func
               for block, func in zip(checkpointing_blocks(unet), own, strict=True))
    with checkpointed_blocks(unet, active=False) as count:
        assert count == 0


def test_a_checkpointed_trainer_trains_the_same_adapter(tiny, picture):
    """Three steps of the trainer with and without checkpointing: the same losses and adapter weights."""
    posterior = encode_posterior(tiny.vae, picture.image)
    text = encode_prompt(tiny.tokenizer, tiny.text_encoder, picture.prompt)
    config = LoraConfig(lora_steps=3, lora_batch_size=2)
    results = []
    for checkpointing in (False, True):
        trainer = LoraTrainer(tiny.unet, tiny.scheduler, posterior, text, tiny.scaling_factor, config, seed=4,
                              checkpointing=checkpointing)
        assert trainer.fits(tiny.unet, posterior, text, config, checkpointing=checkpointing)
        assert not trainer.fits(tiny.unet, posterior, text, config, checkpointing=not checkpointing)
        losses = run_trainer(trainer, config.lora_steps, progress=False)
        results.append((losses, adapter_state(tiny.unet)))
    (losses, state), (checkpointed_losses, checkpointed_state) = results
    assert losses == checkpointed_losses and len(losses) == 3
    assert state.keys() == checkpointed_state.keys()
    assert all(torch.equal(state[name], checkpointed_state[name]) for name in state)
    assert any(state[name].abs().sum() > 0 for name in state if "lora_B" in name)


def test_an_edit_with_lora_checkpointing_is_the_same_edit(editor, picture, fast, tmp_path):
    """Through the editor: the same LoRA (one cache key: checkpointing changes no number) and the same image."""
    plain = editor.edit(picture.image, picture.prompt, picture.points, **fast)
    other = type(editor)(editor.components, editor.device, editor.dtype, cache_dir=tmp_path / "other", progress=False)
    checkpointed = other.edit(picture.image, picture.prompt, picture.points, lora_checkpointing=True, **fast)
    assert checkpointed.config.lora_checkpointing and not checkpointed.lora_cached
    assert checkpointed.lora_key == plain.lora_key
    assert np.array_equal(np.asarray(checkpointed.image), np.asarray(plain.image))


def test_the_kept_memory_count_of_a_checkpointed_lora_step():
    """bench/kept_memory.py on the tiny model: its hooks' count is the graph walk's where nothing is
    checkpointed; checkpointing keeps less, and with the largest block's own activations still less than
    without."""
    from kept_memory import count, count_by_hooks, largest_checkpointed_block

    walked = sum(entry["bytes"] for entry in count("tiny", 64)["lora step"].values())
    plain = count_by_hooks("tiny", 64, checkpointing=False)
    checkpointed = count_by_hooks("tiny", 64, checkpointing=True)
    largest = largest_checkpointed_block("tiny", 64)
    assert plain == walked
    assert 0 < checkpointed < 0.5 * plain and 0 < largest and checkpointed + largest < plain


@pytest.mark.parametrize("checkpointing", [False, True], ids=["kept", "recomputed"])
def test_a_lora_stage_out_of_memory_says_what_to_change_and_the_next_edit_is_a_fresh_one(
        editor, picture, fast, tmp_path, monkeypatch, checkpointing):
    """An out-of-memory error in the LoRA step comes out as one, naming `lora_checkpointing` where it is
    off and the working size; the editor drops the trainer, and its next edit is a fresh editor's."""
    calls = []
    step = LoraTrainer.step

    def failing(self):
        calls.append(self)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return step(self)

    monkeypatch.setattr(LoraTrainer, "step", failing)
    with pytest.raises(torch.OutOfMemoryError) as caught:
        editor.edit(picture.image, picture.prompt, picture.points, lora_checkpointing=checkpointing, **fast)
    message = str(caught.value)
    assert ("lora_checkpointing=True" in message) is not checkpointing
    width, height = picture.image.size  # (a multiple of 64: the working size)
    assert f"at {width}x{height}" in message and "--size" in message and "Tried to allocate 2.00 GiB" in message
    assert editor._lora_trainer is None
    monkeypatch.setattr(LoraTrainer, "step", step)
    again = editor.edit(picture.image, picture.prompt, picture.points, **fast)
    fresh = type(editor)(editor.components, editor.device, editor.dtype, cache_dir=tmp_path / "fresh", progress=False)
    expected = fresh.edit(picture.image, picture.prompt, picture.points, **fast)
    assert not again.lora_cached and again.lora_key == expected.lora_key
    assert np.array_equal(np.asarray(again.image), np.asarray(expected.image))


@pytest.mark.parametrize("stage", ["drag", "denoise", "vae_decode"])
def test_any_stage_out_of_memory_names_itself_and_the_next_edit_is_a_fresh_one(editor, picture, fast, tmp_path,
                                                                                 monkeypatch, stage):
    """Out of memory in a later stage: the error names the stage and the working size (not the LoRA's advice),
    the editor drops its kept graphs, and its next edit (the LoRA now from the cache) is a fresh editor's."""
    import fastdrag.editor as editor_module

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    target, name = {"drag": (type(editor), "_drag"), "denoise": (type(editor), "_denoise"),
                    "vae_decode": (editor_module, "decode")}[stage]
    with monkeypatch.context() as patch:
        patch.setattr(target, name, out_of_memory)
        with pytest.raises(torch.OutOfMemoryError) as caught:
            editor.edit(picture.image, picture.prompt, picture.points, **fast)
    width, height = picture.image.size
    message = str(caught.value)
    assert message.startswith(f"the {editor_module.STAGE_NAMES[stage]} stage ran out of memory at {width}x{height}:")
    assert "--size" in message and "lora_checkpointing" not in message and "3.00 GiB" in message
    assert caught.value.stage == stage and editor._drag_loop is None and editor._lora_trainer is None
    again = editor.edit(picture.image, picture.prompt, picture.points, **fast)
    fresh = type(editor)(editor.components, editor.device, editor.dtype, cache_dir=tmp_path / "fresh", progress=False)
    expected = fresh.edit(picture.image, picture.prompt, picture.points, **fast)
    assert again.lora_cached and np.array_equal(np.asarray(again.image), np.asarray(expected.image))


def test_a_kept_trainer_restarts_in_its_own_mode_and_another_mode_builds_one(editor, picture, fast, tmp_path):
    """With `lora_checkpointing` the kept trainer carries over to the next image and trains what a fresh
    editor trains; turning the option off builds a trainer of the other mode instead of restarting it."""
    settings = dict(fast, lora_checkpointing=True)
    editor.edit(picture.image, picture.prompt, picture.points, **settings)
    trainer = editor._lora_trainer
    assert trainer is not None and trainer.checkpointing
    other = (np.random.default_rng(9).random((64, 64, 3)) * 255).astype(np.uint8)
    checkpointed = editor.edit(other, "another prompt", picture.points, **settings)
    assert editor._lora_trainer is trainer and not checkpointed.lora_cached
    fresh = type(editor)(editor.components, editor.device, editor.dtype, cache_dir=tmp_path / "fresh", progress=False)
    expected = fresh.edit(other, "another prompt", picture.points, **fast)  # (the option changes no number)
    assert np.array_equal(np.asarray(checkpointed.image), np.asarray(expected.image))
    editor.edit(other, "a third prompt", picture.points, **fast)
    assert editor._lora_trainer is not trainer and not editor._lora_trainer.checkpointing
