"""One half-precision copy of an fp32 activation for every linear layer that reads it under autocast.

Autocast casts each linear layer's fp32 input to half precision inside the layer, so an activation
read by several layers is cast once per layer. Under CUDA autocast LayerNorm runs in fp32, and in
SD 1.x each self-attention layer's normalised input feeds `to_q`, `to_k` and `to_v`: 3 casts of
the same tensor in a drag iteration, and 6 while LoRA trains (each adapter's A matrix reads it too;
a cross-attention layer's query input 2). On an H100 such casts and their gradients' casts were the
largest copy kernels of a LoRA step (bench/RESULTS.md, 2026-11-26).

`install_shared_casts(model)` gives each `torch.nn.Linear` a forward pre-hook that, under autocast
to fp16 or bf16, hands the layer the one half copy of its fp32 input (made at its first reader,
kept on the tensor while the tensor is unchanged) through a node of its own whose backward is
autocast's cast's: the gradient cast back to fp32. So every value and gradient is bit for bit
autocast's, gradients add up in the same order, and a forward makes one cast where it made several
(tests/test_shared_casts.py). Its readers also keep that one copy for their backward instead of one
each. Outside autocast, for inputs that are not fp32 and while `torch.compile` traces (which fuses
the casts itself), the hook changes nothing.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

HALF = (torch.float16, torch.bfloat16)
_KEPT = "_fastdrag_half_copy"


class _SharedHalf(torch.autograd.Function):
    """`half` (the half copy of `x`) as one reader's input; the backward is that of autocast's cast."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
        ctx.dtype = x.dtype
        return half.view_as(half)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[torch.Tensor, None]:
        return grad.to(ctx.dtype), None


def shared_half(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` in `dtype` as autocast would cast it for a reader, from one copy kept for all its readers."""
    kept = getattr(x, _KEPT, None)
    if kept is None or kept[0] != x._version or kept[1].dtype != dtype:
        kept = (x._version, x.detach().to(dtype))
        setattr(x, _KEPT, kept)
    return _SharedHalf.apply(x, kept[1]) if x.requires_grad and torch.is_grad_enabled() else kept[1]


def _autocast_half(x: torch.Tensor) -> Optional[torch.dtype]:
    """The half dtype autocast would cast `x` to for a linear layer, or None where it would not cast it."""
    if x.dtype != torch.float32 or torch.compiler.is_compiling():
        return None
    device = x.device.type
    if not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    return dtype if dtype in HALF else None


def _share_input(module: torch.nn.Linear, args: tuple) -> Optional[tuple]:
    if not args or not isinstance(args[0], torch.Tensor):
        return None
    dtype = _autocast_half(args[0])
    return None if dtype is None else (shared_half(args[0], dtype),) + tuple(args[1:])


def _has_hook(module: torch.nn.Module) -> bool:
    return any(hook is _share_input for hook in module._forward_pre_hooks.values())


def install_shared_casts(model: torch.nn.Module) -> int:
    """Give each `torch.nn.Linear` of `model` the shared-cast pre-hook (once); returns how many have it."""
    for module in model.modules():
        if type(module) is torch.nn.Linear and not _has_hook(module):
            module.register_forward_pre_hook(_share_input)
    return shared_cast_count(model)


def remove_shared_casts(model: torch.nn.Module) -> int:
    """Take the pre-hook off every layer of `model` that has it; returns how many had it."""
    count = 0
    for module in model.modules():
        for key in [key for key, hook in module._forward_pre_hooks.items() if hook is _share_input]:
            del module._forward_pre_hooks[key]
            count += 1
    return count


def shared_cast_count(model: torch.nn.Module) -> int:
    """How many of `model`'s layers have the shared-cast pre-hook."""
    return sum(_has_hook(module) for module in model.modules())
