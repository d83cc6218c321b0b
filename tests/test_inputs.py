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
    ([((10, 10, 3), (20, 20))], "drag pair 0 is not"),  # a third coordinate is not dropped unseen
    (np.array([[10, 10, 20, 20]]), "drag pair 0 is not"),
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


def test_points_as_an_array_are_the_pairs_they_hold():
    """An (N, 2, 2) array, as a program holding its points in numpy has them, is the list of its pairs."""
    pairs = [((35.5, 25), (69, 49)), ((3, 40.25), (10, 2))]
    from_list = prepare_inputs(image(70, 50), pairs)
    from_array = prepare_inputs(image(70, 50), np.array(pairs))
    assert from_array.handles.tolist() == from_list.handles.tolist() == [[16.0, 16.0], [26.0, 1.0]]  # (row, col)
    assert from_array.targets.tolist() == from_list.targets.tolist()


def _sideways_file(path, upright: Image.Image, orientation: int = 6):
    """`upright` stored as a phone stores it: pixels turned, EXIF orientation saying how to turn them back."""
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6: the viewer turns 90° clockwise
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, exif=exif)
    return path


def test_an_exif_rotated_photo_is_edited_as_a_viewer_shows_it(tmp_path):
    """Points picked on the displayed (upright) image land where they were picked."""
    from fastdrag.inputs import load_image
    upright = image(width=128, height=64)
    path = _sideways_file(tmp_path / "phone.png", upright)
    with Image.open(path) as raw:
        assert raw.size == (64, 128)  # stored sideways
    loaded = load_image(path)
    assert loaded.size == (128, 64)
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(upright))
    # x = 80 and 90 exist only in the upright picture (the stored one is 64 wide); its mask, stored sideways the same way, fits it
    mask = Image.fromarray(np.pad(np.full((64, 40), 255, np.uint8), ((0, 0), (50, 38))))
    inputs = prepare_inputs(path, [((80, 10), (90, 20))], mask=_sideways_file(tmp_path / "mask.png", mask))
    assert inputs.original_size == (128, 64)
    assert inputs.mask is not None and inputs.mask[0, 0, :, :50].sum() == 0 and inputs.mask[0, 0, :, 50:90].all()


def test_16_bit_and_float_pictures_are_scaled_not_saturated(tmp_path):
    from fastdrag.inputs import load_image
    levels = np.array([[0, 32896, 65535, 8224]], dtype=np.uint16).repeat(4, axis=0)
    path = tmp_path / "deep.png"
    Image.fromarray(levels).save(path)
    with Image.open(path) as opened:
        assert opened.mode.startswith("I")  # PIL's own convert("RGB") would saturate these
    np.testing.assert_array_equal(np.asarray(load_image(path))[0, :, 0], [0, 128, 255, 32])
    floats = tmp_path / "float.tif"  # a float TIFF in [0, 1]
    Image.fromarray(np.array([[0.0, 0.5, 1.0, 0.25]], dtype=np.float32).repeat(4, axis=0), "F").save(floats)
    np.testing.assert_array_equal(np.asarray(load_image(floats))[0, :, 1], [0, 128, 255, 64])


@pytest.mark.parametrize("array, words", [
    (np.full((8, 8, 3), 1.5, np.float32), r"outside \[0, 1\]"),
    (np.full((8, 8, 3), np.nan, np.float32), "NaN or infinite"),
    (np.full((8, 8, 3), 300, np.int64), "outside 0-255"),
    (np.full((8, 8, 3), -1, np.int16), "outside 0-255"),
    (np.ones((8, 8, 3), bool), "must hold uint8"),
])
def test_an_image_array_is_never_wrapped_or_truncated(array, words):
    with pytest.raises(InputError, match=words):
        prepare_inputs(array, [((1, 1), (5, 5))])


