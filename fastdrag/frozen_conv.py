"""Convolutions with frozen weights that keep only the weight for the backward (`frozen_conv`).

PyTorch's convolution keeps its input for the backward even when only the input's gradient is
wanted, which needs the weight alone (a `Linear` with a frozen weight keeps nothing). In a LoRA step
and a drag iteration every convolution of the UNet is frozen (the adapters sit on the attention
projections), so each keeps an activation that nothing reads: a resnet's normalised input, a
transformer's normalised input, an upsampled map. Counted on the meta device at SD 1.5 in fp16
(`bench/kept_memory.py`) that is 452 MiB of the 3062 MiB a LoRA step's forward keeps (batch 4,
64×64 latents) and 120 of a drag iteration's 739.

`install_frozen_conv(model)` gives each plain `Conv2d` of `model` a forward that, while gradients are
recorded for an input whose convolution has frozen weight and bias, runs an autograd function keeping
only the weight and the input's shape; its backward asks `convolution_backward` for the input
gradient alone, with a stand-in of the input's shape, as `torch.nn.grad.conv2d_input` does, which
cuDNN answers with the same backward-data kernel as before. Otherwise (no gradient wanted, a
trained weight, inside `torch.compile`, whose partitioner decides what to keep itself, a padding
mode or padding string `convolution_backward` does not take) the module's own forward runs. The
output and the input gradient are the stock ones; on the CPU they are equal bit for bit
(tests/test_frozen_conv.py). The gradient's memory format follows the weight's (channels-last on
CUDA by default) where the stock one also follows a channels-last input.
"""
from __future__ import annotations

import types
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .patching import own_forward


class _FrozenConv2d(torch.autograd.Function):
    """conv2d whose backward gives the input's gradient only, from the weight alone."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Tuple[int, int],
                padding: Tuple[int, int], dilation: Tuple[int, int], groups: int) -> torch.Tensor:
        out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        # under autocast the convolution ran with the weight cast to the output's dtype (no copy
        # when it is stored in that dtype), and its backward does too
        ctx.save_for_backward(weight.to(out.dtype))
        ctx.input_shape = x.shape
        ctx.conv = (stride, padding, dilation, groups)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        stand_in = grad_out.new_empty(1).expand(ctx.input_shape)  # its shape is all the input gradient needs
        grad_x = torch.ops.aten.convolution_backward(grad_out, stand_in, weight, None, stride, padding, dilation,
                                                     False, [0, 0], groups, (True, False, False))[0]
        return grad_x, None, None, None, None, None, None


def _frozen(tensor: Optional[torch.Tensor]) -> bool:
    return tensor is None or not tensor.requires_grad


def _forward(self: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if (torch.is_grad_enabled() and x.requires_grad and _frozen(self.weight) and _frozen(self.bias)
            and not torch.compiler.is_compiling()):
        return _FrozenConv2d.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
    return type(self).forward(self, x)


def _takes(conv: torch.nn.Module) -> bool:
    """Whether `_forward` computes what this module's own forward does."""
    return (type(conv) is torch.nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and "forward" not in vars(conv))


def install_frozen_conv(model: torch.nn.Module) -> int:
    """Give each plain zero-padded `Conv2d` of `model` the forward above; returns how many have it.
    Installing twice changes nothing more. CUDA graphs captured before keep the stock backward."""
    for module in model.modules():
        if _takes(module):
            module.forward = types.MethodType(_forward, module)
    return frozen_conv_count(model)


def _patched(module: torch.nn.Module) -> bool:
    return own_forward(module) is _forward


def remove_frozen_conv(model: torch.nn.Module) -> int:
    """Give the convolutions `install_frozen_conv` changed their class's forward back; returns how many."""
    patched = [module for module in model.modules() if _patched(module)]
    for module in patched:
        del module.forward
    return len(patched)


def frozen_conv_count(model: torch.nn.Module) -> int:
    """How many of `model`'s convolutions have the forward above."""
    return sum(_patched(module) for module in model.modules())
