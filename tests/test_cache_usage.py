"""The LoRA cache on disk: what it holds, recency kept on use, pruning least recently used first."""
import os
import shutil
import subprocess
import sys
import time

import pytest

import fastdrag.cache_usage as cache_usage
from fastdrag.cache_usage import PARTIAL_AGE_S, entries, parse_size, prune
from fastdrag.cli import main
from fastdrag.errors import InputError


def _file(path, size, age_s):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


@pytest.fixture()
def cache(tmp_path):
    """Two LoRAs, two exports (one used recently), an old and a young half-written file."""
    root = tmp_path / "lora"
    _file(root / "old.safetensors", 1000, 5000)
    _file(root / "new.safetensors", 1000, 100)
    for name, age in (("stale-64x64-L10-onnx-fp32", 4000), ("fresh-64x64-L10-onnx-fp32", 200)):
        _file(root / "exports" / name / "unet_inversion.onnx", 30000, 10)  # written long ago, its
        _file(root / "exports" / name / "manifest.json", 100, age)        # manifest renewed on use
    _file(root / ".abandoned.safetensors.tmp", 500, PARTIAL_AGE_S + 10)
    _file(root / ".in-progress.safetensors.tmp", 500, 5)
    return root


def test_entries_are_listed_least_recently_used_first(cache):
    found = entries(cache)
    assert [(e.path.name, e.kind) for e in found] == [
        ("old.safetensors", "lora"), ("stale-64x64-L10-onnx-fp32", "export"), (".abandoned.safetensors.tmp", "partial"),
        ("fresh-64x64-L10-onnx-fp32", "export"), ("new.safetensors", "lora")]
    assert found[1].size == 30100  # a folder counts all its files


def test_prune_removes_least_recently_used_until_under_the_limit(cache):
    removed = prune(cache, 31500)
    assert [e.path.name for e in removed] == ["old.safetensors", "stale-64x64-L10-onnx-fp32", ".abandoned.safetensors.tmp"]
    assert sorted(p.name for p in cache.iterdir()) == [".in-progress.safetensors.tmp", "exports", "new.safetensors"]
    assert [p.name for p in (cache / "exports").iterdir()] == ["fresh-64x64-L10-onnx-fp32"]
    assert prune(cache, 10**9) == []
    assert {e.path.name for e in prune(cache, 0)} == {"fresh-64x64-L10-onnx-fp32", "new.safetensors"}
    assert (cache / ".in-progress.safetensors.tmp").exists()  # maybe another process's write: left alone


def test_what_other_processes_move_or_remove_while_the_cache_is_listed_is_left_out(cache, monkeypatch):
    """A server per GPU may share one cache: between the listing and its reading, another process's
    prune removes items and its save puts a written file in place of its temporary name."""
    listed = cache_usage._listed

    def listed_then_changed(directory):
        paths = listed(directory)
        (cache / "old.safetensors").unlink()
        shutil.rmtree(cache / "exports" / "stale-64x64-L10-onnx-fp32")
        os.replace(cache / ".in-progress.safetensors.tmp", cache / "in-progress.safetensors")
        return paths

    monkeypatch.setattr(cache_usage, "_listed", listed_then_changed)
    assert [e.path.name for e in entries(cache)] == [
        ".abandoned.safetensors.tmp", "fresh-64x64-L10-onnx-fp32", "new.safetensors"]


def test_prune_counts_what_another_process_removed_first_as_freed_not_as_removed(cache, monkeypatch):
    listing = cache_usage.entries

    def listed_then_removed(directory):
        found = listing(directory)
        (cache / "old.safetensors").unlink()
        shutil.rmtree(cache / "exports" / "stale-64x64-L10-onnx-fp32")
        return found

    monkeypatch.setattr(cache_usage, "entries", listed_then_removed)
    removed = prune(cache, 31500)
    assert [e.path.name for e in removed] == [".abandoned.safetensors.tmp"]
    assert sorted(p.name for p in cache.iterdir()) == [".in-progress.safetensors.tmp", "exports", "new.safetensors"]
    assert [p.name for p in (cache / "exports").iterdir()] == ["fresh-64x64-L10-onnx-fp32"]


