"""`fastdrag.lean_blocks`: the UNet's and VAE's blocks without operations that change no number, bit for
bit the stock ones, and the operations they leave out."""
import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.activations import GEGLU
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from peft.tuners.lora.layer import Linear as LoraLinear

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from op_count import OpCount  # noqa: E402  (what bench/op_count.py counts: the operations that compute)

from fastdrag.config import LoraConfig  # noqa: E402
from fastdrag.fused_blocks import install_fused_blocks, remove_fused_blocks  # noqa: E402
from fastdrag.lean_blocks import LeanAttnProcessor, install_lean_blocks, lean_counts, remove_lean_blocks  # noqa: E402
from fastdrag.lora import ADAPTER, install_adapter, lora_parameters  # noqa: E402


def blocks_of(model):
    """How many resnets, transformers, attention layers, LoRA layers, GEGLUs, linear and convolution
    layers and affine norms `model` has: what the lean blocks take."""
    modules = list(model.modules())
    return {"resnet": sum(isinstance(m, ResnetBlock2D) for m in modules),
            "transformer": sum(isinstance(m, Transformer2DModel) for m in modules),
            "attention": sum(isinstance(m, Attention) for m in modules),
            "lora": sum(type(m) is LoraLinear for m in modules),
            "geglu": sum(type(m) is GEGLU for m in modules),
            "cast": sum(type(m) in (torch.nn.Linear, torch.nn.Conv2d) for m in modules),
            "norm": sum(type(m) in (torch.nn.GroupNorm, torch.nn.LayerNorm) and m.weight is not None for m in modules)}


def adapted_unet(tiny, channels_last=True):
    """The tiny UNet with a LoRA adapter, its weights channels-last (as on CUDA) so activations are too."""
    unet = copy.deepcopy(tiny.unet)
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    install_adapter(unet, LoraConfig(), seed=3)
    for param in lora_parameters(unet):  # a trained adapter: its up-projection is no longer zero
        with torch.no_grad():
            param.normal_(std=0.05)
        param.requires_grad_(True)
    return unet


