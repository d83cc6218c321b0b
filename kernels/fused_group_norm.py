"""Fused GroupNorm (+ SiLU) that reads and writes either memory layout, forward and backward.

PyTorch's CUDA GroupNorm takes contiguous NCHW only, so in a channels-last UNet each GroupNorm copies
its input to NCHW, and the convolution after it copies the output back; under autocast it also runs in
fp32, so the fp16 activations are cast up before it and its output cast down at the next convolution,
with the SiLU between them in fp32 (forward and backward). These kernels read the input where it lies
(any layout whose spatial axes flatten to one stride: NCHW or channels-last), compute in fp32, apply
the optional SiLU and round once to the input's dtype: under autocast the same arithmetic as the fp32
GroupNorm and SiLU followed by the next layer's cast, with none of the copies.

Each program takes one tile (positions x the channels of one group) of one sample, so a batch of one
still fills the GPU (SD 1.5 at 64x64 in 32 groups: 512 programs per sample). Forward: each tile's
count, mean and centred sum of squares, then each tile combines its group's partials (Chan's formula:
exact two-pass statistics, no E[x^2] - E[x]^2 cancellation) and writes its part of the output. The
backward recomputes the normalised value and the SiLU from the input, so only the input and two
floats per group are kept: each tile sums its part of the two group reductions, then each tile
combines them and writes its part of the input gradient.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

TILE_ELEMENTS = 4096  # positions x channels of one group in one program
NUM_WARPS = 4  # per program: 32 of a tile's 4096 elements per thread; 8 takes 47-80 registers a thread
# where 4 takes 80-154 (sm_90, `fastdrag.kernels.compile_check`), more warps per multiprocessor;
# `bench/test_kernels.py` times both on a GPU
MIN_BLOCK_TILES = 64  # one BLOCK_TILES for every SD 1.x size up to 512 px: fewer compiled variants
# sizes that take many values but change no code path, not specialised: with these two choices a
# UNet's ~60 norms compile 7 variants of each kernel at SD 1.5 / 512 px (14 without them)
SIZES = ["HW", "groups", "tiles"]


@triton.jit
def _tile(x_ptr, n, g, tile, HW, group_size, stride_n, stride_c, stride_hw,
          BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    """(pointers, mask, channels, channel mask) of one tile."""
    lanes = tl.arange(0, BLOCK_C)
    c_valid = lanes < group_size
    c = g * group_size + lanes
    hw = tile * BLOCK_HW + tl.arange(0, BLOCK_HW)
    valid = (hw < HW)[:, None] & c_valid[None, :]
    return x_ptr + n * stride_n + c[None, :] * stride_c + hw[:, None] * stride_hw, valid, c, c_valid


@triton.jit
def _tile_count(tile, HW, group_size, BLOCK_HW: tl.constexpr):
    """Elements in tile(s) `tile` of a group: the last one may hold fewer positions."""
    return (tl.minimum(HW - tile * BLOCK_HW, BLOCK_HW) * group_size).to(tl.float32)


@triton.jit(do_not_specialize=SIZES)
def _partial_moments(x_ptr, mean_ptr, m2_ptr, HW, group_size, groups, tiles,
                     stride_n, stride_c, stride_hw, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    n, g, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    at, valid, _, _ = _tile(x_ptr, n, g, tile, HW, group_size, stride_n, stride_c, stride_hw, BLOCK_HW, BLOCK_C)
    x = tl.load(at, mask=valid, other=0.0).to(tl.float32)
    mean = tl.sum(tl.sum(x, axis=1), axis=0) / _tile_count(tile, HW, group_size, BLOCK_HW)
    centred = tl.where(valid, x - mean, 0.0)
    slot = (n * groups + g) * tiles + tile
    tl.store(mean_ptr + slot, mean)
    tl.store(m2_ptr + slot, tl.sum(tl.sum(centred * centred, axis=1), axis=0))


@triton.jit
def _group_moments(mean_ptr, m2_ptr, n, g, HW, group_size, groups, tiles, eps,
                   BLOCK_HW: tl.constexpr, BLOCK_TILES: tl.constexpr):
    """(mean, rstd) of a group from its tiles' partials."""
    t = tl.arange(0, BLOCK_TILES)
    here = t < tiles
    slot = (n * groups + g) * tiles + t
    counts = tl.where(here, _tile_count(t, HW, group_size, BLOCK_HW), 0.0)
    means = tl.load(mean_ptr + slot, mask=here, other=0.0)
    m2s = tl.load(m2_ptr + slot, mask=here, other=0.0)
    total = tl.sum(counts, axis=0)
    mean = tl.sum(counts * means, axis=0) / total
    spread = means - mean
    m2 = tl.sum(m2s + counts * spread * spread, axis=0)
    return mean, 1.0 / tl.sqrt(m2 / total + eps)


