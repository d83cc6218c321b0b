"""Fused LayerNorm over the last axis, forward and backward, computed in fp32 and rounded once.

Under CUDA autocast PyTorch runs LayerNorm in fp32: the half-precision tokens are cast up, normalised
into an fp32 tensor and cast down again for the linear layers that read it; its backward casts the
gradient up, reads an fp32 copy of the input it kept, and casts the input gradient down. SD 1.x's
transformer blocks have 3 LayerNorms each (48 in SD 1.5's UNet, on up to 4 x 4096 tokens of 320
channels in a LoRA step). This kernel reads the tokens in their own dtype, normalises in fp32 and
writes that dtype: autocast's fp32 LayerNorm rounded once at its output, as its readers' casts round
it. The backward reads the input, the output gradient and two floats per row, and rounds the input
gradient once, as autocast's cast of it does. It keeps the half-precision input for the backward
where autocast keeps an fp32 copy. One rounding differs from autocast's: the output's readers'
gradients add up in the output's dtype, where autocast adds them in fp32 (each reader casts its own).

Each program normalises `BLOCK_M` whole rows (a row's `N` channels padded to a power of two), so the
statistics are exact two-pass ones from registers; a batch of one still has thousands of rows.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

ROW_TILE_ELEMENTS = 4096  # rows x padded row width in one program
NUM_WARPS = 8  # 16 of a tile's elements per thread: the backward holds four fp32 values of each


@triton.jit
def _rows(ptr, row_stride, rows, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(pointers, mask, row indices, row mask, column indices, column mask) of this program's rows."""
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_N)
    r_valid, c_valid = r < rows, c < N
    return ptr + r[:, None] * row_stride + c[None, :], r_valid[:, None] & c_valid[None, :], r, r_valid, c, c_valid


