"""Stage 4: reference-controlled DDIM denoising of the (source, edited) latent pair."""
from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from .config import DenoiseConfig
from .ddim import DdimSchedule, ddim_step
from .denoiser import Denoiser


def denoise_pair(denoiser: Denoiser, source: torch.Tensor, edited: torch.Tensor, text_embeddings: torch.Tensor,
                 schedule: DdimSchedule, config: DenoiseConfig, progress: bool = True) -> torch.Tensor:
    """Denoise `[source, edited]` from the drag timestep to 0; returns the (2, 4, h, w) clean latents.

    From step `start_step` on, the chosen self-attention layers of both branches attend to the
    source branch's keys and values, so the edited branch keeps the source's appearance.
    """
    x = torch.cat([source, edited], dim=0)
    text = text_embeddings.expand(2, -1, -1)
    with contextlib.ExitStack() as stack:
        for index, t in enumerate(tqdm(schedule.denoise_timesteps, desc="denoise", disable=not progress, leave=False)):
            if index == config.start_step:
                stack.enter_context(denoiser.reference_control(config.start_layer, config.attention_backend))
            eps = denoiser(x, t, text)
            x = ddim_step(schedule, x, eps, t)
    return x
