"""`fastdrag.frozen_conv`: a frozen convolution keeps only its weight for the backward and gives the
stock output and input gradient, bit for bit on the CPU; anything else runs the stock forward."""
import copy

import numpy as np
import pytest
import torch

from fastdrag.frozen_conv import frozen_conv_count, install_frozen_conv, remove_frozen_conv


def kept(forward):
    """The output of `forward()` and the tensors autograd keeps for its backward."""
    tensors = []

    def pack(tensor):
        tensors.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = forward()
    return out, tensors


def conv_pair(cin, cout, kernel, stride, padding, dilation, groups, bias, channels_last, seed):
    """A frozen convolution and its input (odd sizes), both channels-last when asked."""
    generator = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(cin, cout, kernel, stride, padding, dilation, groups, bias=bias).requires_grad_(False)
    with torch.no_grad():
        for param in conv.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    x = torch.randn(2, cin, 13, 11, generator=generator)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    return conv, x


CASES = [  # cin, cout, kernel, stride, padding, dilation, groups, bias, channels-last
    (6, 10, 3, 1, 1, 1, 1, True, False),  # a resnet's 3x3
    (6, 10, 3, 1, 1, 1, 1, True, True),
    (6, 10, 3, 2, 1, 1, 2, False, True),  # a downsampler's stride, grouped, no bias
    (7, 5, 1, 1, 0, 1, 1, True, True),  # a 1x1 projection
    (8, 12, 3, 2, 0, 2, 4, True, False),  # dilated, windows that leave the map's last rows unread
    (3, 9, 5, 3, 2, 1, 1, True, True),
]


@pytest.mark.parametrize("case", CASES)
def test_a_frozen_convolution_gives_the_stock_output_and_input_gradient_keeping_only_its_weight(case):
    conv, x = conv_pair(*case, seed=sum(case))
    stock_x, frozen_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    stock, stock_kept = kept(lambda: conv(stock_x))
    grad_out = torch.randn(stock.shape, generator=torch.Generator().manual_seed(5)).to(
        memory_format=torch.channels_last if case[-1] else torch.contiguous_format)
    stock.backward(grad_out)
    assert install_frozen_conv(conv) == frozen_conv_count(conv) == 1
    frozen, frozen_kept = kept(lambda: conv(frozen_x))
    frozen.backward(grad_out)
    assert type(frozen.grad_fn).__name__ == "_FrozenConv2dBackward"
    assert any(t is stock_x for t in stock_kept)  # the stock convolution keeps its input
    assert len(frozen_kept) == 1 and frozen_kept[0] is conv.weight  # this one its weight alone
    assert torch.equal(frozen, stock)
    assert not torch.isnan(frozen_x.grad).any()
    assert torch.equal(frozen_x.grad, stock_x.grad)
    assert frozen_x.grad.stride() == stock_x.grad.stride()  # in the same layout


def test_under_autocast_it_computes_in_the_autocast_dtype_and_gives_the_input_its_own_dtype():
    conv, x = conv_pair(6, 10, 3, 1, 1, 1, 1, True, True, seed=3)
    stock_x, frozen_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stock = conv(stock_x)
    grad_out = torch.randn(stock.shape, generator=torch.Generator().manual_seed(6)).to(stock.dtype)
    stock.backward(grad_out)
    install_frozen_conv(conv)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        frozen, frozen_kept = kept(lambda: conv(frozen_x))
    frozen.backward(grad_out)
    assert frozen.dtype == torch.bfloat16 and frozen_x.grad.dtype == torch.float32
    assert [t.dtype for t in frozen_kept] == [torch.bfloat16]  # the weight as the convolution used it
    assert torch.equal(frozen, stock) and torch.equal(frozen_x.grad, stock_x.grad)


def test_a_trained_weight_no_gradient_or_torch_compile_runs_the_stock_forward(monkeypatch):
    conv, x = conv_pair(4, 6, 3, 1, 1, 1, 1, True, False, seed=4)
    install_frozen_conv(conv)
    x.requires_grad_(True)
    conv.bias.requires_grad_(True)  # a trained bias needs the stock backward
    out = conv(x)
    assert type(out.grad_fn).__name__ == "ConvolutionBackward0"
    out.sum().backward()
    assert conv.bias.grad is not None
    conv.bias.requires_grad_(False)
    assert type(conv(x).grad_fn).__name__ == "_FrozenConv2dBackward"
    with torch.no_grad():
        assert conv(x).grad_fn is None
    assert conv(x.detach()).grad_fn is None  # nothing to differentiate
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert type(conv(x).grad_fn).__name__ == "ConvolutionBackward0"  # the partitioner decides what to keep


