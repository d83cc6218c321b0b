"""`fastdrag.shared_casts`: under autocast an fp32 activation read by several linear layers is cast once,
and the norms' weights are not cast at every call; every value and gradient bit for bit autocast's own.

CUDA autocast runs GroupNorm and LayerNorm in fp32 (their inputs and weights cast up, an fp32 output);
CPU autocast runs them in the input's dtype. `op_count.cuda_like_autocast` makes the CPU's autocast do
what CUDA's does with norms, so that the tiny UNet in half precision under it casts what SD 1.5 casts
on a GPU: fp32 normalised inputs to the attention projections, half-precision norm weights cast up."""
import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft.helpers import disable_input_dtype_casting
from torch.profiler import profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from op_count import OpCount, autocast_casts, cuda_like_autocast  # noqa: E402

from fastdrag.config import LoraConfig  # noqa: E402
from fastdrag.lean_blocks import install_lean_blocks  # noqa: E402
from fastdrag.lora import install_adapter, lora_parameters  # noqa: E402
from fastdrag.shared_casts import (install_fp32_affine, install_shared_casts, remove_fp32_affine,  # noqa: E402
                                   remove_shared_casts, shared_cast_count, shared_half)

NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm)


def transformer_blocks(unet):
    return [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]


def adapted_unet(tiny, dtype):
    """The tiny UNet in `dtype` and channels-last (as on CUDA) with a trained-looking adapter (fp32 master
    weights) and the lean blocks."""
    unet = copy.deepcopy(tiny.unet).to(dtype).to(memory_format=torch.channels_last)
    install_adapter(unet, LoraConfig(), seed=3)
    for param in lora_parameters(unet):
        with torch.no_grad():
            param.normal_(std=0.05)
        param.requires_grad_(True)
    install_lean_blocks(unet)
    return unet


@pytest.fixture(scope="module")
def adapted(tiny):
    return adapted_unet(tiny, torch.bfloat16)


def autocast_steps(unet, seed=0, size=(11, 9)):
    """A LoRA step (training mode, batch 2, the adapter's gradients) and a drag iteration (eval mode, batch
    1, the fp32 latent's gradient) under CUDA-like autocast to the UNet's dtype, with what the steps pass
    (`fastdrag.lora.lora_loss`, `fastdrag.drag`); returns their outputs and gradients and the counts of
    operations of each forward (after one forward before: what is made once is not counted), with the
    copies the profiler sees in each forward (autocast's casts, convolutions' layout conversions) as
    "copies"."""
    dtype = unet.dtype
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, unet.config.in_channels, *size, generator=generator)
    text = torch.randn(2, 7, unet.config.cross_attention_dim, generator=generator).to(dtype)
    params = lora_parameters(unet)
    with cuda_like_autocast(dtype), disable_input_dtype_casting(unet):
        unet.train()
        with torch.no_grad():
            unet(latents.to(dtype), torch.tensor([901, 17]), text)
        with OpCount() as lora_ops, profile() as lora_profile:
            out = unet(latents.to(dtype), torch.tensor([901, 17]), text).sample
        weight_grads = torch.autograd.grad(out.float().square().mean(), params)
        unet.eval()
        latent = latents[:1].clone().requires_grad_(True)
        with OpCount() as drag_ops, profile() as drag_profile:
            eps = unet(latent.to(dtype), torch.tensor([500]), text[:1]).sample
        (latent_grad,) = torch.autograd.grad(eps.float(), latent, torch.randn(eps.shape, generator=generator))
    for ops, prof in ((lora_ops, lora_profile), (drag_ops, drag_profile)):
        ops.ops["copies"] = sum(event.count for event in prof.key_averages() if event.key == "aten::copy_")
    return [out, eps, latent_grad, *weight_grads], lora_ops.ops, drag_ops.ops


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_shared_casts_train_and_drag_bit_for_bit_with_fewer_casts(tiny, dtype):
    """Each self-attention layer's normalised input had 6 readers (to_q, to_k, to_v and their adapters' A
    matrices) and each cross-attention layer's query input 2: one cast each now, 6 fewer per block; each
    norm's weight and bias are no longer cast: 2 fewer per norm; and each convolution reading GroupNorm's
    fp32 NCHW output (a resnet's two, a transformer's `proj_in`, the UNet's `conv_out`) gets it cast and
    laid out channels-last in one copy, not two."""
    unet = adapted_unet(tiny, dtype)
    layers = sum(type(m) in (torch.nn.Linear, torch.nn.Conv2d) for m in unet.modules())
    norms = sum(type(m) in NORMS for m in unet.modules())
    assert remove_shared_casts(unet) == layers and remove_fp32_affine(unet) == norms
    stock, stock_lora, stock_drag = autocast_steps(unet)
    assert install_shared_casts(unet) == layers and install_fp32_affine(unet) == norms
    shared, shared_lora, shared_drag = autocast_steps(unet)
    assert all(torch.isfinite(t).all() and t.abs().sum() > 0 for t in stock)
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(shared, stock, strict=True))
    blocks = len(transformer_blocks(unet))
    assert (blocks, norms) == (16, 109)  # SD 1.5's
    assert stock_lora["_to_copy"] - shared_lora["_to_copy"] == 6 * blocks + 2 * norms
    assert stock_drag["_to_copy"] - shared_drag["_to_copy"] == 6 * blocks + 2 * norms
    convolutions = 2 * 22 + 16 + 1
    assert stock_lora["copies"] - shared_lora["copies"] == 6 * blocks + 2 * norms + convolutions
    assert stock_drag["copies"] - shared_drag["copies"] == 6 * blocks + 2 * norms + convolutions
    assert {k: v for k, v in shared_lora.items() if k not in ("_to_copy", "copies")} == \
        {k: v for k, v in stock_lora.items() if k not in ("_to_copy", "copies")}  # nothing else changed


