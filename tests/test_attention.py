import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from fastdrag.attention import ReferenceAttnProcessor, reference_control, self_attention_processor_names, transformer_blocks
from fastdrag.errors import ConfigError


def make_attention(seed=0, dim=40, heads=5):
    torch.manual_seed(seed)
    return Attention(query_dim=dim, heads=heads, dim_head=dim // heads).eval()


def plain(attn, hidden):
    return AttnProcessor2_0()(attn, hidden)


def attend(attn, queries_from, keys_from):
    """Attention of `queries_from`'s queries over `keys_from`'s keys and values, computed by hand."""
    heads = attn.heads
    q, k, v = attn.to_q(queries_from), attn.to_k(keys_from), attn.to_v(keys_from)
    split = lambda x: x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)
    weights = (split(q) @ split(k).transpose(-1, -2) * attn.scale).softmax(-1)
    out = (weights @ split(v)).transpose(1, 2).reshape(q.shape)
    return attn.to_out[0](out)


def test_identical_branches_give_ordinary_attention():
    attn = make_attention()
    source = torch.randn(1, 23, 40)
    pair = torch.cat([source, source])
    with torch.no_grad():
        torch.testing.assert_close(ReferenceAttnProcessor()(attn, pair), plain(attn, pair), rtol=1e-5, atol=1e-6)


def test_edited_branch_attends_to_source_keys_and_values():
    attn = make_attention(1)
    source, edited = torch.randn(1, 19, 40), torch.randn(1, 19, 40)
    with torch.no_grad():
        out = ReferenceAttnProcessor()(attn, torch.cat([source, edited]))
        torch.testing.assert_close(out[:1], attend(attn, source, source), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1:], attend(attn, edited, source), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out[1:], plain(attn, edited), atol=1e-3)


def test_cfg_layout_pairs_each_half_with_its_own_source():
    attn = make_attention(2)
    rows = [torch.randn(1, 11, 40) for _ in range(4)]  # uncond src, uncond edit, cond src, cond edit
    with torch.no_grad():
        out = ReferenceAttnProcessor()(attn, torch.cat(rows))
        for index, (query, source) in enumerate([(0, 0), (1, 0), (2, 2), (3, 2)]):
            torch.testing.assert_close(out[index:index + 1], attend(attn, rows[query], rows[source]), rtol=1e-5, atol=1e-5)


def test_odd_batch_is_refused():
    with pytest.raises(ValueError, match="pairs"):
        ReferenceAttnProcessor()(make_attention(), torch.randn(3, 5, 40))


def test_block_order_and_selection(tiny):
    blocks = transformer_blocks(tiny.unet)
    assert len(blocks) == 16
    assert blocks[0].startswith("down_blocks.0") and blocks[6].startswith("mid_block") and blocks[7].startswith("up_blocks.1")
    chosen = self_attention_processor_names(tiny.unet, 10)
    assert chosen[0] == "up_blocks.2.attentions.0.transformer_blocks.0.attn1.processor"
    assert len(chosen) == 6 and all(".attn1." in name for name in chosen)
    with pytest.raises(ConfigError, match="start_layer 16 is past"):
        self_attention_processor_names(tiny.unet, 16)


def test_install_touches_only_chosen_layers_and_restores(tiny):
    unet = tiny.unet
    before = dict(unet.attn_processors)
    with reference_control(unet, 10) as chosen:
        during = unet.attn_processors
        for name, processor in during.items():
            if name in chosen:
                assert isinstance(processor, ReferenceAttnProcessor)
            else:
                assert processor is before[name]
    assert all(unet.attn_processors[name] is proc for name, proc in before.items())


