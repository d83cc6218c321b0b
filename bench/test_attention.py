"""Reference-controlled attention: the K/V-swap processor against plain attention, and a stage-4 step.

- processor overhead: one self-attention layer at the tiny model's shape (batch 2), plain SDPA
  attention vs the K/V-swap processor on SDPA (and on xformers where it works);
- stage-4 step: one batch-2 UNet forward with reference control at the SD 1.5 shape (64x64
  latent), SDPA vs xformers, contiguous vs channels-last weights; CUDA only (the SD 1.5 UNet is too slow to time on this CPU).
"""
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from fastdrag.attention import ReferenceAttnProcessor, reference_control, xformers_support


def _backend_or_skip(backend, device, dtype):
    if backend == "xformers":
        usable, why = xformers_support(device.type, dtype)
        if not usable:
            pytest.skip(why)


@pytest.mark.parametrize("processor", ["plain-sdpa", "reference-sdpa", "reference-xformers"])
def test_processor_overhead(benchmark, device, dtype, synchronize, processor):
    _backend_or_skip(processor.split("-")[1], device, dtype)
    attn = Attention(query_dim=64, heads=8, dim_head=8).to(device, dtype).eval()
    hidden = torch.randn(2, 16 * 16, 64, device=device, dtype=dtype)
    run = AttnProcessor2_0() if processor == "plain-sdpa" else ReferenceAttnProcessor(processor.split("-")[1])
    benchmark.group = "self-attention layer, batch 2, 256 tokens, 64 channels"

    def step():
        with torch.no_grad():
            run(attn, hidden)
        synchronize()

    benchmark(step)


@pytest.fixture(scope="module")
def sd15_unet(device, dtype):
    if device.type != "cuda":
        pytest.skip("the SD 1.5 stage-4 step is benchmarked on a CUDA GPU only (none here)")
    from fastdrag.models import build_sd15_random

    return build_sd15_random(device=device).unet.to(dtype).eval()


@pytest.mark.parametrize("layout", ["contiguous", "channels-last"])
@pytest.mark.parametrize("backend", ["sdpa", "xformers"])
def test_stage4_step_sd15(benchmark, device, dtype, synchronize, sd15_unet, backend, layout):
    _backend_or_skip(backend, device, dtype)
    latents = torch.randn(2, 4, 64, 64, device=device, dtype=dtype)
    text = torch.randn(2, 77, 768, device=device, dtype=dtype)
    benchmark.group = "stage-4 step, SD 1.5, batch 2, 64x64 latent"
    memory_format = torch.channels_last if layout == "channels-last" else torch.contiguous_format
    sd15_unet.to(memory_format=memory_format)
    latents = latents.to(memory_format=memory_format)

    def step():
        with torch.no_grad():
            sd15_unet(latents, 500, text)
        synchronize()

    try:
        with reference_control(sd15_unet, 10, backend):
            benchmark(step)
    finally:
        sd15_unet.to(memory_format=torch.contiguous_format)
