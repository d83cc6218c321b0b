"""`fastdrag.lora_casts`: a LoRA step's half weights made in one pass, bit for bit autocast's casts."""
import copy
import sys
from pathlib import Path

import pytest
import torch
from peft.helpers import disable_input_dtype_casting

import fastdrag.lora
from fastdrag.config import LoraConfig
from fastdrag.frozen_conv import install_frozen_conv
from fastdrag.lean_blocks import install_lean_blocks, lean_lora_layers
from fastdrag.lora import install_adapter, lora_layers, lora_loss, lora_parameters
from fastdrag.lora_casts import HalfWeights, half_adapter_weights, half_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from op_count import OpCount, cuda_like_autocast  # noqa: E402


def lora_case(tiny, dtype, lean: bool = True, frozen_conv: bool = False):
    """The tiny UNet in `dtype`, channels-last, lean (unless not `lean`), with frozen convolutions if asked
    and a trained-looking fp32 adapter, and a LoRA step's inputs (fresh random values, a batch of 3 at 12x10)."""
    unet = copy.deepcopy(tiny.unet).to(dtype).to(memory_format=torch.channels_last)
    if frozen_conv:
        install_frozen_conv(unet)
    if lean:
        install_lean_blocks(unet)
    install_adapter(unet, LoraConfig(), seed=3)
    generator = torch.Generator().manual_seed(5)
    params = lora_parameters(unet)
    for param in params:
        param.data = torch.randn(param.shape, generator=generator) * 0.1
        param.requires_grad_(True)
    unet.train()
    latents, noise = (torch.randn(3, 4, 12, 10, generator=generator) for _ in range(2))
    timesteps = torch.randint(0, 1000, (3,), generator=generator)
    text = torch.randn(3, 77, unet.config.cross_attention_dim, generator=generator).to(dtype)
    return unet, params, (latents, noise, timesteps, text, tiny.scheduler.alphas_cumprod)


def lora_step(unet, params, arguments, dtype, one_pass: bool, monkeypatch):
    """`lora_loss` and its LoRA gradients under CUDA-like autocast (the CPU's `lora_loss` runs none), with
    or without the one-pass half weights; and the operations counted."""
    with monkeypatch.context() as patch:
        if not one_pass:
            patch.setattr(fastdrag.lora, "lean_lora_layers", lambda model: [])
        with cuda_like_autocast(dtype), disable_input_dtype_casting(unet), OpCount() as ops:
            loss = lora_loss(unet, *arguments)
            grads = torch.autograd.grad(loss, params)
    return loss, grads, ops.ops


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_lora_step_is_bit_for_bit_autocasts_with_two_copies_for_all_weights(tiny, dtype, monkeypatch):
    """The same loss and LoRA gradients; 2 casts fewer per LoRA layer in the forward (its A and B
    weights) and 2 in the backward (their gradients), 2 multi-tensor copies instead."""
    unet, params, arguments = lora_case(tiny, dtype)
    layers = len(lora_layers(unet))
    assert layers == len(lean_lora_layers(unet)) > 0
    lora_step(unet, params, arguments, dtype, True, monkeypatch)  # the norms' fp32 weights are made once
    loss, grads, ops = lora_step(unet, params, arguments, dtype, True, monkeypatch)
    stock_loss, stock_grads, stock_ops = lora_step(unet, params, arguments, dtype, False, monkeypatch)
    assert torch.isfinite(loss) and torch.equal(loss, stock_loss)
    assert grads and all(g.abs().sum() > 0 and torch.equal(g, s) for g, s in zip(grads, stock_grads, strict=True))
    assert stock_ops["_to_copy"] - ops["_to_copy"] == 4 * layers
    assert (ops["_foreach_copy_"], stock_ops["_foreach_copy_"]) == (2, 0)
    assert not any(half_weights(layer, adapter) for layer, adapter in lean_lora_layers(unet))  # none left after


def test_half_weights_are_autocasts_casts_and_their_gradients_keep_their_layouts():
    generator = torch.Generator().manual_seed(2)
    weights = [torch.randn(shape, generator=generator).requires_grad_(True) for shape in [(16, 37), (45, 16), (3, 5)]]
    halves = HalfWeights.apply(torch.bfloat16, *weights)
    assert all(h.dtype == torch.bfloat16 and torch.equal(h, w.detach().to(torch.bfloat16))
               for h, w in zip(halves, weights, strict=True))
    grad_out = torch.randn(37, 16, generator=generator).to(torch.bfloat16).t()  # a transposed gradient
    loss = (halves[0] * grad_out).sum() + halves[1].float().square().sum()  # the third weight is not used
    got = torch.autograd.grad(loss, weights, allow_unused=True)
    stock = [w.to(torch.bfloat16) for w in weights]
    want = torch.autograd.grad((stock[0] * grad_out).sum() + stock[1].float().square().sum(), weights, allow_unused=True)
    assert got[2] is None and want[2] is None
    for g, w in zip(got[:2], want[:2], strict=True):
        assert g.dtype == torch.float32 and torch.equal(g, w) and g.stride() == w.stride()


def test_nothing_changes_outside_autocast_without_gradients_or_for_frozen_weights(tiny):
    unet, params, _ = lora_case(tiny, torch.bfloat16)
    layers = lean_lora_layers(unet)
    with half_adapter_weights(layers) as count:  # no autocast
        assert count == 0 and half_weights(*layers[0]) is None
    with cuda_like_autocast(torch.bfloat16):
        with torch.no_grad(), half_adapter_weights(layers) as count:
            assert count == 0
        for param in params:
            param.requires_grad_(False)
        with half_adapter_weights(layers) as count:
            assert count == 0
        for param in params:
            param.requires_grad_(True)
        with pytest.raises(RuntimeError, match="inside"), half_adapter_weights(layers) as count:
            assert count == len(layers) and half_weights(*layers[0])[0].dtype == torch.bfloat16
            assert half_weights(layers[0][0], "another adapter") is None
            raise RuntimeError("inside")
    assert half_weights(*layers[0]) is None  # taken off even when the step raised


def test_a_lora_matrix_with_a_forward_hook_is_called_as_a_module(tiny, monkeypatch):
    """A forward hook on an adapter matrix sees its call: that layer takes autocast's own casts."""
    unet, params, arguments = lora_case(tiny, torch.bfloat16)
    layer, adapter = lean_lora_layers(unet)[0]
    calls = []
    layer.lora_A[adapter].register_forward_hook(lambda module, args, out: calls.append(out.dtype))
    loss, grads, ops = lora_step(unet, params, arguments, torch.bfloat16, True, monkeypatch)
    stock_loss, stock_grads, _ = lora_step(unet, params, arguments, torch.bfloat16, False, monkeypatch)
    assert calls == [torch.bfloat16, torch.bfloat16]
    assert torch.equal(loss, stock_loss) and grads
    assert all(torch.equal(g, s) for g, s in zip(grads, stock_grads, strict=True))
