"""Point tracking in one launch: nearest feature (L1 over channels) in each handle's search window.

Each program takes one handle, walks the channels in blocks and accumulates the L1 distance of
every window position of the on-the-fly resized map to the handle's original feature; the
argmin (first in row-major order on ties) is written as the new position, on the device.
`point_features` reads the resized map at given points, also without materialising it.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .sampling import geometry, resized_at


@triton.jit
def _track_points_kernel(
    feat_ptr, handle_feats_ptr, handles_ptr, out_ptr,
    C, h, w, H, W, scale_h, scale_w,
    R_P: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    i = tl.program_id(0)
    side: tl.constexpr = 2 * R_P + 1
    hr = tl.load(handles_ptr + 2 * i).to(tl.float32).to(tl.int32)
    hc = tl.load(handles_ptr + 2 * i + 1).to(tl.float32).to(tl.int32)
    p = tl.arange(0, BLOCK_P)
    rows = hr + p // side - R_P
    cols = hc + p % side - R_P
    valid = (p < side * side) & (rows >= 0) & (rows <= H - 1) & (cols >= 0) & (cols <= W - 1)
    rows_c = tl.minimum(tl.maximum(rows, 0), H - 1)
    cols_c = tl.minimum(tl.maximum(cols, 0), W - 1)
    distance = tl.zeros([BLOCK_P], dtype=tl.float32)
    for start in range(0, C, BLOCK_C):
        c_off = start + tl.arange(0, BLOCK_C)
        c_mask = c_off < C
        reference = tl.load(handle_feats_ptr + i * C + c_off, mask=c_mask, other=0.0).to(tl.float32)
        tile_mask = valid[:, None] & c_mask[None, :]
        values = resized_at(feat_ptr, c_off[None, :], tile_mask, rows_c[:, None], cols_c[:, None],
                            h, w, scale_h, scale_w, h * w)
        distance += tl.sum(tl.where(tile_mask, tl.abs(values - reference[None, :]), 0.0), axis=1)
    distance = tl.where(valid, distance, float("inf"))
    best = tl.argmin(distance, axis=0, tie_break_left=True)
    tl.store(out_ptr + 2 * i, (hr + best // side - R_P).to(tl.float32))
    tl.store(out_ptr + 2 * i + 1, (hc + best % side - R_P).to(tl.float32))


@triton.jit
def _point_features_kernel(
    feat_ptr, points_ptr, out_ptr, C, h, w, scale_h, scale_w, BLOCK_C: tl.constexpr,
):
    i = tl.program_id(0)
    block = tl.program_id(1)
    c_off = block * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_off < C
    r = tl.load(points_ptr + 2 * i).to(tl.float32).to(tl.int32)
    c = tl.load(points_ptr + 2 * i + 1).to(tl.float32).to(tl.int32)
    values = resized_at(feat_ptr, c_off, c_mask, r, c, h, w, scale_h, scale_w, h * w)
    tl.store(out_ptr + i * C + c_off, values, mask=c_mask)


def _clamped(points: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Rounded integer positions inside the map (scalar clamps: no host-to-device copy)."""
    points = points.detach().float().round()
    return torch.stack([points[:, 0].clamp(0, H - 1), points[:, 1].clamp(0, W - 1)], dim=-1).contiguous()


def track_points(feat, handle_feats, handles, r_p: int = 3, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Triton version of `reference.track_points` (same contract)."""
    feat = feat.detach().contiguous()
    h, w, H, W, scale_h, scale_w = geometry(feat, size)
    channels = feat.shape[1]
    out = torch.empty((handles.shape[0], 2), dtype=torch.float32, device=feat.device)
    block_p = triton.next_power_of_2((2 * r_p + 1) ** 2)
    block_c = max(1, min(triton.next_power_of_2(channels), 4096 // block_p))
    _track_points_kernel[(handles.shape[0],)](
        feat, handle_feats.detach().float().contiguous(), _clamped(handles, H, W), out,
        channels, h, w, H, W, scale_h, scale_w, R_P=r_p, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=8,
    )
    return out.to(handles.dtype)


def point_features(feat, points, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Triton version of `reference.point_features`: (N, C) fp32 features of the resized map."""
    feat = feat.detach().contiguous()
    h, w, H, W, scale_h, scale_w = geometry(feat, size)
    channels = feat.shape[1]
    out = torch.empty((points.shape[0], channels), dtype=torch.float32, device=feat.device)
    block = min(128, triton.next_power_of_2(channels))
    _point_features_kernel[(points.shape[0], triton.cdiv(channels, block))](
        feat, _clamped(points, H, W), out, channels, h, w, scale_h, scale_w, BLOCK_C=block,
    )
    return out
