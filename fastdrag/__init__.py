"""fastdrag: DragDiffusion point-based image editing on Stable Diffusion 1.x and 2.x, fast and deployable."""
from typing import TYPE_CHECKING

from . import _quiet  # noqa: F401  (first: silences xformers at import)
from ._checkout_path import import_hub_kernels

import_hub_kernels()  # before transformers looks for it (fastdrag._checkout_path)
from .config import DenoiseConfig, DragConfig, EditConfig, InversionConfig, LoraConfig
from .errors import ConfigError, FastDragError, InputError, ModelLoadError, OutputError, OutputExistsError
from .progress import EditCancelled

if TYPE_CHECKING:  # a type checker sees the editor's types; at run time it is imported on first use (below)
    from .editor import DragEditor, EditResult

__version__ = "0.1.0"

__all__ = [
    "DragEditor", "EditResult", "EditConfig", "LoraConfig", "InversionConfig", "DragConfig", "DenoiseConfig",
    "FastDragError", "InputError", "ModelLoadError", "OutputExistsError", "OutputError", "ConfigError",
    "EditCancelled",
]


def __getattr__(name):
    # The editor pulls in torch/diffusers; import it on first use so `fastdrag --help` stays fast.
    if name in ("DragEditor", "EditResult"):
        from . import editor
        return getattr(editor, name)
    raise AttributeError(name)
