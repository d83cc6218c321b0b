"""bench/toy_paths.py, the diagnostic of where a toy edit's move is lost: its path swaps and measures."""
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdrag.toy.model import WEIGHTS

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "toy_paths.py"


@pytest.fixture(scope="module")
def toy_paths():
    spec = importlib.util.spec_from_file_location("toy_paths", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_swapping_every_path_gives_the_source_eps(toy_paths, tiny):
    unet = tiny.unet
    generator = torch.Generator().manual_seed(3)
    source = torch.randn(1, 4, 8, 8, generator=generator)
    other = source + 0.5 * torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        source_paths, other_paths = toy_paths.unet_paths(unet, source, 500, text), toy_paths.unet_paths(unet, other, 500, text)
        both = toy_paths.swapped_eps(unet, other, 500, text, other_paths, source_paths, skips=True, mid=True)
        neither = toy_paths.swapped_eps(unet, other, 500, text, other_paths, source_paths, skips=False, mid=False)
        skips_only = toy_paths.swapped_eps(unet, other, 500, text, other_paths, source_paths, skips=True, mid=False)
    assert len(source_paths[1]) == 1 + sum(len(block.resnets) + (block.downsamplers is not None) for block in unet.down_blocks)
    assert torch.allclose(both, source_paths[0], atol=1e-5)
    assert torch.allclose(neither, other_paths[0], atol=1e-5)
    assert not torch.allclose(source_paths[0], other_paths[0], atol=1e-3)  # the two latents do differ
    assert not torch.allclose(skips_only, other_paths[0], atol=1e-3)


def test_feature_distinctness_measures_distance_from_the_handle(toy_paths):
    size, handle = 31, (15, 15)
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    radius = torch.hypot((rows - 15).float(), (cols - 15).float())
    shape = radius <= 10
    background = radius >= 13
    features = torch.full((3, size, size), 5.0)  # background: 5 away from the handle's 0
    features[:, shape] = radius[shape] * 0.25   # inside: grows with the distance from the handle
    near, ring = toy_paths.feature_distinctness(features, handle, shape, background)
    assert 0 < near < ring < 1
    assert ring == pytest.approx(float(torch.median(radius[shape & (radius >= 4) & (radius <= 8)])) * 0.25 / 5)
    features[:, shape] = 0.0  # a flat interior: indistinguishable from the handle
    assert toy_paths.feature_distinctness(features, handle, shape, background) == (0.0, 0.0)
    assert all(math.isnan(v) for v in toy_paths.feature_distinctness(features, (0, 0), radius < 0, background))


@pytest.mark.skipif(not (WEIGHTS / "unet.safetensors").is_file(), reason="the toy model's weights are not shipped here")
def test_without_drag_steps_every_reading_is_the_same(toy_paths):
    from fastdrag import DragEditor
    from fastdrag.toy.world import make_drag_case

    editor = DragEditor.from_pretrained("toy", device="cpu", progress=False)
    case = make_drag_case(np.random.default_rng(0))
    row = toy_paths.analyse_case(editor, case, lora_steps=0, drag_steps=0)
    assert 0 < row["near"] < row["ring"]
    # z* = z_t: the latent change is zero, so every path reads the same x0 and the shape stays put
    assert row["full"] == pytest.approx(row["latent"], abs=1e-6)
    assert row["skips_src"] == pytest.approx(row["full"], abs=1e-6) and row["mid_src"] == pytest.approx(row["full"], abs=1e-6)
    assert abs(row["full"]) < 0.2
