"""GEGLU that keeps only its projection for the backward, and writes its input gradient in one buffer.

diffusers' `GEGLU` computes `a * gelu(g)` from the two halves of its projection. Autograd then keeps
the projection (the two halves are views of it) and the GELU's output, and its backward concatenates
the two halves' gradients into a new tensor. `GegluProduct` keeps the projection alone, computes the
GELU again in the backward, and writes the two gradients straight into the halves of one buffer:

- the same operators on the same operands, so the forward and the gradients are bit for bit the
  stock ones (tests/test_lean_geglu.py; the elementwise kernels give the same result into a strided
  output on the CPU, and on CUDA both run one functor);
- at SD 1.5 / 512 px the GELU outputs are 352 MiB of what a LoRA step's forward keeps (batch 4) and
  88 MiB of a drag iteration's (`python bench/kept_memory.py`), and the `cat` reads and writes the
  projection's size again, where the GELU computed again reads and writes half of it.

Only where it pays: a call that records a graph, on a contiguous projection, outside `torch.compile`
(it fuses the block its own way). Any other call computes the stock operators.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from diffusers.models.activations import GEGLU

from .kernels.reference import geglu as stock_product  # diffusers' GEGLU product of the projection's halves
from .patching import own_forward


class GegluProduct(torch.autograd.Function):
    """`a * gelu(g)` for `(a, g) = projection.chunk(2, -1)`, keeping only `projection`."""

    @staticmethod
    def forward(ctx, projection: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(projection)
        return stock_product(projection)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (projection,) = ctx.saved_tensors
        value, gate = projection.chunk(2, dim=-1)
        grad_projection = torch.empty_like(projection)
        grad_value, grad_gate = grad_projection.chunk(2, dim=-1)
        torch.mul(grad, F.gelu(gate), out=grad_value)
        torch.ops.aten.gelu_backward.grad_input(grad * value, gate, grad_input=grad_gate)
        return grad_projection


def geglu_product(projection: torch.Tensor) -> torch.Tensor:
    """GEGLU's product of its projection's halves, through `GegluProduct` where it keeps less."""
    if (torch.is_grad_enabled() and projection.requires_grad and projection.is_contiguous()
            and not torch.compiler.is_compiling()):
        return GegluProduct.apply(projection)
    return stock_product(projection)


def _lean_geglu_forward(self: GEGLU, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """diffusers' `GEGLU.forward` (off Ascend NPUs) with the lean product."""
    if args or kwargs.get("scale") is not None:
        return type(self).forward(self, hidden_states, *args, **kwargs)  # its deprecation message
    return geglu_product(self.proj(hidden_states))


def plain_geglu(module: torch.nn.Module) -> bool:
    """Whether `module` is diffusers' own GEGLU with no forward of its own (e.g. `fused_blocks`')."""
    return type(module) is GEGLU and "forward" not in vars(module)


def install_lean_geglu(model: torch.nn.Module) -> int:
    """Give each plain GEGLU of `model` the lean forward; returns how many run it."""
    from diffusers.utils import is_torch_npu_available

    if not is_torch_npu_available():  # there diffusers runs the NPU's own fused GEGLU
        for module in model.modules():
            if plain_geglu(module):
                module.forward = types.MethodType(_lean_geglu_forward, module)
    return lean_geglu_count(model)


def remove_lean_geglu(model: torch.nn.Module) -> int:
    """Give each lean GEGLU its class's forward back; returns how many."""
    count = 0
    for module in model.modules():
        if own_forward(module) is _lean_geglu_forward:
            del module.forward
            count += 1
    return count


def lean_geglu_count(model: torch.nn.Module) -> int:
    return sum(own_forward(module) is _lean_geglu_forward for module in model.modules())
