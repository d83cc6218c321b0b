"""Models whose UNet outputs the velocity (SD 2.x at 768 px: "v_prediction") or the clean latent ("sample")
edit through the same stages as noise-predicting ones: every stage reads noise from the output.

The check that needs no such model: the tiny UNet, with a forward hook that turns its noise prediction
into the velocity (or clean latent) it stands for, and declared as that kind, must edit exactly as the
plain tiny UNet does; declared as a noise predictor, it must not.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from fastdrag import DragEditor
from fastdrag.ddim import DdimSchedule, ddim_step, predicted_noise, training_target
from fastdrag.denoiser import TorchDenoiser
from fastdrag.errors import ModelLoadError
from fastdrag.models import build_tiny, ddim_scheduler, load_components

KINDS = ("v_prediction", "sample")


def _output_as(kind: str, components) -> None:
    """Make `components`' UNet a `kind` model: a hook replaces its noise prediction by what stands for it."""
    alphas = components.scheduler.alphas_cumprod.float()

    def hook(module, args, kwargs, output):
        latents = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        index = torch.as_tensor(timestep, device=latents.device).long().reshape(-1)
        alpha = alphas.to(latents.device)[index].view(-1, 1, 1, 1)
        eps = (output[0] if isinstance(output, tuple) else output.sample).float()
        x = latents.float()
        if kind == "v_prediction":
            converted = (eps - (1 - alpha).sqrt() * x) / alpha.sqrt()
        else:
            converted = (x - (1 - alpha).sqrt() * eps) / alpha.sqrt()
        converted = converted.to(latents.dtype)
        return (converted, *output[1:]) if isinstance(output, tuple) else UNet2DConditionOutput(sample=converted)

    components.unet.register_forward_hook(hook, with_kwargs=True)


def _tiny_as(kind: str, declared: str):
    components = build_tiny()
    _output_as(kind, components)
    components.scheduler = ddim_scheduler(declared)
    return components


@pytest.mark.parametrize("kind", KINDS)
def test_a_denoising_step_from_any_output_is_diffusers_ddim_step(kind):
    """diffusers' DDIM step for the kind is the reference for reading noise from the output."""
    scheduler = ddim_scheduler(kind)
    schedule = DdimSchedule.from_scheduler(scheduler, 50, 35)
    assert schedule.prediction_type == kind
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 7, 9, generator=generator, dtype=torch.float64)
    output = torch.randn(2, 4, 7, 9, generator=generator, dtype=torch.float64)
    for t in (981, 681, 21):
        expected = scheduler.step(output, t, x).prev_sample
        torch.testing.assert_close(ddim_step(schedule, x, schedule.noise(output, x, t), t), expected,
                                   rtol=1e-6, atol=1e-6)


def test_the_velocity_target_is_diffusers_and_each_kind_reads_back_its_noise():
    scheduler = ddim_scheduler("v_prediction")
    generator = torch.Generator().manual_seed(4)
    latents = torch.randn(3, 4, 5, 6, generator=generator, dtype=torch.float64)
    noise = torch.randn(3, 4, 5, 6, generator=generator, dtype=torch.float64)
    timesteps = torch.tensor([3, 480, 997])
    alpha = scheduler.alphas_cumprod.double()[timesteps].view(-1, 1, 1, 1)
    torch.testing.assert_close(training_target(latents, noise, alpha, "v_prediction"),
                               scheduler.get_velocity(latents, noise, timesteps))
    noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
    for kind in ("epsilon", *KINDS):  # the exact target of each kind stands for the exact noise
        torch.testing.assert_close(predicted_noise(training_target(latents, noise, alpha, kind), noisy, alpha, kind), noise)
    with pytest.raises(ValueError, match="prediction_type 'flow'"):
        predicted_noise(noise, latents, alpha, "flow")


@pytest.mark.parametrize("kind", KINDS)
def test_the_lora_loss_of_another_kind_weighs_the_noise_error_as_that_kind_does(kind):
    """The hooked UNet's loss against its kind's target is the plain UNet's noise error, each sample
    weighted by 1/a (velocity) or (1-a)/a (clean latent): the target is that kind's, not the noise."""
    from fastdrag.lora import lora_loss

    plain, hooked = build_tiny(), _tiny_as(kind, kind)
    alphas = plain.scheduler.alphas_cumprod.float()
    generator = torch.Generator().manual_seed(5)
    latents, noise = torch.randn(2, 2, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([40, 850])
    text = torch.randn(2, 77, 32, generator=generator)
    errors = torch.stack([lora_loss(plain.unet, latents[i:i + 1], noise[i:i + 1], timesteps[i:i + 1], text[i:i + 1],
                                    alphas) for i in range(2)])
    alpha = alphas[timesteps]
    weights = 1 / alpha if kind == "v_prediction" else (1 - alpha) / alpha
    expected = (errors * weights).mean()
    loss = lora_loss(hooked.unet, latents, noise, timesteps, text, alphas, kind)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=0)
    assert not torch.allclose(lora_loss(hooked.unet, latents, noise, timesteps, text, alphas), expected, rtol=0.05)


