import numpy as np
import pytest
from PIL import Image

from fastdrag.errors import InputError
from fastdrag.inputs import prepare_inputs, sup_to_image, working_size


def image(width=64, height=64):
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("points, words", [
    ([((70, 10), (20, 20))], r"handle \(70, 10\) of drag pair 0 is outside the 64x64 image"),
    ([((10, 10), (20, -1))], r"target \(20, -1\) of drag pair 0 is outside"),
    ([((10, 10), (10, 10))], "handle equal to its target"),
    ([((10, 10),)], "is not a \\(handle, target\\) pair"),
    ([((10, 10), (20, 20)), ((5, 5), (8, 8), (9, 9))], "drag pair 1 is not"),
    ([], "no drag points"),
    ([((float("nan"), 10), (20, 20))], "not finite"),
])
def test_bad_points(points, words):
    with pytest.raises(InputError, match=words):
        prepare_inputs(image(), points)


def test_missing_and_unreadable_image(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        prepare_inputs(tmp_path / "nope.png", [((1, 1), (5, 5))])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(InputError, match="not a readable image"):
        prepare_inputs(broken, [((1, 1), (5, 5))])


def test_mask_of_the_wrong_size():
    with pytest.raises(InputError, match="mask size 32x64 differs from the image size 64x64"):
        prepare_inputs(image(), [((1, 1), (5, 5))], mask=np.ones((64, 32)))


def test_empty_mask_means_no_mask_term(caplog):
    with caplog.at_level("INFO", logger="fastdrag"):
        inputs = prepare_inputs(image(), [((1, 1), (5, 5))], mask=np.zeros((64, 64)))
    assert inputs.mask is None
    assert "mask is empty" in caplog.text


def test_mask_image_file(tmp_path):
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[10:30, 20:40] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    inputs = prepare_inputs(image(), [((1, 1), (5, 5))], mask=tmp_path / "mask.png")
    assert inputs.mask.shape == (1, 1, 64, 64) and inputs.mask.sum() == 400


def test_resize_policy_scales_points_and_mask():
    assert working_size((70, 50)) == (64, 64)
    assert working_size((500, 333)) == (512, 320)
    assert working_size((500, 333), (256, 192)) == (256, 192)
    mask = np.zeros((50, 70))
    mask[:, 35:] = 1
    inputs = prepare_inputs(image(70, 50), [((35, 25), (69, 49))], mask=mask)
    assert inputs.image.size == (64, 64) and inputs.sup_res == (32, 32)
    assert inputs.handles.tolist() == [[16.0, 16.0]]      # round(25 * 32 / 50), round(35 * 32 / 70)
    assert inputs.targets.tolist() == [[31.0, 31.0]]      # clipped to the map
    assert inputs.mask.shape == (1, 1, 64, 64) and inputs.mask[0, 0, :, :32].sum() == 0 and inputs.mask[0, 0, :, 33:].all()
    back = sup_to_image(inputs.handles, inputs.sup_res, (70, 50))
    assert back == [(35.0, 25.0)]
