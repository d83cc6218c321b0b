"""What the package's instance-attribute forwards share: which method of its own a module has."""
from __future__ import annotations

import torch


def own_forward(module: torch.nn.Module, name: str = "forward"):
    """The function of `module`'s own method attribute `name` (one the package installs, shadowing its
    class's), None without one."""
    return getattr(vars(module).get(name), "__func__", None)
