"""Experimental: the UNet's GroupNorm + SiLU, LayerNorm and GEGLU as fused Triton kernels (`fused_unet_kernels`).

Wires `fastdrag.kernels.group_norm`, `.layer_norm` and `.geglu` into a stock diffusers UNet by
instance attributes, so that the model's classes and weights stay as they are and
`remove_fused_blocks` puts every forward back:
- each `ResnetBlock2D` of the plain kind SD 1.x uses (default time-embedding norm, SiLU, no resampling
  inside the block) gets a forward that runs norm1 + SiLU and norm2 + SiLU fused, and otherwise does
  what the lean forward of `fastdrag.lean_blocks` does (diffusers' arithmetic without its no-op work);
- each continuous-input `Transformer2DModel`'s GroupNorm runs fused, without a SiLU;
- the UNet's output GroupNorm runs fused with its SiLU, and `conv_act` becomes the identity;
- each LayerNorm over one axis (a transformer block's three) runs fused, its output in the input's dtype;
- each `GEGLU` (the feed-forward layers' gate) runs its product fused after its projection.
Why: on an H100 a LoRA step spent 30 % of its kernel time in layout copies and casts and 20 % in
elementwise kernels (bench/RESULTS.md, 2026-11-26); GroupNorm's channels-last copies and autocast
casts were the largest copies, GEGLU's `cat` in the backward among them. The kernels read the
activations where they lie, compute in fp32 and round once: under autocast the arithmetic of the
stock fp32 GroupNorm and SiLU (rounded at the next layer's input), a LayerNorm rounded once at its
output as its readers' casts round autocast's fp32 one (their gradients then add up in half precision),
and a GEGLU rounded once where the stock one rounds its GELU and its product. They keep less for the
backward (the inputs only, in their own dtype).
The first forward and backward at each size compile the kernels, which `DragEditor.warm_up()` pays
for a server.
On the CPU (without `FASTDRAG_FORCE_TRITON`) the dispatcher runs the stock operators, so a patched
model computes exactly what the stock one does. Off by default
(`DragEditor.from_pretrained(fused_unet_kernels=True)`): on an H100 (SD 1.5 / 512 px, before the fused
LayerNorm) a first edit took 4.94 s instead of 6.30 and a repeated one 1.52 s instead of 1.94, but on
16 paired toy cases two took another drag path, both for the worse, so a larger paired run decides
(bench/RESULTS.md). Not part of the LoRA cache key: the adapters it trains differ from the stock
path's by roundings only (unlike `FASTDRAG_HALF_NORMS`, whose fp16 norms measurably changed the
edits), a claim the toy benchmark checks on the GPU.
"""
from __future__ import annotations

import types

import torch
from diffusers.models.activations import GEGLU
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from . import kernels
from .lean_blocks import plain_resnet, resnet_forward
from .patching import own_forward


def _norm(self: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return kernels.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu=False)


def _norm_silu(self: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return kernels.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu=True)


def _identity(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x


def _layer_norm(self: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return kernels.layer_norm(x, self.weight, self.bias, self.eps)


def _geglu(self: GEGLU, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return kernels.geglu(self.proj(hidden_states))


def _fused_norm_silu(block: ResnetBlock2D, norm: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return kernels.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu=True)


def _resnet_forward(self: ResnetBlock2D, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The lean resnet forward (`fastdrag.lean_blocks`) with each norm and its SiLU fused."""
    return resnet_forward(self, input_tensor, temb, _fused_norm_silu)


def _fuse(module: torch.nn.Module, function) -> None:
    """Give `module` the fused forward `function`, keeping the forward of its own it had (a lean one) for
    `remove_fused_blocks`."""
    if own_forward(module) is not function:
        module._forward_before_fused = vars(module).get("forward")  # None: the class's
        module.forward = types.MethodType(function, module)


def _install_group_norms(unet: torch.nn.Module) -> None:
    for module in unet.modules():
        if isinstance(module, ResnetBlock2D) and plain_resnet(module):
            _fuse(module, _resnet_forward)
        elif isinstance(module, Transformer2DModel) and getattr(module, "is_input_continuous", False) \
                and type(module.norm) is torch.nn.GroupNorm:
            _fuse(module.norm, _norm)
    norm_out, act = getattr(unet, "conv_norm_out", None), getattr(unet, "conv_act", None)
    if type(norm_out) is torch.nn.GroupNorm and type(act) is torch.nn.SiLU:
        _fuse(norm_out, _norm_silu)
        _fuse(act, _identity)


def install_fused_blocks(unet: torch.nn.Module, group_norm: bool = True, geglu: bool = True,
                         layer_norm: bool = True) -> dict:
    """Route `unet`'s GroupNorms (and the SiLUs after them), LayerNorms and GEGLUs through the fused
    kernels, each kind when asked; returns `fused_counts`. Installing twice changes nothing more. CUDA graphs
    captured before keep replaying the stock kernels: install before an editor captures any
    (`from_pretrained` does), or call its `release()` after."""
    if group_norm:
        _install_group_norms(unet)
    for module in unet.modules():
        if geglu and type(module) is GEGLU:
            _fuse(module, _geglu)
        elif layer_norm and type(module) is torch.nn.LayerNorm and len(module.normalized_shape) == 1:
            _fuse(module, _layer_norm)
    return fused_counts(unet)


def remove_fused_blocks(unet: torch.nn.Module) -> int:
    """Give the modules `install_fused_blocks` changed the forward they had back (a resnet its lean one,
    `fastdrag.lean_blocks`, where it had it; the others their class's); returns how many."""
    count = 0
    for module in unet.modules():
        if own_forward(module) in (_resnet_forward, _norm, _norm_silu, _identity, _layer_norm, _geglu):
            del module.forward
            before = vars(module).pop("_forward_before_fused", None)
            if before is not None:
                module.forward = before
            count += 1
    return count


def fused_counts(unet: torch.nn.Module) -> dict:
    """How many of `unet`'s GroupNorms, LayerNorms and GEGLUs run fused now:
    {"group_norm": n, "layer_norm": l, "geglu": m}."""
    norms = {_resnet_forward: 2, _norm: 1, _norm_silu: 1}
    patched = [own_forward(module) for module in unet.modules()]
    return {"group_norm": sum(norms.get(function, 0) for function in patched),
            "layer_norm": sum(function is _layer_norm for function in patched),
            "geglu": sum(function is _geglu for function in patched)}
