"""Image <-> latent conversions through the VAE and the text encoding of the prompt."""
from __future__ import annotations

from typing import List, Union

import numpy as np
import torch
from PIL import Image


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


@torch.no_grad()
def encode_posterior(vae, image: Image.Image):
    """The VAE posterior of the image (a DiagonalGaussianDistribution); computed once per edit."""
    pixels = image_to_tensor(image, vae.device, vae.dtype)
    return vae.encode(pixels).latent_dist


@torch.no_grad()
def decode(vae, latents: torch.Tensor, scaling_factor: float) -> Image.Image:
    """Decode scaled latents (1, 4, h, w) to an 8-bit RGB image."""
    pixels = vae.decode(latents.to(vae.dtype) / scaling_factor).sample
    return tensor_to_image(pixels)


@torch.no_grad()
def encode_prompt(tokenizer, text_encoder, prompt: Union[str, List[str]]) -> torch.Tensor:
    """CLIP text embeddings (1, 77, D) of the prompt ((B, 77, D) of a list of B prompts)."""
    tokens = tokenizer(
        prompt,
        padding="max_length",
        max_length=tokenizer.model_max_length if tokenizer.model_max_length < 10_000 else 77,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(text_encoder.device)
    return text_encoder(tokens)[0]
