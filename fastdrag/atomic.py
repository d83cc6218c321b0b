"""Atomic file writes: a temporary file in the destination folder, then a rename."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator, Union

from .errors import InputError, OutputError, OutputExistsError

SAVE_OPTIONS = {"JPEG": {"quality": 95}, "WEBP": {"quality": 95}}  # PIL's default JPEG quality is 75


def check_writable(path: Union[str, Path], overwrite: bool) -> Path:
    """Refuse an existing output unless `overwrite`; create the parent folder and check that a file can
    be written in it, so that an edit or export learns it before its work, not after."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; pass --overwrite (overwrite=True) to replace it")
    check_folder_writable(path.parent, path)
    return path


def check_folder_writable(folder: Path, output: Path) -> None:
    """Make `folder` (where `output` and its temporary sibling go) and write a probe file in it; an
    OutputError that names `output` and the reason if either fails."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{output.name}.probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write {output}: {exc.strerror or exc} ({folder})") from exc


def _umask() -> int:
    """The process umask (read once at import: setting it to read it is not thread-safe later)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


_NEW_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file; mkstemp's files are 0600


@contextlib.contextmanager
def atomic_path(path: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _NEW_FILE_MODE)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def replace_path(staged: Union[str, Path], path: Union[str, Path]) -> None:
    """Put `staged` (a finished file or folder beside `path`) at `path`, replacing what is there.

    A folder cannot be renamed over a non-empty one, and deleting the old one first would leave, if
    interrupted, a half-deleted export whose manifest names files that are gone. So the old one is
    renamed aside (a hidden name beside it), the new one renamed into place, and only then is the old
    one deleted: `path` holds the whole old output or the whole new one, never a part of either (for
    the instant between the two renames it holds nothing, the old one whole beside it). If the new
    one cannot be put in place, the old one goes back.
    """
    staged, path = Path(staged), Path(path)
    aside = None
    if path.exists() or path.is_symlink():
        aside = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:12]}")
        try:
            os.replace(path, aside)
        except FileNotFoundError:  # removed meanwhile (another process pruning a shared cache)
            aside = None
    try:
        os.replace(staged, path)
    except BaseException:
        if aside is not None:
            os.replace(aside, path)
        raise
    if aside is not None:
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.unlink()


def image_format(path: Union[str, Path]) -> str:
    """The PIL format that an image path's extension names (PNG without one); an InputError naming
    the extension when PIL cannot write it, so that a caller learns it before an edit, not after."""
    from PIL import Image

    suffix = Path(path).suffix.lower()
    if not suffix:
        return "PNG"
    Image.init()
    name = Image.registered_extensions().get(suffix)
    if name is None or name not in Image.SAVE:
        raise InputError(f"cannot write {suffix} images ({path}): use .png, .jpg or .webp")
    return name


def check_image_output(path: Union[str, Path], overwrite: bool) -> Path:
    """`check_writable` for an image path whose extension PIL can also write."""
    image_format(path)
    return check_writable(path, overwrite)


def save_image(image, path: Union[str, Path], overwrite: bool = False) -> Path:
    """Write a PIL image atomically in the format its extension names (JPEG and WebP at quality 95),
    refusing to replace an existing file unless `overwrite`."""
    name = image_format(path)
    path = check_writable(path, overwrite)
    try:
        with atomic_path(path) as tmp:
            image.save(tmp, format=name, **SAVE_OPTIONS.get(name, {}))
    except OSError as exc:  # a full disk, say: the old file, if any, is as it was
        raise OutputError(f"could not write {path}: {exc.strerror or exc}") from exc
    return path
