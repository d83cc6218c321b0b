"""fastdrag.channels_last: transformer outputs kept channels-last give the UNet's output and input
gradient of the unpatched model, with two copies fewer per transformer in the forward pass."""
import torch
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch.profiler import profile

from fastdrag.channels_last import keep_transformer_outputs_channels_last
from fastdrag.models import build_tiny


def run(unet, latent, text):
    """Output, input gradient, transformer outputs' layouts, and `aten::clone` calls of the forward."""
    layouts = []
    hooks = [m.register_forward_hook(lambda module, args, out: layouts.append(
        out[0].is_contiguous(memory_format=torch.channels_last) and not out[0].is_contiguous()))
        for m in unet.modules() if isinstance(m, Transformer2DModel)]
    x = latent.clone().requires_grad_(True)
    with profile() as prof:
        out = unet(x, torch.tensor(600), encoder_hidden_states=text).sample
    for hook in hooks:
        hook.remove()
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    clones = sum(event.count for event in prof.key_averages() if event.key == "aten::clone")
    return out.detach(), x.grad, layouts, clones


def test_transformer_outputs_stay_channels_last_and_compute_the_same():
    generator = torch.Generator().manual_seed(3)
    latent = torch.randn(2, 4, 12, 10, generator=generator).contiguous(memory_format=torch.channels_last)
    text = torch.randn(2, 77, 32, generator=generator)
    plain = build_tiny().unet.to(memory_format=torch.channels_last)
    patched = build_tiny().unet.to(memory_format=torch.channels_last)
    count = keep_transformer_outputs_channels_last(patched)
    transformers = sum(isinstance(m, Transformer2DModel) for m in patched.modules())
    assert count == transformers > 0

    want, want_grad, _, plain_clones = run(plain, latent, text)
    got, got_grad, layouts, clones = run(patched, latent, text)
    assert want.abs().max() > 0.1 and want_grad.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-5)
    assert layouts == [True] * transformers  # (so are the unpatched ones: their 1x1 convolution converts back)
    # two copies fewer per transformer: diffusers' NCHW copy and the 1x1 convolution's copy back to channels-last
    assert plain_clones - clones == 2 * transformers, (plain_clones, clones)
    assert not any(isinstance(m, Transformer2DModel) and "_get_output_for_continuous_inputs" in vars(m)
                   for m in plain.modules())  # the other model is untouched
