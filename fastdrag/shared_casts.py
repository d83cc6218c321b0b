"""Autocast's casts made once: shared by a tensor's readers, merged with a layout copy, or kept for
weights. The same values, fewer kernels.

**An fp32 activation read by several linear layers.** Autocast casts each linear layer's fp32 input to
half precision inside the layer, so an activation read by several layers is cast once per layer. Under
CUDA autocast LayerNorm runs in fp32, and in SD 1.x each self-attention layer's normalised input feeds
`to_q`, `to_k` and `to_v`: 3 casts of the same tensor in a drag iteration, and 6 while LoRA trains (each
adapter's A matrix reads it too; a cross-attention layer's query input 2). On an H100 such casts and
their gradients' casts were the largest copy kernels of a LoRA step (bench/RESULTS.md, 2026-11-26).

`install_shared_casts(model)` gives each `torch.nn.Linear` a forward pre-hook that, under autocast
to fp16 or bf16, hands the layer the one half copy of its fp32 input (made at its first reader,
kept on the tensor while the tensor is unchanged) through a node of its own whose backward is
autocast's cast's: the gradient cast back to fp32. So every value and gradient is bit for bit
autocast's, gradients add up in the same order, and a forward makes one cast where it made several
(tests/test_shared_casts.py). Its readers also keep that one copy for their backward instead of one
each. Outside autocast, for inputs that are not fp32, for inference tensors (which have no version
counter to keep a copy by) and while `torch.compile` traces (which fuses the casts itself), the hooks
change nothing.

**An fp32 input to a channels-last convolution.** Under CUDA autocast a resnet's convolutions read
GroupNorm + SiLU's fp32 output, and a transformer's `proj_in` GroupNorm's, in NCHW memory (CUDA's
GroupNorm computes NCHW). Autocast casts it to half precision in that layout, and then the
convolution, whose weights are channels-last, copies it to channels-last: two passes over it. Each
`Conv2d` with channels-last weights gets a pre-hook that makes them one, casting such an input to
half precision and channels-last in one copy (`Tensor.to(dtype, memory_format=...)`): the same values
reach the same kernel, and the gradient comes back through that copy's backward as it came back
through autocast's cast (61 convolutions of each SD 1.5 forward).

**The normalisation layers' weights.** CUDA autocast runs GroupNorm and LayerNorm in fp32, so each
call casts the layer's half-precision weight and bias up (autocast caches casts only of weights that
train): 2 kernels for each of SD 1.5's 61 GroupNorms and 48 LayerNorms in every forward of a LoRA
step or a drag iteration. `install_fp32_affine(model)` gives each GroupNorm and LayerNorm a forward
that, where autocast computes norms in fp32 (`FP32_NORM_DEVICES`), passes fp32 copies of them, kept on
the layer and made again when the weights change (in place or moved); fp16 -> fp32 is exact, so the
output is autocast's bit for bit. A CUDA graph replays the copies it captured, so a norm's weights
changed in place after a capture reach its replays only through an eager forward (no editor changes
them: its stages change adapter weights only).
"""
from __future__ import annotations

import types
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .patching import own_forward

HALF = (torch.float16, torch.bfloat16)
FP32_NORM_DEVICES = {"cuda"}  # where autocast runs GroupNorm and LayerNorm in fp32 (the CPU's keeps the input's dtype)
_KEPT = "_fastdrag_half_copy"
_KEPT_AFFINE = "_fastdrag_fp32_affine"


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


