"""The wheel a user installs: built from this checkout as `pip wheel --no-build-isolation` builds it (in an
environment with transformers, whose `kernels` dependency plugs into every setuptools build)."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_builds_here_and_holds_the_subpackages_the_toy_weights_and_the_type_marker(tmp_path):
    pytest.importorskip("setuptools", minversion="70.1", reason="builds with the environment's setuptools, "
                        "which needs 70.1 or later to write a wheel without the `wheel` package")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                            "--no-index", "-q", "-w", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                           timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("fastdrag-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("fastdrag/editor.py", "fastdrag/kernels/motion_supervision.py", "fastdrag/export/standalone.py",
                   "fastdrag/toy/model.py", "fastdrag/py.typed", "fastdrag/export/manifest.schema.json"):
        assert module in names, module
    weights = [name for name in names if name.startswith("fastdrag/toy/weights/")]
    assert {Path(name).suffix for name in weights} == {".safetensors", ".json"} and len(weights) >= 6
    assert not any(name.startswith(("kernels/", "export/", "tests/", "bench/")) for name in names)
    entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
    assert "fastdrag = fastdrag.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
