"""Atomic writes: all or nothing, and the permissions a plain write would give."""
import os
import stat

import pytest
from PIL import Image

from fastdrag.atomic import atomic_path, save_image
from fastdrag.errors import OutputExistsError


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_get_the_permissions_of_a_plain_write(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    with atomic_path(tmp_path / "atomic.txt") as tmp:
        tmp.write_text("x")
    assert _mode(tmp_path / "atomic.txt") == _mode(plain)  # not mkstemp's 0600
    save_image(Image.new("RGB", (3, 5)), tmp_path / "out.png")
    assert _mode(tmp_path / "out.png") == _mode(plain)


def test_a_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    picture = tmp_path / "picture.png"
    picture.write_bytes(b"old")
    with pytest.raises(OutputExistsError, match="overwrite"):
        save_image(Image.new("RGB", (3, 5)), picture)
    assert picture.read_bytes() == b"old"


def test_images_are_written_in_the_format_their_extension_names(tmp_path):
    import numpy as np

    from fastdrag.errors import InputError
    rows, cols = np.mgrid[0:32, 0:48]
    smooth = np.stack([rows * 7, cols * 5, (rows + cols) * 3], axis=-1)
    picture = Image.fromarray(np.clip(smooth + (((rows // 8 + cols // 8) % 2) * 60)[..., None], 0, 255).astype(np.uint8))
    for name, expected in (("a.png", "PNG"), ("b.JPG", "JPEG"), ("c.jpeg", "JPEG"), ("d.webp", "WEBP"), ("e", "PNG")):
        with Image.open(save_image(picture, tmp_path / name)) as written:
            assert written.format == expected
    # JPEG at quality 95, not PIL's 75: closer to the picture than a default save
    picture.save(tmp_path / "default.jpg")
    error = {}
    for name in ("b.JPG", "default.jpg"):
        with Image.open(tmp_path / name) as written:
            error[name] = np.abs(np.asarray(written, dtype=float) - np.asarray(picture, dtype=float)).mean()
    assert error["b.JPG"] < 0.7 * error["default.jpg"], error
    with pytest.raises(InputError, match=r"cannot write \.xyz images"):
        save_image(picture, tmp_path / "f.xyz")
    assert not list(tmp_path.glob("*f.xyz*"))
