"""`fastdrag.fused_blocks`: which GroupNorms, LayerNorms and GEGLUs it routes through the fused kernels, and that
the model computes what the stock one does (exactly on the reference path, within rounding on the
Triton one)."""
import copy
import importlib.util

import numpy as np
import pytest
import torch
from diffusers.models.activations import GEGLU
from diffusers.models.resnet import ResnetBlock2D

from fastdrag.fused_blocks import fused_counts, install_fused_blocks, remove_fused_blocks
from fastdrag.half_norms import half_norms


def group_norms(module):
    return sum(isinstance(m, torch.nn.GroupNorm) for m in module.modules())


def every_one(module):
    return {"group_norm": group_norms(module), "layer_norm": sum(isinstance(m, torch.nn.LayerNorm) for m in module.modules()),
            "geglu": sum(isinstance(m, GEGLU) for m in module.modules())}


NONE = {"group_norm": 0, "layer_norm": 0, "geglu": 0}


def unet_inputs(unet, batch=2, size=(12, 10), seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, unet.config.in_channels, *size, generator=generator)
    text = torch.randn(batch, 5, unet.config.cross_attention_dim, generator=generator)
    return latents, torch.tensor([500, 300][:batch]), text


def test_every_norm_and_geglu_runs_fused_and_the_unet_computes_what_the_stock_one_does(tiny):
    unet = copy.deepcopy(tiny.unet)
    latents, timesteps, text = unet_inputs(unet)
    stock = unet(latents, timesteps, text).sample
    assert install_fused_blocks(unet, geglu=False, layer_norm=False) == {**NONE, "group_norm": group_norms(unet)}
    everything = every_one(unet)
    assert min(everything.values()) > 0
    assert install_fused_blocks(unet) == fused_counts(unet) == everything
    assert install_fused_blocks(unet) == everything  # twice: the same
    fused = unet(latents, timesteps, text).sample
    assert torch.equal(fused, stock)  # the CPU dispatches to the stock operators
    assert remove_fused_blocks(unet) > 0 and fused_counts(unet) == NONE
    assert not any("forward" in vars(m) for m in unet.modules())
    assert torch.equal(unet(latents, timesteps, text).sample, stock)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_the_fused_unet_matches_the_stock_one_through_the_triton_kernels(tiny, monkeypatch):
    """Output, input gradient and every weight's gradient (the norms' own included) of a
    channels-last UNet, through the kernels under the interpreter, against the stock model."""
    unet = copy.deepcopy(tiny.unet).to(memory_format=torch.channels_last)
    latents, timesteps, text = unet_inputs(unet, batch=1, size=(8, 9), seed=1)
    latents.requires_grad_(True)
    params = [p for p in unet.parameters() if p.requires_grad]

    def run():
        out = unet(latents, timesteps, text).sample
        grads = torch.autograd.grad(out, [latents, *params], torch.ones_like(out) + out.detach())
        return out, grads

    stock, stock_grads = run()
    install_fused_blocks(unet)
    monkeypatch.setenv("FASTDRAG_FORCE_TRITON", "1")
    fused, fused_grads = run()
    assert fused.is_contiguous(memory_format=torch.channels_last) == stock.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(fused).all() and ((fused - stock).norm() / stock.norm()).item() <= 1e-5
    assert all(g is not None and g.abs().sum() > 0 for g in stock_grads)  # every gradient compared is there
    worst = max(((a - b).norm() / b.norm()).item() for a, b in zip(fused_grads, stock_grads, strict=True))
    assert worst <= 1e-4, worst


def test_other_kinds_of_blocks_keep_their_own_forward():
    plain = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=16, groups=2)
    scale_shift = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=16, groups=2, time_embedding_norm="scale_shift")
    resampling = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=16, groups=2, up=True)
    model = torch.nn.ModuleList([plain, scale_shift, resampling])
    assert install_fused_blocks(model)["group_norm"] == 2
    assert "forward" in vars(plain) and "forward" not in vars(scale_shift) and "forward" not in vars(resampling)
    x, temb = torch.randn(2, 8, 5, 6), torch.randn(2, 16)
    fresh = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=16, groups=2)
    fresh.load_state_dict(plain.state_dict())
    assert torch.equal(plain(x, temb), fresh(x, temb))
    vae_like = ResnetBlock2D(in_channels=8, out_channels=6, temb_channels=None, groups=2)  # no time embedding
    stock_vae_like = copy.deepcopy(vae_like)
    assert install_fused_blocks(vae_like)["group_norm"] == 2
    assert torch.equal(vae_like(x, None), stock_vae_like(x, None))  # with its shortcut convolution


