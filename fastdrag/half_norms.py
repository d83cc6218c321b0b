"""Experimental: normalisation in the model's half precision inside autocast (`FASTDRAG_HALF_NORMS=1`).

Autocast runs GroupNorm and LayerNorm in fp32. In the two stages that run under it, the LoRA step and
the drag iteration, each of SD 1.5's ≈ 60 GroupNorms and 48 LayerNorms therefore casts its fp16 input
up and its output back down, forward and backward. On an H100, copies and casts took 31 % of a LoRA
step's kernel time and 27 % of a drag iteration's, with fp32 normalisation kernels beside them
(bench/RESULTS.md, 2026-11-26). PyTorch's half-precision normalisation kernels accumulate in fp32 and
round the output once. The inference stages, which run without autocast, already use them. So the
outputs differ from autocast's by about one rounding of each normalised value.

Off by default. On an H100 (SD 1.5 / 512 px, 2026-11-26) it made a first edit 12 % faster (7.31 ->
6.42 s) and a repeated one 12 % (2.15 -> 1.90 s), but edit quality came out a little worse on every
toy run: *moved* -0.027 +- 0.020 on 16 cases, -0.012 +- 0.008 on 40 (H200), so it stays off
(bench/RESULTS.md).
When on, it is part of the LoRA cache key, since the adapter trains on those roundings.
"""
from __future__ import annotations

import contextlib
import os
import types
from typing import Iterator

import torch
import torch.nn.functional as F

from .patching import own_forward
from .shared_casts import HALF, NORM_FORWARDS

ENV = "FASTDRAG_HALF_NORMS"


def enabled() -> bool:
    """Whether `FASTDRAG_HALF_NORMS` asks for half-precision normalisation under autocast."""
    value = os.environ.get(ENV, "0").strip().lower()
    if value not in ("0", "1", "false", "true", ""):
        raise ValueError(f"{ENV} must be 0 or 1; got {value!r}")
    return value in ("1", "true")


def _group_norm(self: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast(x.device.type, enabled=False):
        return F.group_norm(x.to(self.weight.dtype), self.num_groups, self.weight, self.bias, self.eps)


def _layer_norm(self: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast(x.device.type, enabled=False):
        return F.layer_norm(x.to(self.weight.dtype), self.normalized_shape, self.weight, self.bias, self.eps)


@contextlib.contextmanager
def half_norms(model: torch.nn.Module, active: bool = True) -> Iterator[None]:
    """Inside, each GroupNorm and LayerNorm of `model` with half-precision affine weights (and no
    forward of its own, such as `fastdrag.fused_blocks` gives) normalises in that dtype with autocast
    off (see the module docstring). What a CUDA graph captures inside keeps doing so on every replay.
    With `active` false, or no such layer, nothing changes."""
    forwards = {torch.nn.GroupNorm: _group_norm, torch.nn.LayerNorm: _layer_norm}
    replaceable = (None, *NORM_FORWARDS.values())  # the class's, or the one that keeps fp32 weights; a fused one stays
    patched = []
    if active:
        patched = [(m, vars(m).get("forward")) for m in model.modules()
                   if type(m) in forwards and getattr(m, "weight", None) is not None and m.weight.dtype in HALF
                   and own_forward(m) in replaceable]
    for module, _ in patched:
        module.forward = types.MethodType(forwards[type(module)], module)  # an instance attribute shadows the class's
    try:
        yield
    finally:
        for module, before in patched:
            del module.forward
            if before is not None:
                module.forward = before