@pytest.mark.parametrize("kind", KINDS)
def test_the_denoiser_gives_the_noise_of_a_model_of_another_kind(kind):
    plain, hooked = build_tiny(), _tiny_as(kind, kind)
    generator = torch.Generator().manual_seed(6)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 77, 32, generator=generator)
    for t in (1, 681):
        expected = TorchDenoiser(plain.unet)(latents, t, text)
        torch.testing.assert_close(TorchDenoiser(hooked.unet, scheduler=hooked.scheduler)(latents, t, text), expected,
                                   rtol=1e-4, atol=1e-5)


def _edit(components, tmp_path, picture, name):
    editor = DragEditor(components, torch.device("cpu"), torch.float32, cache_dir=tmp_path / name, progress=False)
    result = editor.edit(picture.image, picture.prompt, picture.points, picture.mask, lora_steps=0,
                         num_inference_steps=20, drag_steps=4)
    return np.asarray(result.image).astype(int), result.handles


@pytest.mark.parametrize("kind", KINDS)
def test_a_model_of_another_kind_edits_as_the_noise_predicting_model_it_stands_for(kind, picture, tmp_path):
    """Inversion, the drag's mask term (x_prev) and the denoising all read noise from the output."""
    expected, expected_handles = _edit(build_tiny(), tmp_path, picture, "plain")
    image, handles = _edit(_tiny_as(kind, kind), tmp_path, picture, "hooked")
    difference = np.abs(image - expected)
    assert difference.max() <= 1 and difference.mean() < 0.05, (difference.max(), difference.mean())
    assert handles == expected_handles
    misread, _ = _edit(_tiny_as(kind, "epsilon"), tmp_path, picture, "misread")  # the output taken for noise
    assert np.abs(misread - expected).mean() > 10


@pytest.mark.parametrize("kind", KINDS)
def test_the_exported_drag_step_reads_noise_from_any_output(kind):
    from fastdrag.config import DragConfig
    from fastdrag.export.drag_graph import drag_step

    plain, hooked = build_tiny(), _tiny_as(kind, kind)
    generator = torch.Generator().manual_seed(7)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 77, 32, generator=generator)
    handles, targets = torch.tensor([[10.0, 12.0]]), torch.tensor([[20.0, 17.0]])
    features = torch.randn(1, 32, generator=generator)
    x_prev0 = torch.randn(1, 4, 8, 8, generator=generator)
    mask = (torch.rand(1, 1, 8, 8, generator=generator) > 0.5).float()
    inputs = (latents, text, handles, targets, features, x_prev0, mask, torch.ones(()))
    outputs = {}
    for name, components in (("plain", plain), ("hooked", hooked)):
        schedule = DdimSchedule.from_scheduler(components.scheduler, 50, 35)
        step = drag_step(components.unet, schedule, schedule.drag_timestep, DragConfig(), (32, 32))
        outputs[name] = step(*inputs)
    for got, expected in zip(outputs["hooked"], outputs["plain"], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["v_prediction"])
def test_an_exported_unet_graph_outputs_noise_for_a_model_of_another_kind(kind, tmp_path):
    """The conversion is inside the graph: a service's loops stay those of a noise-predicting model."""
    import onnxruntime

    from fastdrag.export.graphs import export_onnx, graph_jobs

    plain, hooked = build_tiny(), _tiny_as(kind, kind)
    job = graph_jobs(hooked.unet, hooked.vae, 64, 64, 32, 10, torch.float32, torch.float32,
                     scheduler=hooked.scheduler)[0]
    export_onnx(job, tmp_path / "unet.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "unet.onnx"), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(8)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 77, 32, generator=generator)
    for t in (21, 681):
        (eps,) = session.run(None, {"latents": latents.numpy(), "timestep": np.array([t], np.float32),
                                    "text_embeddings": text.numpy()})
        expected = TorchDenoiser(plain.unet)(latents, t, text)
        torch.testing.assert_close(torch.from_numpy(eps), expected, rtol=1e-4, atol=1e-5)


def _save(components, folder, scheduler_config=None):
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        getattr(components, name).save_pretrained(folder / name)
    if scheduler_config is not None:
        (folder / "scheduler").mkdir()
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config))


