"""Atomic writes: all or nothing, and the permissions a plain write would give."""
import os
import stat
from pathlib import Path

import pytest
from PIL import Image

from fastdrag.atomic import atomic_path, replace_path, save_image
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


def _folder(path, files):
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def _contents(path):
    return {child.name: child.read_text() for child in path.iterdir()}


def test_a_folder_replaces_another_whole_and_leaves_nothing_beside_it(tmp_path):
    old = _folder(tmp_path / "export", {"manifest.json": "old", "unet.onnx": "old weights"})
    new = _folder(tmp_path / ".export.staging", {"manifest.json": "new"})
    replace_path(new, old)
    assert _contents(tmp_path / "export") == {"manifest.json": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # the old one deleted, the staging renamed
    replace_path(_folder(tmp_path / ".first", {"a": "1"}), tmp_path / "fresh")  # nothing there before
    assert _contents(tmp_path / "fresh") == {"a": "1"}
    (tmp_path / "file.txt").write_text("old")
    (tmp_path / ".file.new").write_text("new")
    replace_path(tmp_path / ".file.new", tmp_path / "file.txt")
    assert (tmp_path / "file.txt").read_text() == "new"


def test_an_old_folder_is_never_half_deleted_and_comes_back_when_the_new_one_cannot_be_put_in_place(tmp_path,
                                                                                                 monkeypatch):
    from fastdrag import atomic

    old = _folder(tmp_path / "export", {"manifest.json": "old", "unet.onnx": "old weights"})
    new = _folder(tmp_path / ".export.staging", {"manifest.json": "new"})
    real_replace, seen = os.replace, []

    def interrupted(source, destination):
        seen.append((Path(source).name, Path(destination).name))
        if len(seen) == 2:  # Ctrl-C once the old one is aside, before the new one is in place
            assert _contents(Path(destination).parent / seen[0][1]) == {"manifest.json": "old", "unet.onnx": "old weights"}
            raise KeyboardInterrupt
        real_replace(source, destination)

    monkeypatch.setattr(atomic.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        replace_path(new, old)
    assert seen[0][0] == "export" and seen[0][1].startswith(".export.old-") and seen[1] == (".export.staging", "export")
    assert _contents(old) == {"manifest.json": "old", "unet.onnx": "old weights"}  # put back, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [".export.staging", "export"]


def test_an_output_that_cannot_be_written_is_named_before_the_work_and_a_failed_write_keeps_the_old_file(
        tmp_path, monkeypatch):
    from fastdrag.atomic import check_writable
    from fastdrag.errors import OutputError
    from fastdrag.export.pipeline import check_output

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match=f"cannot write {blocker}/out.png"):
        check_writable(blocker / "out.png", overwrite=False)
    with pytest.raises(OutputError, match=f"cannot write {blocker}/export"):
        check_output(blocker / "export", overwrite=False)
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]  # no probe left behind

    path = tmp_path / "edited.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(path)
    before = path.read_bytes()

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(OutputError, match="could not write .*edited.png: No space left on device"):
        save_image(Image.new("RGB", (4, 4)), path, overwrite=True)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "edited.png"]
