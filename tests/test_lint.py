"""The project's Python passes its linter (ruff, with the rules pyproject.toml selects)."""
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
