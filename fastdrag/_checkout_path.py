"""Run from a source checkout's root, Python finds the checkout's `kernels/` folder (installed as
`fastdrag.kernels`) as the top-level package `kernels`, in place of Hugging Face's `kernels` package,
which transformers (>= 5.2x) requires and imports from diffusers' model loading: every model load then
fails. `import_hub_kernels` imports the installed package first, with the root off the path for that
one import, so later imports of `kernels` get it."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SHADOW = os.path.join(_ROOT, "kernels", "__init__.py")


def _is_root(entry: str) -> bool:
    return os.path.abspath(entry or os.curdir) == _ROOT


def import_hub_kernels() -> None:
    """Import the installed `kernels` package when the checkout's folder would shadow it; else nothing."""
    if "kernels" in sys.modules or not any(_is_root(entry) for entry in sys.path):
        return
    spec = importlib.util.find_spec("kernels")
    if spec is None or spec.origin is None or os.path.abspath(spec.origin) != _SHADOW:
        return
    saved = list(sys.path)
    sys.path[:] = [entry for entry in sys.path if not _is_root(entry)]
    try:
        importlib.import_module("kernels")
    except ImportError:  # not installed: nothing to shadow
        pass
    finally:
        sys.path[:] = saved
