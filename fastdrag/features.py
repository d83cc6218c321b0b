"""UNet features for the drag loop, captured by a forward hook on one up block."""
from __future__ import annotations

import contextlib
from typing import Iterator, List

import torch


def _up_block(unet: torch.nn.Module, index: int) -> torch.nn.Module:
    if not 0 <= index < len(unet.up_blocks):
        raise IndexError(f"feature_block {index} out of range: the UNet has {len(unet.up_blocks)} up blocks")
    return unet.up_blocks[index]


@contextlib.contextmanager
def capture_up_block(unet: torch.nn.Module, index: int) -> Iterator[List[torch.Tensor]]:
    """Collect the output of `unet.up_blocks[index]` of every forward inside the block."""
    block = _up_block(unet, index)
    captured: List[torch.Tensor] = []
    handle = block.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        yield captured
    finally:
        handle.remove()


def unet_with_features(unet, latents: torch.Tensor, timestep: int, text_embeddings: torch.Tensor, block: int):
    """(eps, features of up block `block`) from one UNet forward."""
    with capture_up_block(unet, block) as captured:
        eps = unet(latents, timestep, encoder_hidden_states=text_embeddings).sample
    return eps, captured[-1]


class _FeaturesReady(Exception):
    """Stops a UNet forward once the wanted up block has run: nothing after it is needed."""


def unet_features(unet, latents: torch.Tensor, timestep: int, text_embeddings: torch.Tensor,
                  block: int) -> torch.Tensor:
    """The features of up block `block` alone, without running the blocks after it.

    A drag without a mask term needs no eps, and the last up block is the UNet's costliest (a
    quarter of SD 1.5's forward at 512 px: full-resolution attention). The forward stops by an
    exception from the block's hook; the autograd graph up to the features is complete.
    """
    def stop(module, args, output):
        raise _FeaturesReady(output)

    handle = _up_block(unet, block).register_forward_hook(stop)
    try:
        unet(latents, timestep, encoder_hidden_states=text_embeddings)
    except _FeaturesReady as ready:
        return ready.args[0]
    finally:
        handle.remove()
    raise RuntimeError(f"up block {block} did not run in the UNet's forward")
