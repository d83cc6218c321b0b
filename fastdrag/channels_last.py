"""Experimental: keep the UNet's transformer outputs channels-last (`channels_last_outputs`).

With channels-last weights (the CUDA default) every convolution reads and writes NHWC memory, but
diffusers' `Transformer2DModel` ends with `.permute(0, 3, 1, 2).contiguous()`: it copies its
token-major result into NCHW memory, its 1x1 output convolution then has cuDNN convert that back to
NHWC, and the residual add mixes the two layouts (a strided, unvectorised kernel). The backward pass
pays the same copies again. On an H100 these were among the layout copies that take 30 % of a LoRA
step's kernel time (`bench/profile_stages.py`, bench/RESULTS.md, 2026-11-26).

The token-major result viewed as NCHW is already channels-last memory, so the copy is not needed:
`keep_transformer_outputs_channels_last` gives each transformer an output projection without it.
The arithmetic is the same (the convolution may pick another algorithm, so the rounding can
differ). Opt-in until a GPU lease has measured it (`bench/edit_timing.py` variant
`channels_last_outputs=true`).
"""
from __future__ import annotations

import types

import torch
from diffusers.models.transformers.transformer_2d import Transformer2DModel


def _output_in_input_layout(self: Transformer2DModel, hidden_states: torch.Tensor, residual: torch.Tensor,
                            batch_size: int, height: int, width: int, inner_dim: int) -> torch.Tensor:
    """The output projection and residual of a continuous-input transformer, without the NCHW copy."""
    if self.use_linear_projection:
        hidden_states = self.proj_out(hidden_states)
        return hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2) + residual
    return self.proj_out(hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)) + residual


def keep_transformer_outputs_channels_last(unet: torch.nn.Module) -> int:
    """Give every continuous-input `Transformer2DModel` of `unet` the copy-free output projection
    (an instance attribute, so only this model changes); returns how many. Meant for a UNet whose
    weights are channels-last: with contiguous ones it would make the layouts mix instead."""
    count = 0
    for module in unet.modules():
        if isinstance(module, Transformer2DModel) and getattr(module, "is_input_continuous", False):
            module._get_output_for_continuous_inputs = types.MethodType(_output_in_input_layout, module)
            count += 1
    return count
