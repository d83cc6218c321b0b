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


# The UNet's SDPA calls in a LoRA step (batch 4) at SD 1.5 / 512 px, per level: (batch, query tokens,
# key tokens, heads, head size); the drag iteration makes the same calls at batch 1
SD15_ATTENTION_CALLS = {
    "self 64x64": (4, 4096, 4096, 8, 40),
    "self 32x32": (4, 1024, 1024, 8, 80),
    "self 16x16": (4, 256, 256, 8, 160),
    "cross 64x64": (4, 4096, 77, 8, 40),
}


@pytest.mark.parametrize("call", list(SD15_ATTENTION_CALLS))
@pytest.mark.parametrize("priority", ["default", "flash", "cudnn", "efficient"])
def test_sdpa_priority_forward_backward_sd15(benchmark, device, dtype, synchronize, call, priority):
    """One SDPA forward and backward at an SD 1.5 attention call, in diffusers' layout (heads viewed
    out of the projection), under each `sdpa_priority`: which backend the UNet stages should try first.
    `extra_info["backend"]` names the kernel that ran (PyTorch's default differs by GPU)."""
    if device.type != "cuda":
        pytest.skip("SDPA's backends are compared on a CUDA GPU only (none here)")
    import torch.nn.functional as F

    from fastdrag.attention import chosen_backend, first_backend_runs, sdpa_priority

    batch, tokens, key_tokens, heads, head_size = SD15_ATTENTION_CALLS[call]
    generator = torch.Generator(device=device).manual_seed(0)

    def projected(length):
        return torch.randn(batch, length, heads, head_size, device=device, dtype=dtype,
                           generator=generator).transpose(1, 2).requires_grad_(True)

    query, key, value = projected(tokens), projected(key_tokens), projected(key_tokens)
    grad = torch.randn(batch, heads, tokens, head_size, device=device, dtype=dtype, generator=generator)
    if not first_backend_runs(priority, query, key, value):
        pytest.skip(f"{priority} attention cannot run {call} here: SDPA would fall back")
    benchmark.group = f"SDPA forward + backward, SD 1.5 {call}, batch {batch}"
    # the forward's two matmuls are 4·B·H·Lq·Lk·D FLOPs; a flash backward's five (recomputing the scores) 2.5 times that
    flops = 3.5 * 4 * batch * heads * tokens * key_tokens * head_size

    def step():
        out = F.scaled_dot_product_attention(query, key, value)
        torch.autograd.grad(out, (query, key, value), grad)
        synchronize()

    with sdpa_priority(priority):
        benchmark(step)
        benchmark.extra_info["backend"] = chosen_backend(query, key, value)
    benchmark.extra_info["TFLOP"] = flops / 1e12
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["TFLOP/s"] = flops / 1e12 / benchmark.stats.stats.mean
