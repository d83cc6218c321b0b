"""Pure-PyTorch references of the drag-loop kernels: the CPU path, the fallback and the test oracle.

Coordinates are supervision-map `(row, col)` floats. When `size=(H', W')` is given, `feat` is first
resized to it exactly like `F.interpolate(mode="bilinear", align_corners=False)`.
Every function is vectorised over points and keeps everything on the feature map's device, so
the drag loop never waits for the host.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def resize(feat: torch.Tensor, size: Optional[Tuple[int, int]]) -> torch.Tensor:
    """The feature map at supervision resolution (no-op when `size` is None or already matches)."""
    if size is None or tuple(feat.shape[-2:]) == tuple(size):
        return feat
    return F.interpolate(feat, size=tuple(size), mode="bilinear", align_corners=False)


def window_offsets(radius: int, device: torch.device) -> torch.Tensor:
    """The (2r+1)^2 integer offsets of a square window, in row-major order, as (K, 2) floats."""
    span = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    rows, cols = torch.meshgrid(span, span, indexing="ij")
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1)


def gather(feat: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Features of `feat (1, C, H, W)` at integer positions `(..., 2)`, clamped to the map: (..., C)."""
    _, channels, height, width = feat.shape
    rows = positions[..., 0].long().clamp(0, height - 1)
    cols = positions[..., 1].long().clamp(0, width - 1)
    flat = feat.reshape(channels, height * width)
    return flat[:, (rows * width + cols).reshape(-1)].T.reshape(*positions.shape[:-1], channels)


def bilinear(feat: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of `feat (1, C, H, W)` at fractional positions `(..., 2)`: (..., C).

    Positions outside the map read the border (as `grid_sample(padding_mode="border")`).
    """
    _, _, height, width = feat.shape
    rows = positions[..., 0].clamp(0, height - 1)
    cols = positions[..., 1].clamp(0, width - 1)
    row0, col0 = rows.floor(), cols.floor()
    wr, wc = (rows - row0).unsqueeze(-1), (cols - col0).unsqueeze(-1)
    row1, col1 = (row0 + 1).clamp(max=height - 1), (col0 + 1).clamp(max=width - 1)
    top = gather(feat, torch.stack([row0, col0], -1)) * (1 - wc) + gather(feat, torch.stack([row0, col1], -1)) * wc
    bottom = gather(feat, torch.stack([row1, col0], -1)) * (1 - wc) + gather(feat, torch.stack([row1, col1], -1)) * wc
    return top * (1 - wr) + bottom * wr


# |fixed - moved| below this fraction of |fixed| + |moved| is a tie. Ties are structural, not rare:
# upsampling with align_corners=False repeats the border rows and columns (4x: two of each), so a
# patch at the border can compare a value with itself. |x| has no slope at 0 and rounding (FMA on a
# GPU, another summation order) decides the sign of a tie's difference; every path therefore gives
# ties the zero subgradient, and the gradient does not depend on rounding.
TIE_TOLERANCE = 1e-5


def accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs; fp64 stays fp64 (a high-precision oracle in tests)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def tie_safe_abs(fixed: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
    """`|fixed - moved|`, with zero gradient where the two are equal up to rounding (see TIE_TOLERANCE)."""
    diff = fixed - moved
    tie = diff.abs() <= TIE_TOLERANCE * (fixed.abs() + moved.abs())
    slope = torch.where(tie, torch.zeros_like(diff), diff.sign()).detach()
    return diff * slope + (diff.abs() - diff * slope).detach()


def active_pairs(handles: torch.Tensor, targets: torch.Tensor, reach_distance: float = 2.0) -> torch.Tensor:
    """(N,) bool: pairs whose handle is still at least `reach_distance` from its target."""
    return (targets - handles).norm(dim=-1) >= reach_distance


def motion_supervision_loss(
    feat: torch.Tensor,
    handles: torch.Tensor,
    targets: torch.Tensor,
    r_m: int = 1,
    size: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """Sum over pairs of `(2r_m+1)^2 * mean |sg(F[q]) - F[q + d_i]|` over the patch around each handle.

    `q` runs over the integer positions of the `(2r_m+1)^2` patch around handle `h_i`, clipped to
    the map; `d_i` is the unit direction to the target. Pairs closer than 2 contribute 0.
    """
    feat = resize(feat, size)
    feat = feat.to(accumulation_dtype(feat))
    _, channels, height, width = feat.shape
    handles, targets = handles.to(feat.dtype), targets.to(feat.dtype)
    delta = targets - handles
    distance = delta.norm(dim=-1, keepdim=True)
    direction = delta / distance.clamp_min(1e-12)
    patch = handles.round().unsqueeze(1) + window_offsets(r_m, feat.device).to(feat.dtype).unsqueeze(0)  # (N, K, 2)
    inside = ((patch[..., 0] >= 0) & (patch[..., 0] <= height - 1) & (patch[..., 1] >= 0) & (patch[..., 1] <= width - 1)).to(feat.dtype)
    fixed = gather(feat.detach(), patch)                              # (N, K, C), stop-gradient side
    moved = bilinear(feat, patch + direction.unsqueeze(1))            # (N, K, C)
    per_position = tie_safe_abs(fixed, moved).sum(-1) * inside        # (N, K)
    count = inside.sum(-1) * channels
    per_pair = (2 * r_m + 1) ** 2 * per_position.sum(-1) / count
    return (per_pair * active_pairs(handles, targets).float()).sum()


def track_points(
    feat: torch.Tensor,
    handle_feats: torch.Tensor,
    handles: torch.Tensor,
    r_p: int = 3,
    size: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """New handle positions `(N, 2)`: the nearest feature (L1) to `handle_feats` in each window.

    The window of radius `r_p` around each handle is clipped to the map; ties go to the first
    minimum in row-major order.
    """
    with torch.no_grad():
        feat = resize(feat, size).float()
        _, _, height, width = feat.shape
        window = handles.round().float().unsqueeze(1) + window_offsets(r_p, feat.device).unsqueeze(0)  # (N, P, 2)
        inside = (window[..., 0] >= 0) & (window[..., 0] <= height - 1) & (window[..., 1] >= 0) & (window[..., 1] <= width - 1)
        distance = (gather(feat, window) - handle_feats.float().unsqueeze(1)).abs().sum(-1)
        distance = distance.masked_fill(~inside, float("inf"))
        best = distance.argmin(dim=1)
        return window[torch.arange(window.shape[0], device=feat.device), best].to(handles.dtype)


def masked_l1(x: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`sum |(x - x0) * (1 - mask)|`: how far `x` moved from `x0` outside the editable mask."""
    return ((x.float() - x0.float()) * (1.0 - mask.float())).abs().sum()


def point_features(feat: torch.Tensor, points: torch.Tensor, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Features `(N, C)` of the resized map at integer `points (N, 2)`."""
    return gather(resize(feat, size).float(), points.round())


def group_norm(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """`silu(group_norm(x))` (or the GroupNorm alone) with PyTorch's own operators: what a stock
    diffusers block computes (under autocast, in fp32). The test oracle of the Triton kernel, which
    computes in fp32 and rounds once, is this on fp32 copies of the inputs."""
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


def geglu(x: torch.Tensor) -> torch.Tensor:
    """`a * gelu(g)` for `a, g = x.chunk(2, -1)`: diffusers' GEGLU after its projection."""
    hidden, gate = x.chunk(2, dim=-1)
    return hidden * F.gelu(gate)


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over x's last axis with PyTorch's own operator: what a stock `torch.nn.LayerNorm`
    computes (under CUDA autocast, in fp32)."""
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