def test_convolutions_it_cannot_stand_for_keep_their_own_forward():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding="same"),
                                torch.nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"),
                                torch.nn.ConvTranspose2d(3, 3, 2, stride=2), torch.nn.Conv1d(3, 3, 3),
                                torch.nn.Conv2d(3, 3, 1))
    assert install_frozen_conv(model) == 1
    assert "forward" in vars(model[4]) and not any("forward" in vars(m) for m in list(model)[:4])
    assert remove_frozen_conv(model) == 1 and frozen_conv_count(model) == 0
    assert not any("forward" in vars(m) for m in model.modules())


def lora_step_outputs(unet, latents, timesteps, text):
    """The loss and every LoRA gradient of one training forward and backward, and the bytes of the
    activations (not the weights) kept for the backward."""
    params = [p for p in unet.parameters() if p.requires_grad]
    weights = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    storages = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = unet(latents, timesteps, text).sample.square().mean()
    grads = torch.autograd.grad(loss, params)
    return loss, grads, sum(storages.values())


def test_a_unet_with_an_adapter_trains_on_the_same_gradients_keeping_less(tiny):
    from fastdrag.config import LoraConfig
    from fastdrag.lora import install_adapter, lora_parameters

    unet = copy.deepcopy(tiny.unet).to(memory_format=torch.channels_last)
    install_adapter(unet, LoraConfig(), seed=0)
    generator = torch.Generator().manual_seed(2)
    for param in lora_parameters(unet):  # B is zero at first: give every gradient something to say
        param.data = torch.randn(param.shape, generator=generator) * 0.1
        param.requires_grad_(True)
    inputs = (torch.randn(2, 4, 12, 10, generator=generator), torch.tensor([500, 300]),
              torch.randn(2, 5, unet.config.cross_attention_dim, generator=generator))
    stock_loss, stock_grads, stock_bytes = lora_step_outputs(unet, *inputs)
    convs = sum(type(m) is torch.nn.Conv2d for m in unet.modules())
    assert install_frozen_conv(unet) == convs > 10
    loss, grads, frozen_bytes = lora_step_outputs(unet, *inputs)
    assert torch.equal(loss, stock_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, stock_grads, strict=True)) and len(grads) == len(stock_grads) > 0
    assert frozen_bytes < 0.9 * stock_bytes, (frozen_bytes, stock_bytes)


def test_an_editor_edits_as_it_does_without_it_and_its_export_copy_is_stock(picture, tmp_path, fast):
    from fastdrag import DragEditor
    from fastdrag.export.merge import merged_unet

    frozen = DragEditor.from_pretrained("tiny", device="cpu", cache_dir=tmp_path / "a", progress=False,
                                        frozen_conv=True)
    stock = DragEditor.from_pretrained("tiny", device="cpu", cache_dir=tmp_path / "b", progress=False)
    unet = frozen.components.unet
    assert frozen_conv_count(unet) == sum(type(m) is torch.nn.Conv2d for m in unet.modules()) > 0
    assert frozen_conv_count(stock.components.unet) == 0  # the CPU's default: off (slower there)
    first = stock.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, **fast)
    second = frozen.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, **fast)
    assert np.array_equal(np.asarray(first.image), np.asarray(second.image)) and first.handles == second.handles
    exported = merged_unet(unet)
    assert frozen_conv_count(exported) == 0 and frozen_conv_count(unet) > 0


def test_the_kept_memory_count_sees_the_convolutions_keep_nothing():
    """bench/kept_memory.py, the meta-device count behind the numbers above, on the tiny model."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from kept_memory import count

    stock, frozen = count("tiny", 64, frozen_conv=False), count("tiny", 64, frozen_conv=True)
    for stage in ("lora step", "drag iteration"):
        assert stock[stage]["ConvolutionBackward0._saved_input"]["bytes"] > 0
        assert not any(name.startswith("ConvolutionBackward0") for name in frozen[stage])

        def total(kept):
            return sum(entry["bytes"] for entry in kept.values())

        assert total(frozen[stage]) < total(stock[stage])
    assert frozen["lora step"]["MmBackward0._saved_self"]["bytes"] > 0  # the adapter's inputs, for its gradients
    assert "MmBackward0._saved_self" not in frozen["drag iteration"]  # nothing trains in the drag