def lora_step(unet, seed=0, size=(12, 10)):
    """A LoRA step's forward and backward (training mode, batch 2, the adapter's gradients) and a drag
    iteration's (eval mode, batch 1, the latent's gradient), on fresh random inputs."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, unet.config.in_channels, *size, generator=generator)
    text = torch.randn(2, 7, unet.config.cross_attention_dim, generator=generator)
    params = lora_parameters(unet)
    unet.train()
    out = unet(latents, torch.tensor([901, 17]), text).sample
    weight_grads = torch.autograd.grad(out.square().mean(), params)
    unet.eval()
    latent = latents[:1].clone().requires_grad_(True)
    eps = unet(latent, torch.tensor([500]), text[:1]).sample
    (latent_grad,) = torch.autograd.grad(eps, latent, torch.randn(eps.shape, generator=generator))
    return [out, eps, latent_grad, *weight_grads]


@pytest.mark.parametrize("channels_last", [True, False])
def test_the_lean_unet_trains_and_drags_bit_for_bit_as_the_stock_one(tiny, channels_last):
    unet = adapted_unet(tiny, channels_last)
    stock = lora_step(unet)
    assert install_lean_blocks(unet) == blocks_of(unet)
    assert install_lean_blocks(unet) == lean_counts(unet)  # twice: the same
    lean = lora_step(unet)
    assert all(torch.isfinite(t).all() and t.abs().sum() > 0 for t in stock)
    assert all(torch.equal(a, b) for a, b in zip(lean, stock, strict=True))


def test_the_lean_blocks_leave_out_the_divisions_and_the_shortcut_copies(tiny):
    """Counted with real channels-last tensors on the CPU, where the meta device sees no layouts: in
    training mode each resnet with a shortcut convolution copied its input to NCHW first; each
    transformer copied its tokens to NCHW before `proj_out` (which oneDNN here, and cuDNN in a
    separate copy, turned back to channels-last); each LoRA layer multiplied its branch by its scale of 1."""
    unet = adapted_unet(tiny)
    shortcuts = sum(isinstance(m, ResnetBlock2D) and m.conv_shortcut is not None for m in unet.modules())
    blocks = blocks_of(unet)
    assert shortcuts > 0

    def forward_ops(train):
        unet.train(train)
        latents = torch.randn(2, 4, 12, 10).to(memory_format=torch.channels_last)
        with torch.no_grad(), OpCount() as ops:
            unet(latents, torch.tensor([901, 17]), torch.randn(2, 7, unet.config.cross_attention_dim))
        return ops.ops

    stock = {train: forward_ops(train) for train in (True, False)}
    install_lean_blocks(unet)
    lean = {train: forward_ops(train) for train in (True, False)}
    for train in (True, False):
        assert stock[train]["div"] - lean[train]["div"] == blocks["resnet"] + blocks["attention"]
        assert stock[train]["mul"] - lean[train]["mul"] == blocks["lora"] > 0  # the scale of 1
    assert stock[True]["clone"] - stock[False]["clone"] == shortcuts  # the stock training-mode copies
    assert stock[False]["clone"] == blocks["transformer"] > 0  # the stock NCHW copies before proj_out
    assert lean[True]["clone"] == lean[False]["clone"] == 0


def test_the_lean_transformers_skip_both_nchw_copies_and_keep_their_outputs_channels_last(tiny):
    """With channels-last weights each transformer's output step hands `proj_out` its tokens as they lie:
    2 copies fewer per transformer in the forward, counted by the profiler, which also sees the copy
    oneDNN's convolution made back to channels-last inside its kernel; the outputs stay channels-last
    (as the stock ones do: their convolution converted back) and the results are the stock ones. With
    NCHW weights the convolution computes NCHW, so the step is diffusers' own."""
    from torch.profiler import profile

    def run(unet):
        layouts = []
        hooks = [m.register_forward_hook(lambda module, args, out: layouts.append(
            out[0].is_contiguous(memory_format=torch.channels_last) and not out[0].is_contiguous()))
            for m in unet.modules() if isinstance(m, Transformer2DModel)]
        generator = torch.Generator().manual_seed(3)
        x = torch.randn(2, 4, 12, 10, generator=generator).contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        with profile() as prof:
            out = unet(x, torch.tensor(600), encoder_hidden_states=torch.randn(2, 7, 32, generator=generator)).sample
        for hook in hooks:
            hook.remove()
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        clones = sum(event.count for event in prof.key_averages() if event.key == "aten::clone")
        return out.detach(), x.grad, layouts, clones

    transformers = blocks_of(tiny.unet)["transformer"]
    for channels_last in (True, False):
        stock = copy.deepcopy(tiny.unet).eval()  # (training mode would add the shortcut copies)
        if channels_last:
            stock = stock.to(memory_format=torch.channels_last)
        lean = copy.deepcopy(stock)
        assert install_lean_blocks(lean)["transformer"] == transformers > 0
        want, want_grad, want_layouts, stock_clones = run(stock)
        got, got_grad, layouts, clones = run(lean)
        assert want.abs().max() > 0.1 and want_grad.abs().max() > 0
        assert torch.equal(got, want) and torch.equal(got_grad, want_grad)
        assert layouts == want_layouts == [channels_last] * transformers
        assert stock_clones - clones == (2 * transformers if channels_last else 0), (stock_clones, clones)


