import pytest
import torch

from fastdrag.config import DenoiseConfig, EditConfig, LoraConfig
from fastdrag.errors import ConfigError
from fastdrag.models import ddim_scheduler


def test_defaults_are_the_published_method():
    config = EditConfig()
    assert config.lora == LoraConfig(16, ("to_q", "to_k", "to_v", "to_out.0"), 5e-4, 80, 4)
    assert (config.inversion.num_inference_steps, config.inversion.inversion_strength) == (50, 0.7)
    assert config.inversion.guidance_scale == 1.0
    assert config.inversion.num_inversion_steps == 35
    drag = config.drag
    assert (drag.feature_block, drag.sup_res, drag.r_m, drag.r_p) == (2, None, 1, 3)
    assert (drag.drag_lr, drag.drag_steps, drag.lam, drag.reach_distance) == (0.01, 80, 0.1, 2.0)
    assert drag.mixed_precision is True
    assert config.denoise == DenoiseConfig(start_step=0, start_layer=10)
    assert config.seed == 42


def test_scheduler_is_sd_ddim():
    cfg = ddim_scheduler().config
    assert (cfg.beta_start, cfg.beta_end, cfg.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert (cfg.clip_sample, cfg.set_alpha_to_one, cfg.steps_offset) == (False, False, 1)


def test_replace_routes_fields_to_their_stage():
    config = EditConfig().replace(drag_steps=7, lora_rank=4, start_layer=12, seed=3)
    assert config.drag.drag_steps == 7 and config.lora.lora_rank == 4
    assert config.denoise.start_layer == 12 and config.seed == 3
    assert EditConfig().drag.drag_steps == 80  # the original is untouched


@pytest.mark.parametrize("overrides, words", [
    (dict(drag_stepz=3), "unknown edit option 'drag_stepz'"),
    (dict(inversion_strength=0.0), "inversion_strength"),
    (dict(lora_rank=0), "lora_rank"),
    (dict(size=(100, 64)), "multiple of 8"),
    (dict(drag_lr=0.0), "lora_lr and drag_lr must be > 0"),
    (dict(lora_lr=-1e-4), "lora_lr and drag_lr must be > 0"),
    (dict(lam=-0.1), "lam and reach_distance must be >= 0"),
    (dict(seed="x"), "seed must be a whole number; got 'x'"),
    (dict(drag_steps=2.5), "drag_steps must be a whole number; got 2.5"),
    (dict(lora_steps=True), "lora_steps must be a whole number; got True"),
    (dict(lora_lr=float("inf")), "lora_lr must be a finite number; got inf"),
    (dict(drag_lr=float("nan")), "drag_lr must be a finite number; got nan"),
    (dict(lam="0.1"), "lam must be a finite number"),
    (dict(cuda_graphs="no"), "cuda_graphs must be true or false; got 'no'"),
    (dict(lora_targets="to_q"), "lora_targets must be a non-empty sequence of module names"),
    (dict(lora_targets=()), "lora_targets must be a non-empty sequence of module names"),
    (dict(sup_res=(0, 32)), r"sup_res must be None or \(h, w\), each >= 1"),
    (dict(sup_res=(32.5, 32)), "sup_res must be None or two whole numbers"),
    (dict(backend=None), "backend must be a string"),
])
def test_bad_values_are_named(overrides, words):
    with pytest.raises(ConfigError, match=words):
        EditConfig().replace(**overrides)


@pytest.mark.parametrize("device, words", [
    ("gpu", "unknown device 'gpu'"),
    ("cuda", "no usable CUDA GPU|does not exist"),
    ("cuda:64", "no usable CUDA GPU|does not exist: this machine has"),
])
def test_a_device_this_machine_lacks_is_named_before_loading(device, words):
    """A CUDA device without a GPU (or past the last one) is a ConfigError that says so, not PyTorch's
    assertion when the first weight moves; on a machine with a GPU `cuda` itself is fine."""
    from fastdrag import DragEditor

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: `cuda` is a device it has")
    with pytest.raises(ConfigError, match=words):
        DragEditor.from_pretrained("/no/such/model", device=device)


def test_numpy_scalars_are_taken_as_the_numbers_they_are():
    import numpy as np

    config = EditConfig().replace(seed=np.int64(3), lam=np.float32(0.25), drag_steps=np.int32(5),
                                  cuda_graphs=np.bool_(False), sup_res=(np.int64(32), 32), size=[64, 128])
    assert (config.seed, config.drag.lam, config.drag.drag_steps, bool(config.cuda_graphs)) == (3, 0.25, 5, False)


def test_an_editor_checks_a_config_built_by_hand(tiny):
    from fastdrag import DragEditor

    with pytest.raises(ConfigError, match="seed must be a whole number"):
        DragEditor(tiny, torch.device("cpu"), torch.float32, config=EditConfig(seed="42"))