SHARING_PROCESS = """
import sys, tempfile
from pathlib import Path
from fastdrag.atomic import atomic_path, replace_path
from fastdrag.cache_usage import prune
directory, role = Path(sys.argv[1]), sys.argv[2]
rounds = 0
while not (directory.parent / "stop").exists():
    if role == "writer":  # a server saving adapters, and now and then an export, as the cache's writers do
        with atomic_path(directory / f"lora{rounds % 40}.safetensors") as tmp:
            tmp.write_bytes(bytes(50_000))
        if rounds % 4 == 0:
            (directory / "exports").mkdir(exist_ok=True)
            staged = Path(tempfile.mkdtemp(prefix=".export.", dir=directory / "exports"))
            (staged / "manifest.json").write_bytes(bytes(20_000))
            replace_path(staged, directory / "exports" / f"export{rounds % 10}")
    else:
        prune(directory, 1_000_000)
    rounds += 1
print(rounds)
"""


def test_servers_sharing_a_cache_prune_it_while_another_writes_it(tmp_path):
    """Two processes prune the cache to a size after each request, as `fastdrag serve --prune-cache-to`
    does, while a third saves adapters and exports into it; no call of any of them fails. (Before
    listing learnt to leave out what is gone, most of the prunes failed with FileNotFoundError.)"""
    directory = tmp_path / "lora"
    directory.mkdir()
    others = [subprocess.Popen([sys.executable, "-c", SHARING_PROCESS, str(directory), role], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for role in ("writer", "pruner")]
    prunes, removed, start = 0, 0, time.monotonic()
    try:
        while time.monotonic() - start < 3 or prunes < 100:
            removed += len(prune(directory, 1_000_000))
            prunes += 1
    finally:
        (tmp_path / "stop").touch()
        results = [process.communicate(timeout=60) for process in others]
    for process, (out, err) in zip(others, results, strict=True):
        assert process.returncode == 0, err
        assert int(out) > 0
    assert removed > 0  # the removals raced too, not only the listings


def test_loading_a_lora_renews_it(editor, picture, fast):
    editor.train_lora(picture.image, picture.prompt, **fast)
    (path,) = editor.cache.directory.glob("*.safetensors")
    os.utime(path, (1, 1))
    editor.release()  # so the next edit loads it from the cache
    editor.edit(picture.image, picture.prompt, picture.points, **fast)
    assert path.stat().st_mtime > time.time() - 60


def test_sizes_parse_and_bad_ones_are_named():
    assert parse_size("20GB") == 20 * 10**9 and parse_size("1.5 GiB") == int(1.5 * 2**30)
    assert parse_size("500m") == 500 * 10**6 and parse_size("0") == 0 and parse_size("123") == 123
    for bad in ("lots", "20 parsecs", "-1GB", ""):
        with pytest.raises(InputError, match="is not a number with an optional unit"):
            parse_size(bad)


def test_cache_command_reports_and_prunes(cache, capsys):
    assert main(["cache", "--cache-dir", str(cache)]) == 0
    report = capsys.readouterr().out
    assert "2 LoRAs 2.0 kB, 2 exports 60.2 kB, 1 partial write 500 B; total 62.7 kB" in report
    assert main(["cache", "--cache-dir", str(cache), "--prune-to", "31.5kB"]) == 0
    report = capsys.readouterr().out
    assert "removed 3 (least recently used first), freed 31.6 kB" in report
    assert report.rstrip().endswith("1 LoRA 1.0 kB, 1 export 30.1 kB; total 31.1 kB")
    assert main(["cache", "--cache-dir", str(cache), "--prune-to", "lots"]) == 2
    assert "is not a number" in capsys.readouterr().err
