"""Fused GEGLU: `a * gelu(g)` of a projection `[..., 2D]` split as `(a, g)`, forward and backward.

The stock GEGLU of SD 1.x's feed-forward layers splits the projection with `chunk`, runs the exact
GELU and the product as two elementwise passes, keeps the GELU's output for the backward and joins
the two halves' gradients with a copy (`cat`). On SD 1.5 those tensors are the UNet's largest
(batch 4, 64x64: 4 x 4096 x 1280 per half). This kernel reads the projection once and writes the
product, computed in fp32 and rounded once; its backward writes both halves' gradients into one
buffer, so nothing is kept but the projection, which the stock path keeps too.
"""
import torch
import triton
import triton.language as tl

BLOCK = 1024
# read inside the kernels, so constexpr: Triton's compiler rejects plain float globals there (its
# interpreter does not; `fastdrag.kernels.compile_check` catches what only the compiler rejects)
SQRT_HALF = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _halves(x_ptr, n, half, BLOCK: tl.constexpr):
    """(output offsets, their mask, offsets of `a` in x, a, g) of this program's block, in fp32."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offsets < n
    a_at = (offsets // half) * 2 * half + offsets % half
    a = tl.load(x_ptr + a_at, mask=valid, other=0.0).to(tl.float32)
    g = tl.load(x_ptr + a_at + half, mask=valid, other=0.0).to(tl.float32)
    return offsets, valid, a_at, a, g


@triton.jit
def _geglu_forward(x_ptr, y_ptr, n, half, BLOCK: tl.constexpr):
    offsets, valid, _, a, g = _halves(x_ptr, n, half, BLOCK)
    y = a * 0.5 * g * (1.0 + tl.erf(g * SQRT_HALF))
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _geglu_backward(x_ptr, dy_ptr, dx_ptr, n, half, BLOCK: tl.constexpr):
    offsets, valid, a_at, a, g = _halves(x_ptr, n, half, BLOCK)
    dy = tl.load(dy_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.erf(g * SQRT_HALF))
    pdf = tl.exp(-0.5 * g * g) * INV_SQRT_2PI
    tl.store(dx_ptr + a_at, (dy * g * cdf).to(dx_ptr.dtype.element_ty), mask=valid)
    tl.store(dx_ptr + a_at + half, (dy * a * (cdf + g * pdf)).to(dx_ptr.dtype.element_ty), mask=valid)


class Geglu(torch.autograd.Function):
    """Autograd wrapper; keeps the projection for the backward."""

    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        half = x.shape[-1] // 2
        y = torch.empty(*x.shape[:-1], half, dtype=x.dtype, device=x.device)
        n = y.numel()
        _geglu_forward[(triton.cdiv(n, BLOCK),)](x, y, n, half, BLOCK=BLOCK)
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        n = dy.numel()
        _geglu_backward[(triton.cdiv(n, BLOCK),)](x, dy, dx, n, x.shape[-1] // 2, BLOCK=BLOCK)
        return dx


def geglu(x: torch.Tensor) -> torch.Tensor:
    """Triton version of `reference.geglu`: `a * gelu(g)` for `a, g = x.chunk(2, -1)`, computed in
    fp32 and rounded once to x's dtype."""
    if x.shape[-1] % 2:
        raise ValueError(f"GEGLU needs an even last axis; got {tuple(x.shape)}")
    return Geglu.apply(x)
