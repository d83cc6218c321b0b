"""Stage 4: reference-controlled DDIM denoising of the (source, edited) latent pair."""
from __future__ import annotations

import contextlib
from typing import Hashable, Optional, Union

import torch

from .config import DenoiseConfig
from .ddim import DdimSchedule, ddim_step
from .denoiser import Denoiser
from .guidance import guided_noise
from .progress import Progress, as_progress
from .source_kv import SourceKV


def denoise_pair(denoiser: Denoiser, source: torch.Tensor, edited: torch.Tensor, text_embeddings: torch.Tensor,
                 schedule: DdimSchedule, config: DenoiseConfig, progress: Union[bool, Progress] = True,
                 record: Optional[SourceKV] = None, record_key: Hashable = None,
                 unconditional: Optional[torch.Tensor] = None, guidance_scale: float = 1.0) -> torch.Tensor:
    """Denoise `[source, edited]` from the drag timestep to 0; returns the (2, 4, h, w) clean latents.

    From step `start_step` on, the chosen self-attention layers of both branches attend to the
    source branch's keys and values, so the edited branch keeps the source's appearance. With
    `record` (a `SourceKV`; the denoiser must keep them) those keys and values of every such step
    are recorded into it, where they then answer for `record_key`. With a `guidance_scale` other
    than 1, each step's noise is guided by the `unconditional` embeddings (`fastdrag.guidance`; the
    pair's unconditional rows attend to their own source row); it records nothing then.
    """
    if guidance_scale != 1.0 and record is not None:
        raise ValueError("the source branch's keys and values are recorded without guidance only (guidance_scale 1)")
    x = torch.cat([source, edited], dim=0)
    return _denoise(denoiser, x, text_embeddings, schedule, config, progress, record, True, record_key,
                    unconditional, guidance_scale)


def denoise_edited(denoiser: Denoiser, edited: torch.Tensor, text_embeddings: torch.Tensor, schedule: DdimSchedule,
                   config: DenoiseConfig, kept: SourceKV, progress: Union[bool, Progress] = True) -> torch.Tensor:
    """Denoise the edited latent alone, its swapped layers reading the source branch's keys and values
    that `kept` recorded in a `denoise_pair` of the same source latent, prompt, adapter and settings:
    the edited row of that pair's result, without the source branch's forwards. Returns (1, 4, h, w)."""
    return _denoise(denoiser, edited, text_embeddings, schedule, config, progress, kept, False, None)


def _denoise(denoiser: Denoiser, x: torch.Tensor, text_embeddings: torch.Tensor, schedule: DdimSchedule,
             config: DenoiseConfig, progress: Union[bool, Progress], source_kv: Optional[SourceKV], recording: bool,
             key: Hashable, unconditional: Optional[torch.Tensor] = None, guidance_scale: float = 1.0) -> torch.Tensor:
    text = text_embeddings.expand(x.shape[0], -1, -1)
    uncond = None if unconditional is None else unconditional.expand(x.shape[0], -1, -1)
    timesteps = schedule.denoise_timesteps
    swapped = {}
    if source_kv is not None:
        if not getattr(denoiser, "keeps_source_kv", False):
            raise ValueError(f"{type(denoiser).__name__} cannot keep the source branch's keys and values")
        source_kv.begin(x, max(len(timesteps) - config.start_step, 0), config.start_layer, recording)
        swapped = {"source_kv": source_kv}
    with contextlib.ExitStack() as stack:
        for index in as_progress(progress).steps("denoise", len(timesteps)):
            t = timesteps[index]
            if index == config.start_step:
                stack.enter_context(denoiser.reference_control(config.start_layer, config.attention_backend, **swapped))
            if source_kv is not None and index >= config.start_step:
                source_kv.set_step(index - config.start_step)
            eps = guided_noise(denoiser, x, t, text, uncond, guidance_scale)
            x = ddim_step(schedule, x, eps, t)
    if source_kv is not None:
        source_kv.finish(key)
    return x
