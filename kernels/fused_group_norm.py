"""Fused GroupNorm (+ SiLU) that reads and writes either memory layout, forward and backward.

PyTorch's CUDA GroupNorm takes contiguous NCHW only, so in a channels-last UNet each GroupNorm copies
its input to NCHW, and the convolution after it copies the output back; under autocast it also runs in
fp32, so the fp16 activations are cast up before it and its output cast down at the next convolution,
with the SiLU between them in fp32 (forward and backward). These kernels read the input where it lies
(any layout whose spatial axes flatten to one stride: NCHW or channels-last), compute in fp32, apply
the optional SiLU and round once to the input's dtype: under autocast the same arithmetic as the fp32
GroupNorm and SiLU followed by the next layer's cast, with none of the copies.

One program per (sample, group): a pass for the mean, one for the centred variance (exact two-pass
statistics, the second read mostly from L2), one to write. The backward recomputes the normalised
value and the SiLU from the input, so only the input and two floats per group are saved.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

TILE_ELEMENTS = 4096  # positions x channels of one group per loop step


@triton.jit
def _group_norm_forward(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr,
                        HW, group_size, groups, eps,
                        x_stride_n, x_stride_c, x_stride_hw, y_stride_n, y_stride_c, y_stride_hw,
                        SILU: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0)
    g = tl.program_id(1)
    lanes = tl.arange(0, BLOCK_C)
    c_valid = lanes < group_size
    c = g * group_size + lanes
    x_base = x_ptr + n * x_stride_n + c[None, :] * x_stride_c
    count = HW * group_size

    total = tl.zeros([BLOCK_HW, BLOCK_C], tl.float32)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        valid = (hw < HW)[:, None] & c_valid[None, :]
        total += tl.load(x_base + hw[:, None] * x_stride_hw, mask=valid, other=0.0).to(tl.float32)
    mean = tl.sum(tl.sum(total, axis=1), axis=0) / count

    squares = tl.zeros([BLOCK_HW, BLOCK_C], tl.float32)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        valid = (hw < HW)[:, None] & c_valid[None, :]
        x = tl.load(x_base + hw[:, None] * x_stride_hw, mask=valid, other=0.0).to(tl.float32)
        centred = tl.where(valid, x - mean, 0.0)
        squares += centred * centred
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(squares, axis=1), axis=0) / count + eps)
    tl.store(mean_ptr + n * groups + g, mean)
    tl.store(rstd_ptr + n * groups + g, rstd)

    scale = tl.load(w_ptr + c, mask=c_valid, other=0.0).to(tl.float32) * rstd
    shift = tl.load(b_ptr + c, mask=c_valid, other=0.0).to(tl.float32) - mean * scale
    y_base = y_ptr + n * y_stride_n + c[None, :] * y_stride_c
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        valid = (hw < HW)[:, None] & c_valid[None, :]
        x = tl.load(x_base + hw[:, None] * x_stride_hw, mask=valid, other=0.0).to(tl.float32)
        y = x * scale[None, :] + shift[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_base + hw[:, None] * y_stride_hw, y.to(y_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _group_norm_backward(x_ptr, dy_ptr, dx_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, dw_ptr, db_ptr,
                         C, HW, group_size, groups,
                         x_stride_n, x_stride_c, x_stride_hw, dy_stride_n, dy_stride_c, dy_stride_hw,
                         dx_stride_n, dx_stride_c, dx_stride_hw,
                         SILU: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0)
    g = tl.program_id(1)
    lanes = tl.arange(0, BLOCK_C)
    c_valid = lanes < group_size
    c = g * group_size + lanes
    mean = tl.load(mean_ptr + n * groups + g)
    rstd = tl.load(rstd_ptr + n * groups + g)
    w = tl.load(w_ptr + c, mask=c_valid, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + c, mask=c_valid, other=0.0).to(tl.float32)
    x_base = x_ptr + n * x_stride_n + c[None, :] * x_stride_c
    dy_base = dy_ptr + n * dy_stride_n + c[None, :] * dy_stride_c
    count = HW * group_size

    # sums over the group of d(xhat) and d(xhat) * xhat; per channel, those of dz * xhat and dz
    sum_dxhat = tl.zeros([BLOCK_HW, BLOCK_C], tl.float32)
    sum_dxhat_xhat = tl.zeros([BLOCK_HW, BLOCK_C], tl.float32)
    dw = tl.zeros([BLOCK_C], tl.float32)
    db = tl.zeros([BLOCK_C], tl.float32)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        valid = (hw < HW)[:, None] & c_valid[None, :]
        x = tl.load(x_base + hw[:, None] * x_stride_hw, mask=valid, other=0.0).to(tl.float32)
        dz = tl.load(dy_base + hw[:, None] * dy_stride_hw, mask=valid, other=0.0).to(tl.float32)
        xhat = tl.where(valid, (x - mean) * rstd, 0.0)
        if SILU:
            z = xhat * w[None, :] + b[None, :]
            s = tl.sigmoid(z)
            dz = dz * s * (1.0 + z * (1.0 - s))
        dxhat = dz * w[None, :]
        sum_dxhat += dxhat
        sum_dxhat_xhat += dxhat * xhat
        dw += tl.sum(dz * xhat, axis=0)
        db += tl.sum(dz, axis=0)
    mean_dxhat = tl.sum(tl.sum(sum_dxhat, axis=1), axis=0) / count
    mean_dxhat_xhat = tl.sum(tl.sum(sum_dxhat_xhat, axis=1), axis=0) / count
    tl.store(dw_ptr + n * C + c, dw, mask=c_valid)
    tl.store(db_ptr + n * C + c, db, mask=c_valid)

    dx_base = dx_ptr + n * dx_stride_n + c[None, :] * dx_stride_c
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        valid = (hw < HW)[:, None] & c_valid[None, :]
        x = tl.load(x_base + hw[:, None] * x_stride_hw, mask=valid, other=0.0).to(tl.float32)
        dz = tl.load(dy_base + hw[:, None] * dy_stride_hw, mask=valid, other=0.0).to(tl.float32)
        xhat = (x - mean) * rstd
        if SILU:
            z = xhat * w[None, :] + b[None, :]
            s = tl.sigmoid(z)
            dz = dz * s * (1.0 + z * (1.0 - s))
        dx = rstd * (dz * w[None, :] - mean_dxhat - xhat * mean_dxhat_xhat)
        tl.store(dx_base + hw[:, None] * dx_stride_hw, dx.to(dx_ptr.dtype.element_ty), mask=valid)


def _strides(t: torch.Tensor) -> Optional[Tuple[int, int, int]]:
    """(sample, channel, position) strides when the spatial axes flatten to one stride, else None."""
    spatial_sizes, spatial_strides = t.shape[2:], t.stride()[2:]
    expected = spatial_strides[-1]
    for size, stride in zip(reversed(spatial_sizes), reversed(spatial_strides)):
        if size != 1 and stride != expected:
            return None
        expected = stride * size
    return t.stride(0), t.stride(1), spatial_strides[-1]


def _flattenable(t: torch.Tensor, like: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
    """`t` and its strides; copied (to `like`'s layout, or contiguous) only when its spatial axes do not flatten."""
    strides = _strides(t)
    if strides is None:
        t = torch.empty_like(like).copy_(t) if like is not None and _strides(like) is not None else t.contiguous()
        strides = _strides(t)
    return t, strides


def _blocks(group_size: int, positions: int) -> Tuple[int, int]:
    block_c = triton.next_power_of_2(group_size)
    block_hw = min(max(1, TILE_ELEMENTS // block_c), triton.next_power_of_2(positions))
    return block_hw, block_c


def group_norm_forward(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                       silu: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, x as read, mean, rstd): y in x's dtype and layout; mean and rstd fp32, (N, groups)."""
    x, x_strides = _flattenable(x)
    batch, channels = x.shape[:2]
    positions = x[0, 0].numel()
    group_size = channels // num_groups
    y = torch.empty_like(x)
    mean = torch.empty(batch, num_groups, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    block_hw, block_c = _blocks(group_size, positions)
    _group_norm_forward[(batch, num_groups)](
        x, y, weight, bias, mean, rstd, positions, group_size, num_groups, eps, *x_strides, *_strides(y),
        SILU=silu, BLOCK_HW=block_hw, BLOCK_C=block_c, num_warps=4)
    return y, x, mean, rstd


def group_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        mean: torch.Tensor, rstd: torch.Tensor, silu: bool
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx in x's dtype and layout, per-sample fp32 partial dweight and dbias, each (N, C))."""
    dy, dy_strides = _flattenable(dy, like=x)
    batch, channels = x.shape[:2]
    num_groups = mean.shape[1]
    positions = x[0, 0].numel()
    group_size = channels // num_groups
    dx = torch.empty_like(x)
    dw = torch.empty(batch, channels, dtype=torch.float32, device=x.device)
    db = torch.empty_like(dw)
    block_hw, block_c = _blocks(group_size, positions)
    _group_norm_backward[(batch, num_groups)](
        x, dy, dx, weight, bias, mean, rstd, dw, db, channels, positions, group_size, num_groups,
        *_strides(x), *dy_strides, *_strides(dx),
        SILU=silu, BLOCK_HW=block_hw, BLOCK_C=block_c, num_warps=4)
    return dx, dw, db


class GroupNormSiLU(torch.autograd.Function):
    """Autograd wrapper: gradients for the input, and for the affine weights only when they need them."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, silu):
        y, x_read, mean, rstd = group_norm_forward(x, num_groups, weight, bias, eps, silu)
        ctx.save_for_backward(x_read, weight, bias, mean, rstd)
        ctx.silu = silu
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = group_norm_backward(dy, x, weight, bias, mean, rstd, ctx.silu)
        grad_weight = dw.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = db.sum(0).to(bias.dtype) if ctx.needs_input_grad[2] else None
        return dx if ctx.needs_input_grad[0] else None, grad_weight, grad_bias, None, None, None


def group_norm(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """Triton version of `reference.group_norm`: `silu(group_norm(x))` (or without the SiLU) computed
    in fp32 and rounded once to x's dtype, in x's layout."""
    channels = x.shape[1]
    if weight is None:
        weight = torch.ones(channels, dtype=x.dtype, device=x.device)
    if bias is None:
        bias = torch.zeros(channels, dtype=x.dtype, device=x.device)
    return GroupNormSiLU.apply(x, weight, bias, num_groups, eps, silu)
