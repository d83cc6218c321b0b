"""Train the toy model: the VAE on scene reconstructions, then the UNet on noised latents.

Resumable: a checkpoint (model, optimiser, step) is written every `checkpoint_every` steps into
the output folder and picked up on the next run. Runs on the GPU when there is one.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..atomic import atomic_path, check_folder_writable
from ..config import DragConfig
from ..ddim import noised
from ..features import unet_with_features
from ..models import ddim_scheduler
from ..vae import encode_prompt
from .model import WEIGHTS, load_toy, save_part, tokenizer, toy_text_encoder, toy_unet, toy_vae
from .world import SIZE, interior, make_scene

logger = logging.getLogger(__name__)

FEATURE_BLOCK = DragConfig().feature_block  # the up block whose output the drag reads


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
    colour_weight: float = 2.0  # decoder fine-tuning: L1 between each shape interior's mean colour and its true colour
    unet_steps: int = 2000
    unet_batch: int = 32
    unet_lr: float = 3e-4
    scenes: int = 3000          # scenes encoded once for UNet training
    scene_size: int = SIZE      # side of the UNet's training scenes in px (shapes and drags scale with it)
    checkpoint_every: int = 250
    seed: int = 0
    unet_time_budget_s: Optional[float] = None  # fit the UNet steps into this many seconds (measured rate)
    vae_from: Optional[str] = None   # reuse a trained VAE from this weights folder ("toy": the built-in one)
    decoder_steps_on_reuse: int = 0  # whole-scene decoder steps for a reused VAE (the latent space stays)
    unet_from: Optional[str] = None  # start the UNet from this weights folder's UNet ("toy": the built-in one)
    # weight of an auxiliary loss that makes the drag's features (up block 2) predict the clean latent
    # through a 1x1 convolution (dropped after training): features bound to content (an experiment, 0 = off)
    feature_weight: float = 0.0


def _pixels(images) -> torch.Tensor:
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2)


def _resume(path: Path, module, optimizer, steps: int) -> Tuple[int, int]:
    """(step reached, total steps) from the checkpoint at `path`, else (0, `steps`)."""
    if not path.is_file():
        return 0, steps
    # tensors, numbers and containers only: a checkpoint file cannot run code when it loads
    state = torch.load(path, map_location="cpu", weights_only=True)
    module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    logger.info("resuming %s at step %d", path.name, state["step"])
    return int(state["step"]), int(state.get("total", steps))


def _checkpoint(path: Path, module, optimizer, step: int, total: int) -> None:
    with atomic_path(path) as staged:
        torch.save({"model": module.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "total": total},
                   staged)


CALIBRATION_STEPS = 30


def _loop(name: str, steps: int, module, optimizer, loss_fn: Callable[[int], torch.Tensor], out: Path,
          every: int, progress: bool, time_budget_s: Optional[float] = None) -> int:
    """Train `steps` steps on a cosine schedule (resumable); returns the steps reached.

    With `time_budget_s`, a fresh run times its first steps and shortens `steps` to fit the budget,
    so the schedule still decays to zero at the end.
    """
    path = out / f"{name}-checkpoint.pt"
    start, steps = _resume(path, module, optimizer, steps)
    module.train()
    bar = tqdm(total=steps, desc=f"train {name}", disable=not progress, initial=start)
    began = time.perf_counter()
    step = start
    while step < steps:
        lr_scale = 0.5 * (1 + math.cos(math.pi * step / steps))  # cosine decay to 0
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_scale
        loss = loss_fn(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if time_budget_s is not None and start == 0 and step == CALIBRATION_STEPS:
            per_step = (time.perf_counter() - began) / step
            steps = max(step, min(steps, int(time_budget_s / per_step)))
            bar.total = steps
            logger.info("%s: %.1f ms per step, %d steps fit %.0f s", name, per_step * 1e3, steps, time_budget_s)
        bar.update(1)
        if step % 50 == 0 or step == steps:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % every == 0 or step == steps:
            _checkpoint(path, module, optimizer, step, steps)
    bar.close()
    module.eval()
    return steps


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
        scenes = [make_scene(rng) for _ in range(config.decoder_batch)]
        pixels = _pixels([scene.image for scene in scenes]).to(device)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample()
        recon = vae.decode(latents).sample
        return (F.mse_loss(recon, pixels) + 0.5 * F.l1_loss(recon, pixels)
                + config.colour_weight * _colour_error(recon, scenes))

    _loop("decoder", config.decoder_steps, vae, optimizer, loss_fn, out, config.checkpoint_every, progress)
    vae.requires_grad_(True)


def _colour_error(recon: torch.Tensor, scenes) -> torch.Tensor:
    """Mean L1 (in [-1, 1] units) between each shape interior's mean reconstructed colour and its true colour.

    Pixel losses leave a small shape's flat colour a few levels off (its interior is a few dozen
    pixels of a 128 px image); this term holds the mean itself.
    """
    errors = []
    for image, scene in zip(recon, scenes, strict=True):
        for shape in scene.shapes:
            inner = torch.from_numpy(interior(shape.mask)).to(recon.device)
            if inner.any():
                true = torch.tensor(shape.colour, dtype=recon.dtype, device=recon.device) / 127.5 - 1.0
                errors.append((image[:, inner].mean(1) - true).abs().mean())
    return torch.stack(errors).mean() if errors else recon.new_zeros(())


def _scene_chunk(args: Tuple[int, int, int, int]) -> List[Tuple[np.ndarray, str]]:
    seed, chunk, count, size = args
    rng = np.random.default_rng([seed, chunk])
    return [(np.asarray(scene.image), scene.prompt) for scene in (make_scene(rng, size) for _ in range(count))]


def _scenes(count: int, seed: int, size: int = SIZE, chunk: int = 50) -> List[Tuple[np.ndarray, str]]:
    """`count` scenes of `size` px (image array, prompt), made in worker processes: deterministic per
    (seed, chunk)."""
    jobs = [(seed, index, min(chunk, count - start), size) for index, start in enumerate(range(0, count, chunk))]
    workers = min(len(jobs), os.cpu_count() or 1, 16)
    if workers <= 1 or count < 2000:
        return [item for job in jobs for item in _scene_chunk(job)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:  # workers run numpy and PIL only
        return [item for part in pool.map(_scene_chunk, jobs) for item in part]


def train_unet(out: Path, vae, scaling_factor: float, config: TrainConfig, device: torch.device, progress: bool = True):
    text_encoder = toy_text_encoder().to(device).eval()
    tok = tokenizer()
    scenes = _scenes(config.scenes, config.seed + 1, config.scene_size)
    prompts = sorted({prompt for _, prompt in scenes})
    prompt_index = {prompt: i for i, prompt in enumerate(prompts)}
    latents = []
    with torch.no_grad():
        table = torch.cat([encode_prompt(tok, text_encoder, prompts[start:start + 256])
                           for start in range(0, len(prompts), 256)])
        for start in tqdm(range(0, len(scenes), 50), desc="encode scenes", disable=not progress):
            pixels = _pixels([image for image, _ in scenes[start:start + 50]]).to(device)
            latents.append(vae.encode(pixels).latent_dist.mean * scaling_factor)
    latents = torch.cat(latents)
    text_of_scene = torch.tensor([prompt_index[prompt] for _, prompt in scenes], device=device)
    unet = load_toy(_folder(config.unet_from)).unet if config.unet_from else toy_unet()
    unet = unet.to(device)
    trained = unet  # what the optimiser and the checkpoints hold: the UNet, and the head when there is one
    if config.feature_weight > 0:
        feature_channels = unet.config.block_out_channels[-1 - FEATURE_BLOCK]
        head = torch.nn.Conv2d(feature_channels, unet.config.in_channels, 1).to(device)
        trained = torch.nn.ModuleDict({"unet": unet, "head": head})
    optimizer = _optimizer(trained, config.unet_lr)
    alphas_cumprod = ddim_scheduler().alphas_cumprod.to(device)
    generator = torch.Generator(device=device).manual_seed(config.seed)

    def loss_fn(step: int) -> torch.Tensor:
        index = torch.randint(0, latents.shape[0], (config.unet_batch,), generator=generator, device=device)
        x0, text = latents[index], table[text_of_scene[index]]
        noise = torch.randn(x0.shape, generator=generator, device=device)
        t = torch.randint(0, 1000, (config.unet_batch,), generator=generator, device=device)
        noisy = noised(x0, noise, t, alphas_cumprod)
        if config.feature_weight <= 0:
            return F.mse_loss(unet(noisy, t, encoder_hidden_states=text).sample, noise)
        eps, features = unet_with_features(unet, noisy, t, text, FEATURE_BLOCK)  # up block 2: latent resolution
        return F.mse_loss(eps, noise) + config.feature_weight * F.mse_loss(head(features), x0)

    _loop("unet", config.unet_steps, trained, optimizer, loss_fn, out, config.checkpoint_every, progress,
          config.unet_time_budget_s)
    save_part(unet, out, "unet", {"scene_size": config.scene_size})
    save_part(text_encoder, out, "text_encoder")
    return unet


def _folder(name: str) -> Path:
    return WEIGHTS if name == "toy" else Path(name)


def _trained_vae(folder: str, out: Path, device: torch.device):
    """A VAE trained before (its weights copied into `out`, so the folder is a whole model)."""
    trained = load_toy(_folder(folder))
    out.mkdir(parents=True, exist_ok=True)
    for suffix in (".safetensors", ".json"):
        source = _folder(folder) / f"vae{suffix}"
        if source.resolve() != (out / f"vae{suffix}").resolve():
            with atomic_path(out / f"vae{suffix}") as staged:
                shutil.copyfile(source, staged)
    return trained.vae.to(device).eval(), trained.scaling_factor


def train_toy(out: Path, config: Optional[TrainConfig] = None, device: Optional[str] = None, progress: bool = True) -> Dict[str, float]:
    """Train VAE then UNet into `out` (weights `vae/unet/text_encoder.safetensors` + configs)."""
    config = config or TrainConfig()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(out)
    check_folder_writable(out, out / "unet.safetensors")  # an OutputError naming it, not a traceback
    timings = {}
    start = time.perf_counter()
    if config.vae_from:
        vae, scaling_factor = _trained_vae(config.vae_from, out, device)
        if config.decoder_steps_on_reuse:
            finetune_decoder(vae, out, dataclasses.replace(config, decoder_steps=config.decoder_steps_on_reuse),
                             device, progress)
            vae.eval()
            save_part(vae, out, "vae", {"scaling_factor": scaling_factor, "version": 1})
    else:
        vae, scaling_factor = train_vae(out, config, device, progress)
    timings["vae_s"] = time.perf_counter() - start
    start = time.perf_counter()
    train_unet(out, vae, scaling_factor, config, device, progress)
    timings["unet_s"] = time.perf_counter() - start
    return timings