def test_unselected_and_cross_attention_outputs_are_bitwise_unchanged(tiny):
    unet = tiny.unet
    captured = {}
    names = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1", "up_blocks.3.attentions.2.transformer_blocks.0.attn2"]
    hooks = [unet.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: captured.__setitem__(n, o)) for n in names]
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    with torch.no_grad():
        unet(x, 500, text)
        baseline = dict(captured)
        with reference_control(unet, 10):
            unet(x, 500, text)
    for hook in hooks:
        hook.remove()
    assert torch.equal(captured[names[0]], baseline[names[0]])  # unselected self-attention
    # cross-attention in a selected block sees changed inputs, so compare the processor itself
    attn2 = unet.get_submodule(names[1])
    hidden = torch.randn(2, 64, attn2.inner_dim // attn2.heads * attn2.heads)
    with torch.no_grad():
        outside = attn2(hidden[:, :, :attn2.to_q.in_features], encoder_hidden_states=text)
        with reference_control(unet, 10):
            inside = attn2(hidden[:, :, :attn2.to_q.in_features], encoder_hidden_states=text)
    assert torch.equal(outside, inside)


def test_processors_restored_after_an_exception(tiny):
    unet = tiny.unet
    before = dict(unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with reference_control(unet, 10):
            raise RuntimeError("boom")
    assert all(unet.attn_processors[name] is proc for name, proc in before.items())


def test_backend_choice_here():
    from fastdrag.attention import choose_backend

    backend, why = choose_backend("auto", torch.device("cpu"), torch.float32)
    assert backend == "sdpa" and "xformers" in why
    assert choose_backend("sdpa", torch.device("cpu"), torch.float32)[0] == "sdpa"
    with pytest.raises(ConfigError, match="'xformers' is not usable here"):
        choose_backend("xformers", torch.device("cpu"), torch.float32)
    with pytest.raises(ConfigError, match="attention_backend must be one of"):
        choose_backend("flash", torch.device("cpu"), torch.float32)


def test_xformers_is_asked_only_for_head_sizes_it_has_kernels_for():
    from fastdrag.attention import _sdpa, _xformers, attention_function

    assert attention_function("xformers", 40) is _xformers and attention_function("xformers", 160) is _xformers
    assert attention_function("xformers", 4) is _sdpa and attention_function("xformers", 36) is _sdpa
    assert attention_function("sdpa", 40) is _sdpa


def test_lora_present_and_merged_give_the_same_reference_attention(tiny):
    from fastdrag.config import LoraConfig
    from fastdrag.lora import install_adapter, lora_layers, lora_parameters

    unet = tiny.unet
    install_adapter(unet, LoraConfig(lora_rank=4), seed=3)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for param in lora_parameters(unet):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    x, text = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        with reference_control(unet, 10):
            unmerged = unet(x, 300, text).sample
        unet.disable_adapters()
        with reference_control(unet, 10):
            base = unet(x, 300, text).sample
        unet.enable_adapters()
        for layer in lora_layers(unet):
            layer.merge(adapter_names=["fastdrag"])
        try:
            with reference_control(unet, 10):
                merged = unet(x, 300, text).sample
        finally:
            for layer in lora_layers(unet):
                layer.unmerge()
            unet.requires_grad_(False)  # peft's enable_adapters makes the adapter trainable again
    assert not torch.allclose(unmerged, base, atol=1e-3)  # the adapter matters ...
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)  # ... and merging changes nothing


def test_stage4_source_branch_is_plain_ddim_denoising(tiny):
    from fastdrag.config import DenoiseConfig
    from fastdrag.ddim import DdimSchedule, ddim_step
    from fastdrag.denoise import denoise_pair
    from fastdrag.denoiser import TorchDenoiser

    denoiser = TorchDenoiser(tiny.unet)
    schedule = DdimSchedule.from_scheduler(tiny.scheduler, 20, 14)
    generator = torch.Generator().manual_seed(5)
    source, edited = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 77, 32, generator=generator)
    pair = denoise_pair(denoiser, source, edited, text, schedule, DenoiseConfig(), progress=False)
    plain = source
    for t in schedule.denoise_timesteps:
        plain = ddim_step(schedule, plain, denoiser(plain, t, text), t)
    torch.testing.assert_close(pair[:1], plain, rtol=1e-4, atol=1e-5)
    # the edited branch is steered by the source's keys and values: not what denoising it alone gives
    alone = edited
    for t in schedule.denoise_timesteps:
        alone = ddim_step(schedule, alone, denoiser(alone, t, text), t)
    assert not torch.allclose(pair[1:], alone, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers has no CPU kernels: needs a CUDA GPU (none here)")
def test_xformers_matches_sdpa_in_fp16():
    from fastdrag.attention import xformers_support

    usable, why = xformers_support("cuda", torch.float16)
    if not usable:
        pytest.skip(why)
    attn = make_attention(6).cuda().half()
    hidden = torch.randn(4, 1024, 40, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        torch.testing.assert_close(ReferenceAttnProcessor("xformers")(attn, hidden), ReferenceAttnProcessor("sdpa")(attn, hidden),
                                   rtol=1e-2, atol=1e-2)


def test_sdpa_priority_orders_the_backends_for_its_duration_and_names_bad_choices():
    from torch.nn.attention import SDPBackend

    from fastdrag.attention import SDPA_PRIORITIES, sdpa_priority

    before = torch._C._get_sdp_priority_order()
    with sdpa_priority("cudnn"):
        assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.CUDNN_ATTENTION)
        assert torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()
    with sdpa_priority("flash"):
        assert torch._C._get_sdp_priority_order()[:2] == [int(SDPBackend.FLASH_ATTENTION),
                                                         int(SDPBackend.EFFICIENT_ATTENTION)]
        assert torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    with sdpa_priority("efficient"):
        assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.EFFICIENT_ATTENTION)
        assert not torch.backends.cuda.cudnn_sdp_enabled()  # only the backends it lists
    with sdpa_priority("default"):
        assert torch._C._get_sdp_priority_order() == before
    assert torch._C._get_sdp_priority_order() == before and torch.backends.cuda.cudnn_sdp_enabled()
    with pytest.raises(ConfigError, match="default, flash, cudnn, efficient"):
        with sdpa_priority("fa3"):
            pass
    assert list(SDPA_PRIORITIES) == ["default", "flash", "cudnn", "efficient"]


