"""Python started in the checkout's root (`python -m fastdrag.cli ...`) imports Hugging Face's `kernels`
package, not the checkout's `kernels/` folder (which is fastdrag.kernels)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def installed_hub_kernels() -> bool:
    """Whether a `kernels` package other than the checkout's folder is installed."""
    spec = importlib.util.find_spec("kernels")
    return spec is not None and spec.origin is not None and Path(spec.origin).resolve() != ROOT / "kernels" / "__init__.py"


@pytest.mark.skipif(not installed_hub_kernels(), reason="Hugging Face's kernels package is not installed: nothing to shadow")
def test_fastdrag_imported_in_the_checkout_root_gives_transformers_the_installed_kernels_package():
    shadowed = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.__file__)"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    assert shadowed.stdout.strip() == str(ROOT / "kernels" / "__init__.py")  # what the guard is for
    code = "import fastdrag, kernels; print(kernels.__file__); from diffusers import AutoencoderKL"
    guarded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert guarded.returncode == 0, guarded.stderr[-2000:]
    assert Path(guarded.stdout.strip()).resolve() != ROOT / "kernels" / "__init__.py"
