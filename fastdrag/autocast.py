"""The UNet under autocast in its own half precision, for the steps that run a backward (LoRA, drag)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from peft.helpers import disable_input_dtype_casting

from .half_norms import half_norms


@contextlib.contextmanager
def unet_autocast(unet: torch.nn.Module, active: bool, norms_in_half: bool = False) -> Iterator[None]:
    """Autocast to the UNet's dtype on its device; with `active` false, nothing changes.

    - No weight-cast cache: each weight is used once per forward, and a CUDA graph must not keep casts.
    - peft's LoRA input cast is off. peft casts each LoRA layer's input to the dtype of the adapter's
      fp32 master weights, and autocast casts it straight back to half for the matmul: a round trip
      that changes no bit and costs two copies of the input in the forward and two in the backward,
      per LoRA layer (`tests/test_autocast.py` checks both).
    - `norms_in_half`: the experimental half-precision normalisation of `fastdrag.half_norms`.
    """
    if not active:
        yield
        return
    with torch.autocast(unet.device.type, dtype=unet.dtype, cache_enabled=False), \
            disable_input_dtype_casting(unet), half_norms(unet, norms_in_half):
        yield