def test_an_editor_runs_its_unet_attention_under_its_sdpa_priority(picture, tmp_path, fast):
    """The UNet stages' attention runs under the editor's order; on the CPU (no cuDNN attention) the
    edit is the default one bit for bit. Changing the order drops the kept graphs."""
    import numpy as np
    from torch.nn.attention import SDPBackend

    from fastdrag import DragEditor

    default = DragEditor.from_pretrained("tiny", device="cpu", cache_dir=tmp_path / "a", progress=False)
    cudnn = DragEditor.from_pretrained("tiny", device="cpu", cache_dir=tmp_path / "b", progress=False,
                                       sdpa_priority="cudnn")
    orders = []
    attention = next(m for m in cudnn.components.unet.modules() if isinstance(m, Attention))
    attention.register_forward_pre_hook(lambda module, args: orders.append(torch._C._get_sdp_priority_order()[0]))
    first = default.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, **fast)
    second = cudnn.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, **fast)
    assert np.array_equal(np.asarray(first.image), np.asarray(second.image)) and first.handles == second.handles
    assert orders and set(orders) == {int(SDPBackend.CUDNN_ATTENTION)}  # every UNet call, LoRA to denoising
    assert torch._C._get_sdp_priority_order()[0] != int(SDPBackend.CUDNN_ATTENTION)  # and only then
    assert cudnn._drag_loop is not None
    cudnn.sdpa_priority = "efficient"
    assert cudnn.sdpa_priority == "efficient" and cudnn._drag_loop is None
    with pytest.raises(ConfigError, match="sdpa_priority"):
        cudnn.sdpa_priority = "fastest"
    with pytest.raises(ConfigError, match="sdpa_priority"):
        DragEditor.from_pretrained("tiny", device="cpu", progress=False, sdpa_priority="fastest")


def test_first_backend_runs_says_whether_the_order_falls_back_for_a_call():
    from fastdrag.attention import first_backend_runs

    # CPU tensors: neither cuDNN's nor the CUDA kernels run them, and asking PyTorch would start CUDA, which a
    # CUDA build of torch cannot do on a machine without a GPU driver ("driver version is insufficient")
    query = torch.randn(1, 64, 8, 40).transpose(1, 2)
    assert first_backend_runs("default", query, query, query)
    assert not first_backend_runs("flash", query, query, query)
    assert not first_backend_runs("cudnn", query, query, query)
    assert not first_backend_runs("efficient", query, query, query)
    with pytest.raises(ConfigError, match="sdpa_priority"):
        first_backend_runs("fa3", query, query, query)


def test_sdpa_choices_name_the_backend_each_order_runs_here():
    """`fastdrag info`'s line: on the CPU every order runs PyTorch's CPU flash kernel for SD's head
    size, and the math path where the flash kernel is off."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fastdrag.attention import SDPA_PRIORITIES, chosen_backend, sdpa_choices

    assert sdpa_choices(torch.device("cpu")) == {name: "FlashAttention" for name in SDPA_PRIORITIES}
    query = torch.randn(1, 64, 8, 40).transpose(1, 2)
    with sdpa_kernel(SDPBackend.MATH):
        assert chosen_backend(query, query, query) == "math"