def test_the_op_count_counts_the_casts_of_a_merged_adapter(tiny):
    """bench/op_count.py's count (the drag with its adapter merged: to_q, to_k and to_v read the normalised
    input, 2 casts fewer per block; the norms' weights, 2 per norm) and the LoRA step's (and there the
    128 LoRA layers' weights and their gradients, cast in two multi-tensor copies by
    `fastdrag.lora_casts`); its count of all copies also sees the 61 convolutions' merged copies and the
    transformers' NCHW copies."""
    stock, lean = autocast_casts(lean=False), autocast_casts(lean=True)
    assert stock["drag"]["casts"] - lean["drag"]["casts"] == 2 * 16 + 2 * 109
    assert stock["lora"]["casts"] - lean["lora"]["casts"] == 6 * 16 + 2 * 109 + 4 * 128
    for stage in ("lora", "drag"):  # and the convolutions' and the transformers' layout copies
        assert stock[stage]["copies"] - lean[stage]["copies"] > stock[stage]["casts"] - lean[stage]["casts"] + 61


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

        latents = torch.randn(2, 4, 11, 9).bfloat16()
        with cuda_like_autocast(torch.bfloat16), disable_input_dtype_casting(adapted), \
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


def test_norm_weights_follow_changes_and_stay_put_outside_cuda_like_autocast(adapted):
    norm = copy.deepcopy(next(m for m in adapted.modules() if type(m) is torch.nn.GroupNorm))  # the fixture's stays
    x = torch.randn(2, norm.num_channels, 5, 3).bfloat16()
    with cuda_like_autocast(torch.bfloat16):
        before = norm(x)
        with torch.no_grad():
            norm.weight.mul_(1.5)  # in place: the kept fp32 copy is stale
        after = norm(x)
        expected = F.group_norm(x.float(), norm.num_groups, norm.weight.float(), norm.bias.float(), norm.eps)
        assert torch.equal(after, expected) and not torch.equal(after, before)
    with torch.no_grad():
        norm.weight.div_(1.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the CPU's own autocast: norms in the input's dtype
        out = norm(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, F.group_norm(x, norm.num_groups, norm.weight, norm.bias,
                                                                         norm.eps))


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
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.randn(3, 13)  # an inference tensor has no version counter to keep a copy by: autocast's casts
        assert torch.equal(first(y), F.linear(y.bfloat16(), first.weight.bfloat16(), first.bias.bfloat16()))
    assert remove_shared_casts(model) == 2 and shared_cast_count(model) == 0


def test_half_norms_replace_the_kept_weight_norms_and_give_them_back(adapted):
    """The experimental fp16 norms (`fastdrag.half_norms`) take these norms too while inside, and leave
    each with the forward it had."""
    from fastdrag.half_norms import half_norms

    norms = [m for m in adapted.modules() if type(m) in NORMS]
    before = [vars(m)["forward"] for m in norms]
    layer_norm = next(m for m in norms if type(m) is torch.nn.LayerNorm)
    x = torch.randn(2, 9, layer_norm.normalized_shape[0]).bfloat16()
    with cuda_like_autocast(torch.bfloat16), half_norms(adapted):
        assert all(vars(m)["forward"].__func__.__module__ == "fastdrag.half_norms" for m in norms)
        assert layer_norm(x).dtype == torch.bfloat16  # normalised in half precision
    assert [vars(m)["forward"] for m in norms] == before


def test_an_fp32_nchw_input_reaches_a_channels_last_convolution_in_one_copy():
    """Under autocast an fp32 NCHW input to a convolution with channels-last weights (what CUDA's GroupNorm
    hands a resnet's convolutions) is cast and laid out channels-last in one copy, where autocast's cast
    and the convolution's conversion made two (the profiler counts the copies); the output and the
    input's gradient are the stock ones. An input already channels-last, NCHW weights or no autocast:
    left as they were."""
    torch.manual_seed(2)
    channels_last = torch.nn.Conv2d(6, 5, 3, padding=1).bfloat16().to(memory_format=torch.channels_last)
    nchw = torch.nn.Conv2d(6, 5, 3, padding=1).bfloat16()
    x = torch.randn(2, 6, 7, 9)

    def run(conv, x, autocast=True):
        x = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), profile(record_shapes=True) as prof:
            out = conv(x if autocast else x.bfloat16())
        (grad,) = torch.autograd.grad((out.float() * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum(), x)
        # copies of the input alone (a CPU without oneDNN's bf16 convolution also copies the bias into the output)
        return out, grad, sum(event.name == "aten::copy_" and event.input_shapes[:1] == [list(x.shape)]
                              for event in prof.events())

    cases = [(channels_last, x), (channels_last, x.contiguous(memory_format=torch.channels_last)), (nchw, x)]
    stock = [run(conv, inputs) for conv, inputs in cases] + [run(channels_last, x, autocast=False)]
    assert install_shared_casts(channels_last) == install_shared_casts(nchw) == 1
    hooked = [run(conv, inputs) for conv, inputs in cases] + [run(channels_last, x, autocast=False)]
    for (out, grad, _), (want, want_grad, _) in zip(hooked, stock, strict=True):
        assert torch.isfinite(want).all() and want_grad.abs().sum() > 0
        assert out.dtype == want.dtype and torch.equal(out, want) and torch.equal(grad, want_grad)
    assert [copies for *_, copies in stock] == [2, 1, 1, 2]
    assert [copies for *_, copies in hooked] == [1, 1, 1, 2]
    assert hooked[0][0].is_contiguous(memory_format=torch.channels_last)
