"""Reference control: the self-attention K/V swap of stage 4, as a diffusers attention processor.

The batch holds consecutive (source, edited) pairs: `[source, edited]` at guidance scale 1, or
`[uncond source, uncond edited, cond source, cond edited]` with classifier-free guidance. In the
selected self-attention layers every row's queries attend to the keys and values of the source
row of its pair; keys and values are projected for the source rows only.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from .errors import ConfigError


class ReferenceAttnProcessor:
    """Self-attention where both rows of each (source, edited) pair use the source's K/V (PyTorch SDPA)."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("ReferenceAttnProcessor is for self-attention layers only")
        if attention_mask is not None:
            raise ValueError("ReferenceAttnProcessor does not take an attention mask")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch, length, _ = hidden_states.shape
        if batch % 2:
            raise ValueError(f"reference control needs (source, edited) pairs in the batch; got batch {batch}")
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        source_states = hidden_states[0::2]
        query = attn.to_q(hidden_states)
        key = attn.to_k(source_states)
        value = attn.to_v(source_states)
        heads = attn.heads
        head_dim = query.shape[-1] // heads
        pairs = batch // 2
        # (pairs, 2, heads, L, d) queries against (pairs, 1, heads, L, d) source keys/values.
        query = query.view(pairs, 2, length, heads, head_dim).transpose(2, 3)
        key = key.view(pairs, 1, length, heads, head_dim).transpose(2, 3)
        value = value.view(pairs, 1, length, heads, head_dim).transpose(2, 3)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key.expand_as(query), value.expand_as(query), scale=attn.scale)
        out = out.transpose(2, 3).reshape(batch, length, heads * head_dim).to(query.dtype)

        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def transformer_blocks(unet: torch.nn.Module) -> List[str]:
    """Module names of the UNet's transformer blocks in forward order: down blocks, mid, up blocks."""
    stages = list(unet.down_blocks) + [unet.mid_block] + list(unet.up_blocks)
    module_names = {id(module): name for name, module in unet.named_modules()}
    names = []
    for stage in stages:
        for transformer in getattr(stage, "attentions", []) or []:
            for block in getattr(transformer, "transformer_blocks", []):
                names.append(module_names[id(block)])
    return names


def self_attention_processor_names(unet: torch.nn.Module, start_layer: int) -> List[str]:
    """Processor names of the self-attention (`attn1`) of transformer blocks `start_layer` onward."""
    blocks = transformer_blocks(unet)
    if start_layer >= len(blocks):
        raise ConfigError(
            f"start_layer {start_layer} is past the model's last transformer block (it has {len(blocks)}, indices 0-{len(blocks) - 1})"
        )
    return [f"{name}.attn1.processor" for name in blocks[start_layer:]]


@contextlib.contextmanager
def reference_control(unet: torch.nn.Module, start_layer: int, processor: Optional[object] = None) -> Iterator[List[str]]:
    """Install the K/V-swap processor on the chosen self-attention layers; restore the originals on exit."""
    chosen = self_attention_processor_names(unet, start_layer)
    original: Dict[str, object] = dict(unet.attn_processors)
    swap = processor if processor is not None else ReferenceAttnProcessor()
    unet.set_attn_processor({name: (swap if name in chosen else proc) for name, proc in original.items()})
    try:
        yield chosen
    finally:
        unet.set_attn_processor(original)
