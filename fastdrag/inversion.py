"""Stage 2: DDIM inversion of the image latent to the drag timestep."""
from __future__ import annotations

from typing import Union

import torch

from .ddim import DdimSchedule, ddim_inversion_step
from .denoiser import Denoiser
from .progress import Progress, as_progress


def invert(denoiser: Denoiser, latents: torch.Tensor, text_embeddings: torch.Tensor, schedule: DdimSchedule,
           progress: Union[bool, Progress] = True) -> torch.Tensor:
    """z_t at `schedule.drag_timestep` from the clean latent (posterior mean x scaling factor)."""
    x = latents
    timesteps = schedule.inversion_timesteps
    for index in as_progress(progress).steps("inversion", len(timesteps)):
        t = timesteps[index]
        eps = denoiser(x, t, text_embeddings)
        x = ddim_inversion_step(schedule, x, eps, t)
    return x