def test_other_blocks_and_calls_keep_the_stock_arithmetic():
    """Blocks the lean forward does not take keep their own; a factor that is not 1 still divides; an
    attention call with a mask, a residual or a 4-D input goes to the stock processor."""
    torch.manual_seed(0)
    scale_shift = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=16, groups=2, time_embedding_norm="scale_shift")
    resampling = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=16, groups=2, up=True)
    halved = ResnetBlock2D(in_channels=8, out_channels=6, temb_channels=16, groups=2, output_scale_factor=2.0)
    decoder_like = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=None, groups=2, time_embedding_norm="group")
    model = torch.nn.ModuleList([scale_shift, resampling, halved, decoder_like])
    stock = copy.deepcopy(model)
    assert install_lean_blocks(model)["resnet"] == 2
    assert "forward" not in vars(scale_shift) and "forward" not in vars(resampling)
    x, temb = torch.randn(2, 8, 5, 7), torch.randn(2, 16)
    assert torch.equal(halved(x, temb), stock[2](x, temb))
    assert torch.equal(decoder_like(x, None), stock[3](x, None))
    assert torch.equal(decoder_like(x, temb), stock[3](x, temb))  # a "group" block ignores temb

    attn = Attention(query_dim=16, heads=2, dim_head=8, rescale_output_factor=2.0)
    with_residual = Attention(query_dim=16, heads=2, dim_head=8, residual_connection=True)
    for layer in (attn, with_residual):
        reference = copy.deepcopy(layer)
        install_lean_blocks(layer)
        tokens, context = torch.randn(2, 9, 16), torch.randn(2, 5, 16)
        assert torch.equal(layer(tokens), reference(tokens))
        assert torch.equal(layer(tokens, context), reference(tokens, context))
        mask = torch.randn(2, 1, 5) > 0
        assert torch.equal(layer(tokens, context, attention_mask=mask), reference(tokens, context, attention_mask=mask))
        image = torch.randn(2, 16, 3, 3)
        assert torch.equal(layer(image), reference(image))
    assert isinstance(attn.processor, LeanAttnProcessor)
    assert type(with_residual.processor) is AttnProcessor2_0  # not a plain layer: left as it was


def test_adapters_added_later_run_lean_and_other_scales_keep_their_multiplication(tiny):
    unet = copy.deepcopy(tiny.unet)
    install_lean_blocks(unet)
    install_adapter(unet, LoraConfig(lora_rank=4), seed=1)  # as an editor's first LoRA stage does
    layers = [m for m in unet.modules() if type(m) is LoraLinear]
    assert layers and lean_counts(unet)["lora"] == len(layers)
    assert lean_counts(unet)["cast"] == blocks_of(unet)["cast"]  # the adapters' linear layers share casts too
    for layer in layers:  # a trained adapter, and a scale of 2 where alpha is not the rank
        with torch.no_grad():
            layer.lora_B[ADAPTER].weight.normal_(std=0.05)
    x = torch.randn(2, 9, layers[0].in_features)
    stock = copy.deepcopy(layers[0])
    del stock.forward  # peft's own
    assert torch.equal(layers[0](x), stock(x))
    layers[0].scaling[ADAPTER] = stock.scaling[ADAPTER] = 2.0
    with OpCount() as ops:
        out = layers[0](x)
    assert ops.ops["mul"] == 1 and torch.equal(out, stock(x))
    layers[1].merge()  # merged (the drag's): peft's forward, the base layer alone
    y = torch.randn(2, 9, layers[1].in_features)
    with OpCount() as ops:
        assert torch.equal(layers[1](y), layers[1].base_layer(y))
    assert ops.ops["mm"] + ops.ops["addmm"] == 2  # one for each side: no LoRA branch


def test_the_lean_vae_decodes_and_encodes_bit_for_bit(tiny):
    vae = copy.deepcopy(tiny.vae)
    generator = torch.Generator().manual_seed(5)
    latent, image = torch.randn(1, 4, 6, 5, generator=generator), torch.rand(1, 3, 48, 40, generator=generator) * 2 - 1
    decoded, encoded = vae.decode(latent).sample, vae.encode(image).latent_dist.mean
    assert install_lean_blocks(vae)["resnet"] == blocks_of(vae)["resnet"]
    assert torch.equal(vae.decode(latent).sample, decoded) and torch.equal(vae.encode(image).latent_dist.mean, encoded)


