"""`fastdrag.shared_casts`: under autocast an fp32 activation read by several linear layers is cast once,
with every value and gradient bit for bit autocast's own.

CUDA autocast runs GroupNorm and LayerNorm in fp32 (their inputs and weights cast up, an fp32 output);
CPU autocast runs them in the input's dtype. `cuda_like_norms` makes the CPU's norms do what CUDA's
do, so that the tiny UNet under CPU autocast has the activations that SD 1.5 has on a GPU: fp32
normalised inputs to the attention layers' projections."""
import copy
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft.helpers import disable_input_dtype_casting

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from op_count import OpCount  # noqa: E402

from fastdrag.config import LoraConfig  # noqa: E402
from fastdrag.lean_blocks import install_lean_blocks  # noqa: E402
from fastdrag.lora import install_adapter, lora_parameters  # noqa: E402
from fastdrag.shared_casts import install_shared_casts, remove_shared_casts, shared_cast_count, shared_half  # noqa: E402


def _fp32_group_norm(self, x):
    with torch.autocast(x.device.type, enabled=False):
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)


def _fp32_layer_norm(self, x):
    with torch.autocast(x.device.type, enabled=False):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)


def cuda_like_norms(model):
    """Each GroupNorm and LayerNorm of `model` normalises as under CUDA autocast: everything cast to fp32."""
    forwards = {torch.nn.GroupNorm: _fp32_group_norm, torch.nn.LayerNorm: _fp32_layer_norm}
    for module in model.modules():
        if type(module) in forwards:
            module.forward = types.MethodType(forwards[type(module)], module)


def transformer_blocks(unet):
    return [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]


@pytest.fixture(scope="module")
def adapted(tiny):
    """The tiny UNet with a trained-looking adapter, the lean blocks and CUDA's fp32 norms."""
    unet = copy.deepcopy(tiny.unet)
    install_adapter(unet, LoraConfig(), seed=3)
    for param in lora_parameters(unet):
        with torch.no_grad():
            param.normal_(std=0.05)
        param.requires_grad_(True)
    install_lean_blocks(unet)
    cuda_like_norms(unet)
    return unet


def autocast_steps(unet, dtype, seed=0, size=(11, 9)):
    """A LoRA step (training mode, batch 2, the adapter's gradients) and a drag iteration (eval mode, batch
    1, the latent's gradient) under CPU autocast to `dtype`, as `fastdrag.autocast.unet_autocast` runs
    them; returns their outputs and gradients and the forwards' operation counts."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, unet.config.in_channels, *size, generator=generator)
    text = torch.randn(2, 7, unet.config.cross_attention_dim, generator=generator).to(dtype)  # as the steps pass it
    params = lora_parameters(unet)
    with torch.autocast("cpu", dtype=dtype, cache_enabled=False), disable_input_dtype_casting(unet):
        unet.train()
        with OpCount() as lora_ops:
            out = unet(latents, torch.tensor([901, 17]), text).sample
        weight_grads = torch.autograd.grad(out.float().square().mean(), params)
        unet.eval()
        latent = latents[:1].clone().requires_grad_(True)
        with OpCount() as drag_ops:
            eps = unet(latent, torch.tensor([500]), text[:1]).sample
        (latent_grad,) = torch.autograd.grad(eps.float(), latent, torch.randn(eps.shape, generator=generator))
    return [out, eps, latent_grad, *weight_grads], lora_ops.ops, drag_ops.ops


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_shared_casts_train_and_drag_bit_for_bit_with_one_cast_per_activation(adapted, dtype):
    """Each self-attention layer's normalised input had 6 readers (to_q, to_k, to_v and their adapters' A
    matrices) and each cross-attention layer's query input 2: one cast each now, 6 fewer per block."""
    remove_shared_casts(adapted)
    stock, stock_lora, stock_drag = autocast_steps(adapted, dtype)
    assert install_shared_casts(adapted) == sum(type(m) is torch.nn.Linear for m in adapted.modules())
    shared, shared_lora, shared_drag = autocast_steps(adapted, dtype)
    assert all(torch.isfinite(t).all() and t.abs().sum() > 0 for t in stock)
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(shared, stock))
    blocks = len(transformer_blocks(adapted))
    assert blocks == 16
    assert stock_lora["_to_copy"] - shared_lora["_to_copy"] == 6 * blocks
    assert stock_drag["_to_copy"] - shared_drag["_to_copy"] == 6 * blocks
    assert {k: v for k, v in shared_lora.items() if k != "_to_copy"} == \
        {k: v for k, v in stock_lora.items() if k != "_to_copy"}  # nothing else changed


