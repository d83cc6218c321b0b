"""Drag-loop kernels, and two for the UNet's blocks, dispatched by device (imported as `fastdrag.kernels`).

Which path runs (`FASTDRAG_KERNELS`):
- unset or `triton`: the Triton kernels for CUDA tensors, the PyTorch references of `reference.py`
  for every other tensor. On an H100 (2026-11-26, Triton 3.6) every test of
  tests/test_kernels_triton.py passed against the references: the motion loss at every tested
  geometry (the SD one, 64x64 read at 256x256, included) in fp32, fp16 and bf16, patch radii 0-2,
  tracking, point features, the mask term and a whole drag; with CUDA graphs, loss and tracking
  together were 21x faster than the reference (bench/RESULTS.md);
- `reference`: the references on every device (the way back if a GPU disagrees).
`FASTDRAG_FORCE_TRITON=1` sends every tensor to Triton (CPU tensors need `TRITON_INTERPRET=1`):
the tests' switch.
Both paths share one contract: supervision `(row, col)` coordinates, an optional `size` at which
`feat` is read as if resized bilinearly (`align_corners=False`), fp32 accumulation.
The UNet's kernels (`group_norm`, `layer_norm`, `geglu`; wired in by `fastdrag.fused_blocks`, opt-in)
compute in fp32 and round once; their references are the stock operators.
"""
import importlib.util
import os
from typing import Optional, Tuple

import torch

from . import reference
from .reference import active_pairs

__all__ = ["motion_supervision_loss", "track_points", "masked_l1", "point_features", "group_norm", "layer_norm", "geglu",
           "active_pairs", "uses_triton", "kernel_choice"]

INT32_ELEMENTS = 2**31  # the UNet kernels index with 32-bit offsets: larger tensors take the reference

_HAVE_TRITON = importlib.util.find_spec("triton") is not None


def uses_triton(tensor: torch.Tensor) -> bool:
    """Whether the kernels take the Triton path for tensors like `tensor`."""
    if not _HAVE_TRITON:
        return False
    if os.environ.get("FASTDRAG_FORCE_TRITON", "") == "1":
        if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET", "") != "1":
            raise RuntimeError("FASTDRAG_FORCE_TRITON=1 on CPU tensors needs TRITON_INTERPRET=1 (set before the kernels load)")
        return True
    return kernel_choice() == "triton" and tensor.is_cuda


def kernel_choice() -> str:
    """`FASTDRAG_KERNELS`, checked: "triton" (the default: Triton for CUDA tensors) or "reference"."""
    choice = os.environ.get("FASTDRAG_KERNELS", "triton")
    if choice not in ("reference", "triton"):
        raise ValueError(f"FASTDRAG_KERNELS must be reference or triton; got {choice!r}")
    return choice


def motion_supervision_loss(feat: torch.Tensor, handles: torch.Tensor, targets: torch.Tensor, r_m: int = 1,
                            size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Sum over pairs of `(2r_m+1)^2 * mean |sg(F[q]) - F[q + d_i]|` (DESIGN.md stage 3, step 4)."""
    if uses_triton(feat):
        from .motion_supervision import motion_supervision_loss as fused
        return fused(feat, handles, targets, r_m, size)
    return reference.motion_supervision_loss(feat, handles, targets, r_m, size)


def track_points(feat: torch.Tensor, handle_feats: torch.Tensor, handles: torch.Tensor, r_p: int = 3,
                 size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """New handle positions `(N, 2)`: nearest feature to `handle_feats` in each window (step 2)."""
    if uses_triton(feat):
        from .point_tracking import track_points as fused
        return fused(feat, handle_feats, handles, r_p, size)
    return reference.track_points(feat, handle_feats, handles, r_p, size)


def point_features(feat: torch.Tensor, points: torch.Tensor, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Features `(N, C)` of the (resized) map at integer points."""
    if uses_triton(feat):
        from .point_tracking import point_features as fused
        return fused(feat, points, size)
    return reference.point_features(feat, points, size)


def masked_l1(x: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`sum |(x - x0) * (1 - mask)|` (the mask term of step 5)."""
    if uses_triton(x):
        from .mask_term import masked_l1 as fused
        return fused(x, x0, mask)
    return reference.masked_l1(x, x0, mask)


def group_norm(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """`silu(group_norm(x))`, or the GroupNorm alone (`fastdrag.fused_blocks` wires it into a model).
    The Triton path reads x in its own layout and rounds once from fp32; inside `torch.compile` or an
    export the reference runs, so that traced graphs hold stock operators."""
    if _unet_kernel(x):
        from .fused_group_norm import group_norm as fused
        return fused(x, num_groups, weight, bias, eps, silu)
    return reference.group_norm(x, num_groups, weight, bias, eps, silu)


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over x's last axis; the Triton path computes in fp32, rounds once to x's dtype and
    keeps x (not an fp32 copy of it) for the backward."""
    if _unet_kernel(x):
        from .fused_layer_norm import layer_norm as fused
        return fused(x, weight, bias, eps)
    return reference.layer_norm(x, weight, bias, eps)


def geglu(x: torch.Tensor) -> torch.Tensor:
    """`a * gelu(g)` for `a, g = x.chunk(2, -1)` (diffusers' GEGLU after its projection); the Triton
    path computes in fp32 and rounds once, and keeps nothing but `x` for the backward."""
    if _unet_kernel(x):
        from .fused_geglu import geglu as fused
        return fused(x)
    return reference.geglu(x)


def _unet_kernel(x: torch.Tensor) -> bool:
    """Whether a UNet op (GroupNorm, LayerNorm, GEGLU) takes its Triton kernel: as the drag kernels, except inside
    `torch.compile` or an export, where the reference runs so that traced graphs hold stock operators,
    and for an empty tensor (no grid to launch)."""
    return uses_triton(x) and not torch.compiler.is_compiling() and 0 < x.numel() < INT32_ELEMENTS