@triton.jit(do_not_specialize=SIZES)
def _normalise(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, m2_ptr, saved_mean_ptr, saved_rstd_ptr,
               HW, group_size, groups, tiles, eps,
               x_stride_n, x_stride_c, x_stride_hw, y_stride_n, y_stride_c, y_stride_hw,
               SILU: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_TILES: tl.constexpr):
    n, g, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    mean, rstd = _group_moments(mean_ptr, m2_ptr, n, g, HW, group_size, groups, tiles, eps, BLOCK_HW, BLOCK_TILES)
    if tile == 0:
        tl.store(saved_mean_ptr + n * groups + g, mean)
        tl.store(saved_rstd_ptr + n * groups + g, rstd)
    at, valid, c, c_valid = _tile(x_ptr, n, g, tile, HW, group_size, x_stride_n, x_stride_c, x_stride_hw,
                                  BLOCK_HW, BLOCK_C)
    scale = tl.load(w_ptr + c, mask=c_valid, other=0.0).to(tl.float32) * rstd
    shift = tl.load(b_ptr + c, mask=c_valid, other=0.0).to(tl.float32) - mean * scale
    y = tl.load(at, mask=valid, other=0.0).to(tl.float32) * scale[None, :] + shift[None, :]
    if SILU:
        y = y * tl.sigmoid(y)
    out, _, _, _ = _tile(y_ptr, n, g, tile, HW, group_size, y_stride_n, y_stride_c, y_stride_hw, BLOCK_HW, BLOCK_C)
    tl.store(out, y.to(y_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _gradients_before_norm(x_ptr, dy_ptr, w_ptr, b_ptr, mean, rstd, n, g, tile, HW, group_size,
                           x_stride_n, x_stride_c, x_stride_hw, dy_stride_n, dy_stride_c, dy_stride_hw,
                           SILU: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    """(xhat, dz, w, valid, channels, channel mask) of a tile: dz the gradient at the affine output
    (through the SiLU when there is one), xhat the normalised input."""
    at, valid, c, c_valid = _tile(x_ptr, n, g, tile, HW, group_size, x_stride_n, x_stride_c, x_stride_hw,
                                  BLOCK_HW, BLOCK_C)
    dy_at, _, _, _ = _tile(dy_ptr, n, g, tile, HW, group_size, dy_stride_n, dy_stride_c, dy_stride_hw,
                           BLOCK_HW, BLOCK_C)
    w = tl.load(w_ptr + c, mask=c_valid, other=0.0).to(tl.float32)
    x = tl.load(at, mask=valid, other=0.0).to(tl.float32)
    dz = tl.load(dy_at, mask=valid, other=0.0).to(tl.float32)
    xhat = tl.where(valid, (x - mean) * rstd, 0.0)
    if SILU:
        z = xhat * w[None, :] + tl.load(b_ptr + c, mask=c_valid, other=0.0).to(tl.float32)[None, :]
        s = tl.sigmoid(z)
        dz = dz * s * (1.0 + z * (1.0 - s))
    return xhat, dz, w, valid, c, c_valid


@triton.jit(do_not_specialize=SIZES + ["C"])
def _backward_partials(x_ptr, dy_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, sum_dxhat_ptr, sum_dxhat_xhat_ptr,
                       dw_ptr, db_ptr, C, HW, group_size, groups, tiles,
                       x_stride_n, x_stride_c, x_stride_hw, dy_stride_n, dy_stride_c, dy_stride_hw,
                       SILU: tl.constexpr, WEIGHT_GRADS: tl.constexpr, BLOCK_HW: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    n, g, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    mean = tl.load(mean_ptr + n * groups + g)
    rstd = tl.load(rstd_ptr + n * groups + g)
    xhat, dz, w, valid, c, c_valid = _gradients_before_norm(
        x_ptr, dy_ptr, w_ptr, b_ptr, mean, rstd, n, g, tile, HW, group_size, x_stride_n, x_stride_c, x_stride_hw,
        dy_stride_n, dy_stride_c, dy_stride_hw, SILU, BLOCK_HW, BLOCK_C)
    dxhat = dz * w[None, :]
    slot = (n * groups + g) * tiles + tile
    tl.store(sum_dxhat_ptr + slot, tl.sum(tl.sum(dxhat, axis=1), axis=0))
    tl.store(sum_dxhat_xhat_ptr + slot, tl.sum(tl.sum(dxhat * xhat, axis=1), axis=0))
    if WEIGHT_GRADS:  # per (sample, tile) partial sums of the affine weights' gradients
        row = (n * tiles + tile) * C
        tl.store(dw_ptr + row + c, tl.sum(dz * xhat, axis=0), mask=c_valid)
        tl.store(db_ptr + row + c, tl.sum(dz, axis=0), mask=c_valid)


@triton.jit(do_not_specialize=SIZES)
def _input_gradient(x_ptr, dy_ptr, dx_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, sum_dxhat_ptr, sum_dxhat_xhat_ptr,
                    HW, group_size, groups, tiles,
                    x_stride_n, x_stride_c, x_stride_hw, dy_stride_n, dy_stride_c, dy_stride_hw,
                    dx_stride_n, dx_stride_c, dx_stride_hw,
                    SILU: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_TILES: tl.constexpr):
    n, g, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    mean = tl.load(mean_ptr + n * groups + g)
    rstd = tl.load(rstd_ptr + n * groups + g)
    t = tl.arange(0, BLOCK_TILES)
    slots = (n * groups + g) * tiles + t
    count = HW * group_size
    mean_dxhat = tl.sum(tl.load(sum_dxhat_ptr + slots, mask=t < tiles, other=0.0), axis=0) / count
    mean_dxhat_xhat = tl.sum(tl.load(sum_dxhat_xhat_ptr + slots, mask=t < tiles, other=0.0), axis=0) / count
    xhat, dz, w, valid, _, _ = _gradients_before_norm(
        x_ptr, dy_ptr, w_ptr, b_ptr, mean, rstd, n, g, tile, HW, group_size, x_stride_n, x_stride_c, x_stride_hw,
        dy_stride_n, dy_stride_c, dy_stride_hw, SILU, BLOCK_HW, BLOCK_C)
    dx = rstd * (dz * w[None, :] - mean_dxhat - xhat * mean_dxhat_xhat)
    out, _, _, _ = _tile(dx_ptr, n, g, tile, HW, group_size, dx_stride_n, dx_stride_c, dx_stride_hw, BLOCK_HW, BLOCK_C)
    tl.store(out, dx.to(dx_ptr.dtype.element_ty), mask=valid)


def _strides(t: torch.Tensor) -> Optional[Tuple[int, int, int]]:
    """(sample, channel, position) strides when the spatial axes flatten to one stride, else None."""
    spatial_sizes, spatial_strides = t.shape[2:], t.stride()[2:]
    expected = spatial_strides[-1]
    for size, stride in zip(reversed(spatial_sizes), reversed(spatial_strides), strict=True):
        if size != 1 and stride != expected:
            return None
        expected = stride * size
    return t.stride(0), t.stride(1), spatial_strides[-1]


def _flattenable(t: torch.Tensor, like: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
    """`t` and its strides; copied (to `like`'s layout, which flattens, or contiguous) only when its
    spatial axes do not flatten."""
    strides = _strides(t)
    if strides is None:
        t = torch.empty_like(like).copy_(t) if like is not None else t.contiguous()
        strides = _strides(t)
    return t, strides


def _grid(x: torch.Tensor, num_groups: int) -> Tuple[int, int, int, int, int, int]:
    """(positions, group size, tiles per group, BLOCK_HW, BLOCK_C, BLOCK_TILES) for x."""
    positions = x[0, 0].numel()
    group_size = x.shape[1] // num_groups
    block_c = triton.next_power_of_2(group_size)
    block_hw = min(max(1, TILE_ELEMENTS // block_c), triton.next_power_of_2(positions))
    tiles = triton.cdiv(positions, block_hw)
    return positions, group_size, tiles, block_hw, block_c, max(MIN_BLOCK_TILES, triton.next_power_of_2(tiles))


def group_norm_forward(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                       silu: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, x as read, mean, rstd): y in x's dtype and layout; mean and rstd fp32, (N, groups)."""
    x, x_strides = _flattenable(x)
    batch = x.shape[0]
    positions, group_size, tiles, block_hw, block_c, block_tiles = _grid(x, num_groups)
    grid = (batch, num_groups, tiles)
    means, m2s = torch.empty(2, batch * num_groups * tiles, dtype=torch.float32, device=x.device)
    _partial_moments[grid](x, means, m2s, positions, group_size, num_groups, tiles, *x_strides,
                           BLOCK_HW=block_hw, BLOCK_C=block_c, num_warps=NUM_WARPS)
    y = torch.empty_like(x)
    mean = torch.empty(batch, num_groups, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    _normalise[grid](x, y, weight, bias, means, m2s, mean, rstd, positions, group_size, num_groups, tiles,
                     eps, *x_strides, *_strides(y), SILU=silu, BLOCK_HW=block_hw, BLOCK_C=block_c,
                     BLOCK_TILES=block_tiles, num_warps=NUM_WARPS)
    return y, x, mean, rstd


def group_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        mean: torch.Tensor, rstd: torch.Tensor, silu: bool, weight_grads: bool
                        ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dx in x's dtype and layout, fp32 partial dweight and dbias, each (rows, C) to be summed over
    rows, or None without `weight_grads`: frozen weights cost no reductions)."""
    dy, dy_strides = _flattenable(dy, like=x)
    batch, channels = x.shape[:2]
    num_groups = mean.shape[1]
    positions, group_size, tiles, block_hw, block_c, block_tiles = _grid(x, num_groups)
    grid = (batch, num_groups, tiles)
    sum_dxhat, sum_dxhat_xhat = torch.empty(2, batch * num_groups * tiles, dtype=torch.float32, device=x.device)
    # without WEIGHT_GRADS the kernel writes no partials, so any pointer stands in for theirs
    dw, db = (torch.empty(2, batch * tiles, channels, dtype=torch.float32, device=x.device) if weight_grads
              else (sum_dxhat, sum_dxhat))
    x_strides = _strides(x)
    _backward_partials[grid](x, dy, weight, bias, mean, rstd, sum_dxhat, sum_dxhat_xhat, dw, db, channels, positions,
                             group_size, num_groups, tiles, *x_strides, *dy_strides,
                             SILU=silu, WEIGHT_GRADS=weight_grads, BLOCK_HW=block_hw, BLOCK_C=block_c, num_warps=NUM_WARPS)
    dx = torch.empty_like(x)
    _input_gradient[grid](x, dy, dx, weight, bias, mean, rstd, sum_dxhat, sum_dxhat_xhat, positions, group_size,
                          num_groups, tiles, *x_strides, *dy_strides, *_strides(dx),
                          SILU=silu, BLOCK_HW=block_hw, BLOCK_C=block_c, BLOCK_TILES=block_tiles, num_warps=NUM_WARPS)
    return (dx, dw, db) if weight_grads else (dx, None, None)


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
        dx, dw, db = group_norm_backward(dy, x, weight, bias, mean, rstd, ctx.silu,
                                         weight_grads=ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        grad_weight = dw.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = db.sum(0).to(bias.dtype) if ctx.needs_input_grad[2] else None
        return dx if ctx.needs_input_grad[0] else None, grad_weight, grad_bias, None, None, None


def group_norm(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """Triton version of `reference.group_norm`: `silu(group_norm(x))` (or without the SiLU) computed
    in fp32 and rounded once to x's dtype, in x's layout."""
    if x.dim() == 2:  # (N, C): one position
        return group_norm(x.unsqueeze(-1), num_groups, weight, bias, eps, silu).squeeze(-1)
    channels = x.shape[1]
    if weight is None:
        weight = torch.ones(channels, dtype=x.dtype, device=x.device)
    if bias is None:
        bias = torch.zeros(channels, dtype=x.dtype, device=x.device)
    return GroupNormSiLU.apply(x, weight, bias, num_groups, eps, silu)
