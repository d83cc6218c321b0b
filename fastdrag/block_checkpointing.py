"""The UNet's blocks recomputed in the backward instead of kept (`lora_checkpointing`, off by default).

A LoRA step's forward keeps what its backward reads: counted on the meta device (`bench/kept_memory.py`),
2,258 MiB at SD 1.5 / 512 px and 5,059 MiB at SD 2.1 / 768 px in fp16, most of an edit's GPU memory
(on an H100 the SD 1.5 step's CUDA graph pool was 3.42 of the 6.10 GiB reserved, bench/RESULTS.md).
diffusers' blocks can run each resnet and each transformer block under `torch.utils.checkpoint`, which
keeps only its inputs and runs it again in the backward to get the rest: the same numbers (the UNet
draws no random numbers: its dropouts are 0), about one more forward of those blocks per step.

`checkpointed_blocks(unet)` turns that on for the duration, with PyTorch's non-reentrant checkpoint
and no RNG state kept (reading a CUDA generator's state is not allowed while a CUDA graph captures).
A recomputation runs under the autocast state of its forward (PyTorch restores it), but the package's
other forward-time states (`fastdrag.lora_casts`' half adapter weights, `fastdrag.half_norms`, peft's
input casting turned off) hold only while their contexts are open, so the backward of a checkpointed
forward runs inside them: `fastdrag.lora.lora_backward`.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List

import torch
from torch.utils.checkpoint import checkpoint


def _recomputed(module: torch.nn.Module, *args):
    """`module(*args)`, keeping only `args` for the backward, which runs it again."""
    return checkpoint(module.__call__, *args, use_reentrant=False, preserve_rng_state=False)


def checkpointing_blocks(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The blocks of `model` that can run their parts under checkpoint (diffusers' `gradient_checkpointing` flag)."""
    return [module for module in model.modules() if isinstance(getattr(module, "gradient_checkpointing", None), bool)]


@contextlib.contextmanager
def checkpointed_blocks(model: torch.nn.Module, active: bool = True) -> Iterator[int]:
    """Inside, `model`'s diffusers blocks run their resnets and transformer blocks under checkpoint
    where gradients are recorded; yields how many blocks do. With `active` false nothing changes."""
    blocks = checkpointing_blocks(model) if active else []
    before = [(block.gradient_checkpointing, vars(block).get("_gradient_checkpointing_func")) for block in blocks]
    for block in blocks:
        block.gradient_checkpointing = True
        block._gradient_checkpointing_func = _recomputed
    try:
        yield len(blocks)
    finally:
        for block, (flag, func) in zip(blocks, before, strict=True):
            block.gradient_checkpointing = flag
            if func is None:
                vars(block).pop("_gradient_checkpointing_func", None)
            else:
                block._gradient_checkpointing_func = func