@triton.jit(do_not_specialize=["rows"])
def _layer_norm_forward(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, rows, N, x_row_stride, y_row_stride, eps,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    at, valid, r, r_valid, c, c_valid = _rows(x_ptr, x_row_stride, rows, N, BLOCK_M, BLOCK_N)
    x = tl.load(at, mask=valid, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    centred = tl.where(valid, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / N + eps)
    w = tl.load(w_ptr + c, mask=c_valid, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + c, mask=c_valid, other=0.0).to(tl.float32)
    y = w[None, :] * (centred * rstd[:, None]) + b[None, :]
    out, _, _, _, _, _ = _rows(y_ptr, y_row_stride, rows, N, BLOCK_M, BLOCK_N)
    tl.store(out, y.to(y_ptr.dtype.element_ty), mask=valid)
    tl.store(mean_ptr + r, mean, mask=r_valid)
    tl.store(rstd_ptr + r, rstd, mask=r_valid)


@triton.jit(do_not_specialize=["rows"])
def _layer_norm_backward(x_ptr, dy_ptr, dx_ptr, w_ptr, mean_ptr, rstd_ptr, dw_ptr, db_ptr, rows, N,
                         x_row_stride, dy_row_stride, dx_row_stride,
                         WEIGHT_GRADS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    at, valid, r, r_valid, c, c_valid = _rows(x_ptr, x_row_stride, rows, N, BLOCK_M, BLOCK_N)
    dy_at, _, _, _, _, _ = _rows(dy_ptr, dy_row_stride, rows, N, BLOCK_M, BLOCK_N)
    x = tl.load(at, mask=valid, other=0.0).to(tl.float32)
    dy = tl.load(dy_at, mask=valid, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + r, mask=r_valid, other=0.0)
    rstd = tl.load(rstd_ptr + r, mask=r_valid, other=0.0)
    w = tl.load(w_ptr + c, mask=c_valid, other=0.0).to(tl.float32)
    xhat = tl.where(valid, (x - mean[:, None]) * rstd[:, None], 0.0)
    dxhat = dy * w[None, :]
    mean_dxhat = tl.sum(dxhat, axis=1) / N
    mean_dxhat_xhat = tl.sum(dxhat * xhat, axis=1) / N
    dx = rstd[:, None] * (dxhat - mean_dxhat[:, None] - xhat * mean_dxhat_xhat[:, None])
    out, _, _, _, _, _ = _rows(dx_ptr, dx_row_stride, rows, N, BLOCK_M, BLOCK_N)
    tl.store(out, dx.to(dx_ptr.dtype.element_ty), mask=valid)
    if WEIGHT_GRADS:  # this program's rows' part of the affine weights' gradients
        part = tl.program_id(0) * N + c
        tl.store(dw_ptr + part, tl.sum(dy * xhat, axis=0), mask=c_valid)
        tl.store(db_ptr + part, tl.sum(dy, axis=0), mask=c_valid)


def _blocks(rows: int, width: int) -> Tuple[int, int]:
    """(BLOCK_M, BLOCK_N): whole rows padded to a power of two, about ROW_TILE_ELEMENTS a program."""
    block_n = triton.next_power_of_2(width)
    block_m = min(max(1, ROW_TILE_ELEMENTS // block_n), triton.next_power_of_2(max(rows, 1)))
    return block_m, block_n


def _matrix(t: torch.Tensor, width: int) -> torch.Tensor:
    """`t` as (rows, width) with unit column stride (a copy only when its layout has none)."""
    matrix = t.reshape(-1, width)
    return matrix if matrix.stride(-1) == 1 else matrix.contiguous()


def layer_norm_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y (rows, N) in x's dtype, x as (rows, N), mean, rstd (fp32, rows))."""
    width = x.shape[-1]
    matrix = _matrix(x, width)
    rows = matrix.shape[0]
    y = torch.empty(rows, width, dtype=x.dtype, device=x.device)
    mean, rstd = torch.empty(2, rows, dtype=torch.float32, device=x.device)
    block_m, block_n = _blocks(rows, width)
    _layer_norm_forward[(triton.cdiv(rows, block_m),)](
        matrix, y, weight, bias, mean, rstd, rows, width, matrix.stride(0), y.stride(0), eps,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=NUM_WARPS)
    return y, matrix, mean, rstd


def layer_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                        rstd: torch.Tensor, weight_grads: bool
                        ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dx (rows, N) in x's dtype, fp32 dweight and dbias, or None without `weight_grads`)."""
    rows, width = x.shape
    dy = _matrix(dy, width)
    dx = torch.empty_like(x)
    block_m, block_n = _blocks(rows, width)
    programs = triton.cdiv(rows, block_m)
    # without WEIGHT_GRADS the kernel writes no partials, so any pointer stands in for theirs
    dw, db = (torch.empty(2, programs, width, dtype=torch.float32, device=x.device) if weight_grads
              else (mean, mean))
    _layer_norm_backward[(programs,)](
        x, dy, dx, weight, mean, rstd, dw, db, rows, width, x.stride(0), dy.stride(0), dx.stride(0),
        WEIGHT_GRADS=weight_grads, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=NUM_WARPS)
    return (dx, dw.sum(0), db.sum(0)) if weight_grads else (dx, None, None)


class LayerNorm(torch.autograd.Function):
    """Autograd wrapper: gradients for the input, and for the affine weights only when they need them."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, matrix, mean, rstd = layer_norm_forward(x, weight, bias, eps)
        ctx.save_for_backward(matrix, weight, mean, rstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        matrix, weight, mean, rstd = ctx.saved_tensors
        weight_grads = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        dx, dw, db = layer_norm_backward(dy, matrix, weight, mean, rstd, weight_grads)
        return (dx.view(ctx.shape) if ctx.needs_input_grad[0] else None,
                dw.to(weight.dtype) if ctx.needs_input_grad[1] else None,
                db.to(weight.dtype) if ctx.needs_input_grad[2] else None, None)


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float = 1e-5) -> torch.Tensor:
    """Triton version of `reference.layer_norm`: LayerNorm over x's last axis computed in fp32 and
    rounded once to x's dtype."""
    width = x.shape[-1]
    if weight is None:
        weight = torch.ones(width, dtype=x.dtype, device=x.device)
    if bias is None:
        bias = torch.zeros(width, dtype=weight.dtype, device=x.device)
    return LayerNorm.apply(x, weight, bias, eps)
