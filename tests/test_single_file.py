"""Single-file checkpoints in the original (LDM) layout, as SD 1.5, SD 2.x and most fine-tunes are shared, load
offline through diffusers' single-file loader with a configuration folder (`single_file_config`) and
edit as the same weights in a diffusers folder do."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fastdrag import DragEditor
from fastdrag.errors import ModelLoadError
from fastdrag.models import build_tiny, load_components

from ldm_layout import TEXT, UNET, ldm_state_dict

MODEL_INDEX = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
               "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
               "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"],
               "safety_checker": [None, None], "feature_extractor": [None, None]}
SD_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "steps_offset": 1, "skip_prk_steps": True}


def configuration_folder(components, folder, prediction_type="epsilon"):
    """A diffusers folder of `components`' configuration and tokenizer only, no weights: what a user keeps
    beside single files of one architecture."""
    components.unet.save_config(folder / "unet")
    components.vae.save_config(folder / "vae")
    components.text_encoder.config.save_pretrained(folder / "text_encoder")
    components.tokenizer.save_pretrained(folder / "tokenizer")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(dict(SD_SCHEDULER, prediction_type=prediction_type)))
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX))
    return folder


def single_file(components, path):
    """`components`' weights in one original-layout checkpoint: safetensors, or a `.ckpt` pickle's `state_dict`."""
    state = ldm_state_dict(components.unet, components.vae, components.text_encoder)
    if path.suffix == ".ckpt":
        torch.save({"state_dict": state}, path)
    else:
        save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def other_weights():
    """The tiny architecture with other weights than the `tiny` fixture's: what the file holds must be
    what loads, not what a folder or the built-in model has."""
    components = build_tiny()
    generator = torch.Generator().manual_seed(17)
    with torch.no_grad():
        for module in (components.unet, components.vae, components.text_encoder):
            for param in module.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 0.01)
    return components


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_an_original_layout_file_loads_its_own_weights_offline(other_weights, tmp_path, suffix, monkeypatch):
    """Every weight from the file, none from elsewhere; the noise schedule from the folder's scheduler config;
    and no paragraph from diffusers about the safety checker an edit does not use."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = configuration_folder(other_weights, tmp_path / "config")
    path = single_file(other_weights, tmp_path / f"model{suffix}")
    pipeline_logger = logging.getLogger("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    pipeline_logger.addHandler(handler)
    try:
        loaded = load_components(str(path), single_file_config=str(folder), progress=False)
    finally:
        pipeline_logger.removeHandler(handler)
    assert not [r for r in records if "safety checker" in r.getMessage()]
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(other_weights, name).state_dict(), getattr(loaded, name).state_dict()
        assert want.keys() == got.keys(), name
        assert all(torch.equal(want[key], got[key]) for key in want), name
    assert loaded.identity.startswith("file:")
    assert type(loaded.scheduler).__name__ == "DDIMScheduler" and loaded.scheduler.config.prediction_type == "epsilon"
    torch.testing.assert_close(loaded.scheduler.alphas_cumprod, other_weights.scheduler.alphas_cumprod)


def test_a_single_file_edits_as_its_weights_in_a_folder_do(other_weights, tmp_path, picture, fast):
    """The same edit from the single file as from a diffusers folder of the same weights; a v-model's file
    gets its kind from the configuration folder."""
    folder = configuration_folder(other_weights, tmp_path / "config")
    path = single_file(other_weights, tmp_path / "model.safetensors")
    full = tmp_path / "folder"
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        getattr(other_weights, name).save_pretrained(full / name)
    edits = []
    for source, config in ((path, folder), (str(full), None)):  # paths as Path objects too
        editor = DragEditor.from_pretrained(source, device="cpu", single_file_config=config,
                                            cache_dir=tmp_path / "lora", progress=False)
        edits.append(editor.edit(picture.image, picture.prompt, picture.points, **fast))
    from_file, from_folder = edits
    # equal weights, but the CPU's matrix products round by where their operands lie in memory (a UNet
    # forward of the two loads differed by 6e-7 in a scratch run): within 1/255, the same handles
    difference = np.abs(np.asarray(from_file.image).astype(int) - np.asarray(from_folder.image).astype(int))
    assert difference.max() <= 1 and from_file.handles == from_folder.handles
    assert np.abs(np.asarray(from_file.image).astype(int) - np.asarray(picture.image).astype(int)).mean() > 0.5
    assert from_file.lora_key != from_folder.lora_key  # two models to the cache: the identity says where from
    v_folder = configuration_folder(other_weights, tmp_path / "v-config", prediction_type="v_prediction")
    loaded = load_components(str(path), single_file_config=str(v_folder), progress=False)
    assert loaded.scheduler.config.prediction_type == "v_prediction" and loaded.identity.endswith(":v_prediction")


def test_a_single_file_of_another_architecture_than_its_configuration_is_refused(other_weights, tmp_path):
    """A file whose UNet does not fit the folder's configuration (a weight of another shape): one clear
    error naming the file, not a model with weights left at random."""
    folder = configuration_folder(other_weights, tmp_path / "config")
    state = ldm_state_dict(other_weights.unet, other_weights.vae, other_weights.text_encoder)
    name = UNET + "input_blocks.0.0.weight"
    state[name] = torch.randn(state[name].shape[0] * 2, *state[name].shape[1:])
    path = tmp_path / "other.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelLoadError, match="other.safetensors"):
        load_components(str(path), single_file_config=str(folder), progress=False)


def test_an_sd2_shaped_file_with_an_open_clip_text_encoder_loads_its_own_weights(tmp_path, monkeypatch):
    """SD 2.x's layout: linear projections in the transformers, the text encoder as OpenCLIP's tower (fused
    query-key-value projections), and a v-model's configuration folder."""
    from test_prediction_type import _sd2_shaped

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sd2 = _sd2_shaped(lean=False)
    folder = configuration_folder(sd2, tmp_path / "config", prediction_type="v_prediction")
    path = tmp_path / "sd2.safetensors"
    state = ldm_state_dict(sd2.unet, sd2.vae, sd2.text_encoder, open_clip=True)
    assert any(key.endswith("attn.in_proj_weight") for key in state) and not any(key.startswith(TEXT) for key in state)
    save_file(state, str(path))
    loaded = load_components(str(path), single_file_config=str(folder), progress=False)
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(sd2, name).state_dict(), getattr(loaded, name).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[key], got[key]) for key in want), name
    assert loaded.unet.config.use_linear_projection and loaded.scheduler.config.prediction_type == "v_prediction"