def test_half_norms_leave_fused_group_norms_alone(tiny):
    unet = copy.deepcopy(tiny.unet).half()
    install_fused_blocks(unet)
    before = {name: vars(m).get("forward") for name, m in unet.named_modules()}
    with half_norms(unet):
        changed = [name for name, m in unet.named_modules() if vars(m).get("forward") is not before[name]]
        assert changed and all(isinstance(unet.get_submodule(name), (torch.nn.LayerNorm, torch.nn.GroupNorm))
                               for name in changed)
        # the GroupNorms half_norms took are those whose block does not call them (a fused ResnetBlock2D's)
        assert all(not isinstance(unet.get_submodule(name), torch.nn.GroupNorm) or name.endswith(("norm1", "norm2"))
                   for name in changed)
    assert fused_counts(unet) == every_one(unet)
    assert all(vars(m).get("forward") is before[name] for name, m in unet.named_modules())


def test_an_editor_with_fused_unet_kernels_edits_as_the_stock_one(picture, tmp_path, fast):
    from fastdrag import DragEditor

    stock = DragEditor.from_pretrained("tiny", device="cpu", cache_dir=tmp_path / "a", progress=False)
    fused = DragEditor.from_pretrained("tiny", device="cpu", cache_dir=tmp_path / "b", progress=False,
                                       fused_unet_kernels=True)
    unet = fused.components.unet
    assert fused_counts(unet) == every_one(unet) and fused_counts(stock.components.unet) == NONE
    first = stock.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, **fast)
    second = fused.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, **fast)
    assert np.array_equal(np.asarray(first.image), np.asarray(second.image)) and first.handles == second.handles


def kept_bytes(forward):
    """Output of `forward()` and the bytes of the distinct storages autograd keeps for its backward."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = forward()
    return sum(storages.values()), out


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_a_fused_geglu_keeps_only_its_projection(monkeypatch):
    """The stock GEGLU keeps its GELU's output for the product's backward; the fused one recomputes it."""
    gate = GEGLU(12, 10)
    x = torch.randn(2, 7, 12, generator=torch.Generator().manual_seed(9), requires_grad=True)
    stock_bytes, stock = kept_bytes(lambda: gate(x))
    install_fused_blocks(gate)
    monkeypatch.setenv("FASTDRAG_FORCE_TRITON", "1")
    fused_bytes, fused = kept_bytes(lambda: gate(x))
    assert ((fused - stock).norm() / stock.norm()).item() <= 1e-5
    assert stock_bytes - fused_bytes == stock.numel() * stock.element_size(), (stock_bytes, fused_bytes)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_a_fused_block_keeps_fewer_activations_for_its_backward(monkeypatch):
    """The stock block keeps each GroupNorm's output for the SiLU's backward; the fused kernel
    recomputes it from the input, so exactly those two activations are no longer kept (under CUDA
    autocast the stock block also keeps fp32 copies; the GPU tests measure that case)."""
    block = ResnetBlock2D(in_channels=12, out_channels=12, temb_channels=16, groups=4)
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(2, 12, 9, 7, generator=generator, requires_grad=True)
    temb = torch.randn(2, 16, generator=generator)

    stock_bytes, stock = kept_bytes(lambda: block(x, temb))
    install_fused_blocks(block)
    monkeypatch.setenv("FASTDRAG_FORCE_TRITON", "1")
    fused_bytes, fused = kept_bytes(lambda: block(x, temb))
    assert ((fused - stock).norm() / stock.norm()).item() <= 1e-5
    activation = x.numel() * x.element_size()  # each GroupNorm output: 2 x 12 x 9 x 7 fp32, 6048 bytes
    # give or take the small tensors each side keeps besides (group statistics, the bias the kernel reads)
    assert abs(stock_bytes - fused_bytes - 2 * activation) <= 256, (stock_bytes, fused_bytes)


def test_the_export_copy_gets_the_stock_blocks(tiny):
    from fastdrag.export.merge import merged_unet

    unet = copy.deepcopy(tiny.unet)
    install_fused_blocks(unet)
    exported = merged_unet(unet)
    assert fused_counts(exported) == NONE
    assert not any("forward" in vars(m) for m in exported.modules())
    assert fused_counts(unet) == every_one(unet)  # the editor's UNet keeps its kernels