def test_image_arrays_of_floats_in_0_1_and_small_integers_are_pixels():
    from fastdrag.inputs import load_image
    pixels = np.random.default_rng(1).integers(0, 256, (8, 8, 3))
    expected = pixels.astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(load_image(pixels.astype(np.int64))), expected)
    np.testing.assert_array_equal(np.asarray(load_image((pixels / 255.0).astype(np.float32))), expected)


def test_transparency_is_dropped_with_a_warning(caplog):
    from fastdrag.inputs import load_image
    rgba = Image.fromarray(np.random.default_rng(2).integers(0, 256, (8, 8, 4), dtype=np.uint8), "RGBA")
    with caplog.at_level("WARNING", logger="fastdrag.inputs"):
        loaded = load_image(rgba)
    assert "transparency" in caplog.text
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(rgba)[..., :3])
    caplog.clear()
    with caplog.at_level("WARNING", logger="fastdrag.inputs"):
        load_image(image())
    assert caplog.text == ""


def test_a_working_size_far_above_the_models_is_advised_against():
    from fastdrag.inputs import size_advice
    assert size_advice((1024, 1024), 512) is None and size_advice((512, 768), 512) is None
    advice = size_advice((4032, 3008), 512)  # a phone photo at its own size
    assert advice.startswith("working at 4032x3008, 46x the pixels of the 512x512")
    assert "size=(512, 384) (--size 512x384)" in advice
    assert "4.2x the pixels" in size_advice((1088, 1024), 512)


def test_an_edit_far_above_the_models_size_warns(editor, caplog):
    big = Image.fromarray(np.random.default_rng(3).integers(0, 256, (128, 192, 3), dtype=np.uint8))
    with caplog.at_level("WARNING", logger="fastdrag.editor"):
        editor.edit(big, "x", [((20, 20), (30, 30))], lora_steps=1, num_inference_steps=4, drag_steps=1)
    assert "working at 192x128, 6.0x the pixels of the 64x64" in caplog.text  # the tiny model's size
    caplog.clear()
    with caplog.at_level("WARNING", logger="fastdrag.editor"):
        editor.edit(image(), "x", [((20, 20), (30, 30))], lora_steps=1, num_inference_steps=4, drag_steps=1)
    assert "working at" not in caplog.text


def test_points_outside_the_editable_mask_are_warned_about(caplog):
    left_half = np.zeros((64, 64))
    left_half[:, :32] = 1
    with caplog.at_level("WARNING", logger="fastdrag.inputs"):
        prepare_inputs(image(), [((10, 10), (20, 30))], mask=left_half)
    assert caplog.text == ""
    with caplog.at_level("WARNING", logger="fastdrag.inputs"):
        prepare_inputs(image(), [((10, 10), (20, 30)), ((40, 5), (50, 60))], mask=left_half)
    assert "handle (40, 5) of drag pair 1 is outside the editable mask" in caplog.text
    assert "target (50, 60) of drag pair 1 is outside" in caplog.text and "pair 0" not in caplog.text


def test_grey_and_transparent_image_arrays_load_as_their_pil_images_do(caplog):
    from fastdrag.inputs import load_image

    pixels = np.random.default_rng(3).integers(0, 256, (8, 10, 4), dtype=np.uint8)
    grey = pixels[..., 0]
    for array in (grey, grey[..., None], grey / 255.0):
        np.testing.assert_array_equal(np.asarray(load_image(array)), np.asarray(Image.fromarray(grey).convert("RGB")))
    with caplog.at_level("WARNING", logger="fastdrag.inputs"):
        loaded = load_image(pixels)
    assert "transparency" in caplog.text
    np.testing.assert_array_equal(np.asarray(loaded), pixels[..., :3])


