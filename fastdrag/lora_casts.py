"""The trained LoRA weights cast to half precision in one pass per LoRA step, not one cast each.

Under autocast each LoRA layer's A and B matmuls cast their fp32 master weights to half precision at
every call, and the backward casts each weight's gradient back to fp32: at SD 1.5's 128 LoRA layers
that is 256 small cast kernels in a LoRA step's forward and 256 in its backward, about a tenth of the
step's 5,000 kernels on an H100 (bench/RESULTS.md). `half_adapter_weights(layers)` makes all of a
step's half weights in one multi-tensor copy (`torch._foreach_copy_`, one launch per few dozen
tensors on CUDA) and casts all their gradients back in another; the lean LoRA forward
(`fastdrag.lean_blocks`) takes them. The same roundings (a copy to half rounds to nearest, as
autocast's cast does), the same gradients in the same layouts, bit for bit (tests/test_lora_casts.py).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from .shared_casts import autocast_half_dtype

_KEPT = "_fastdrag_half_lora_weights"


class HalfWeights(torch.autograd.Function):
    """`weights` in `dtype`, made by one multi-tensor copy; the backward copies their gradients back to
    the weights' dtype the same way, each in its own layout, as autocast's casts' backward does."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *weights: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)  # an unused weight gets no gradient, as with autocast's casts
        ctx.dtypes = [weight.dtype for weight in weights]
        halves = [torch.empty_like(weight, dtype=dtype) for weight in weights]
        torch._foreach_copy_(halves, list(weights))
        return tuple(halves)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: Optional[torch.Tensor]) -> tuple:
        present = [index for index, grad in enumerate(grads) if grad is not None]
        masters = [torch.empty_like(grads[index], dtype=ctx.dtypes[index]) for index in present]
        if masters:
            torch._foreach_copy_(masters, [grads[index] for index in present])
        out: List[Optional[torch.Tensor]] = [None] * len(grads)
        for index, master in zip(present, masters, strict=True):
            out[index] = master
        return (None, *out)


@contextlib.contextmanager
def half_adapter_weights(layers: Sequence[Tuple[torch.nn.Module, str]]) -> Iterator[int]:
    """Within: each `(peft LoRA layer, adapter)` of `layers` whose A and B weights are fp32 and train has
    them in autocast's half dtype, all made by one `HalfWeights` (`half_weights` reads them); yields how
    many layers have them. Outside autocast to a half dtype, without gradients or while `torch.compile`
    traces, it does nothing."""
    chosen = [(layer, adapter) for layer, adapter in layers
              if all(w.dtype == torch.float32 and w.requires_grad
                     for w in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight))]
    dtype = autocast_half_dtype(chosen[0][0].lora_A[chosen[0][1]].weight.device.type) if chosen else None
    if dtype is None or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        yield 0
        return
    weights = [w for layer, adapter in chosen for w in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight)]
    halves = HalfWeights.apply(dtype, *weights)
    for index, (layer, adapter) in enumerate(chosen):
        setattr(layer, _KEPT, (adapter, halves[2 * index], halves[2 * index + 1]))
    try:
        yield len(chosen)
    finally:
        for layer, _ in chosen:
            vars(layer).pop(_KEPT, None)


def half_weights(layer: torch.nn.Module, adapter: str) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The half A and B weights `half_adapter_weights` made for `layer`'s `adapter`, None outside it."""
    kept = vars(layer).get(_KEPT)
    return None if kept is None or kept[0] != adapter else (kept[1], kept[2])
