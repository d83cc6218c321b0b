"""Stage 2: DDIM inversion of the image latent to the drag timestep."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .ddim import DdimSchedule, ddim_inversion_step
from .denoiser import Denoiser


def invert(denoiser: Denoiser, latents: torch.Tensor, text_embeddings: torch.Tensor, schedule: DdimSchedule,
           progress: bool = True) -> torch.Tensor:
    """z_t at `schedule.drag_timestep` from the clean latent (posterior mean x scaling factor)."""
    x = latents
    for t in tqdm(schedule.inversion_timesteps, desc="inversion", disable=not progress, leave=False):
        eps = denoiser(x, t, text_embeddings)
        x = ddim_inversion_step(schedule, x, eps, t)
    return x
