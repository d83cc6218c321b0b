"""A model's device and dtype, read from its first weight."""
from __future__ import annotations

import torch


def first_weight(model: torch.nn.Module) -> torch.Tensor:
    """The first floating-point parameter of `model`, whose device and dtype are the model's.

    diffusers' `device` and `dtype` properties walk every module first (7 ms each for SD 1.5's UNet on
    a 2-core CPU), and an edit reads them at several stage boundaries, where the GPU waits for the host.
    """
    return next(p for p in model.parameters() if p.is_floating_point())
