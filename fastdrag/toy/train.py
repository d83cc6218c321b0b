"""Train the toy model: the VAE on scene reconstructions, then the UNet on noised latents.

Resumable: a checkpoint (model, optimiser, step) is written every `checkpoint_every` steps into
the output folder and picked up on the next run. Runs on the GPU when there is one.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models import ddim_scheduler
from ..vae import encode_prompt
from .model import save_part, tokenizer, toy_text_encoder, toy_unet, toy_vae
from .world import SIZE, make_scene

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    vae_steps: int = 4000
    vae_batch: int = 16
    vae_crop: int = 64
    vae_lr: float = 4e-4
    kl_weight: float = 1e-6
    decoder_steps: int = 400    # then the decoder alone on whole 128 px scenes (GroupNorm sees the full image)
    decoder_batch: int = 8
    decoder_lr: float = 1e-4
    unet_steps: int = 2000
    unet_batch: int = 32
    unet_lr: float = 3e-4
    scenes: int = 3000          # scenes encoded once for UNet training
    checkpoint_every: int = 250
    seed: int = 0


def _pixels(images) -> torch.Tensor:
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2)


def _resume(path: Path, module, optimizer) -> int:
    if not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=False)
    module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    logger.info("resuming %s at step %d", path.name, state["step"])
    return int(state["step"])


def _checkpoint(path: Path, module, optimizer, step: int) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": module.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, tmp)
    tmp.replace(path)


def _loop(name: str, steps: int, module, optimizer, loss_fn: Callable[[int], torch.Tensor], out: Path,
          every: int, progress: bool) -> None:
    path = out / f"{name}-checkpoint.pt"
    start = _resume(path, module, optimizer)
    module.train()
    bar = tqdm(range(start, steps), desc=f"train {name}", disable=not progress, initial=start, total=steps)
    for step in bar:
        lr_scale = 0.5 * (1 + math.cos(math.pi * step / steps))  # cosine decay to 0
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_scale
        loss = loss_fn(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % every == 0 or step + 1 == steps:
            _checkpoint(path, module, optimizer, step + 1)
    module.eval()


def _optimizer(module, lr):
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.0)
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
    return optimizer


def train_vae(out: Path, config: TrainConfig, device: torch.device, progress: bool = True):
    vae = toy_vae().to(device)
    optimizer = _optimizer(vae, config.vae_lr)
    rng = np.random.default_rng(config.seed)

    def loss_fn(step: int) -> torch.Tensor:
        crops = []
        for _ in range(config.vae_batch):
            image = make_scene(rng).image
            x, y = rng.integers(0, SIZE - config.vae_crop + 1, size=2)
            crops.append(image.crop((x, y, x + config.vae_crop, y + config.vae_crop)))
        pixels = _pixels(crops).to(device)
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample()).sample
        return F.mse_loss(recon, pixels) + 0.5 * F.l1_loss(recon, pixels) + config.kl_weight * posterior.kl().mean()

    _loop("vae", config.vae_steps, vae, optimizer, loss_fn, out, config.checkpoint_every, progress)
    finetune_decoder(vae, out, config, device, progress)
    with torch.no_grad():
        rng_eval = np.random.default_rng(10_000 + config.seed)
        latents = torch.cat([vae.encode(_pixels([make_scene(rng_eval).image for _ in range(16)]).to(device)).latent_dist.mean
                             for _ in range(4)])
    scaling_factor = float(1.0 / latents.std())
    save_part(vae, out, "vae", {"scaling_factor": scaling_factor, "version": 1})
    return vae, scaling_factor


def finetune_decoder(vae, out: Path, config: TrainConfig, device: torch.device, progress: bool = True) -> None:
    """Fine-tune the decoder on whole scenes with the encoder frozen.

    Crops make training cheap, but GroupNorm and the mid-block attention then see statistics of a
    64 px crop, and whole 128 px images come back with shifted colours; the latent space (the
    encoder) stays as it is, so a UNet trained on it stays valid.
    """
    rng = np.random.default_rng(config.seed + 2)
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    optimizer = _optimizer(vae.decoder, config.decoder_lr)
    optimizer.add_param_group({"params": list(vae.post_quant_conv.parameters()), "lr": config.decoder_lr,
                               "initial_lr": config.decoder_lr})

    def loss_fn(step: int) -> torch.Tensor:
        pixels = _pixels([make_scene(rng).image for _ in range(config.decoder_batch)]).to(device)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample()
        recon = vae.decode(latents).sample
        return F.mse_loss(recon, pixels) + 0.5 * F.l1_loss(recon, pixels)

    _loop("decoder", config.decoder_steps, vae, optimizer, loss_fn, out, config.checkpoint_every, progress)
    vae.requires_grad_(True)


def train_unet(out: Path, vae, scaling_factor: float, config: TrainConfig, device: torch.device, progress: bool = True):
    text_encoder = toy_text_encoder().to(device).eval()
    tok = tokenizer()
    rng = np.random.default_rng(config.seed + 1)
    latents, texts = [], []
    cache: Dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for start in tqdm(range(0, config.scenes, 50), desc="encode scenes", disable=not progress):
            scenes = [make_scene(rng) for _ in range(min(50, config.scenes - start))]
            latents.append(vae.encode(_pixels([s.image for s in scenes]).to(device)).latent_dist.mean * scaling_factor)
            for scene in scenes:
                if scene.prompt not in cache:
                    cache[scene.prompt] = encode_prompt(tok, text_encoder, scene.prompt)[0]
                texts.append(cache[scene.prompt])
    latents = torch.cat(latents)
    texts = torch.stack(texts)
    unet = toy_unet().to(device)
    optimizer = _optimizer(unet, config.unet_lr)
    scheduler = ddim_scheduler()
    generator = torch.Generator(device=device).manual_seed(config.seed)

    def loss_fn(step: int) -> torch.Tensor:
        index = torch.randint(0, latents.shape[0], (config.unet_batch,), generator=generator, device=device)
        x0, text = latents[index], texts[index]
        noise = torch.randn(x0.shape, generator=generator, device=device)
        t = torch.randint(0, 1000, (config.unet_batch,), generator=generator, device=device)
        return F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=text).sample, noise)

    _loop("unet", config.unet_steps, unet, optimizer, loss_fn, out, config.checkpoint_every, progress)
    save_part(unet, out, "unet")
    save_part(text_encoder, out, "text_encoder")
    return unet


def train_toy(out: Path, config: Optional[TrainConfig] = None, device: Optional[str] = None, progress: bool = True) -> Dict[str, float]:
    """Train VAE then UNet into `out` (weights `vae/unet/text_encoder.safetensors` + configs)."""
    config = config or TrainConfig()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    start = time.perf_counter()
    vae, scaling_factor = train_vae(out, config, device, progress)
    timings["vae_s"] = time.perf_counter() - start
    start = time.perf_counter()
    train_unet(out, vae, scaling_factor, config, device, progress)
    timings["unet_s"] = time.perf_counter() - start
    return timings
