"""Classifier-free guidance in inversion and denoising (`guidance_scale`; DragDiffusion's default of 1 runs none).

With a scale `g` other than 1 the noise of a step is `eps(uncond) + g · (eps(text) - eps(uncond))`, the
unconditional embeddings being the empty prompt's, as DragDiffusion's pipeline computes it for inversion
and for the denoising of the (source, edited) pair; its drag runs on the prompt alone. A denoiser that
takes any batch gets one call on `[latents, latents]` with `[uncond, text]` (for a pair, rows
`[uncond source, uncond edited, source, edited]`, the layout the reference attention pairs up); one
with a fixed batch (`fixed_batch`: the exported graphs) gets two calls. For a model that outputs the
velocity or the clean latent the denoiser has already turned each output into noise, and the guidance,
linear in the output, is the same either way.
"""
from __future__ import annotations

from typing import Optional

import torch


def guided_noise(denoiser, latents: torch.Tensor, timestep: int, text: torch.Tensor,
                 unconditional: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """The noise of one step of `latents` under guidance `scale` (`text` and `unconditional` one row per latent
    row); at a scale of 1 (or without `unconditional`), the denoiser's own on `text`."""
    if scale == 1.0 or unconditional is None:
        return denoiser(latents, timestep, text)
    if getattr(denoiser, "fixed_batch", False):
        eps_uncond, eps_text = denoiser(latents, timestep, unconditional), denoiser(latents, timestep, text)
    else:
        eps_uncond, eps_text = denoiser(torch.cat([latents, latents]), timestep, torch.cat([unconditional, text])).chunk(2)
    return eps_uncond + scale * (eps_text - eps_uncond)
