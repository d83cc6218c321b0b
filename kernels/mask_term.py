"""Fused mask term: `sum |(x - x0) * (1 - mask)|` in one pass, forward and backward.

The mask has the spatial size of `x` and broadcasts over its leading (batch, channel) axes.
"""
import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _masked_l1_forward(x_ptr, x0_ptr, mask_ptr, partial_ptr, n, plane, BLOCK: tl.constexpr):
    block = tl.program_id(0)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    valid = offsets < n
    x = tl.load(x_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    x0 = tl.load(x0_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    keep = 1.0 - tl.load(mask_ptr + offsets % plane, mask=valid, other=1.0).to(tl.float32)
    tl.store(partial_ptr + block, tl.sum(tl.abs((x - x0) * keep), axis=0))


@triton.jit
def _masked_l1_backward(x_ptr, x0_ptr, mask_ptr, grad_out_ptr, grad_ptr, n, plane, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offsets < n
    x = tl.load(x_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    x0 = tl.load(x0_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    keep = 1.0 - tl.load(mask_ptr + offsets % plane, mask=valid, other=1.0).to(tl.float32)
    value = (x - x0) * keep
    sign = tl.where(value > 0, 1.0, tl.where(value < 0, -1.0, 0.0))
    tl.store(grad_ptr + offsets, sign * keep * tl.load(grad_out_ptr).to(tl.float32), mask=valid)


class MaskedL1(torch.autograd.Function):
    """Autograd wrapper; `x0` gets the negated gradient when it requires one, the mask none."""

    @staticmethod
    def forward(ctx, x, x0, mask):
        x, x0, mask = x.contiguous(), x0.contiguous(), mask.contiguous()
        n, plane = x.numel(), mask.numel()
        blocks = triton.cdiv(n, BLOCK)
        partial = torch.empty(blocks, dtype=torch.float32, device=x.device)
        _masked_l1_forward[(blocks,)](x, x0, mask, partial, n, plane, BLOCK=BLOCK)
        ctx.save_for_backward(x, x0, mask)
        return partial.sum()

    @staticmethod
    def backward(ctx, grad_out):
        x, x0, mask = ctx.saved_tensors
        n = x.numel()
        grad = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        _masked_l1_backward[(triton.cdiv(n, BLOCK),)](x, x0, mask, grad_out.float().contiguous(), grad, n, mask.numel(), BLOCK=BLOCK)
        grad_x = grad.to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_x0 = (-grad).to(x0.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_x0, None


def masked_l1(x: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Triton version of `reference.masked_l1`; `mask` must cover x's last two axes."""
    if mask.shape[-2:] != x.shape[-2:] or mask.numel() != x.shape[-1] * x.shape[-2]:
        mask = mask.expand_as(x)
    return MaskedL1.apply(x, x0, mask)