def autocast_half_dtype(device_type: str) -> Optional[torch.dtype]:
    """The half dtype autocast computes matmuls in on `device_type`, None where it is off or not half."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)
    return dtype if dtype in HALF else None


def _autocast_half(x: torch.Tensor) -> Optional[torch.dtype]:
    """The half dtype autocast would cast `x` to for a linear layer, or None where it would not cast it."""
    if torch.compiler.is_compiling() or x.dtype != torch.float32 or x.is_inference():  # (no version counter)
        return None
    return autocast_half_dtype(x.device.type)


def _share_input(module: torch.nn.Linear, args: tuple) -> Optional[tuple]:
    if not args or not isinstance(args[0], torch.Tensor):
        return None
    dtype = _autocast_half(args[0])
    return None if dtype is None else (shared_half(args[0], dtype),) + tuple(args[1:])


def channels_last_conv(conv: torch.nn.Module) -> bool:
    """Whether `conv` is a `Conv2d` whose weight lies channels-last (NHWC strides, not also NCHW's): cuDNN
    and oneDNN then compute channels-last whatever the input's layout, converting an NCHW input first."""
    if not isinstance(conv, torch.nn.Conv2d) or conv.weight.dim() != 4:
        return False
    _, channels, height, width = conv.weight.shape
    strides = conv.weight.stride()
    return (strides == (channels * height * width, 1, width * channels, channels)
            and strides != (channels * height * width, height * width, width, 1))


def _cast_to_layout(module: torch.nn.Conv2d, args: tuple) -> Optional[tuple]:
    if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() != 4:
        return None
    x = args[0]
    dtype = _autocast_half(x)
    if dtype is None or x.is_contiguous(memory_format=torch.channels_last) or not channels_last_conv(module):
        return None
    return (x.to(dtype=dtype, memory_format=torch.channels_last),) + tuple(args[1:])


HOOKS = {torch.nn.Linear: _share_input, torch.nn.Conv2d: _cast_to_layout}


def _has_hook(module: torch.nn.Module) -> bool:
    return any(hook in HOOKS.values() for hook in module._forward_pre_hooks.values())


def install_shared_casts(model: torch.nn.Module) -> int:
    """Give each `torch.nn.Linear` and `torch.nn.Conv2d` of `model` its pre-hook (once); returns how many
    layers have one."""
    for module in model.modules():
        hook = HOOKS.get(type(module))
        if hook is not None and not _has_hook(module):
            module.register_forward_pre_hook(hook)
    return shared_cast_count(model)


def remove_shared_casts(model: torch.nn.Module) -> int:
    """Take the pre-hooks off every layer of `model` that has one; returns how many had one."""
    count = 0
    for module in model.modules():
        for key in [key for key, hook in module._forward_pre_hooks.items() if hook in HOOKS.values()]:
            del module._forward_pre_hooks[key]
            count += 1
    return count


def shared_cast_count(model: torch.nn.Module) -> int:
    """How many of `model`'s layers have one of these pre-hooks."""
    return sum(_has_hook(module) for module in model.modules())


def _fp32_affine(norm: torch.nn.Module, x: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """`norm`'s (weight, bias) as this call should pass them: their kept fp32 copies where autocast would
    cast them to fp32, else the parameters themselves."""
    weight, bias = norm.weight, norm.bias
    device = x.device.type
    if (torch.compiler.is_compiling() or weight is None or weight.dtype not in HALF or weight.is_inference()
            or device not in FP32_NORM_DEVICES or not torch.is_autocast_enabled(device)):
        return weight, bias
    stamp = tuple((p._version, p.data_ptr(), p.device) for p in (weight, bias) if p is not None)
    kept = vars(norm).get(_KEPT_AFFINE)
    if kept is None or kept[0] != stamp:
        copies = tuple(None if p is None else p.detach().float() for p in (weight, bias))
        kept = (stamp, copies)
        setattr(norm, _KEPT_AFFINE, kept)
    return kept[1]


def _group_norm(self: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    weight, bias = _fp32_affine(self, x)
    return F.group_norm(x, self.num_groups, weight, bias, self.eps)


def _layer_norm(self: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    weight, bias = _fp32_affine(self, x)
    return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


NORM_FORWARDS = {torch.nn.GroupNorm: _group_norm, torch.nn.LayerNorm: _layer_norm}


def install_fp32_affine(model: torch.nn.Module) -> int:
    """Give each GroupNorm and LayerNorm of `model` with affine weights and no forward of its own the
    forward that passes fp32 copies of them under autocast; returns how many have it."""
    for module in model.modules():
        function = NORM_FORWARDS.get(type(module))
        if function is not None and module.weight is not None and "forward" not in vars(module):
            module.forward = types.MethodType(function, module)
    return fp32_affine_count(model)


def remove_fp32_affine(model: torch.nn.Module) -> int:
    """Give each norm that has that forward its class's back (and drop its copies); returns how many."""
    count = 0
    for module in model.modules():
        if own_forward(module) in NORM_FORWARDS.values():
            del module.forward
            vars(module).pop(_KEPT_AFFINE, None)
            count += 1
    return count


def fp32_affine_count(model: torch.nn.Module) -> int:
    """How many of `model`'s norms have the forward of `install_fp32_affine`."""
    return sum(own_forward(m) in NORM_FORWARDS.values() for m in model.modules())
