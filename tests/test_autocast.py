"""`unet_autocast`: autocast without peft's LoRA input round trip, bit for bit the same arithmetic.

CUDA autocast is what the package uses; the CPU's bf16 autocast has the same cast rules for linear
layers, so the claims are checked here on a bf16 tiny UNet (in fp16 on a GPU, through `lora_loss`:
tests/test_gpu.py::test_fp16_lora_loss_skips_peft_input_round_trip).
"""
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch.profiler import profile

from fastdrag.autocast import unet_autocast
from fastdrag.config import LoraConfig
from fastdrag.lora import install_adapter, lora_layers, lora_parameters
from fastdrag.models import build_tiny


@pytest.fixture(scope="module")
def adapted_bf16_unet():
    unet = build_tiny().to("cpu", torch.bfloat16).unet
    install_adapter(unet, LoraConfig(), seed=3)
    generator = torch.Generator().manual_seed(4)
    for param in lora_parameters(unet):  # B is 0 after install: give the branch something to compute
        param.data = torch.randn(param.shape, generator=generator) * 0.1
        param.requires_grad_(True)
    yield unet
    unet.requires_grad_(False)


def forward_backward(unet, inputs, context):
    """The UNet's output and the LoRA weights' gradients of a fixed loss, computed inside `context`."""
    latents, timesteps, text = inputs
    params = lora_parameters(unet)
    for param in params:
        param.grad = None
    with context:
        output = unet(latents, timesteps, encoder_hidden_states=text).sample
    (output.float() - 1).pow(2).mean().backward()
    return output.detach(), [param.grad.clone() for param in params]


def fresh_inputs(seed):
    """16x16 latents: 2x2 tokens at the mid block, where one token would make q and k gradient-free."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(3, 4, 16, 16, generator=generator).bfloat16(),
            torch.randint(0, 1000, (3,), generator=generator),
            torch.randn(3, 77, 32, generator=generator).bfloat16())


def plain_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)


def test_no_lora_input_round_trip_changes_no_bit(adapted_bf16_unet):
    inputs = fresh_inputs(5)
    output, grads = forward_backward(adapted_bf16_unet, inputs, unet_autocast(adapted_bf16_unet, True))
    reference_output, reference_grads = forward_backward(adapted_bf16_unet, inputs, plain_autocast())
    assert torch.isfinite(output).all() and output.abs().max() > 0
    assert torch.equal(output, reference_output)
    assert reference_grads and all(g.abs().max() > 0 for g in reference_grads)
    assert all(torch.equal(g, r) for g, r in zip(grads, reference_grads, strict=True))


def test_no_lora_input_round_trip_saves_two_copies_per_lora_call_and_two_per_input_gradient(adapted_bf16_unet):
    inputs = fresh_inputs(6)
    calls = []  # per LoRA layer call: whether its input needs a gradient (text for cross-attention k/v does not)
    hooks = [layer.register_forward_pre_hook(lambda module, args: calls.append(args[0].requires_grad))
             for layer in lora_layers(adapted_bf16_unet)]

    def copies(context):
        with profile() as prof:
            forward_backward(adapted_bf16_unet, inputs, context)
        return sum(event.count for event in prof.key_averages() if event.key == "aten::_to_copy")

    try:
        saved = copies(plain_autocast()) - copies(unet_autocast(adapted_bf16_unet, True))
    finally:
        for hook in hooks:
            hook.remove()
    per_pass = calls[:len(calls) // 2]
    assert len(per_pass) == len(lora_layers(adapted_bf16_unet)) and sum(per_pass) > len(per_pass) // 2
    assert saved == 2 * len(per_pass) + 2 * sum(per_pass), saved


def test_casting_comes_back_and_inactive_changes_nothing(adapted_bf16_unet):
    tuner_layers = [m for m in adapted_bf16_unet.modules() if isinstance(m, BaseTunerLayer)]
    with unet_autocast(adapted_bf16_unet, True):
        assert torch.is_autocast_enabled("cpu")
        assert not any(m.cast_input_dtype_enabled for m in tuner_layers)
    assert all(m.cast_input_dtype_enabled for m in tuner_layers)
    with pytest.raises(RuntimeError, match="inside"):
        with unet_autocast(adapted_bf16_unet, True):
            raise RuntimeError("inside")
    assert all(m.cast_input_dtype_enabled for m in tuner_layers)
    with unet_autocast(adapted_bf16_unet, False):
        assert not torch.is_autocast_enabled("cpu")
        assert all(m.cast_input_dtype_enabled for m in tuner_layers)
