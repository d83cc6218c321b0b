"""The LoRA cache on disk: what it holds, recency kept on use, pruning least recently used first."""
import os
import time

import pytest

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
