"""The denoiser interface used by the forward-only stages (inversion and denoising).

A denoiser maps (latents, timestep, text embeddings) to predicted noise. `reference_control`
switches it to the K/V-swap mode of stage 4 for a batch of (source, edited) pairs. Other backends
(ONNX Runtime, TensorRT) implement the same two methods.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Protocol

import torch

from .attention import reference_control


class Denoiser(Protocol):
    def __call__(self, latents: torch.Tensor, timestep: int, text_embeddings: torch.Tensor) -> torch.Tensor: ...

    def reference_control(self, start_layer: int, backend: str = "auto") -> contextlib.AbstractContextManager: ...


class TorchDenoiser:
    """The UNet itself, run in its own dtype under `torch.no_grad`."""

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, timestep: int, text_embeddings: torch.Tensor) -> torch.Tensor:
        dtype = self.unet.dtype
        t = torch.full((), timestep, device=latents.device, dtype=torch.long)  # a fill, not a host-to-device copy
        eps = self.unet(latents.to(dtype), t, encoder_hidden_states=text_embeddings.to(dtype)).sample
        return eps.to(latents.dtype)

    @contextlib.contextmanager
    def reference_control(self, start_layer: int, backend: str = "auto") -> Iterator[None]:
        with reference_control(self.unet, start_layer, backend):
            yield
