"""FLOP budgets (torch's FLOP counter): every stage does the least work the method allows.

LoRA step at the SD 1.5 and SD 2.1 shapes on the meta device (no memory, no time); the drag iteration and the
denoising step on the tiny model; the image is VAE-encoded once per edit.
"""
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastdrag.config import DenoiseConfig, DragConfig, LoraConfig


def count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def forward_and_input_backward(unet, batch, latent, text_dim, device):
    x = torch.randn(batch, 4, latent, latent, device=device, requires_grad=True)
    text = torch.randn(batch, 77, text_dim, device=device)

    def run():
        unet(x, torch.full((batch,), 500, device=device), encoder_hidden_states=text).sample.float().sum().backward()

    return count(run)


@pytest.mark.parametrize("model, latent", [("sd15-random", 64), ("sd21-random", 96)])  # at 512 and 768 px
def test_lora_step_costs_four_forward_and_input_backward_passes_at_sd_shape(model, latent):
    """SD 1.5, and SD 2.1 (linear projections, 1024-wide text, the velocity as target)."""
    from fastdrag.lora import LoraTrainer
    from fastdrag.models import build_sd_random

    components = build_sd_random(model, device="meta")
    unet, width = components.unet, components.text_encoder.config.hidden_size
    shape = (1, 4, latent, latent)
    posterior = SimpleNamespace(mean=torch.zeros(shape, device="meta"), std=torch.ones(shape, device="meta"))
    trainer = LoraTrainer(unet, components.scheduler, posterior, torch.zeros(1, 77, width, device="meta"),
                          components.scaling_factor, LoraConfig(), seed=0)
    step = count(trainer.step)
    trainer.finish()
    reference = forward_and_input_backward(unet, 1, latent, width, "meta")  # adapter present, frozen
    assert reference > 1e12  # SD scale: 1.74 TFLOP (SD 1.5 at 512 px), 4.93 (SD 2.1 at 768)
    assert step <= 1.05 * 4 * reference, step / (4 * reference)
    assert step >= 0.95 * 4 * reference  # and it really is four samples in one pass


def test_drag_iteration_costs_one_forward_and_input_backward(tiny, picture):
    from fastdrag.ddim import DdimSchedule
    from fastdrag.drag import DragLoop
    from fastdrag.inputs import prepare_inputs

    inputs = prepare_inputs(picture.image, picture.points, picture.mask)
    schedule = DdimSchedule.from_scheduler(tiny.scheduler, 50, 35)
    text = torch.randn(1, 77, 32)
    loop = DragLoop(tiny.unet, torch.randn(1, 4, 8, 8), schedule.drag_timestep, text, inputs.handles, inputs.targets,
                    inputs.mask, schedule, DragConfig(drag_steps=5), inputs.sup_res)
    iteration = count(lambda: loop.step(1))
    reference = forward_and_input_backward(tiny.unet, 1, 8, 32, "cpu")
    assert not any(p.grad is not None for p in tiny.unet.parameters())
    assert 0.95 * reference <= iteration <= 1.05 * reference, iteration / reference


def test_denoising_step_is_one_batch_two_forward(tiny):
    from fastdrag.denoiser import TorchDenoiser

    denoiser = TorchDenoiser(tiny.unet)
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    plain = count(lambda: denoiser(x, 421, text))
    with denoiser.reference_control(DenoiseConfig().start_layer):
        swapped = count(lambda: denoiser(x, 421, text))
    assert 0.9 * plain <= swapped <= plain  # K/V projected for the source rows only


def test_a_repeated_edits_denoising_step_with_kept_source_keys_and_values_is_one_batch_one_forward(tiny):
    """`keep_source_kv`: the edited branch alone, its swapped layers reading recorded keys and values
    (projecting none), costs at most one plain batch-1 forward: half the pair's step."""
    from fastdrag.denoiser import TorchDenoiser
    from fastdrag.source_kv import SourceKV

    denoiser, store = TorchDenoiser(tiny.unet), SourceKV()
    start_layer = DenoiseConfig().start_layer
    pair, text = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    store.begin(pair, 1, start_layer, recording=True)
    store.set_step(0)
    with denoiser.reference_control(start_layer, source_kv=store):
        swapped_pair = count(lambda: denoiser(pair, 421, text))
    store.finish("image")
    store.begin(pair[1:], 1, start_layer, recording=False)
    plain_one = count(lambda: denoiser(pair[1:], 421, text[1:]))
    with denoiser.reference_control(start_layer, source_kv=store):
        kept_one = count(lambda: denoiser(pair[1:], 421, text[1:]))
    assert 0.9 * plain_one <= kept_one < plain_one  # no key or value projected
    assert kept_one <= 0.5 * swapped_pair


