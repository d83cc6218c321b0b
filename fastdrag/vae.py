"""Image <-> latent conversions through the VAE and the text encoding of the prompt."""
from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, List, Optional, Union

import numpy as np
import torch
from PIL import Image

from .weights import first_weight

if TYPE_CHECKING:
    from .cuda_graph import CapturedCalls

logger = logging.getLogger(__name__)


def image_to_tensor(image: Image.Image, device, dtype) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].to(device=device, dtype=dtype)


def tensor_to_image(tensor: torch.Tensor) -> Image.Image:
    """A (1, 3, H, W) or (3, H, W) tensor in [-1, 1] to 8-bit RGB."""
    tensor = tensor.detach().float().clamp(-1, 1)
    if tensor.ndim == 4:
        tensor = tensor[0]
    array = ((tensor.permute(1, 2, 0).cpu().numpy() + 1.0) * 127.5).round().astype(np.uint8)
    return Image.fromarray(array)


def _moments(vae, pixels: torch.Tensor) -> torch.Tensor:
    return vae.encode(pixels).latent_dist.parameters


def _pixels(vae, latents: torch.Tensor) -> torch.Tensor:
    return vae.decode(latents).sample


@torch.no_grad()
def encode_posterior(vae, image: Image.Image, graphs: Optional["CapturedCalls"] = None):
    """The VAE posterior of the image (a DiagonalGaussianDistribution); computed once per edit.
    With `graphs` (CUDA), the encoder replays a CUDA graph of theirs."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    weight = first_weight(vae)
    pixels = image_to_tensor(image, weight.device, weight.dtype)
    if graphs is None or not pixels.is_cuda:
        return vae.encode(pixels).latent_dist
    return DiagonalGaussianDistribution(graphs("vae_encode", functools.partial(_moments, vae), pixels).clone())


@torch.no_grad()
def decode(vae, latents: torch.Tensor, scaling_factor: float, graphs: Optional["CapturedCalls"] = None) -> Image.Image:
    """Decode scaled latents (1, 4, h, w) to an 8-bit RGB image. With `graphs` (CUDA), the decoder
    replays a CUDA graph of theirs (its output is copied to the host at once)."""
    latents = latents.to(first_weight(vae).dtype) / scaling_factor
    if graphs is None or not latents.is_cuda:
        return tensor_to_image(_pixels(vae, latents))
    return tensor_to_image(graphs("vae_decode", functools.partial(_pixels, vae), latents))


def capture_decoder(vae, latent_shape, graphs: "CapturedCalls") -> None:
    """Capture the decoder's graph for latents of `latent_shape` now, if it is not there yet (before
    the other graphs of an edit: `DragEditor._encode` says why)."""
    weight = first_weight(vae)
    latents = torch.zeros(latent_shape, device=weight.device, dtype=weight.dtype)
    if not graphs.has("vae_decode", latents):
        graphs("vae_decode", functools.partial(_pixels, vae), latents)


@torch.no_grad()
def encode_prompt(tokenizer, text_encoder, prompt: Union[str, List[str]]) -> torch.Tensor:
    """CLIP text embeddings (1, 77, D) of the prompt ((B, 77, D) of a list of B prompts); a prompt longer
    than the encoder reads is cut, with a warning that says where."""
    max_length = tokenizer.model_max_length if tokenizer.model_max_length < 10_000 else 77
    for text in [prompt] if isinstance(prompt, str) else prompt:
        ids = tokenizer(text, truncation=False).input_ids
        if len(ids) > max_length:
            kept = tokenizer.decode(ids[1:max_length - 1])  # without the start and end tokens
            logger.warning("the prompt is %d tokens; the text encoder reads %d, so only %r counts",
                           len(ids), max_length, kept)
    tokens = tokenizer(
        prompt,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(text_encoder.device)
    return text_encoder(tokens)[0]
