"""What the package's instance-attribute forwards share: which forward of its own a module has."""
from __future__ import annotations

import torch


def own_forward(module: torch.nn.Module):
    """The function of `module`'s own `forward` attribute (one the package installs), None without one."""
    return getattr(vars(module).get("forward"), "__func__", None)
