"""The toy world and its quality measures, checked against scenes whose truth is known."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastdrag.toy.quality import psnr, score, segment
from fastdrag.toy.world import _draw, make_drag_case, make_scene


def test_scenes_hold_one_to_three_shapes_of_the_right_size():
    rng = np.random.default_rng(0)
    counts = set()
    for _ in range(40):
        scene = make_scene(rng)
        counts.add(len(scene.shapes))
        assert scene.image.size == (128, 128)
        for shape in scene.shapes:
            ys, xs = np.nonzero(shape.mask)
            across = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
            assert 18 <= across <= 52
            inside = np.asarray(scene.image)[shape.mask]
            assert (np.abs(inside.astype(int) - shape.colour).max(axis=1) <= 1).mean() > 0.95  # flat colour
        masks = [s.mask for s in scene.shapes]
        assert sum(m.sum() for m in masks) == np.logical_or.reduce(masks).sum()  # no overlaps
        assert scene.prompt.count(" and ") == len(scene.shapes) - 1
    assert counts == {1, 2, 3}


def test_drag_cases_move_a_shape_8_to_16_px_inside_the_mask():
    rng = np.random.default_rng(1)
    for _ in range(30):
        case = make_drag_case(rng)
        shape = case.scene.shapes[case.shape_index]
        assert case.handle == shape.centre
        assert 8 <= np.hypot(case.target[0] - case.handle[0], case.target[1] - case.handle[1]) <= 16
        assert case.mask[shape.mask].all()
        tx, ty = (int(round(v)) for v in case.target)
        assert case.mask[ty, tx] == 1 and case.mask.mean() < 0.6


def test_a_larger_world_renders_the_same_cases_scaled():
    small_rng, large_rng = np.random.default_rng(3), np.random.default_rng(3)
    for _ in range(20):
        small, large = make_drag_case(small_rng), make_drag_case(large_rng, 256)
        assert large.scene.image.size == (256, 256) and large.mask.shape == (256, 256)
        assert large.scene.prompt == small.scene.prompt
        assert np.allclose(large.handle, np.multiply(small.handle, 2)) and np.allclose(large.target, np.multiply(small.target, 2))
        for a, b in zip(small.scene.shapes, large.scene.shapes, strict=True):
            assert b.size == pytest.approx(2 * a.size) and b.mask.sum() == pytest.approx(4 * a.mask.sum(), rel=0.2)  # rasterised edges


def moved_scene(case):
    """The truth: the scene with the dragged shape drawn at its target instead."""
    shape = case.scene.shapes[case.shape_index]
    image = np.asarray(case.scene.image).copy()
    image[shape.mask] = case.scene.background[shape.mask]
    canvas = Image.fromarray(image)
    dx, dy = case.target[0] - case.handle[0], case.target[1] - case.handle[1]
    _draw(shape.kind, (shape.centre[0] + dx, shape.centre[1] + dy), shape.size, canvas, shape.colour)
    return np.asarray(canvas)


def test_measures_score_the_truth_and_no_edit():
    rng = np.random.default_rng(2)
    for _ in range(5):
        case = make_drag_case(rng)
        truth = score(case, moved_scene(case))
        assert truth.moved == pytest.approx(1.0, abs=0.08) and truth.md < 1.5
        assert truth.area_ratio == pytest.approx(1.0, abs=0.1) and truth.if_psnr == 99.0
        unchanged = score(case, np.asarray(case.scene.image))
        assert abs(unchanged.moved) < 0.05 and unchanged.area_ratio == pytest.approx(1.0)
        vanished = score(case, case.scene.background)
        assert vanished.moved == 0.0 and vanished.area_ratio == 0.0 and vanished.lost
        assert not truth.lost and not unchanged.lost
        # a remnant of the shape at the target is lost, not arrived: its centroid says nothing
        remnant = np.asarray(case.scene.background).copy()
        arrived = moved_scene(case)
        shape = case.scene.shapes[case.shape_index]
        keep = np.argwhere(np.all(arrived == shape.colour, axis=-1) & (case.mask > 0.5))[:max(1, shape.mask.sum() // 10)]
        remnant[keep[:, 0], keep[:, 1]] = shape.colour
        scrap = score(case, remnant)
        assert scrap.lost and scrap.moved == 0.0 and 0 < scrap.area_ratio < 0.25
        assert scrap.md == pytest.approx(float(np.linalg.norm(np.subtract(case.target, case.handle))))


def test_segment_and_psnr():
    background = np.full((4, 4, 3), 100, dtype=np.uint8)
    image = background.copy()
    image[1:3, 1:3] = (220, 40, 40)
    assert segment(image, background, (220, 40, 40)).sum() == 4
    assert psnr(image, image) == 99.0
    noisy = image.astype(int) + 10
    assert psnr(image, noisy) == pytest.approx(10 * np.log10(255 ** 2 / 100), rel=1e-6)


def test_the_shipped_text_encoder_loads_under_either_transformers_naming():
    """transformers 5 names a CLIPTextModel's weights without the `text_model.` prefix that 4 gives each (the
    shipped weights were saved by 5): the toy model's load renames them to the module's own naming, so the
    built-in `toy` loads under either, and a module of the other naming takes the same values."""
    import torch
    from safetensors.torch import load_file

    from fastdrag.toy.model import WEIGHTS, keys_as_in, load_toy, toy_text_encoder

    shipped = load_file(str(WEIGHTS / "text_encoder.safetensors"))
    installed = toy_text_encoder(seed=5)
    if next(iter(installed.state_dict())).startswith("text_model."):  # transformers 4: unwrap for the other naming
        prefixed, plain = installed, installed.text_model
    else:  # transformers 5: wrap
        plain, prefixed = installed, torch.nn.Module()
        prefixed.text_model = plain
    for module in (prefixed, plain):
        renamed = keys_as_in(module, {k: v.float() for k, v in shipped.items()})
        assert renamed.keys() == module.state_dict().keys()
        module.load_state_dict(renamed)  # strict: no key missing or left over
    loaded = list(load_toy().text_encoder.state_dict().values())
    assert len(loaded) == len(shipped) and all(
        torch.equal(a, b) for a, b in zip(loaded, plain.state_dict().values(), strict=True))


def test_training_writes_a_loadable_model_resumes_and_fits_a_time_budget(tmp_path):
    import torch
    from fastdrag.toy.model import load_toy
    from fastdrag.toy.train import CALIBRATION_STEPS, TrainConfig, train_toy

    config = TrainConfig(vae_steps=2, vae_batch=2, decoder_steps=1, decoder_batch=1, unet_steps=3, unet_batch=2,
                         scenes=60, checkpoint_every=2)
    train_toy(tmp_path / "fresh", config, device="cpu", progress=False)
    fresh = load_toy(tmp_path / "fresh")
    assert fresh.scaling_factor > 0 and torch.isfinite(next(fresh.unet.parameters())).all()
    assert torch.load(tmp_path / "fresh" / "unet-checkpoint.pt", weights_only=True)["step"] == 3

    # reuse the built-in VAE, start from the built-in UNet; a tiny budget stops right after calibration
    budget = TrainConfig(unet_steps=10_000, unet_batch=2, scenes=60, vae_from="toy", unet_from="toy",
                         unet_time_budget_s=1e-6)
    train_toy(tmp_path / "tuned", budget, device="cpu", progress=False)
    state = torch.load(tmp_path / "tuned" / "unet-checkpoint.pt", weights_only=True)
    assert state["step"] == state["total"] == CALIBRATION_STEPS
    tuned, builtin = load_toy(tmp_path / "tuned"), load_toy()
    assert tuned.scaling_factor == builtin.scaling_factor
    assert len({tuned.identity, builtin.identity, fresh.identity}) == 3  # LoRA caches keyed by weights
    assert load_toy().identity == builtin.identity
    from fastdrag.models import load_components  # what `--model DIR` loads: the trained folder itself
    assert load_components(str(tmp_path / "tuned")).identity == tuned.identity
    vae_equal = all(torch.equal(a, b)
                    for a, b in zip(tuned.vae.state_dict().values(), builtin.vae.state_dict().values(), strict=True))
    assert vae_equal
    changed = [not torch.equal(a, b)
               for a, b in zip(tuned.unet.state_dict().values(), builtin.unet.state_dict().values(), strict=True)]
    assert any(changed)
    # a second run resumes at the end and trains nothing more
    train_toy(tmp_path / "tuned", budget, device="cpu", progress=False)
    assert torch.load(tmp_path / "tuned" / "unet-checkpoint.pt", weights_only=True)["step"] == CALIBRATION_STEPS


def test_a_model_part_written_when_the_write_fails_keeps_the_part_it_replaced(tmp_path, monkeypatch):
    """`toy train` writes each part whole or not at all: a failure half way through (a full disk, Ctrl-C)
    leaves the part that was there, loadable, and no temporary file."""
    import torch
    from fastdrag.toy import model
    from fastdrag.toy.model import load_toy, save_part

    builtin = load_toy()
    for name in ("vae", "unet", "text_encoder"):
        save_part(getattr(builtin, name), tmp_path, name, {"scaling_factor": builtin.scaling_factor, "version": 1}
                  if name == "vae" else None)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}

    def half_written(tensors, filename, **kwargs):
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError("No space left on device")

    monkeypatch.setattr(model, "save_file", half_written)
    with pytest.raises(OSError, match="No space left"):
        save_part(builtin.unet, tmp_path, "unet")
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
    reloaded = load_toy(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.unet.state_dict().values(),
                                                  builtin.unet.state_dict().values(), strict=True))


def test_decoder_fine_tuning_of_a_reused_vae_keeps_the_latent_space(tmp_path):
    import json

    import torch
    from fastdrag.toy.model import load_toy
    from fastdrag.toy.train import TrainConfig, _scenes, train_toy

    config = TrainConfig(vae_from="toy", decoder_steps_on_reuse=2, decoder_batch=1, unet_steps=1, unet_batch=2, scenes=4,
                         scene_size=64)
    train_toy(tmp_path, config, device="cpu", progress=False)
    assert json.loads((tmp_path / "unet.json").read_text())["scene_size"] == 64  # what the UNet was trained at
    assert {image.shape for image, _ in _scenes(3, 0, 64)} == {(64, 64, 3)}
    tuned, builtin = load_toy(tmp_path), load_toy()
    for (name, a), b in zip(tuned.vae.state_dict().items(), builtin.vae.state_dict().values(), strict=True):
        if name.startswith(("encoder.", "quant_conv.")):
            assert torch.equal(a, b), name
    assert any(not torch.equal(a, b) for name, a, b in
               zip(tuned.vae.state_dict(), tuned.vae.state_dict().values(), builtin.vae.state_dict().values(), strict=True)
               if name.startswith("decoder."))
    assert tuned.scaling_factor == builtin.scaling_factor


def test_feature_loss_changes_what_the_unet_learns_and_leaves_no_head(tmp_path):
    import torch
    from fastdrag.toy.model import load_toy
    from fastdrag.toy.train import TrainConfig, train_toy

    trained = {}
    for weight in (0.0, 1.0):
        config = TrainConfig(vae_from="toy", unet_from="toy", unet_steps=2, unet_batch=2, scenes=4, feature_weight=weight)
        train_toy(tmp_path / str(weight), config, device="cpu", progress=False)
        trained[weight] = load_toy(tmp_path / str(weight)).unet.state_dict()  # loads: the head was not saved
    builtin = load_toy().unet.state_dict()
    changed = lambda a, b: any(not torch.equal(a[name], b[name]) for name in a)
    assert changed(trained[0.0], builtin) and changed(trained[1.0], builtin)
    assert changed(trained[1.0], trained[0.0])  # same batches and seed: only the feature loss differs
    assert trained[1.0].keys() == builtin.keys()


def test_colour_error_measures_the_mean_colour_of_shape_interiors():
    import torch

    from fastdrag.toy.train import _colour_error, _pixels
    from fastdrag.toy.world import interior

    scenes = [make_scene(np.random.default_rng(seed)) for seed in (3, 4)]
    exact = _pixels([scene.image for scene in scenes])
    assert float(_colour_error(exact, scenes)) < 1e-6
    shifted = exact.clone()
    offset = torch.tensor([0.1, -0.05, 0.0])[:, None]
    for image, scene in zip(shifted, scenes, strict=True):
        for shape in scene.shapes:
            inner = torch.from_numpy(interior(shape.mask))
            image[:, inner] += offset                     # interiors off by a known colour
            image[:, torch.from_numpy(shape.mask) & ~inner] -= 0.5  # edges are not part of the measure
    assert float(_colour_error(shifted, scenes)) == pytest.approx(0.05, abs=1e-5)
    assert float(_colour_error(exact.flip(-1), scenes)) > 0.01  # shapes not where the scenes have them