def test_the_image_is_encoded_once_per_edit_and_not_for_a_repeated_one(editor, picture, fast):
    """Once for a new image (the LoRA trains on it); not at all for a repeated edit, whose LoRA comes from
    the cache and whose inversion the editor kept; once again when that inversion is gone."""
    calls, texts = [], []
    hook = editor.components.vae.encoder.register_forward_hook(lambda *args: calls.append(1))
    text_hook = editor.components.text_encoder.register_forward_hook(lambda *args: texts.append(1))
    try:
        editor.release()
        first = editor.edit(picture.image, picture.prompt, picture.points, **fast)
        assert len(calls) == 1 and len(texts) == 1 and "vae_encode" in first.timings
        moved = [((x + 2, y), target) for (x, y), target in picture.points]
        repeated = editor.edit(picture.image, picture.prompt, moved, **fast)  # LoRA cached, inversion kept
        assert len(calls) == 1 and len(texts) == 1 and "vae_encode" not in repeated.timings
        assert repeated.lora_cached
        editor.release()  # drops the kept inversion (and the prompts' embeddings)
        again = editor.edit(picture.image, picture.prompt, picture.points, **fast)
        assert len(calls) == 2 and len(texts) == 2 and again.lora_cached and "vae_encode" in again.timings
    finally:
        hook.remove()
        text_hook.remove()


def test_drag_iteration_without_a_mask_stops_the_unet_after_the_feature_block(tiny, picture):
    """No mask term, no eps needed: the up blocks after the feature block (the costliest, at full
    resolution) and the output convolution do no work."""
    from fastdrag.ddim import DdimSchedule
    from fastdrag.drag import DragLoop
    from fastdrag.inputs import prepare_inputs

    inputs = prepare_inputs(picture.image, picture.points, picture.mask)
    schedule = DdimSchedule.from_scheduler(tiny.scheduler, 50, 35)
    text, z_t = torch.randn(1, 77, 32), torch.randn(1, 4, 8, 8)
    config = DragConfig(drag_steps=5)
    iterations = {}
    for mask in (inputs.mask, None):
        loop = DragLoop(tiny.unet, z_t, schedule.drag_timestep, text, inputs.handles, inputs.targets, mask, schedule,
                        config, inputs.sup_res)
        with FlopCounterMode(display=False) as counter:
            loop.step(1)
        iterations[mask is None] = counter
    late = [f"UNet2DConditionModel.up_blocks.{i}" for i in range(config.feature_block + 1, len(tiny.unet.up_blocks))]
    late.append("UNet2DConditionModel.conv_out")
    counts = {flag: counter.get_flop_counts() for flag, counter in iterations.items()}
    assert all(sum(counts[False].get(name, {}).values()) > 0 for name in late)  # with a mask they run
    assert all(sum(counts[True].get(name, {}).values()) == 0 for name in late)
    assert iterations[True].get_total_flops() < 0.9 * iterations[False].get_total_flops()


def test_the_benchmarks_cheap_flop_sum_equals_torchs_flop_counter(tiny, picture, tmp_path):
    """bench/flop_count.py (what the benchmark suite reports) against FlopCounterMode, on a whole
    small edit: LoRA steps, inversion, a masked drag and reference-controlled denoising."""
    import sys
    from pathlib import Path

    from fastdrag import DragEditor

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from flop_count import count_flops

    editor = DragEditor(tiny, torch.device("cpu"), torch.float32, cache_dir=tmp_path, progress=False)
    editor.text_embeddings(picture.prompt)  # kept: neither counted edit encodes the prompt
    seeds = iter(range(2))  # a new LoRA each time: both counts train one

    def edit():
        editor.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, lora_steps=2,
                    num_inference_steps=10, drag_steps=3, seed=next(seeds))

    cheap = count_flops(edit)
    assert cheap > 0
    assert cheap == count(edit)


def test_the_architecture_table_counts_a_lora_step_as_four_frozen_forward_and_input_backward_passes():
    """bench/arch_flops.py's table (meta device) at SD 1.5's size: its pieces agree with each other and
    with the budget above (the tiny model's rank-16 adapters are not small beside its 32-wide layers)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from arch_flops import costs

    row = costs("sd15-random")
    # frozen weights: the backward computes input gradients alone, about one forward again (with weight
    # gradients it would be two: measured 2.15x the forward at SD 1.5)
    assert 1.8 * row["unet_forward"] < row["unet_forward_input_backward"] < 2.5 * row["unet_forward"]
    assert 0.95 * 4 * row["unet_forward_input_backward"] <= row["lora_step"] <= 1.05 * 4 * row["unet_forward_input_backward"]
    assert row["vae_decode"] > row["vae_encode"] > 0 and row["prediction_type"] == "epsilon"
    # `lora_checkpointing` runs the checkpointed blocks' forwards again in the backward: more than the step,
    # less than the step and a whole batch-4 forward again (the blocks are most of the UNet, not all of it)
    forwards_again = row["lora_step_checkpointed"] - row["lora_step"]
    assert 0.5 * 4 * row["unet_forward"] < forwards_again < 4 * row["unet_forward"]
