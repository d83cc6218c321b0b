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
    with pytest.raises(OutputExistsError, match="overwrite"):
        save_image(Image.new("RGB", (3, 5)), target)
