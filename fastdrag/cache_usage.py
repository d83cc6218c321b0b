"""What the LoRA cache holds on disk, and pruning it to a size, least recently used first.

The cache folder holds one `<key>.safetensors` per trained adapter (about 13 MB at SD 1.5, rank
16) and the exports of the exported backends under `exports/`: a whole UNet's graphs each,
gigabytes at SD 1.5 (one per model and size for `onnxruntime`, one per adapter for `tensorrt`).
Nothing is deleted unless asked (`fastdrag cache --prune-to SIZE`, or `prune`): a server that
edits many images should prune on a schedule.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from .errors import InputError

PARTIAL_AGE_S = 3600  # a half-written file or folder younger than this may still be being written


@dataclass
class CacheEntry:
    path: Path
    kind: str          # "lora", "export" or "partial" (left by an interrupted write)
    size: int          # bytes
    last_used: float   # seconds since the epoch (the file's modification time, renewed on use)


def touch(path: Path) -> None:
    """Mark a cache file as used now (best effort: a read-only cache still works)."""
    try:
        os.utime(path)
    except OSError:
        pass


def _folder_size(folder: Path) -> int:
    size = 0
    for path in folder.rglob("*"):
        try:
            size += path.stat().st_size if path.is_file() else 0
        except FileNotFoundError:  # gone since it was listed
            pass
    return size


def _listed(directory: Path) -> List[Path]:
    """What the cache folder holds now: adapters, hidden (partial) files, and exports."""
    candidates = list(directory.glob("*.safetensors")) + list(directory.glob(".*"))
    exports = directory / "exports"
    if exports.is_dir():
        candidates += list(exports.iterdir())
    return candidates


def _entry(path: Path, now: float) -> Optional[CacheEntry]:
    """`path` as a removable entry; None for a partial write young enough to be still going on."""
    stat = path.stat()
    if path.name.startswith("."):
        if now - stat.st_mtime < PARTIAL_AGE_S:
            return None  # possibly being written by another process
        kind = "partial"
    else:
        kind = "lora" if path.suffix == ".safetensors" else "export"
    if kind == "export" and (path / "manifest.json").is_file():
        stat = (path / "manifest.json").stat()  # renewed each time an edit uses the export
    size = _folder_size(path) if path.is_dir() else stat.st_size
    return CacheEntry(path, kind, size, stat.st_mtime)


def entries(directory: Path) -> List[CacheEntry]:
    """Every removable item of the cache at `directory`, least recently used first.

    Other processes may share the cache (a server per GPU): an item they move into place or remove
    between the listing and its reading is left out, not an error.
    """
    found: List[CacheEntry] = []
    now = time.time()
    for path in _listed(Path(directory)):
        try:
            entry = _entry(path, now)
        except FileNotFoundError:
            continue
        if entry is not None:
            found.append(entry)
    return sorted(found, key=lambda entry: entry.last_used)


def remove(entry: CacheEntry) -> bool:
    """Delete one entry; a folder is first renamed away, so no reader sees it half deleted. False when
    it was already gone (another process sharing the cache removed it first)."""
    try:
        if entry.path.is_dir():
            doomed = entry.path.with_name(f".{entry.path.name}.deleting-{os.getpid()}")
            os.replace(entry.path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        else:
            entry.path.unlink()
    except (FileNotFoundError, IsADirectoryError):  # gone, or gone and another process's new export put there
        return False
    return True


def prune(directory: Path, max_bytes: int) -> List[CacheEntry]:
    """Remove the least recently used entries until the cache holds at most `max_bytes`; returns the
    ones this call removed (an entry another process removed meanwhile counts as freed, not as removed)."""
    remaining = entries(directory)
    total = sum(entry.size for entry in remaining)
    removed: List[CacheEntry] = []
    for entry in remaining:
        if total <= max_bytes:
            break
        if remove(entry):
            removed.append(entry)
        total -= entry.size
    return removed


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'20GB', '1.5 GiB', '500M', '0' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise InputError(f"size {text!r} is not a number with an optional unit (e.g. 20GB, 500MB, 1.5GiB, 0)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def human(size: int) -> str:
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size} B"
