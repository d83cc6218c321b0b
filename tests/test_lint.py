"""The project's Python passes its linter (ruff, with the rules pyproject.toml selects) and runs on the oldest
Python setup.py admits (vermin)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_code_passes_the_linter():
    beside_python = Path(sys.executable).parent / "ruff"  # the environment's own, which the test extras install
    ruff = str(beside_python) if beside_python.exists() else shutil.which("ruff")
    assert ruff, "ruff is not installed: pip install -e \".[test]\""
    checked = subprocess.run([ruff, "check", "--no-cache", "--output-format", "concise", str(ROOT)],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert checked.returncode == 0, checked.stdout[-4000:] + checked.stderr[-2000:]


def test_the_code_uses_nothing_the_oldest_supported_python_lacks():
    """vermin finds no module, function or syntax newer than setup.py's `python_requires` (3.10: CI runs the
    suite on 3.11 only, so a 3.11-only call such as `import tomllib` would pass every other test and fail
    only on a user's 3.10). `--exclude long`: it reads tensors' `.long()` as Python 2's `long`."""
    import re

    oldest = re.search(r'python_requires=">=(\d+\.\d+)"', (ROOT / "setup.py").read_text()).group(1)
    beside_python = Path(sys.executable).parent / "vermin"
    vermin = str(beside_python) if beside_python.exists() else shutil.which("vermin")
    assert vermin, "vermin is not installed: pip install -e \".[test]\""
    folders, files = ["fastdrag", "kernels", "export", "bench", "tests"], ["setup.py", "conftest.py"]
    checked = subprocess.run([vermin, "--no-tips", "--violations", "--eval-annotations", "--exclude", "long",
                              f"--target={oldest}-", *folders, *files], capture_output=True, text=True, cwd=ROOT,
                             timeout=120)
    assert checked.returncode == 0, checked.stdout[-4000:] + checked.stderr[-2000:]
    python_files = sum(len(list((ROOT / folder).rglob("*.py"))) for folder in folders) + len(files)
    assert f"Analyzing {python_files} files" in checked.stdout, checked.stdout[-2000:]  # all of them read