def test_removing_the_lean_blocks_and_the_fused_ones_on_top(tiny):
    unet = copy.deepcopy(tiny.unet)
    install_lean_blocks(unet)
    lean = {name: vars(m).get("forward") for name, m in unet.named_modules()}
    install_fused_blocks(unet, geglu=False)
    assert lean_counts(unet)["resnet"] == 0  # the fused forward replaced the lean one
    remove_fused_blocks(unet)
    assert {name: vars(m).get("forward") for name, m in unet.named_modules()} == lean
    assert not any("_forward_before_fused" in vars(m) for m in unet.modules())
    assert remove_lean_blocks(unet) == sum(blocks_of(unet).values())
    assert not any("forward" in vars(m) or m._forward_pre_hooks for m in unet.modules())
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())


def test_an_editor_edits_bit_for_bit_with_and_without_lean_blocks(picture, tmp_path, fast):
    from fastdrag import DragEditor

    results = []
    for lean in (True, False):
        editor = DragEditor.from_pretrained("tiny", device="cpu", cache_dir=tmp_path / str(lean), progress=False,
                                            lean_blocks=lean)
        assert lean_counts(editor.components.unet)["resnet"] == (blocks_of(editor.components.unet)["resnet"]
                                                                 if lean else 0)
        results.append(editor.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, **fast))
    assert results[0].handles == results[1].handles
    assert np.array_equal(np.asarray(results[0].image), np.asarray(results[1].image))


def tiny_unet_modules():
    from fastdrag.models import build_tiny

    return list(build_tiny().unet.modules())


def test_the_op_count_sees_divisions_and_the_drags_conditioning_go():
    """bench/op_count.py, the meta-device count behind the numbers in the docs, on the tiny model: the
    lean blocks remove divisions, the LoRA scale's multiplications and the transformers' NCHW copies
    (one each: the meta device's convolution makes no copy of its own), and the drag's kept
    conditioning its time embedding's and cross-attention keys' and values' operations; in a backward
    each GEGLU computes its GELU again instead of concatenating its gradients."""
    from op_count import compare

    results = compare("tiny", 128)  # the mid block at 2x2: at 1x1 an NCHW copy is no copy
    conditioning = {"div", "clone", "mm", "addmm", "silu", "mul", "cat", "_to_copy", "arange", "exp", "sin", "cos"}
    modules = tiny_unet_modules()
    transformers = sum(type(m).__name__ == "Transformer2DModel" for m in modules)
    geglus = sum(type(m).__name__ == "GEGLU" for m in modules)
    assert geglus > 0
    for stage, stock in results["stock"].items():
        lean = results["lean"][stage]
        assert stock["ops"] > lean["ops"] > 0, stage
        removed = {name: entry["ops"] - lean["by_op"].get(name, {"ops": 0})["ops"] for name, entry in stock["by_op"].items()}
        if stage in ("lora", "drag"):  # these run a backward
            assert removed.pop("gelu") == -geglus and removed["cat"] >= geglus, (stage, removed)
        assert all(n >= 0 for n in removed.values()) and set(lean["by_op"]) <= set(stock["by_op"]), (stage, removed)
        gone = {name for name, n in removed.items() if n}
        if stage == "drag":
            assert {"div", "clone", "mm", "silu", "sin", "cos"} <= gone <= conditioning, removed
            assert removed["cat"] == geglus + 2, removed  # and the time embedding's two
        elif stage == "decode":  # the VAE has no transformer
            assert gone == {"div"}, removed
        else:  # the LoRA step's LoRA layers no longer multiply by their scale of 1
            assert gone == ({"div", "mul", "clone", "cat"} if stage == "lora" else {"div", "clone"}), (stage, removed)
        if stage != "decode":
            assert removed["clone"] == transformers, (stage, removed)
