"""A Stable Diffusion 1.x model's weights in the original (CompVis/LDM) single-file layout, for tests.

Checkpoints shared as one `.safetensors` file (the SD 1.5 release, most fine-tunes) name their tensors
as the original repository's modules did: `model.diffusion_model.input_blocks.1.1.proj_in.weight`, not
diffusers' `down_blocks.0.attentions.0.proj_in.weight`. diffusers reads that layout (`from_single_file`);
nothing here writes it, so the tests that load such a file make it from a diffusers model with these
renaming rules, written from the two layouts' module structures.
"""
from __future__ import annotations

import re
from typing import Dict

import torch

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
OPEN_CLIP = "cond_stage_model.model."  # SD 2.x's text encoder

_UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
_VAE_ATTENTION = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _unet_key(key: str, layers_per_block: int, blocks: int) -> str:
    """One diffusers UNet key in the LDM layout (SD 1.x: resnets then attentions in each block)."""
    fixed = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for old, new in fixed.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    rest = key
    if match := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
        prefix = f"input_blocks.{block * (layers_per_block + 1) + index + 1}.{0 if kind == 'resnets' else 1}."
    elif match := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(match[1]) + 1) * (layers_per_block + 1)}.0.op.{match[2]}"
    elif match := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
        kind, index, rest = match[1], int(match[2]), match[3]
        prefix = f"middle_block.{2 * index if kind == 'resnets' else 1}."
    elif match := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
        prefix = f"output_blocks.{block * (layers_per_block + 1) + index}.{0 if kind == 'resnets' else 1}."
    elif match := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        return f"output_blocks.{int(match[1]) * (layers_per_block + 1) + layers_per_block}.{{up}}.conv.{match[2]}"
    else:
        raise KeyError(f"no LDM name for UNet key {key}")
    if prefix.endswith(".0."):  # a resnet's own layers are named otherwise
        for old, new in _UNET_RESNET:
            if rest.startswith(old + "."):
                rest = new + rest[len(old):]
    return prefix + rest


def _vae_key(key: str, up_blocks: int) -> str:
    """One diffusers VAE key in the LDM layout (the decoder's blocks are numbered from the lowest resolution
    up in diffusers, from the highest in LDM)."""
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{up_blocks - 1 - int(m[1])}.block.", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{up_blocks - 1 - int(m[1])}.upsample.", key)
    key = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", key)
    if match := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
        rest = match[2]
        for old, new in _VAE_ATTENTION:
            if rest.startswith(old + "."):
                rest = new + rest[len(old):]
        key = f"{match[1]}.mid.attn_1.{rest}"
    return key


def _open_clip_state(text_encoder: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """A CLIP text model's weights as SD 2.x's OpenCLIP text tower names them: one fused query-key-value
    projection per layer (`in_proj_weight`, queries first) and its own names for the rest."""
    plain = {key[len("text_model."):] if key.startswith("text_model.") else key: value
             for key, value in text_encoder.state_dict().items()}
    state = {"token_embedding.weight": plain.pop("embeddings.token_embedding.weight"),
             "positional_embedding": plain.pop("embeddings.position_embedding.weight"),
             "ln_final.weight": plain.pop("final_layer_norm.weight"), "ln_final.bias": plain.pop("final_layer_norm.bias")}
    renames = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
               ("self_attn.out_proj", "attn.out_proj")]
    for layer in range(text_encoder.config.num_hidden_layers):
        own, theirs = f"encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            state[f"{theirs}attn.in_proj_{kind}"] = torch.cat(
                [plain.pop(f"{own}self_attn.{name}_proj.{kind}") for name in ("q", "k", "v")])
        for key in [key for key in plain if key.startswith(own)]:
            rest = key[len(own):]
            for old, new in renames:
                rest = rest.replace(old, new)
            state[theirs + rest] = plain.pop(key)
    if plain:
        raise KeyError(f"no OpenCLIP name for text encoder keys {sorted(plain)[:3]}")
    return state


def ldm_state_dict(unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module,
                   open_clip: bool = False) -> Dict[str, torch.Tensor]:
    """The three models' weights under their LDM names, as one single-file checkpoint holds them; with
    `open_clip`, the text encoder as SD 2.x's checkpoints hold theirs."""
    layers = unet.config.layers_per_block
    attended_up = {i for i, kind in enumerate(unet.config.up_block_types) if "CrossAttn" in kind}
    state: Dict[str, torch.Tensor] = {}
    for key, value in unet.state_dict().items():
        name = _unet_key(key, layers, len(unet.config.down_block_types))
        if "{up}" in name:  # an upsampler follows the block's attention where it has one
            name = name.replace("{up}", "2" if int(key.split(".")[1]) in attended_up else "1")
        state[UNET + name] = value
    for key, value in vae.state_dict().items():
        name = _vae_key(key, len(vae.config.up_block_types))
        if ".mid.attn_1." in name and name.endswith(".weight") and value.dim() == 2:
            value = value[:, :, None, None]  # LDM's VAE attention projects with 1x1 convolutions
        state[VAE + name] = value
    if open_clip:
        state.update({OPEN_CLIP + key: value for key, value in _open_clip_state(text_encoder).items()})
    else:
        for key, value in text_encoder.state_dict().items():  # as transformers 4's CLIPTextModel named them
            state[TEXT + ("" if key.startswith("text_model.") else "text_model.") + key] = value
    return {name: tensor.contiguous() for name, tensor in state.items()}
