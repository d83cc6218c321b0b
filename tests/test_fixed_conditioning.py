"""`fastdrag.fixed_conditioning`: a drag's time embedding, its projections and the text's cross-attention
keys and values kept across forwards, bit for bit what the forward computes, and the operations it saves."""
import copy
import sys
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from op_count import OpCount  # noqa: E402  (what bench/op_count.py counts: the operations that compute)

from fastdrag.config import LoraConfig  # noqa: E402
from fastdrag.fixed_conditioning import FixedConditioning, applies  # noqa: E402
from fastdrag.lean_blocks import install_lean_blocks  # noqa: E402
from fastdrag.lora import install_adapter, lora_parameters  # noqa: E402


@pytest.fixture()
def unet(tiny):
    """The tiny UNet with a trained-looking, frozen LoRA adapter and the lean blocks."""
    unet = copy.deepcopy(tiny.unet).to(memory_format=torch.channels_last)
    install_adapter(unet, LoraConfig(), seed=3)
    with torch.no_grad():
        for param in lora_parameters(unet):
            param.normal_(std=0.05)
    unet.requires_grad_(False)
    install_lean_blocks(unet)
    return unet


def inputs(unet, seed=0, size=(11, 9)):
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(1, unet.config.in_channels, *size, generator=generator)
    text = torch.randn(1, 7, unet.config.cross_attention_dim, generator=generator)
    return latent, torch.tensor(421), text


def forward_and_gradient(unet, latent, timestep, text):
    latent = latent.clone().requires_grad_(True)
    eps = unet(latent, timestep, encoder_hidden_states=text).sample
    (grad,) = torch.autograd.grad(eps, latent, torch.ones_like(eps) + eps.detach())
    return eps, grad


def test_the_kept_values_give_the_forward_and_gradient_bit_for_bit_with_fewer_operations(unet):
    latent, timestep, text = inputs(unet)
    with OpCount() as stock_ops:
        stock = forward_and_gradient(unet, latent, timestep, text)
    fixed = FixedConditioning(unet, latent, timestep, text)
    assert fixed.enabled and len(fixed.values) == 2 + len(fixed.resnets) + 2 * len(fixed.cross_attention)
    with fixed.active(), OpCount() as kept_ops:
        kept = forward_and_gradient(unet, latent, timestep, text)
        again = forward_and_gradient(unet, latent + 1, timestep, text)  # another latent: still right
    assert all(torch.isfinite(t).all() and t.abs().sum() > 0 for t in stock)
    assert all(torch.equal(a, b) for a, b in zip(kept, stock, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(again, forward_and_gradient(unet, latent + 1, timestep, text), strict=True))
    # per forward: the sinusoid's sin and cos, the MLP's and the resnets' SiLUs, a matmul for each of
    # the MLP's two layers and each resnet's projection, and three (base, LoRA down and up, the adapter
    # unmerged) for each cross-attention layer's key and value
    saved = {name: stock_ops.ops[name] - kept_ops.ops[name] / 2 for name in ("sin", "cos", "silu", "mm", "addmm")}
    resnets, cross = len(fixed.resnets), len(fixed.cross_attention)
    assert saved["sin"] == saved["cos"] == 1
    assert saved["silu"] == 1 + resnets
    assert saved["mm"] + saved["addmm"] == 2 + resnets + 2 * cross * 3
    # outside the context the UNet computes everything again, and has nothing of the context left
    assert all("fixed_time_projection" not in vars(m) and "fixed_key_value" not in vars(m)
               for m in (*fixed.resnets, *fixed.cross_attention))
    assert all("forward" not in vars(m) and "fixed_output" not in vars(m) for m in (unet.time_proj, unet.time_embedding))


def test_a_refresh_writes_new_text_and_weights_into_the_same_tensors(unet):
    latent, timestep, text = inputs(unet)
    kept_text = text.clone()
    fixed = FixedConditioning(unet, latent, timestep, kept_text)
    addresses = [value.data_ptr() for value in fixed.values]
    before = [value.clone() for value in fixed.values]
    new_text = torch.randn_like(text)
    kept_text.copy_(new_text)  # as a restarted drag loop refills its text
    with torch.no_grad():
        unet.time_embedding.linear_1.weight.mul_(1.5)  # and another image's weights
        for param in lora_parameters(unet):
            param.normal_(std=0.05)
    fixed.refresh()
    assert [value.data_ptr() for value in fixed.values] == addresses
    assert torch.equal(before[0], fixed.values[0])  # the sinusoid of the same timestep
    assert all(not torch.equal(a, b) for a, b in zip(before[1:], fixed.values[1:], strict=True))
    with fixed.active():
        kept = forward_and_gradient(unet, latent, timestep, kept_text)
    assert all(torch.equal(a, b) for a, b in zip(kept, forward_and_gradient(unet, latent, timestep, new_text), strict=True))


def test_other_text_and_stock_blocks_compute_their_own(unet, tiny):
    latent, timestep, text = inputs(unet)
    other = torch.randn_like(text)
    fixed = FixedConditioning(unet, latent, timestep, text)
    with fixed.active():
        kept = forward_and_gradient(unet, latent, timestep, other.clone())  # not the kept text: its own K/V
    assert all(torch.equal(a, b) for a, b in zip(kept, forward_and_gradient(unet, latent, timestep, other), strict=True))
    stock = copy.deepcopy(tiny.unet)  # diffusers' blocks: only the time embedding is taken
    fixed = FixedConditioning(stock, latent, timestep, text)
    with fixed.active(), OpCount() as ops:
        kept = forward_and_gradient(stock, latent, timestep, text)
    assert ops.ops["sin"] == 0
    assert all(torch.equal(a, b) for a, b in zip(kept, forward_and_gradient(stock, latent, timestep, text), strict=True))


def test_a_unet_with_more_than_a_plain_time_embedding_is_left_alone(tiny):
    unet = copy.deepcopy(tiny.unet)
    assert applies(unet)
    unet.time_embed_act = torch.nn.SiLU()
    latent, timestep, text = inputs(unet)
    fixed = FixedConditioning(unet, latent, timestep, text)
    assert not applies(unet) and not fixed.enabled and fixed.values == []
    with fixed.active():
        assert "forward" not in vars(unet.time_embedding)


def test_a_context_inside_another_is_refused(unet):
    latent, timestep, text = inputs(unet)
    fixed = FixedConditioning(unet, latent, timestep, text)
    with fixed.active():
        with pytest.raises(RuntimeError, match="already has its own"):
            with FixedConditioning(unet, latent, timestep, text).active():
                pass
    assert not any(isinstance(m, (ResnetBlock2D, Attention)) and "fixed_time_projection" in vars(m)
                   for m in unet.modules())
