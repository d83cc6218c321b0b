"""Fused motion-supervision loss: on-the-fly bilinear resize + patch sampling + L1, forward and backward.

Per pair i with handle h_i at least `reach` from its target g_i and d_i = (g_i - h_i)/|g_i - h_i|:
`L_i = (2r_m+1)^2 * mean_{q in patch, c} |sg(R[c, q]) - R[c, q + d_i]|`, R the resized map,
the patch the (2r_m+1)^2 integer positions around h_i clipped to the map. The resized map is
never materialised; the backward scatters into the native map's gradient. A tie (|fixed - moved|
within rounding, see `reference.TIE_TOLERANCE`) gets the zero subgradient, as in the reference.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .reference import TIE_TOLERANCE
from .sampling import geometry, resized_at, sample_at, scatter_sample


@triton.jit
def _pair_geometry(handles_ptr, targets_ptr, i, reach):
    hr = tl.load(handles_ptr + 2 * i).to(tl.float32)
    hc = tl.load(handles_ptr + 2 * i + 1).to(tl.float32)
    dr = tl.load(targets_ptr + 2 * i).to(tl.float32) - hr
    dc = tl.load(targets_ptr + 2 * i + 1).to(tl.float32) - hc
    dist = tl.sqrt(dr * dr + dc * dc)
    inv = 1.0 / tl.maximum(dist, 1e-12)
    return hr, hc, dr * inv, dc * inv, dist >= reach


@triton.jit
def _patch_count(hr, hc, H, W, R_M: tl.constexpr):
    rows = tl.minimum(hr + R_M, H - 1.0) - tl.maximum(hr - R_M, 0.0) + 1.0
    cols = tl.minimum(hc + R_M, W - 1.0) - tl.maximum(hc - R_M, 0.0) + 1.0
    return tl.maximum(rows, 0.0) * tl.maximum(cols, 0.0)


@triton.jit
def _patch_values(feat_ptr, c_off, c_mask, hr, hc, dr, dc, h, w, H, W, scale_h, scale_w,
                  R_M: tl.constexpr, BLOCK_P: tl.constexpr):
    """The whole patch around the handle as one (positions, channels) tile: (fixed values, moved
    values, moved rows, moved columns, lane mask). Rows past the patch's (2r_m+1)^2 positions are masked."""
    side: tl.constexpr = 2 * R_M + 1
    k = tl.arange(0, BLOCK_P)[:, None]
    qr = hr + (k // side - R_M).to(tl.float32)
    qc = hc + (k % side - R_M).to(tl.float32)
    mask = (k < side * side) & c_mask[None, :] & (qr >= 0) & (qr <= H - 1) & (qc >= 0) & (qc <= W - 1)
    qr_i = tl.minimum(tl.maximum(qr, 0.0), H - 1.0).to(tl.int32)
    qc_i = tl.minimum(tl.maximum(qc, 0.0), W - 1.0).to(tl.int32)
    channels = c_off[None, :]
    fixed = resized_at(feat_ptr, channels, mask, qr_i, qc_i, h, w, scale_h, scale_w, h * w)
    moved = sample_at(feat_ptr, channels, mask, qr + dr, qc + dc, H, W, h, w, scale_h, scale_w, h * w)
    return fixed, moved, qr + dr, qc + dc, mask


@triton.jit
def _motion_loss_forward(
    feat_ptr, handles_ptr, targets_ptr, partial_ptr,
    C, h, w, H, W, scale_h, scale_w, reach,
    R_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    i = tl.program_id(0)
    block = tl.program_id(1)
    c_off = block * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_off < C
    hr, hc, dr, dc, active = _pair_geometry(handles_ptr, targets_ptr, i, reach)
    side: tl.constexpr = 2 * R_M + 1
    fixed, moved, _, _, mask = _patch_values(feat_ptr, c_off, c_mask, hr, hc, dr, dc, h, w, H, W,
                                             scale_h, scale_w, R_M, BLOCK_P)
    total = tl.sum(tl.sum(tl.where(mask, tl.abs(fixed - moved), 0.0), axis=1), axis=0)
    count = _patch_count(hr, hc, H, W, R_M)
    weight = tl.where(active, (side * side) / (count * C), 0.0)
    tl.store(partial_ptr + i * tl.num_programs(1) + block, total * weight)


@triton.jit
def _motion_loss_backward(
    feat_ptr, handles_ptr, targets_ptr, grad_out_ptr, grad_ptr,
    C, h, w, H, W, scale_h, scale_w, reach,
    R_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, TIE: tl.constexpr,
):
    i = tl.program_id(0)
    block = tl.program_id(1)
    c_off = block * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_off < C
    hr, hc, dr, dc, active = _pair_geometry(handles_ptr, targets_ptr, i, reach)
    side: tl.constexpr = 2 * R_M + 1
    count = _patch_count(hr, hc, H, W, R_M)
    weight = tl.where(active, (side * side) / (count * C), 0.0) * tl.load(grad_out_ptr).to(tl.float32)
    active_lanes = c_mask & (tl.zeros([BLOCK_C], dtype=tl.float32) + active.to(tl.float32) > 0.5)
    fixed, moved, mr, mc, mask = _patch_values(feat_ptr, c_off, active_lanes, hr, hc, dr, dc, h, w, H, W,
                                               scale_h, scale_w, R_M, BLOCK_P)
    diff = moved - fixed  # d|fixed - moved| / d moved = sign(moved - fixed); 0 at a tie
    tie = tl.abs(diff) <= TIE * (tl.abs(fixed) + tl.abs(moved))
    g = tl.where(tie, 0.0, tl.where(diff > 0, weight, -weight))
    scatter_sample(grad_ptr, c_off[None, :], mask, mr, mc, g, H, W, h, w, scale_h, scale_w, h * w)


def _launch_settings(channels: int, r_m: int) -> Tuple[int, int, int, int]:
    """(patch positions per tile, channels per tile, programs per pair, warps): one program takes the whole
    patch for a block of channels (32 at least), in tiles of up to 2048 values (more only for patch radii
    above 3), with at most one thread per value of its tile (up to four warps): no thread holds a replica of
    another's lane (replicated lanes and atomic adds are a combination to avoid)."""
    block_p = triton.next_power_of_2((2 * r_m + 1) ** 2)
    block_c = max(32, min(triton.next_power_of_2(channels), 2048 // block_p))
    return block_p, block_c, triton.cdiv(channels, block_c), max(1, min(4, block_p * block_c // 32))


def motion_loss_forward(feat, handles, targets, r_m, size, reach=2.0) -> torch.Tensor:
    channels = feat.shape[1]
    h, w, H, W, scale_h, scale_w = geometry(feat, size)
    block_p, block_c, blocks, warps = _launch_settings(channels, r_m)
    partial = torch.empty((handles.shape[0], blocks), dtype=torch.float32, device=feat.device)
    _motion_loss_forward[(handles.shape[0], blocks)](
        feat, handles, targets, partial, channels, h, w, H, W, scale_h, scale_w, reach, R_M=r_m, BLOCK_P=block_p,
        BLOCK_C=block_c, num_warps=warps,
    )
    return partial.sum()


def motion_loss_backward(feat, handles, targets, grad_out, r_m, size, reach=2.0) -> torch.Tensor:
    channels = feat.shape[1]
    h, w, H, W, scale_h, scale_w = geometry(feat, size)
    block_p, block_c, blocks, warps = _launch_settings(channels, r_m)
    grad = torch.zeros(feat.shape, dtype=torch.float32, device=feat.device)
    _motion_loss_backward[(handles.shape[0], blocks)](
        feat, handles, targets, grad_out, grad, channels, h, w, H, W, scale_h, scale_w, reach, R_M=r_m,
        BLOCK_P=block_p, BLOCK_C=block_c, TIE=TIE_TOLERANCE, num_warps=warps,
    )
    return grad.to(feat.dtype)


class MotionSupervisionLoss(torch.autograd.Function):
    """Autograd wrapper: gradient flows to `feat` only (handles and targets are positions)."""

    @staticmethod
    def forward(ctx, feat, handles, targets, r_m, size):
        feat = feat.contiguous()
        handles = handles.detach().float().round().contiguous()
        targets = targets.detach().float().contiguous()
        ctx.save_for_backward(feat, handles, targets)
        ctx.r_m, ctx.size = r_m, size
        return motion_loss_forward(feat, handles, targets, r_m, size)

    @staticmethod
    def backward(ctx, grad_out):
        feat, handles, targets = ctx.saved_tensors
        grad = motion_loss_backward(feat, handles, targets, grad_out.float().contiguous(), ctx.r_m, ctx.size)
        return grad, None, None, None, None


def motion_supervision_loss(feat, handles, targets, r_m: int = 1, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Fused Triton version of `reference.motion_supervision_loss` (same contract)."""
    return MotionSupervisionLoss.apply(feat, handles, targets, r_m, None if size is None else tuple(size))
