"""Opt-in `torch.compile` of the UNet's residual and feed-forward blocks (regional compilation).

Compiling the whole UNet would recompile on every edit: the drag loop hooks an up block for its
features and stage 4 swaps self-attention processors, and both are part of what a compiled UNet
guards on. The blocks compiled here hold none of that (nor, at the default LoRA targets, a LoRA
layer): `ResnetBlock2D` (GroupNorm, SiLU, convolution, time embedding, residual) and `FeedForward`
(GEGLU), where fusing the normalisation and elementwise work around the convolutions and matrix
products is what compilation can add. Each block compiles once per input shape and grad mode, on
its first call (a CUDA graph's warm-up steps, before the capture), and every later edit reuses it.

The cost is compilation time, paid once per process: on this project's 2-core CPU the tiny
model's first edit took 148 s instead of under 2; on an H100, SD 1.5's compilation had not
finished after 200 s, and compiled blocks replayed in a CUDA graph differed from their uncaptured
forward by 6.5e-4 in fp32 (bench/RESULTS.md, 2026-11-26). Experimental; off by default.
"""
from __future__ import annotations

import importlib.util
import logging

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.resnet import ResnetBlock2D

from .errors import ConfigError

logger = logging.getLogger(__name__)

BLOCK_TYPES = (ResnetBlock2D, FeedForward)
# SD 1.5 has 22 residual blocks of ~10 shapes, each met without and with gradients and at batch 1, 2
# and 4: more than dynamo's default of 8 compiled variants per function
RECOMPILE_LIMIT = 64


def check_compile_support(device: torch.device) -> None:
    """Raise a ConfigError naming what `torch.compile` lacks here, instead of failing inside the first edit."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise ConfigError("compile_blocks: torch.compile does not support this Python/PyTorch build")
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise ConfigError("compile_blocks on CUDA needs the triton package (pip install triton)")
        return
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception as exc:  # noqa: BLE001 - inductor raises its own types, version to version
        raise ConfigError(f"compile_blocks on the {device.type} needs a C++ compiler for torch.compile "
                          f"(g++, or one named by $CXX): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                          ) from exc


def compile_blocks(unet: torch.nn.Module) -> int:
    """Compile every residual and feed-forward block of `unet` in place; returns how many.

    Raises dynamo's per-function limit of compiled variants (`recompile_limit`) to at least
    `RECOMPILE_LIMIT`, for the whole process.
    """
    import torch._dynamo.config as dynamo_config

    blocks = [module for module in unet.modules() if isinstance(module, BLOCK_TYPES)]
    if not blocks:
        raise ConfigError("compile_blocks: the UNet has no ResnetBlock2D or FeedForward block to compile")
    check_compile_support(unet.device)
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    for block in blocks:
        block.compile()
    logger.info("compiled %d UNet blocks (each compiles on its first call)", len(blocks))
    return len(blocks)


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether `module` runs through `torch.compile` (set by `nn.Module.compile`)."""
    return getattr(module, "_compiled_call_impl", None) is not None


def without_compiled_blocks(unet: torch.nn.Module) -> torch.nn.Module:
    """`unet` with its blocks' compiled calls dropped (in place): for a copy that is traced for export."""
    for module in unet.modules():
        if is_compiled(module):
            module._compiled_call_impl = None
    return unet
