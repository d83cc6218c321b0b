"""`fastdrag.half_norms` on the CPU: the patching, its undoing, the switch and the cache key. What it
changes on a GPU (CUDA autocast runs normalisation in fp32; CPU autocast does not) is in test_gpu.py."""
import pytest
import torch
from PIL import Image

from fastdrag.config import LoraConfig
from fastdrag.half_norms import ENV, enabled, half_norms
from fastdrag.lora import lora_key


def _norms(model):
    return [m for m in model.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]


def test_half_norms_patches_the_half_precision_norms_only_while_inside():
    from fastdrag.models import build_tiny

    unet = build_tiny().unet.to(torch.bfloat16)
    unet.conv_norm_out.float()  # a norm with fp32 weights is left to autocast
    half = [m for m in _norms(unet) if m is not unet.conv_norm_out]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=generator).to(torch.bfloat16)
    text = torch.randn(1, 77, 32, generator=generator).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = unet(x, torch.tensor(500), encoder_hidden_states=text).sample
    with pytest.raises(RuntimeError, match="inside"):
        with torch.autocast("cpu", dtype=torch.bfloat16), half_norms(unet):
            assert len(half) > 20 and all("forward" in m.__dict__ for m in half)
            assert "forward" not in unet.conv_norm_out.__dict__
            # a norm given fp32 (as autocast's fp32 ops hand on) normalises in its own half dtype
            group_norm = unet.down_blocks[0].resnets[0].norm1
            wide = torch.randn(1, group_norm.num_channels, 5, 7, generator=generator)
            assert group_norm(wide).dtype == torch.bfloat16
            torch.testing.assert_close(group_norm(wide).float(), torch.nn.functional.group_norm(
                wide, group_norm.num_groups, group_norm.weight.float(), group_norm.bias.float(), group_norm.eps),
                rtol=2e-2, atol=2e-2)
            patched = unet(x, torch.tensor(500), encoder_hidden_states=text).sample
            raise RuntimeError("inside")
    assert not any("forward" in m.__dict__ for m in _norms(unet))  # undone, an error inside included
    torch.testing.assert_close(patched, plain)  # CPU autocast keeps norms in bf16 anyway: the same kernels
    with half_norms(unet, active=False):
        assert not any("forward" in m.__dict__ for m in _norms(unet))


def test_switch_and_cache_key(monkeypatch):
    image = Image.new("RGB", (64, 64), (10, 20, 30))

    def key(dtype):
        return lora_key("tiny", image, "a ball", LoraConfig(), 42, dtype)

    monkeypatch.delenv(ENV, raising=False)
    plain_half, plain_full = key(torch.float16), key(torch.float32)
    assert not enabled()
    monkeypatch.setenv(ENV, "1")
    assert enabled()
    assert key(torch.float16) != plain_half  # the adapter trains on other roundings
    assert key(torch.float32) == plain_full  # no autocast in fp32: nothing changes
    monkeypatch.setenv(ENV, "yes please")
    with pytest.raises(ValueError, match=ENV):
        enabled()
