"""Keep the repository root off `sys.path` while pytest runs here (`python -m pytest` puts it first).

The root's `kernels/` folder is installed as `fastdrag.kernels`; found on the path as a top-level
package it would shadow Hugging Face's `kernels` package, which transformers (>= 5.2x) requires and
diffusers imports. Nothing here imports the root's folders as top-level packages.
"""
import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _ROOT]