def test_a_merged_adapter_shares_the_three_projections_cast(adapted):
    """The drag runs the adapter merged: to_q, to_k and to_v read the normalised input, 2 casts fewer."""
    unet = copy.deepcopy(adapted)
    for module in unet.modules():
        if hasattr(module, "merge") and hasattr(module, "lora_A"):
            module.merge()
    cuda_like_norms(unet)
    latent = torch.randn(1, 4, 7, 10).requires_grad_(True)
    text = torch.randn(1, 5, unet.config.cross_attention_dim).half()

    def drag_iteration():
        with torch.autocast("cpu", dtype=torch.float16, cache_enabled=False), OpCount() as ops:
            eps = unet(latent, torch.tensor([500]), text).sample
        return eps, torch.autograd.grad(eps.float().sum(), latent)[0], ops.ops

    shared = drag_iteration()
    remove_shared_casts(unet)
    stock = drag_iteration()
    assert torch.equal(shared[0], stock[0]) and torch.equal(shared[1], stock[1])
    assert stock[2]["_to_copy"] - shared[2]["_to_copy"] == 2 * len(transformer_blocks(unet))


def test_the_readers_keep_one_copy_for_their_backward(adapted):
    """The adapters' A matrices keep their input for their weight's gradient: one half copy of each
    self-attention layer's normalised input among the three of them, not one each."""
    blocks = transformer_blocks(adapted)
    shapes = {}  # each block's (positions, channels)
    hooks = [block.register_forward_pre_hook(lambda m, args: shapes.setdefault(m, args[0].shape[1:]) and None)
             for block in blocks]

    def kept_bytes():
        storages = {}

        def pack(tensor):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        latents = torch.randn(2, 4, 11, 9)
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False), disable_input_dtype_casting(adapted), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            adapted.train()
            adapted(latents, torch.tensor([901, 17]), torch.randn(2, 7, 32).bfloat16())
        return sum(storages.values())

    try:
        remove_shared_casts(adapted)
        stock = kept_bytes()
        install_shared_casts(adapted)
        shared = kept_bytes()
    finally:
        for hook in hooks:
            hook.remove()
    assert len(shapes) == len(blocks) == 16
    copies_fewer = sum(2 * 2 * positions * channels * 2 for positions, channels in shapes.values())  # 2 of 3, batch 2, bf16
    assert stock - shared == copies_fewer > 0


def test_a_changed_input_is_cast_again_and_other_inputs_are_left_alone():
    torch.manual_seed(1)
    first, second = torch.nn.Linear(13, 6), torch.nn.Linear(13, 5)
    model = torch.nn.ModuleList([first, second])
    assert install_shared_casts(model) == 2 and install_shared_casts(model) == 2
    x = torch.randn(3, 13)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = first(x)
        x.mul_(3.0)  # written in place after its first reader: the kept copy is stale
        b = second(x)
        assert torch.equal(b, F.linear(x.bfloat16(), second.weight.bfloat16(), second.bias.bfloat16()))
        assert torch.equal(a, F.linear((x / 3.0).bfloat16(), first.weight.bfloat16(), first.bias.bfloat16()))
        half = x.bfloat16()
        with OpCount() as ops:
            first(half)  # not fp32: nothing to share
        assert "_to_copy" not in ops.ops or ops.ops["_to_copy"] == 2  # autocast's own casts of the weights
    with OpCount() as ops:
        out = first(x)  # no autocast: fp32, no cast at all
    assert out.dtype == torch.float32 and "_to_copy" not in ops.ops
    assert shared_half(x, torch.bfloat16) is shared_half(x, torch.bfloat16)  # kept, no grad: the copy itself
    assert remove_shared_casts(model) == 2 and shared_cast_count(model) == 0