def test_a_model_folder_says_what_its_unet_outputs_and_a_caller_can_override_it(tmp_path, caplog):
    tiny = build_tiny()
    _save(tiny, tmp_path / "v", {"_class_name": "DDIMScheduler", "prediction_type": "v_prediction"})
    _save(tiny, tmp_path / "plain")
    loaded = load_components(str(tmp_path / "v"))
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    assert not caplog.records
    assert load_components(str(tmp_path / "plain")).scheduler.config.prediction_type == "epsilon"
    assert "no scheduler/scheduler_config.json" in caplog.text  # an assumption the user is told
    overridden = load_components(str(tmp_path / "v"), prediction_type="epsilon")
    assert overridden.scheduler.config.prediction_type == "epsilon"
    # a LoRA trained against one kind's target is not another's: the cache keys (identity) differ
    assert loaded.identity != overridden.identity
    assert load_components("tiny", prediction_type="sample").scheduler.config.prediction_type == "sample"


def test_an_unknown_prediction_type_is_refused_by_name(tmp_path):
    _save(build_tiny(), tmp_path / "flow", {"_class_name": "DDIMScheduler", "prediction_type": "flow"})
    with pytest.raises(ModelLoadError, match="prediction_type 'flow'"):
        load_components(str(tmp_path / "flow"))
    with pytest.raises(ModelLoadError, match="prediction_type 'velocity'"):
        load_components("tiny", prediction_type="velocity")


def _sd2_shaped(lean: bool):
    """The tiny model with SD 2.x's UNet differences: linear projections in and out of the transformers,
    a head count per block, attention upcast, and the velocity as output (random weights)."""
    from diffusers import UNet2DConditionModel

    from fastdrag.lean_blocks import install_lean_blocks

    components = build_tiny()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        components.unet = UNet2DConditionModel(
            sample_size=8, block_out_channels=(32, 32, 64, 64), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=32,
            attention_head_dim=(2, 4, 8, 8), use_linear_projection=True, upcast_attention=True, norm_num_groups=8)
    components.scheduler = ddim_scheduler("v_prediction")
    if lean:
        install_lean_blocks(components.unet)
        install_lean_blocks(components.vae)
    return components


def test_an_sd2_shaped_model_edits_alike_with_and_without_the_lean_blocks(picture, tmp_path):
    """The lean blocks rewrite the transformers' forwards: with linear projections too."""
    edits = []
    for lean in (False, True):
        editor = DragEditor(_sd2_shaped(lean), torch.device("cpu"), torch.float32, cache_dir=tmp_path / str(lean),
                            progress=False)
        result = editor.edit(picture.image, picture.prompt, picture.points, picture.mask, lora_steps=3,
                             num_inference_steps=10, drag_steps=4)
        edits.append((np.asarray(result.image).astype(int), result.handles))
    (plain, plain_handles), (lean, lean_handles) = edits
    assert np.abs(plain - lean).max() <= 1 and plain_handles == lean_handles
    assert np.abs(plain - np.asarray(picture.image).astype(int)).mean() > 0.5  # it edited something


def test_a_model_trained_with_another_noise_schedule_edits_with_it(tmp_path, caplog):
    """The betas come from the model's scheduler config too (SD 1.x and 2.x share DESIGN.md's): a folder
    that says others gets them, with a warning that names them, and its LoRAs another cache key."""
    from diffusers import DDIMScheduler

    _save(build_tiny(), tmp_path / "linear", {"_class_name": "DDIMScheduler", "beta_schedule": "linear",
                                              "beta_end": 0.02, "prediction_type": "v_prediction"})
    _save(build_tiny(), tmp_path / "sd", {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                                          "beta_schedule": "scaled_linear", "trained_betas": None})
    loaded = load_components(str(tmp_path / "linear"))
    expected = DDIMScheduler(beta_start=0.00085, beta_end=0.02, beta_schedule="linear").alphas_cumprod  # (SD's start)
    torch.testing.assert_close(loaded.scheduler.alphas_cumprod, expected)
    schedule = DdimSchedule.from_scheduler(loaded.scheduler, 50, 35)
    assert schedule.alpha(681) == pytest.approx(float(expected[681]))
    assert "beta_end=0.02, beta_schedule='linear'" in caplog.text
    overridden = load_components(str(tmp_path / "linear"), prediction_type="epsilon")  # keeps the betas
    torch.testing.assert_close(overridden.scheduler.alphas_cumprod, expected)
    caplog.clear()
    sd = load_components(str(tmp_path / "sd"))  # SD's own schedule, as its PNDM config says it: no warning
    torch.testing.assert_close(sd.scheduler.alphas_cumprod, ddim_scheduler().alphas_cumprod)
    assert "noise schedule" not in caplog.text
    # the folders' weights are alike: only the scheduler tells their LoRAs apart
    assert sd.identity.split(":")[0] == "folder" and ":betas-" in overridden.identity and ":betas-" not in sd.identity
