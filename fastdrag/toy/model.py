"""The toy model: SD 1.x's structure in miniature (VAE x8 with 4 latent channels; a UNet with SD's
block arrangement and 16 transformer blocks; a CLIP text encoder), trained on the toy world."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..atomic import atomic_path
from ..errors import ModelLoadError
from ..models import Components, ddim_scheduler, tokenizer_folder

WEIGHTS = Path(__file__).parent / "weights"
PARTS = ("vae", "unet", "text_encoder")


def toy_vae() -> AutoencoderKL:
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 64, 128, 128), layers_per_block=1, latent_channels=4, norm_num_groups=32,
        sample_size=128,
    )


def toy_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 48, 64, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
    )


def toy_text_encoder(seed: int = 0) -> CLIPTextModel:
    """A small CLIP text encoder, kept at its seeded random weights: a fixed, distinct code per prompt."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModel(CLIPTextConfig(
            vocab_size=514, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513,
        ))


def tokenizer() -> CLIPTokenizer:
    folder = tokenizer_folder()
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def save_part(module: torch.nn.Module, folder: Path, name: str, extra: Optional[dict] = None) -> None:
    """Weights in fp16 safetensors (small enough to commit) and the config beside them, each written
    whole or not at all (an interrupted `toy train` leaves the part it replaced, not half a file)."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / f"{name}.safetensors") as staged:
        save_file({k: v.detach().half().contiguous() for k, v in module.state_dict().items()}, str(staged))
    config = dict(module.config) if hasattr(module, "config") and not isinstance(module, CLIPTextModel) else {}
    with atomic_path(folder / f"{name}.json") as staged:
        staged.write_text(json.dumps({**{k: v for k, v in config.items() if not k.startswith("_")}, **(extra or {})},
                                     default=list, indent=1))


def keys_as_in(module: torch.nn.Module, state: dict) -> dict:
    """`state` with its keys named as `module` names them: transformers 5 names a CLIPTextModel's weights
    without the `text_model.` prefix that transformers 4 puts before each (the shipped weights were saved by
    5), so a file written by either loads into either."""
    own = next(iter(module.state_dict()), "")
    prefix = "text_model."
    if own.startswith(prefix):
        return {(k if k.startswith(prefix) else prefix + k): v for k, v in state.items()}
    return {k.removeprefix(prefix): v for k, v in state.items()}


def missing_parts(folder: Path) -> list:
    """The toy model's weight files that `folder` lacks (none: a folder `fastdrag toy train` wrote)."""
    return [p for p in PARTS if not (folder / f"{p}.safetensors").is_file()]


def load_toy(folder: Path = WEIGHTS) -> Components:
    """The trained toy model (built-in name `toy`)."""
    missing = missing_parts(folder)
    if missing:
        raise ModelLoadError(f"the toy model's weights are missing from {folder} ({', '.join(missing)}): "
                             "train them with `fastdrag toy train --out DIR`")
    vae, unet, text = toy_vae(), toy_unet(), toy_text_encoder()
    digest = hashlib.sha256()
    for name, module in zip(PARTS, (vae, unet, text), strict=True):
        data = (folder / f"{name}.safetensors").read_bytes()
        digest.update(data)
        module.load_state_dict(keys_as_in(module, {k: v.float() for k, v in load(data).items()}))
    meta = json.loads((folder / "vae.json").read_text())
    vae.register_to_config(scaling_factor=float(meta["scaling_factor"]))
    digest.update(str(meta["scaling_factor"]).encode())
    # identity by content: cached adapters of other toy weights never load onto these
    return Components(unet, vae, text, tokenizer(), ddim_scheduler(), identity=f"toy:{digest.hexdigest()[:16]}")