@pytest.mark.parametrize("bad, words", [
    (None, "must be a file path, a PIL image or an HxWx3 array; got NoneType"),
    (12, "got int"),
    (np.zeros((0, 0, 3), np.uint8), r"image array is empty \(shape \(0, 0, 3\)\)"),
    (np.zeros((4, 8, 8, 3), np.uint8), r"must be HxWx3 .*got shape \(4, 8, 8, 3\)"),
    (np.zeros((8, 8, 2), np.uint8), r"got shape \(8, 8, 2\)"),
])
def test_an_image_that_is_not_one_is_named(bad, words):
    with pytest.raises(InputError, match=words):
        prepare_inputs(bad, [((1, 1), (5, 5))])


@pytest.mark.parametrize("mask, words", [
    (np.full((64, 64), np.nan), "mask array has NaN or infinite values"),
    (np.where(np.eye(64) > 0, np.inf, 1.0), "mask array has NaN or infinite values"),
    ([["a"] * 64] * 64, "mask must be a file path, a PIL image or an HxW array of numbers; got list"),
])
def test_a_mask_that_is_not_numbers_is_refused_not_taken_for_no_mask(mask, words):
    with pytest.raises(InputError, match=words):
        prepare_inputs(image(), [((1, 1), (5, 5))], mask)


def test_a_mask_reads_the_same_from_a_file_a_pil_image_and_grey_or_rgb_arrays_of_0_255_or_0_1(tmp_path):
    """Every form a mask may take: the same pixels give the same latent mask (0-255 numbers are scaled, an
    HxWx3 or HxWx4 array's first channel is read)."""
    grey = np.zeros((64, 128), dtype=np.uint8)
    grey[10:30, 20:47] = 255
    Image.fromarray(grey).save(tmp_path / "mask.png")
    forms = [tmp_path / "mask.png", Image.fromarray(grey), Image.fromarray(grey).convert("RGB"), grey,
             grey.astype(np.float64) / 255, np.stack([grey] * 3, axis=2), np.dstack([grey] * 3 + [np.full_like(grey, 255)])]
    masks = [prepare_inputs(image(128, 64), [((25, 15), (30, 20))], mask=form).mask for form in forms]
    assert masks[0].shape == (1, 1, 64, 128) and masks[0].sum() == 20 * 27
    for mask in masks[1:]:
        assert np.array_equal(np.asarray(mask), np.asarray(masks[0]))


def test_a_mask_file_that_is_not_an_image_is_named(tmp_path):
    (tmp_path / "mask.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match=r"mask file .*mask.png is not a readable image"):
        prepare_inputs(image(), [((1, 1), (5, 5))], mask=tmp_path / "mask.png")


@pytest.mark.parametrize("data, words", [
    ({"handles": [[1, 1]]}, "needs lists 'handles' and 'targets'"),
    ({"handles": [[1, 1]], "targets": "[[5, 5]]"}, "needs lists 'handles' and 'targets'"),
    ({"handles": [[1, 1], [2, 2]], "targets": [[5, 5]]}, "has 2 handles but 1 targets: points must be paired"),
    ([[[1, 1], [5, 5]], [[1, 1]]], r"entry 1 is not a \[handle, target\] pair"),
    ([[1, 1, 5, 5]], r"entry 0 is not a \[handle, target\] pair"),
    ("1,1:5,5", "must hold a list of pairs or handles/targets lists"),
])
def test_points_json_that_is_not_pairs_is_refused_naming_its_source(data, words):
    from fastdrag.inputs import points_from_json

    with pytest.raises(InputError, match=rf"^points\.json:? {words}"):
        points_from_json(data, "points.json")


def test_points_json_in_either_form_gives_the_same_pairs():
    from fastdrag.inputs import points_from_json

    pairs = points_from_json([[[1, 2], [5, 6]], [[3, 4], [7, 8]]], "points.json")
    assert [tuple(map(tuple, pair)) for pair in pairs] == \
        [tuple(map(tuple, pair)) for pair in points_from_json({"handles": [[1, 2], [3, 4]], "targets": [[5, 6], [7, 8]]}, "x")]
