"""Stage 2: DDIM inversion of the image latent to the drag timestep."""
from __future__ import annotations

from typing import Optional, Union

import torch

from .ddim import DdimSchedule, ddim_inversion_step
from .denoiser import Denoiser
from .guidance import guided_noise
from .progress import Progress, as_progress


def invert(denoiser: Denoiser, latents: torch.Tensor, text_embeddings: torch.Tensor, schedule: DdimSchedule,
           progress: Union[bool, Progress] = True, unconditional: Optional[torch.Tensor] = None,
           guidance_scale: float = 1.0) -> torch.Tensor:
    """z_t at `schedule.drag_timestep` from the clean latent (posterior mean x scaling factor); with a
    `guidance_scale` other than 1, each step's noise is guided by the `unconditional` embeddings
    (`fastdrag.guidance`)."""
    x = latents
    timesteps = schedule.inversion_timesteps
    uncond = None if unconditional is None else unconditional.expand(x.shape[0], -1, -1)
    for index in as_progress(progress).steps("inversion", len(timesteps)):
        t = timesteps[index]
        eps = guided_noise(denoiser, x, t, text_embeddings, uncond, guidance_scale)
        x = ddim_inversion_step(schedule, x, eps, t)
    return x
