"""Checks only a CUDA GPU can make: the compiled kernels in the real loop, no host sync, half precision."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


@pytest.fixture(scope="module")
def cuda_tiny():
    from fastdrag.models import build_tiny

    return build_tiny().to("cuda", torch.float16)


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_drag_loop_never_syncs_with_the_host(cuda_tiny, picture, monkeypatch, kernels):
    from fastdrag.config import DragConfig
    from fastdrag.ddim import DdimSchedule
    from fastdrag.drag import drag
    from fastdrag.inputs import prepare_inputs

    inputs = prepare_inputs(picture.image, picture.points, picture.mask)
    schedule = DdimSchedule.from_scheduler(cuda_tiny.scheduler, 50, 35)
    z_t = torch.randn(1, 4, 8, 8, device="cuda")
    text = torch.randn(1, 77, 32, device="cuda", dtype=torch.float16)
    handles, targets, mask = inputs.handles.cuda(), inputs.targets.cuda(), inputs.mask.cuda()
    monkeypatch.setenv("FASTDRAG_SYNC_DEBUG", "error")  # any sync inside the loop raises
    monkeypatch.setenv("FASTDRAG_KERNELS", kernels)
    result = drag(cuda_tiny.unet, z_t, schedule.drag_timestep, text, handles, targets, mask, schedule,
                  DragConfig(drag_steps=12), inputs.sup_res, progress=False)
    assert result.latent.dtype == torch.float32 and torch.isfinite(result.latent).all()
    assert result.handles.is_cuda


def test_edit_in_half_precision(picture, tmp_path):
    from fastdrag import DragEditor

    editor = DragEditor.from_pretrained("tiny", device="cuda", dtype="fp16", cache_dir=tmp_path, progress=False)
    result = editor.edit(picture.image, picture.prompt, picture.points, mask=picture.mask,
                         lora_steps=4, num_inference_steps=10, drag_steps=6)
    assert result.image.size == picture.image.size
    assert all(p.dtype == torch.float32 for n, p in editor.components.unet.named_parameters() if "lora_" in n)
    # channels-last weights are the CUDA default (faster on the H100, bench/RESULTS.md)
    assert editor.components.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not editor.components.unet.conv_in.weight.is_contiguous()


def _drag_setting(components, picture, dtype):
    from fastdrag.ddim import DdimSchedule
    from fastdrag.inputs import prepare_inputs

    inputs = prepare_inputs(picture.image, picture.points, picture.mask)
    schedule = DdimSchedule.from_scheduler(components.scheduler, 50, 35)
    generator = torch.Generator(device="cuda").manual_seed(0)
    z_t = torch.randn(1, 4, 8, 8, device="cuda", generator=generator)
    text = torch.randn(1, 77, 32, device="cuda", generator=generator).to(dtype)
    return inputs, schedule, z_t, text


@pytest.mark.parametrize("masked", [True, False], ids=["mask", "no-mask"])  # no mask: the forward stops early
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_graph_drag_loop_matches_the_eager_loop(picture, dtype, masked, monkeypatch, half_norms="0"):
    from fastdrag.config import DragConfig
    from fastdrag.drag import drag
    from fastdrag.models import build_tiny

    monkeypatch.setenv("FASTDRAG_HALF_NORMS", half_norms)
    components = build_tiny().to("cuda", dtype)
    inputs, schedule, z_t, text = _drag_setting(components, picture, dtype)
    far = inputs.targets.clone()
    far[:, 1] = inputs.sup_res[1] - 1  # far enough that no handle arrives within the steps
    runs = {}
    monkeypatch.setenv("FASTDRAG_SYNC_DEBUG", "error")  # the replays must not sync either
    for graph in (False, True):
        runs[graph] = drag(components.unet, z_t, schedule.drag_timestep, text, inputs.handles.cuda(), far.cuda(),
                           inputs.mask.cuda() if masked else None, schedule, DragConfig(drag_steps=10), inputs.sup_res,
                           progress=False, cuda_graph=graph)
    eager, graphed = runs[False], runs[True]
    assert graphed.steps == eager.steps == 10
    assert torch.isfinite(graphed.latent).all() and not torch.equal(graphed.latent, z_t)
    # Runs differ in the last bits (atomic adds in backward passes), and Adam turns the sign of a
    # near-zero gradient into a full +-lr step, so compare the trajectory, not every element: the
    # H100 run of 2026-11-25 failed an element-wise 1e-4 check in fp32 (the fp16 run passed 1e-2).
    change_eager, change_graphed = eager.latent - z_t, graphed.latent - z_t
    assert (change_graphed - change_eager).norm() <= 0.05 * change_eager.norm()
    torch.testing.assert_close(graphed.losses, eager.losses, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(graphed.handles, eager.handles, rtol=0, atol=1.0)


def test_graphed_drag_loop_with_half_norms_matches_the_eager_loop(picture, monkeypatch):
    """`FASTDRAG_HALF_NORMS=1`: the patched norms are what the drag graph captures (fp16, mask)."""
    test_cuda_graph_drag_loop_matches_the_eager_loop(picture, torch.float16, True, monkeypatch, half_norms="1")


def test_half_norms_keep_autocast_normalisation_in_half_precision():
    """Under CUDA autocast the norms run in fp32; `half_norms` runs them in fp16, and the UNet's
    output and input gradient stay within fp16 rounding of autocast's."""
    from fastdrag.half_norms import half_norms
    from fastdrag.models import build_tiny

    unet = build_tiny().to("cuda", torch.float16).unet
    generator = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(2, 4, 8, 8, device="cuda", generator=generator, dtype=torch.float16).requires_grad_(True)
    text = torch.randn(2, 77, 32, device="cuda", generator=generator, dtype=torch.float16)

    def run(patch):
        dtypes = set()
        hooks = [m.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype)) for m in unet.modules()
                 if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
        with torch.autocast("cuda", dtype=torch.float16, cache_enabled=False), half_norms(unet, patch):
            out = unet(x, torch.tensor(500, device="cuda"), encoder_hidden_states=text).sample.float()
        for hook in hooks:
            hook.remove()
        return out, torch.autograd.grad(out.square().mean(), x)[0].float(), dtypes

    out, grad, dtypes = run(False)
    half_out, half_grad, half_dtypes = run(True)
    assert dtypes == {torch.float32} and half_dtypes == {torch.float16}
    assert torch.isfinite(half_out).all() and torch.isfinite(half_grad).all()
    assert ((half_out - out).norm() / out.norm()).item() < 1e-2
    assert ((half_grad - grad).norm() / grad.norm()).item() < 2e-2


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "inference"])
def test_fused_unet_kernels_are_as_exact_as_the_stock_operators(autocast, no_tf32):
    """A channels-last fp16 tiny UNet with its GroupNorms, LayerNorms and GEGLUs fused, against an fp32 copy of
    it: under autocast (the LoRA and drag steps) as close as the stock fp32 norms, without it
    (inversion, denoising) as close as the stock fp16 operators, which round twice."""
    import copy

    from fastdrag.autocast import unet_autocast
    from fastdrag.fused_blocks import install_fused_blocks
    from fastdrag.models import build_tiny

    stock = build_tiny().to("cuda", torch.float16).unet.to(memory_format=torch.channels_last)
    fused = copy.deepcopy(stock)
    assert min(install_fused_blocks(fused).values()) > 0
    exact = copy.deepcopy(stock).float()
    generator = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(2, 4, 24, 20, device="cuda", generator=generator)
    text = torch.randn(2, 77, 32, device="cuda", generator=generator)

    def run(unet):
        dtype = torch.float32 if unet is exact else torch.float16
        latents = x.to(dtype).requires_grad_(True)
        with unet_autocast(unet, autocast and unet is not exact):
            out = unet(latents, torch.tensor(500, device="cuda"), encoder_hidden_states=text.to(dtype)).sample.float()
        grad = torch.autograd.grad(out.square().mean(), latents)[0].float() if autocast else None
        return out, grad

    want_out, want_grad = run(exact)
    (stock_out, stock_grad), (fused_out, fused_grad) = run(stock), run(fused)
    error = lambda got, want: ((got - want).norm() / want.norm()).item()
    assert torch.isfinite(fused_out).all() and error(fused_out, want_out) < 1e-2
    assert error(fused_out, want_out) <= 1.25 * error(stock_out, want_out) + 1e-4
    if autocast:
        assert torch.isfinite(fused_grad).all() and error(fused_grad, want_grad) <= 1.25 * error(stock_grad, want_grad) + 1e-4


def tiny_half_unet():
    """The tiny UNet in fp16, channels-last, frozen, with nothing installed."""
    from fastdrag.models import build_tiny

    return build_tiny().to("cuda", torch.float16).unet.to(memory_format=torch.channels_last).requires_grad_(False)


def lora_like_step(unet, seed):
    """(output, input gradient, peak bytes above the start) of a LoRA-like step: batch 4 at 64x64, the
    forward under the UNet's autocast and the gradient of its input."""
    from fastdrag.autocast import unet_autocast

    generator = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(4, 4, 64, 64, device="cuda", generator=generator, dtype=torch.float16).requires_grad_(True)
    text = torch.randn(4, 77, 32, device="cuda", generator=generator, dtype=torch.float16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with unet_autocast(unet, True):
        out = unet(x, torch.tensor(500, device="cuda"), encoder_hidden_states=text).sample
    (grad,) = torch.autograd.grad(out.float().square().mean(), x)
    torch.cuda.synchronize()
    return out, grad, torch.cuda.max_memory_allocated() - base


def test_fused_unet_kernels_lower_the_peak_memory_of_a_lora_step():
    """Under autocast the stock GroupNorm and LayerNorm keep fp32 copies of their inputs and the SiLU
    its fp32 output for the backward, and GEGLU its GELU's output; the fused kernels keep their fp16
    inputs alone. A LoRA-like step must peak lower with them."""
    import copy

    from fastdrag.fused_blocks import install_fused_blocks

    stock = tiny_half_unet()
    fused = copy.deepcopy(stock)
    install_fused_blocks(fused)
    lora_like_step(stock, 5), lora_like_step(fused, 5)  # first calls: cuDNN and Triton warm-up
    stock_peak, fused_peak = lora_like_step(stock, 5)[2], lora_like_step(fused, 5)[2]
    assert fused_peak < 0.9 * stock_peak, (stock_peak / 2**20, fused_peak / 2**20)


def test_frozen_convolutions_give_the_stock_gradient_and_lower_the_peak_memory_of_a_lora_step():
    """cuDNN's backward-data kernel from the weight alone gives the stock input gradient, and the
    convolutions' inputs are no longer kept: a LoRA-like step peaks lower."""
    import copy

    from fastdrag.frozen_conv import install_frozen_conv

    stock = tiny_half_unet()
    frozen = copy.deepcopy(stock)
    assert install_frozen_conv(frozen) > 10
    lora_like_step(stock, 6), lora_like_step(frozen, 6)  # first calls: cuDNN's algorithm search
    (stock_out, stock_grad, stock_peak), (out, grad, peak) = lora_like_step(stock, 6), lora_like_step(frozen, 6)
    assert torch.equal(out, stock_out)  # the same forward
    assert torch.isfinite(grad).all()
    assert ((grad.float() - stock_grad.float()).norm() / stock_grad.float().norm()).item() <= 1e-3
    assert peak < 0.95 * stock_peak, (stock_peak / 2**20, peak / 2**20)


@pytest.mark.parametrize("call", [(2, 4096, 4096, 8, 40), (2, 1024, 1024, 8, 80), (2, 256, 256, 8, 160),
                                  (2, 4096, 77, 8, 40)], ids=["self-40", "self-80", "self-160", "cross-40"])
@pytest.mark.parametrize("priority", ["flash", "cudnn", "efficient"])
def test_each_sdpa_priority_is_as_exact_as_the_default_at_sd_attention_calls(call, priority):
    """Output and every input gradient of SDPA in diffusers' layout at SD 1.5's head sizes, fp16,
    against fp32 math: the backend a priority puts first as close as PyTorch's default choice."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fastdrag.attention import first_backend_runs, sdpa_priority

    batch, tokens, key_tokens, heads, head_size = call
    generator = torch.Generator(device="cuda").manual_seed(7)
    tensors = [torch.randn(batch, length, heads, head_size, device="cuda", generator=generator).transpose(1, 2)
               for length in (tokens, key_tokens, key_tokens)]
    grad = torch.randn(batch, heads, tokens, head_size, device="cuda", generator=generator)
    half = [t.half().requires_grad_(True) for t in tensors]
    if not first_backend_runs(priority, *half, debug=True):
        pytest.skip(f"{priority} attention cannot run this call on this GPU (see the warning for why)")

    def run(inputs, out_grad):
        out = F.scaled_dot_product_attention(*inputs)
        return [out.float(), *(g.float() for g in torch.autograd.grad(out, inputs, out_grad))]

    with sdpa_kernel(SDPBackend.MATH):
        want = run([t.requires_grad_(True) for t in tensors], grad)
    default = run(half, grad.half())
    with sdpa_priority(priority):
        got = run(half, grad.half())
    error = lambda a, b: ((a - b).norm() / b.norm()).item()
    for g, d, w in zip(got, default, want, strict=True):
        assert torch.isfinite(g).all()
        assert error(g, w) <= 1.25 * error(d, w) + 1e-3, (priority, error(g, w), error(d, w))


@pytest.fixture()
def no_tf32(monkeypatch):
    """fp32 convolutions and matmuls in fp32 (cuDNN's convolutions default to TF32 on Ampere and later,
    about fp16's rounding), so an fp32 edit is the exact one to measure fp16 edits against."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def distances_to_the_fp32_edit(picture, tmp_path, **options):
    """Mean |fp16 edit - fp32 edit| (0-255) of the tiny editor's edit, for the stock fp16 editor and for an
    fp16 editor with `options`.

    A random tiny model's drag edit magnifies rounding: on an H100 two fp16 editors whose kernels merely
    round differently (FlashAttention against cuDNN's attention, the fused UNet kernels against the stock
    operators) made images 12.8 and 13.6 apart on average (twenty-fourth session); on the CPU a relative
    change of 1e-3 in the UNet's weights moves the fp32 edit by 3.2, and another seed by 17.4. So an
    option is judged, as the operator tests judge it, by how close its fp16 edit comes to the exact
    (fp32) one, against the stock fp16 edit's distance from it."""
    import numpy as np
    from fastdrag import DragEditor

    settings = dict(lora_steps=4, num_inference_steps=10, drag_steps=6)
    images = {}
    for name, dtype, extra in (("fp32", "fp32", {}), ("stock", "fp16", {}), ("option", "fp16", options)):
        editor = DragEditor.from_pretrained("tiny", device="cuda", dtype=dtype, cache_dir=tmp_path / name,
                                            progress=False, **extra)
        result = editor.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, **settings)
        images[name] = np.asarray(result.image, dtype=np.float32)
    distance = lambda name: float(np.abs(images[name] - images["fp32"]).mean())
    return distance("stock"), distance("option")


@pytest.mark.parametrize("other", ["flash", "cudnn"])
def test_an_editor_with_another_sdpa_priority_edits_like_the_default_one(picture, tmp_path, no_tf32, other):
    """PyTorch's default order takes cuDNN's attention first on an H100 and FlashAttention first on an
    A100: whichever the other is, an edit with it first is about as close to the fp32 edit as the
    default one's."""
    stock, option = distances_to_the_fp32_edit(picture, tmp_path, sdpa_priority=other)
    assert option <= 2.0 * stock + 2.0, (stock, option)


def test_an_editor_with_fused_unet_kernels_edits_like_the_stock_one(picture, tmp_path, no_tf32):
    stock, option = distances_to_the_fp32_edit(picture, tmp_path, fused_unet_kernels=True)
    assert option <= 2.0 * stock + 2.0, (stock, option)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_restarted_graphed_drag_loop_replays_a_new_drag(picture, dtype, monkeypatch):
    """A repeated edit restarts its drag loop in place: the graph captured during the first drag
    replays the second from its first iteration (no warm-up, no capture, no host sync), and the
    second drag comes out as an eager loop's would (the bounds of the graph-vs-eager test above)."""
    from fastdrag.config import DragConfig
    from fastdrag.drag import DragLoop
    from fastdrag.models import build_tiny

    components = build_tiny().to("cuda", dtype)
    inputs, schedule, z_t, text = _drag_setting(components, picture, dtype)
    config, t, unet = DragConfig(drag_steps=10), schedule.drag_timestep, components.unet
    far = inputs.targets.clone().cuda()
    far[:, 1] = inputs.sup_res[1] - 1
    loop = DragLoop(unet, z_t, t, text, inputs.handles.cuda(), far, inputs.mask.cuda(), schedule, config,
                    inputs.sup_res, cuda_graph=True)
    loop.run(progress=False)
    graph = loop.optimizer_step.graph
    assert graph is not None
    generator = torch.Generator(device="cuda").manual_seed(3)
    z_b = torch.randn(z_t.shape, device="cuda", generator=generator)
    text_b = torch.randn(text.shape, device="cuda", generator=generator).to(dtype)
    handles_b = (inputs.handles.cuda() + torch.tensor([1.0, 2.0], device="cuda")).clamp(0, min(inputs.sup_res) - 1)
    far_b = torch.full_like(handles_b, float(min(inputs.sup_res) - 1))  # the far corner: no arrival in 10 steps
    mask_b = torch.roll(inputs.mask.cuda(), shifts=(2, 3), dims=(-2, -1))
    assert loop.fits(unet, z_b, t, text_b, handles_b, mask_b, schedule, config, inputs.sup_res, cuda_graph=True)
    loop.restart(z_b, text_b, handles_b, far_b, mask_b)
    monkeypatch.setenv("FASTDRAG_SYNC_DEBUG", "error")
    restarted = loop.run(progress=False)
    assert loop.optimizer_step.graph is graph  # replayed, not captured again
    eager = DragLoop(unet, z_b, t, text_b, handles_b, far_b, mask_b, schedule, config, inputs.sup_res).run(progress=False)
    assert restarted.steps == eager.steps == 10
    change_eager, change_restarted = eager.latent - z_b, restarted.latent - z_b
    assert torch.isfinite(restarted.latent).all() and change_eager.norm() > 0
    assert (change_restarted - change_eager).norm() <= 0.05 * change_eager.norm()
    torch.testing.assert_close(restarted.losses, eager.losses, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(restarted.handles, eager.handles, rtol=0, atol=1.0)


def test_cuda_graph_drag_loop_stops_when_handles_arrive(picture):
    from fastdrag.config import DragConfig
    from fastdrag.drag import drag
    from fastdrag.models import build_tiny

    components = build_tiny().to("cuda", torch.float32)
    inputs, schedule, z_t, text = _drag_setting(components, picture, torch.float32)
    near = inputs.handles.cuda() + torch.tensor([[1.0, 1.0]], device="cuda")
    result = drag(components.unet, z_t, schedule.drag_timestep, text, inputs.handles.cuda(), near, None, schedule,
                  DragConfig(drag_steps=20), inputs.sup_res, progress=False, cuda_graph=True)
    assert result.steps == 1 and torch.equal(result.latent, z_t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_graphed_denoiser_matches_the_eager_one(dtype):
    from fastdrag.denoiser import TorchDenoiser
    from fastdrag.models import build_tiny

    unet = build_tiny().to("cuda", dtype).unet
    generator = torch.Generator(device="cuda").manual_seed(1)
    eager, graphed = TorchDenoiser(unet), TorchDenoiser(unet, cuda_graphs=True)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    for batch in (1, 2):
        for t in (981, 341):
            x = torch.randn(batch, 4, 8, 8, device="cuda", generator=generator)
            text = torch.randn(batch, 77, 32, device="cuda", generator=generator)
            torch.testing.assert_close(graphed(x, t, text), eager(x, t, text), rtol=tolerance, atol=tolerance)
    pair = torch.randn(2, 4, 8, 8, device="cuda", generator=generator)
    text = torch.randn(1, 77, 32, device="cuda", generator=generator).expand(2, -1, -1)
    with eager.reference_control(10, "sdpa"), graphed.reference_control(10, "sdpa"):
        swapped = graphed(pair, 501, text)
        torch.testing.assert_close(swapped, eager(pair, 501, text), rtol=tolerance, atol=tolerance)
    assert not torch.allclose(swapped, graphed(pair, 501, text), atol=tolerance)  # plain graph: another key
    assert len(graphed.graphs) == 3
    with torch.no_grad():
        unet.conv_out.bias.add_(1.0)  # in place: a replay sees it
    torch.testing.assert_close(graphed(pair, 501, text), eager(pair, 501, text), rtol=tolerance, atol=tolerance)
    graphed.reset()
    assert not graphed.graphs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_graphed_denoising_of_the_edited_branch_alone_matches_the_pair(dtype, no_tf32):
    """Kept source keys and values (`keep_source_kv`) through CUDA graphs: the recording pair's graph
    writes them into the slots at the device step index, the edited branch's batch-1 graph reads them
    back, and its replays neither capture again nor sync with the host. fp32 (TF32 off): the eager
    pair's edited row; fp16: about as close to that fp32 result as the graphed fp16 pair's is."""
    from fastdrag.config import DenoiseConfig
    from fastdrag.ddim import DdimSchedule
    from fastdrag.denoise import denoise_edited, denoise_pair
    from fastdrag.denoiser import TorchDenoiser
    from fastdrag.models import build_tiny
    from fastdrag.source_kv import SourceKV

    components = build_tiny()
    schedule = DdimSchedule.from_scheduler(components.scheduler, 10, 7)
    config = DenoiseConfig(start_step=2)  # two plain steps first: a batch-1 graph without the swap too
    generator = torch.Generator(device="cuda").manual_seed(3)
    source, edited = (torch.randn(1, 4, 8, 8, device="cuda", generator=generator) for _ in range(2))
    text = torch.randn(1, 77, 32, device="cuda", generator=generator)
    exact = denoise_pair(TorchDenoiser(components.unet.to("cuda", torch.float32)), source, edited, text, schedule,
                         config, progress=False)
    graphed = TorchDenoiser(components.unet.to("cuda", dtype), cuda_graphs=True)
    store = SourceKV()
    pair = denoise_pair(graphed, source, edited, text, schedule, config, progress=False, record=store,
                        record_key="image")
    alone = denoise_edited(graphed, edited, text, schedule, config, store, progress=False)
    assert torch.isfinite(alone).all() and store.holds("image")
    error = lambda x: float((x - exact[1:]).abs().max())
    if dtype == torch.float32:
        torch.testing.assert_close(pair, exact, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(alone, exact[1:], rtol=1e-4, atol=1e-4)
    else:
        assert error(alone) <= 2 * error(pair[1:]) + 1e-3, (error(alone), error(pair[1:]))
    graphs = set(graphed.graphs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = denoise_edited(graphed, edited, text, schedule, config, store, progress=False)
        other = denoise_edited(graphed, source, text, schedule, config, store, progress=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert set(graphed.graphs) == graphs and len(graphs) == 4  # plain batch 1 and 2, recording, reading
    assert torch.equal(again, alone)
    assert not torch.allclose(other, alone, atol=1e-2)  # another edited latent: not a stale output


def test_a_repeated_edit_with_kept_source_keys_and_values_matches_one_without(picture, tmp_path, no_tf32):
    import numpy as np
    from fastdrag import DragEditor

    settings = dict(lora_steps=4, num_inference_steps=10, drag_steps=6, reach_distance=0)
    moved = [((hx + 4, hy - 2), (tx - 3, ty)) for (hx, hy), (tx, ty) in picture.points]
    images = {}
    for keep in (False, True):
        editor = DragEditor.from_pretrained("tiny", device="cuda", dtype="fp32", cache_dir=tmp_path / str(keep),
                                            progress=False)
        editor.warm_up(keep_source_kv=keep, **settings)
        editor.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, keep_source_kv=keep, **settings)
        graphs = len(editor.denoiser.graphs)
        result = editor.edit(picture.image, picture.prompt, moved, mask=picture.mask, keep_source_kv=keep, **settings)
        assert result.lora_cached and len(editor.denoiser.graphs) == graphs  # warm_up captured them all
        assert (editor._source_kv.nbytes > 0) == keep
        images[keep] = np.asarray(result.image, dtype=np.float32)
    difference = np.abs(images[True] - images[False])
    assert difference.mean() < 3.0, difference.mean()


def test_sd15_random_reaches_the_gpu_without_free_fragments():
    """The benchmark model loads as a checkpoint does, from the CPU in fp16, the UNet's convolution
    weights channels-last as the editor loads them on CUDA: what loading it reserves is about what its
    weights take (cast in place on the GPU, 0.51 GiB of free fragments stayed; the layout converted
    after the move leaves 137 MiB by bench/load_fragments.py's replay, the one-step load 11)."""
    from fastdrag.models import load_components

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    reserved = torch.cuda.memory_reserved()
    components = load_components("sd15-random", device="cuda", dtype=torch.float16, channels_last=True)
    torch.cuda.synchronize()
    modules = (components.unet, components.vae, components.text_encoder)
    weights = sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers()))
    assert all(p.dtype == torch.float16 and p.is_cuda for m in modules for p in m.parameters())
    assert components.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    held = torch.cuda.memory_reserved() - reserved
    assert weights > 1.9 * 2**30 and held - weights < 0.1 * 2**30, (held / 2**30, weights / 2**30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_graphed_vae_matches_the_eager_one(dtype):
    """The VAE's encoder and decoder replayed from graphs: the eager posterior and pixels, for fresh
    inputs at every replay, at a size that is not square; another size captures another graph."""
    import numpy as np
    from PIL import Image
    from fastdrag.cuda_graph import CapturedCalls
    from fastdrag.models import build_tiny
    from fastdrag.vae import capture_decoder, decode, encode_posterior

    vae = build_tiny().to("cuda", dtype).vae
    graphs = CapturedCalls()
    tolerance = 1e-4 if dtype == torch.float32 else 3e-3
    rng = np.random.default_rng(3)
    capture_decoder(vae, (1, 4, 5, 7), graphs)
    assert list(graphs.graphs)[0][0] == "vae_decode"
    for width, height in ((56, 40), (56, 40), (24, 32)):
        image = Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))
        eager, graphed = encode_posterior(vae, image), encode_posterior(vae, image, graphs)
        torch.testing.assert_close(graphed.mean, eager.mean, rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(graphed.std, eager.std, rtol=tolerance, atol=tolerance)
        assert torch.isfinite(graphed.mean).all() and graphed.mean.std() > 0
        latents = torch.randn_like(eager.mean, dtype=torch.float32) * 2
        expected = np.asarray(decode(vae, latents, 0.18215), dtype=np.float32)
        got = np.asarray(decode(vae, latents, 0.18215, graphs), dtype=np.float32)
        assert np.abs(got - expected).max() <= 1.0  # 8-bit pixels: at most one level from rounding
        assert expected.std() > 1.0
    assert len(graphs.graphs) == 4  # an encoder and a decoder for each of the two sizes
    graphs.reset()
    assert not graphs.graphs


def test_edit_with_cuda_graphs_matches_the_eager_edit(picture, tmp_path, no_tf32):
    import numpy as np
    from fastdrag import DragEditor

    editor = DragEditor.from_pretrained("tiny", device="cuda", dtype="fp32", cache_dir=tmp_path, progress=False)
    settings = dict(lora_steps=4, num_inference_steps=10, drag_steps=6)
    eager = editor.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, cuda_graphs=False, **settings)
    editor._inversions.clear()  # run the inversion again, through graphs
    graphed = editor.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, cuda_graphs=True,
                          cuda_graph_vae=True, **settings)
    # (element-wise run-to-run differences as above: the first, stricter version failed on the H100)
    difference = np.abs(np.asarray(eager.image, dtype=np.float32) - np.asarray(graphed.image, dtype=np.float32))
    assert difference.mean() < 3.0, difference.mean()
    np.testing.assert_allclose(graphed.handles, eager.handles, rtol=0, atol=2.0)


def test_release_frees_the_memory_of_the_kept_graphs(picture, tmp_path):
    from fastdrag import DragEditor

    editor = DragEditor.from_pretrained("tiny", device="cuda", dtype="fp32", cache_dir=tmp_path, progress=False)
    editor.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, lora_steps=4, num_inference_steps=10,
                drag_steps=6, reach_distance=0, cuda_graph_vae=True)  # no early stop: past the drag loop's capture
    assert editor._drag_loop.optimizer_step.graph is not None and editor.denoiser.graphs
    torch.cuda.synchronize()
    held = torch.cuda.memory_reserved()
    pool = editor._graph_pool
    editor._drop_graphs()  # what the weights' moving does: the UNet's graphs go, their pool and the VAE's graphs stay
    assert not editor.denoiser.graphs and editor._drag_loop is None
    assert editor._graph_pool is pool and editor._vae_graphs.graphs
    editor.release()
    assert editor._graph_pool is None and not editor._vae_graphs.graphs
    assert torch.cuda.memory_reserved() < held


def test_lean_transformer_output_skips_both_nchw_copies_on_cuda():
    """The lean blocks' transformer output step on CUDA with channels-last weights: the same forward bit
    for bit, and one counted copy fewer per transformer: diffusers' NCHW copy before proj_out. (The copy
    cuDNN's convolution makes of an NCHW input back to channels-last also goes, but inside the
    convolution's kernel, where a dispatch mode does not see it: the H100 counted 97 against 81 clones,
    twenty-fourth session.)"""
    import copy
    import sys
    from pathlib import Path

    from fastdrag.lean_blocks import install_lean_blocks

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from op_count import OpCount

    stock = tiny_half_unet()
    lean = copy.deepcopy(stock)
    assert install_lean_blocks(lean)["transformer"] == 16
    generator = torch.Generator(device="cuda").manual_seed(8)
    latents = torch.randn(2, 4, 40, 24, device="cuda", generator=generator, dtype=torch.float16)
    text = torch.randn(2, 77, 32, device="cuda", generator=generator, dtype=torch.float16)
    outputs, clones = [], []
    for unet in (stock, lean):
        with torch.no_grad(), OpCount() as ops:
            outputs.append(unet(latents.to(memory_format=torch.channels_last), 500, text).sample)
        clones.append(ops.ops["clone"])
    assert torch.isfinite(outputs[0]).all() and torch.equal(outputs[0], outputs[1])
    assert clones[0] - clones[1] == 16, clones


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_silu_written_channels_last_is_bit_for_bit_the_nchw_one_on_cuda(dtype):
    """A question for a change not yet built (bench/RESULTS.md, still open): in the inference stages a
    resnet's SiLU could write CUDA's NCHW GroupNorm output straight into channels-last memory, the
    layout its convolution then copies it to (44 copies fewer per SD 1.5 forward). That is exact only
    if CUDA's SiLU computes each value alike whatever its output's strides. On the CPU it does not (an
    fp32 SiLU into a strided output takes the scalar `exp`), so this asks the GPU."""
    generator = torch.Generator(device="cuda").manual_seed(11)
    for channels, side in ((320, 64), (640, 32), (1280, 16), (4, 7)):
        x = torch.randn(2, channels, side, side, device="cuda", generator=generator, dtype=dtype) * 3
        stock = torch.nn.functional.silu(x).contiguous(memory_format=torch.channels_last)
        direct = torch.empty_like(x, memory_format=torch.channels_last)
        torch.ops.aten.silu.out(x, out=direct)
        assert direct.is_contiguous(memory_format=torch.channels_last) and torch.equal(direct, stock), channels


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lean_geglu_is_bit_for_bit_the_stock_one_on_cuda(dtype):
    """`fastdrag.lean_geglu` on CUDA at an SD 1.5 feed-forward size and an odd one: the product and the
    projection's gradient, written into the two halves of one buffer, bit for bit the stock ones
    (tests/test_lean_geglu.py checks the CPU)."""
    from fastdrag.lean_geglu import geglu_product

    generator = torch.Generator(device="cuda").manual_seed(9)
    for shape in [(4, 1024, 2 * 2560), (3, 77, 2 * 37)]:
        projection = (torch.randn(shape, device="cuda", generator=generator) * 3).to(dtype).requires_grad_(True)
        grad = torch.randn(shape[:-1] + (shape[-1] // 2,), device="cuda", generator=generator).to(dtype)
        value, gate = projection.chunk(2, dim=-1)
        stock = value * torch.nn.functional.gelu(gate)
        (stock_grad,) = torch.autograd.grad(stock, projection, grad)
        lean = geglu_product(projection)
        assert type(lean.grad_fn).__name__ == "GegluProductBackward"
        (lean_grad,) = torch.autograd.grad(lean, projection, grad)
        assert torch.isfinite(stock_grad).all()
        assert torch.equal(lean, stock) and torch.equal(lean_grad, stock_grad), shape


def cuda_lora_case(lean: bool):
    """The tiny fp16 UNet on CUDA with an adapter whose branch computes something (B is 0 after install),
    the lean blocks where asked, and a LoRA step's inputs: (components, LoRA params, lora_loss's other
    arguments)."""
    from fastdrag.config import LoraConfig
    from fastdrag.lean_blocks import install_lean_blocks
    from fastdrag.lora import install_adapter, lora_parameters
    from fastdrag.models import build_tiny

    tiny = build_tiny().to("cuda", torch.float16)
    if lean:
        install_lean_blocks(tiny.unet)
    install_adapter(tiny.unet, LoraConfig(), seed=3)
    generator = torch.Generator().manual_seed(4)
    params = lora_parameters(tiny.unet)
    for param in params:
        param.data = (torch.randn(param.shape, generator=generator) * 0.1).cuda()
        param.requires_grad_(True)
    latents, noise = (torch.randn(3, 4, 16, 16, generator=generator).cuda() for _ in range(2))
    timesteps = torch.randint(0, 1000, (3,), generator=generator).cuda()
    text = torch.randn(3, 77, 32, generator=generator).to("cuda", torch.float16)
    return tiny, params, (latents, noise, timesteps, text, tiny.scheduler.alphas_cumprod.cuda())


def test_shared_casts_under_cuda_autocast_cast_inputs_and_norm_weights_once():
    """`fastdrag.shared_casts` under CUDA's own autocast, where LayerNorm hands the attention projections
    fp32 and casts its fp16 weights up: a LoRA step's forward bit for bit the same with 6 casts fewer
    per transformer block (to_q, to_k, to_v and their adapters' A matrices read one copy), 2 fewer per
    norm (its kept fp32 weight and bias) and one layout copy fewer per convolution that read an fp32
    NCHW input, the gradients the same (to run-to-run noise: attention
    backward kernels may add in another order). tests/test_shared_casts.py checks bit-equal gradients
    on the CPU, with CUDA's fp32 norms imitated."""
    import sys
    from pathlib import Path

    from fastdrag.lora import lora_loss
    from fastdrag.shared_casts import (install_fp32_affine, install_shared_casts, remove_fp32_affine,
                                       remove_shared_casts)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from op_count import OpCount

    from torch.profiler import profile

    tiny, params, arguments = cuda_lora_case(lean=True)
    tiny.unet.to(memory_format=torch.channels_last)  # as the editor loads it on CUDA
    nchw_inputs = []  # convolutions handed an fp32 NCHW input (CUDA's GroupNorm computes NCHW)
    hooks = [m.register_forward_pre_hook(lambda module, args: nchw_inputs.append(
        args[0].dtype == torch.float32 and not args[0].is_contiguous(memory_format=torch.channels_last)))
        for m in tiny.unet.modules() if type(m) is torch.nn.Conv2d]  # after the shared casts' hooks: what reached the layer

    def step():
        nchw_inputs.clear()
        with OpCount() as ops, profile() as prof:
            loss = lora_loss(tiny.unet, *arguments)
        clones = sum(event.count for event in prof.key_averages() if event.key == "aten::clone")
        return loss.detach(), torch.autograd.grad(loss, params), ops.ops["_to_copy"], clones, sum(nchw_inputs)

    step()  # the first: the norms' fp32 weights are made
    loss, grads, casts, clones, nchw = step()
    remove_shared_casts(tiny.unet)
    norms = remove_fp32_affine(tiny.unet)
    stock_loss, stock_grads, stock_casts, stock_clones, stock_nchw = step()
    install_shared_casts(tiny.unet)
    install_fp32_affine(tiny.unet)
    for hook in hooks:
        hook.remove()
    blocks = sum(type(m).__name__ == "BasicTransformerBlock" for m in tiny.unet.modules())
    assert torch.isfinite(loss) and torch.equal(loss, stock_loss)
    assert (blocks, norms) == (16, 109)
    assert stock_casts - casts == 6 * blocks + 2 * norms, (stock_casts, casts)
    # each convolution that got an fp32 NCHW input now gets it cast and laid out in one copy: the
    # convolution's own conversion (a clone) goes (61 if CUDA's GroupNorm hands out NCHW, as it did)
    assert nchw == 0 and stock_clones - clones == stock_nchw, (stock_clones, clones, stock_nchw)
    for got, want in zip(grads, stock_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)
    tiny.unet.requires_grad_(False)


def test_lora_weights_cast_in_two_multi_tensor_copies_on_cuda(monkeypatch):
    """`fastdrag.lora_casts` under CUDA's own autocast: a LoRA step's loss bit for bit the same, its LoRA
    gradients the same (to run-to-run noise: attention backward kernels may add in another order), and
    about 4 kernels fewer per LoRA layer (its two weights' casts and their gradients' casts, made by a
    few multi-tensor launches instead: `torch._foreach_copy_`'s fast path). tests/test_lora_casts.py
    checks bit-equal gradients and the exact count of casts on the CPU."""
    import fastdrag.lora
    from torch.profiler import ProfilerActivity, profile

    from fastdrag.lora import lora_layers, lora_loss

    tiny, params, arguments = cuda_lora_case(lean=True)
    layers = len(lora_layers(tiny.unet))

    def step(one_pass):
        with monkeypatch.context() as patch:
            if not one_pass:
                patch.setattr(fastdrag.lora, "lean_lora_layers", lambda model: [])
            lora_loss(tiny.unet, *arguments)  # the norms' fp32 weights are made at a first step
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                loss = lora_loss(tiny.unet, *arguments)
                grads = torch.autograd.grad(loss, params)
                torch.cuda.synchronize()
        kernels = sum(event.device_type == torch.autograd.DeviceType.CUDA for event in prof.events())
        return loss.detach(), grads, kernels

    loss, grads, kernels = step(True)
    stock_loss, stock_grads, stock_kernels = step(False)
    tiny.unet.requires_grad_(False)
    assert layers == 128 and torch.isfinite(loss) and torch.equal(loss, stock_loss)
    for got, want in zip(grads, stock_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)
    assert stock_kernels - kernels >= 4 * layers - 16, (stock_kernels, kernels)


def test_fp16_lora_loss_skips_peft_input_round_trip(monkeypatch):
    """`lora_loss` under CUDA fp16 autocast (`unet_autocast`) against the same step with peft's
    fp16 -> fp32 -> fp16 input cast left on: the same loss bit for bit, the same LoRA gradients (to
    run-to-run noise: attention backward kernels may add in another order), and at least two copies
    fewer per LoRA call with an fp16 input (tests/test_autocast.py checks bit-equal gradients and the
    exact count on the CPU)."""
    from collections import Counter

    import fastdrag.lora
    from torch.profiler import profile

    from fastdrag.lora import lora_layers, lora_loss

    tiny, params, arguments = cuda_lora_case(lean=False)

    half_inputs = []  # LoRA calls whose input is fp16: under CUDA autocast LayerNorm hands q/k/v fp32
    hooks = [layer.register_forward_pre_hook(lambda module, args: half_inputs.append(args[0].dtype == torch.float16))
             for layer in lora_layers(tiny.unet)]

    def step():
        half_inputs.clear()
        for param in params:
            param.grad = None
        with profile(record_shapes=True) as prof:
            loss = lora_loss(tiny.unet, *arguments)
            loss.backward()
            torch.cuda.synchronize()
        copies = Counter({(str(event.input_shapes), str(getattr(event, "input_dtypes", ""))): event.count
                          for event in prof.key_averages(group_by_input_shape=True) if event.key == "aten::_to_copy"})
        return loss.detach(), [param.grad.clone() for param in params], copies

    loss, grads, copies = step()
    monkeypatch.setattr(fastdrag.lora, "unet_autocast", lambda unet, active, norms_in_half=False:
                        torch.autocast("cuda", dtype=unet.dtype, cache_enabled=False))
    reference_loss, reference_grads, reference_copies = step()
    assert torch.isfinite(loss) and torch.equal(loss, reference_loss)
    assert all(r.abs().max() > 0 for r in reference_grads[:4])
    for got, want in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)
    for hook in hooks:
        hook.remove()
    # Two fewer per LoRA call with an fp16 input (peft's cast up and autocast's cast back), more in the
    # backward. Only those: CUDA autocast runs LayerNorm in fp32, so the q/k/v layers after it get fp32
    # inputs, which peft leaves alone (the H100, 2026-11-26: 192 fewer, 64 of them the text's for the
    # cross-attention k/v, where 2 per LoRA call would have been 256; CPU bf16 autocast keeps norms in bf16)
    fewer = sum(reference_copies.values()) - sum(copies.values())
    assert 0 < sum(half_inputs) < len(half_inputs)
    assert fewer >= 2 * sum(half_inputs), (fewer, sum(half_inputs), reference_copies - copies, copies - reference_copies)
    tiny.unet.requires_grad_(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_graphed_lora_training_matches_the_eager_one(dtype):
    from types import SimpleNamespace

    from fastdrag.config import LoraConfig
    from fastdrag.lora import LoraTrainer, adapter_state
    from fastdrag.models import build_tiny

    tiny = build_tiny().to("cuda", dtype)
    generator = torch.Generator().manual_seed(6)
    posterior = SimpleNamespace(mean=torch.randn(1, 4, 8, 8, generator=generator).cuda(),
                                std=(torch.rand(1, 4, 8, 8, generator=generator) * 0.1).cuda())
    text = torch.randn(1, 77, 32, generator=generator).to("cuda", dtype)

    def train(cuda_graph):
        trainer = LoraTrainer(tiny.unet, tiny.scheduler, posterior, text, tiny.scaling_factor, LoraConfig(), seed=5,
                              cuda_graph=cuda_graph)
        start = {k: v.detach().float().cpu() for k, v in adapter_state(tiny.unet).items()}
        losses = torch.stack([trainer.step() for _ in range(8)]).cpu()
        replayed = trainer.graph is not None
        trainer.finish()
        trained = {k: v.detach().float().cpu() for k, v in adapter_state(tiny.unet).items()}
        return losses, start, {k: trained[k] - start[k] for k in start}, replayed

    eager_losses, eager_start, eager_change, eager_replayed = train(False)
    graph_losses, graph_start, graph_change, graph_replayed = train(True)
    assert graph_replayed and not eager_replayed
    assert all(torch.equal(graph_start[k], eager_start[k]) for k in eager_start)  # one seed, one adapter
    assert torch.isfinite(graph_losses).all()
    tolerance = 1e-3 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(graph_losses, eager_losses, rtol=tolerance, atol=tolerance)
    # What training changed, compared as a whole, not element by element: Adam moves a weight whose
    # gradient is near zero by about lr * sign(grad), so rounding that differs between the two paths
    # (capturable AdamW, kernel choice) can flip single elements by about 2 lr per step (the H100 saw
    # 3e-4 after 8 steps in fp32, on 2 of 512 elements of one tensor)
    eager_all = torch.cat([v.flatten() for v in eager_change.values()])
    graph_all = torch.cat([graph_change[k].flatten() for k in eager_change])
    assert eager_all.abs().max() > 0  # it trained
    assert ((graph_all - eager_all).norm() / eager_all.norm()).item() < (0.02 if dtype == torch.float32 else 0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_restarted_graphed_lora_trainer_trains_a_new_image_like_a_fresh_eager_one(dtype):
    """The trainer an editor keeps: restarted on another image, its graph replays from the first step
    (no eager step, no capture) and trains like a fresh eager trainer on that image, within the bounds
    of the graphed-vs-eager test above."""
    from types import SimpleNamespace

    from fastdrag.config import LoraConfig
    from fastdrag.lora import LoraTrainer, adapter_state, run_trainer
    from fastdrag.models import build_tiny

    tiny = build_tiny().to("cuda", dtype)
    generator = torch.Generator().manual_seed(8)

    def image():
        return SimpleNamespace(mean=torch.randn(1, 4, 8, 8, generator=generator).cuda(),
                               std=(torch.rand(1, 4, 8, 8, generator=generator) * 0.1).cuda()), \
            torch.randn(1, 77, 32, generator=generator).to("cuda", dtype)

    (first, first_text), (second, second_text) = image(), image()
    kept = LoraTrainer(tiny.unet, tiny.scheduler, first, first_text, tiny.scaling_factor, LoraConfig(), seed=1,
                       cuda_graph=True)
    run_trainer(kept, 5, progress=False, keep_graph=True)
    graph = kept.graph
    assert graph is not None and kept.fits(tiny.unet, second, second_text, LoraConfig(), cuda_graph=True)
    kept.restart(second, second_text, seed=5)
    start = {k: v.detach().float().cpu() for k, v in adapter_state(tiny.unet).items()}
    losses = torch.tensor(run_trainer(kept, 8, progress=False, keep_graph=True))
    assert kept.graph is graph  # replayed, not captured again
    trained = {k: v.detach().float().cpu() for k, v in adapter_state(tiny.unet).items()}

    eager = LoraTrainer(tiny.unet, tiny.scheduler, second, second_text, tiny.scaling_factor, LoraConfig(), seed=5)
    eager_start = {k: v.detach().float().cpu() for k, v in adapter_state(tiny.unet).items()}
    eager_losses = torch.tensor(run_trainer(eager, 8, progress=False))
    eager_trained = {k: v.detach().float().cpu() for k, v in adapter_state(tiny.unet).items()}
    assert all(torch.equal(start[k], eager_start[k]) for k in start)  # re-initialised as a fresh one is
    assert torch.isfinite(losses).all()
    tolerance = 1e-3 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(losses, eager_losses, rtol=tolerance, atol=tolerance)
    change = torch.cat([(trained[k] - start[k]).flatten() for k in start])
    eager_change = torch.cat([(eager_trained[k] - start[k]).flatten() for k in start])
    assert eager_change.abs().max() > 0
    assert ((change - eager_change).norm() / eager_change.norm()).item() < (0.02 if dtype == torch.float32 else 0.1)


def test_an_editor_restarts_its_kept_graphs_for_a_new_image(picture, tmp_path, no_tf32):
    """The second new image of a graphed editor replays the LoRA step's, the drag loop's and the
    denoiser's graphs captured for the first (no capture) and edits like a fresh editor's first edit of
    it, within the graph-vs-eager edit bounds; the memory held between edits is reported. In fp32 without
    TF32: with it, the two editors' convolutions (cuDNN may pick other algorithms for them, e.g. when other
    processes share the GPU) round like fp16, which the drag magnifies (twenty-fourth session: the test
    failed beside other test processes and passed alone)."""
    import numpy as np
    from fastdrag import DragEditor

    settings = dict(lora_steps=6, num_inference_steps=10, drag_steps=6, reach_distance=0, keep_lora_trainer=True,
                    cuda_graph_vae=True)
    editor = DragEditor.from_pretrained("tiny", device="cuda", dtype="fp32", cache_dir=tmp_path / "a", progress=False)
    editor.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, **settings)
    trainer, loop = editor._lora_trainer, editor._drag_loop
    graphs = (trainer.graph, loop.optimizer_step.graph, dict(editor.denoiser.graphs))
    assert graphs[0] is not None and graphs[1] is not None and graphs[2]
    vae_graphs = dict(editor._vae_graphs.graphs)
    assert [key[0] for key in vae_graphs] == ["vae_decode", "vae_encode"]  # the decoder first, before the edit's other graphs
    pools = {tuple(graphs[0].pool()), tuple(graphs[1].pool()), *(tuple(g.graph.pool()) for g in graphs[2].values()),
             *(tuple(entry[0].pool()) for entry in vae_graphs.values())}
    assert pools == {tuple(editor._graph_pool.handle)}  # one memory pool for all of them
    other = (np.random.default_rng(8).random((64, 64, 3)) * 255).astype(np.uint8)
    kept = editor.edit(other, "another prompt", picture.points, mask=picture.mask, **settings)
    assert not kept.lora_cached and editor._lora_trainer is trainer and editor._drag_loop is loop
    assert trainer.graph is graphs[0] and loop.optimizer_step.graph is graphs[1]
    assert all(editor.denoiser.graphs[key] is graph for key, graph in graphs[2].items())
    assert editor._vae_graphs.graphs == vae_graphs  # the same graphs replayed
    fresh = DragEditor.from_pretrained("tiny", device="cuda", dtype="fp32", cache_dir=tmp_path / "b", progress=False)
    expected = fresh.edit(other, "another prompt", picture.points, mask=picture.mask, **settings)
    difference = np.abs(np.asarray(kept.image, dtype=np.float32) - np.asarray(expected.image, dtype=np.float32))
    assert difference.mean() < 3.0, difference.mean()
    np.testing.assert_allclose(kept.handles, expected.handles, rtol=0, atol=2.0)


@pytest.mark.parametrize("stage", ["lora", "drag", "denoise"])
def test_an_edit_stopped_after_its_graphs_were_captured_leaves_them_usable(picture, tmp_path, no_tf32, stage):
    """An `on_step` callback's exception stops a graphed edit between replays (after the LoRA step's, the
    drag loop's and the denoiser's captures); the editor's next edit of that image restarts the kept graphs
    and edits like a fresh editor, within the graph-vs-eager bounds above."""
    import numpy as np
    from fastdrag import DragEditor, EditCancelled

    settings = dict(lora_steps=6, num_inference_steps=10, drag_steps=6, reach_distance=0, keep_lora_trainer=True,
                    cuda_graph_vae=True)
    editor = DragEditor.from_pretrained("tiny", device="cuda", dtype="fp32", cache_dir=tmp_path / "a", progress=False)
    editor.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, **settings)
    trainer, loop = editor._lora_trainer, editor._drag_loop

    def stop(name, done, total):
        if name == stage and done == total - 1:
            raise EditCancelled(name)

    other = (np.random.default_rng(8).random((64, 64, 3)) * 255).astype(np.uint8)
    with pytest.raises(EditCancelled):
        editor.edit(other, "another prompt", picture.points, mask=picture.mask, on_step=stop, **settings)
    resumed = editor.edit(other, "another prompt", picture.points, mask=picture.mask, **settings)
    assert editor._lora_trainer is trainer and editor._drag_loop is loop  # restarted, not captured again
    fresh = DragEditor.from_pretrained("tiny", device="cuda", dtype="fp32", cache_dir=tmp_path / "b", progress=False)
    expected = fresh.edit(other, "another prompt", picture.points, mask=picture.mask, **settings)
    difference = np.abs(np.asarray(resumed.image, dtype=np.float32) - np.asarray(expected.image, dtype=np.float32))
    assert difference.mean() < 3.0, difference.mean()
    np.testing.assert_allclose(resumed.handles, expected.handles, rtol=0, atol=2.0)


def test_a_garbage_collection_cannot_fall_inside_a_capture():
    """A dropped graph in a reference cycle dies at a garbage collection; one inside another capture
    would destroy it mid-capture, which CUDA refuses (a toy evaluation failed so once in 48 edits).
    `capture` keeps collections out: here the thresholds ask for one at every allocation inside."""
    import gc

    from fastdrag.cuda_graph import capture

    class Holder:
        pass

    x = torch.randn(1000, device="cuda")
    thresholds = gc.get_threshold()
    try:
        for _ in range(3):
            holder = Holder()
            holder.me, holder.graph = holder, torch.cuda.CUDAGraph()
            with capture(holder.graph):
                holder.out = x * 2
            del holder  # cyclic garbage that holds a captured graph
            graph = torch.cuda.CUDAGraph()
            gc.set_threshold(1, 1, 1)
            with capture(graph):
                y = x + 1
                garbage = [[i] for i in range(1000)]  # container allocations, each a chance to collect
            gc.set_threshold(*thresholds)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(y, x + 1) and len(garbage) == 1000
    finally:
        gc.set_threshold(*thresholds)
        gc.collect()


def test_compiled_blocks_replay_in_cuda_graphs(picture):
    """`compile_blocks` under the package's own CUDA graphs: the blocks compile during the warm-up
    calls, then the graphed denoiser and the graphed drag loop replay them and agree with the eager,
    uncompiled UNet."""
    from fastdrag.config import DragConfig
    from fastdrag.denoiser import TorchDenoiser
    from fastdrag.drag import drag
    from fastdrag.models import build_tiny
    from fastdrag.regional_compile import compile_blocks

    tiny = build_tiny().to("cuda", torch.float32)
    inputs, schedule, z_t, text = _drag_setting(tiny, picture, torch.float32)
    far = inputs.targets.clone()
    far[:, 1] = inputs.sup_res[1] - 1

    def drag_run(graph):
        return drag(tiny.unet, z_t, schedule.drag_timestep, text, inputs.handles.cuda(), far.cuda(), inputs.mask.cuda(),
                    schedule, DragConfig(drag_steps=10), inputs.sup_res, progress=False, cuda_graph=graph)

    eps = TorchDenoiser(tiny.unet)(z_t, 501, text)
    eager = drag_run(False)
    compile_blocks(tiny.unet)
    compiled_eps = TorchDenoiser(tiny.unet)(z_t, 501, text)
    graphed_denoiser = TorchDenoiser(tiny.unet, cuda_graphs=True)
    graphed_eps = graphed_denoiser(z_t, 501, text)
    assert graphed_denoiser.graphs
    # The graph replays the compiled kernels, yet on three H100 leases (2026-11-26) its forward was up
    # to 6.5e-4 from the same compiled blocks run without a graph (232 of 256 elements past 1e-5):
    # rounding of TF32's size, cause not found. So it is bounded in norm, as compiled against eager is
    # below, which lets the drag checks after it run.
    assert torch.isfinite(graphed_eps).all()
    assert ((graphed_eps - compiled_eps).norm() / compiled_eps.norm()).item() < 5e-3
    # Compiled against eager: the fused kernels round differently. On the H100 (2026-11-26) an element
    # bound of 1e-4 failed at 5e-4 (36 % of the elements past it), which is rounding of the size of
    # cuDNN's TF32 convolutions (on by default in fp32), so the two are compared in norm
    assert torch.isfinite(compiled_eps).all()
    assert ((compiled_eps - eps).norm() / eps.norm()).item() < 5e-3
    graphed = drag_run(True)
    assert graphed.steps == eager.steps == 10 and torch.isfinite(graphed.latent).all()
    # The first loss is the same arithmetic up to the forward's rounding (above). The second follows one
    # Adam step, whose first step moves each element by about the learning rate whatever the size of its
    # gradient, so elements with tiny gradients move differently: 0.68 % apart on an H200 (2026-11-26),
    # where 0.2 % had been allowed. After them the two runs part as far as the tiny model's chaotic drag
    # takes any two arithmetics apart: compiled against eager on the CPU, the losses differed by up to
    # 7 % from the third iteration on and the latent's change by 9.6 % in norm. So the rest is bounded
    # loosely (a broken compiled backward moves nothing like the eager one); whether compiled edits
    # score the same is the toy quality benchmark's question.
    torch.testing.assert_close(graphed.losses[0], eager.losses[0], rtol=5e-3, atol=1e-4)
    torch.testing.assert_close(graphed.losses[1], eager.losses[1], rtol=2e-2, atol=1e-4)
    change_eager, change_graphed = eager.latent - z_t, graphed.latent - z_t
    assert (change_graphed - change_eager).norm() <= 0.25 * change_eager.norm()
    torch.testing.assert_close(graphed.handles, eager.handles, rtol=0, atol=2.0)


@pytest.mark.skipif(__import__("importlib").util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed")
def test_an_editor_on_cuda_exports_graphs_that_compute_its_unet(picture, tmp_path, no_tf32):
    """An fp16 editor on CUDA exports (its graphs' example inputs on its device), and ONNX Runtime's
    inversion graph gives the CUDA UNet's eps; the drag graph traces on CUDA, and its traced step gives
    the eager step's gradient there."""
    import numpy as np
    import onnxruntime as ort

    from fastdrag import DragEditor
    from fastdrag.config import DragConfig
    from fastdrag.ddim import DdimSchedule
    from fastdrag.export import merged_unet
    from fastdrag.export.drag_graph import drag_job, drag_step

    editor = DragEditor.from_pretrained("tiny", device="cuda", dtype="fp16", cache_dir=tmp_path / "cache", progress=False)
    manifest = editor.export(picture.image, picture.prompt, tmp_path / "out", fp16=True, lora_steps=2)
    assert manifest.data["precision"]["unet"] == "fp16"
    merged = merged_unet(editor.components.unet)
    x, text = torch.randn(1, 4, 8, 8, device="cuda"), torch.randn(1, 77, 32, device="cuda")
    session = ort.InferenceSession(str(manifest.path("unet_inversion")), providers=["CPUExecutionProvider"])
    (eps,) = session.run(None, {"latents": x.half().cpu().numpy(), "timestep": np.array([300.0], np.float32),
                                "text_embeddings": text.half().cpu().numpy()})
    with torch.no_grad():
        expected = merged(x.half(), 300, text.half()).sample.float().cpu().numpy()
    assert np.isfinite(eps).all()
    assert np.linalg.norm(eps.astype(np.float32) - expected) / np.linalg.norm(expected) < 2e-2

    unet = merged.float()
    schedule = DdimSchedule.from_scheduler(editor.components.scheduler, 50, 35)
    job = drag_job(unet, (1, 4, 8, 8), 32, 1, schedule, DragConfig(), (32, 32))
    assert all(tensor.is_cuda for tensor in job.example)
    traced = job.module(*job.example)
    eager = drag_step(unet, schedule, schedule.drag_timestep, DragConfig(), (32, 32))(*job.example)
    assert torch.isfinite(traced[0]).all() and float(traced[0].norm()) > 0
    assert float((traced[0] - eager[0]).norm() / eager[0].norm()) < 1e-4 and torch.equal(traced[1], eager[1])


def test_a_v_model_edits_on_cuda_with_graphs_as_the_noise_predicting_model_it_stands_for(picture, tmp_path, no_tf32):
    """The CUDA-graph paths (the denoiser's replays, the drag loop's captured iteration with its mask term)
    read noise from a velocity output too: tests/test_prediction_type.py's check, on the GPU."""
    import numpy as np
    from fastdrag import DragEditor
    from fastdrag.models import build_tiny
    from test_prediction_type import _tiny_as

    images = {}
    for name, components in (("plain", build_tiny()), ("v", _tiny_as("v_prediction", "v_prediction")),
                             ("misread", _tiny_as("v_prediction", "epsilon"))):
        editor = DragEditor(components.to("cuda", torch.float32), torch.device("cuda"), torch.float32,
                            cache_dir=tmp_path / name, progress=False)
        result = editor.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, lora_steps=0,
                             num_inference_steps=10, drag_steps=6, reach_distance=0, cuda_graphs=True,
                             cuda_graph_vae=True)
        assert editor._drag_loop.optimizer_step.graph is not None  # the captured iteration ran
        images[name] = np.asarray(result.image, dtype=np.float32)
    apart = lambda name: float(np.abs(images[name] - images["plain"]).mean())
    # (run-to-run differences of graphed fp32 edits as in test_edit_with_cuda_graphs_matches_the_eager_edit)
    assert apart("v") < 3.0 and apart("misread") > 3 * max(apart("v"), 1.0), (apart("v"), apart("misread"))


@pytest.mark.parametrize("setting", ["fp32-norms", "half-norms", "fused"])
def test_a_checkpointed_lora_step_on_cuda_trains_like_the_kept_one_and_peaks_lower(monkeypatch, setting):
    """`lora_checkpointing` on CUDA in fp16, on the UNet an editor prepares (channels-last, frozen
    convolutions, lean blocks, shared casts; `fused`: with the fused Triton kernels): with its step replayed
    as a CUDA graph it trains as the step that keeps its activations does (within the graphed-vs-eager
    bounds above; the half norms' recomputation must run as their forward did, or checkpoint's metadata
    check fails), and an eager step at 64x64 latents peaks lower."""
    from types import SimpleNamespace

    from fastdrag import DragEditor
    from fastdrag.config import LoraConfig
    from fastdrag.lora import LoraTrainer, adapter_state

    monkeypatch.setenv("FASTDRAG_HALF_NORMS", "1" if setting == "half-norms" else "0")
    editor = DragEditor.from_pretrained("tiny", device="cuda", dtype="fp16", progress=False,
                                        fused_unet_kernels=setting == "fused")
    unet = editor.components.unet
    generator = torch.Generator().manual_seed(8)
    text = torch.randn(1, 77, 32, generator=generator).to("cuda", torch.float16)

    def posterior(side):
        return SimpleNamespace(mean=torch.randn(1, 4, side, side, generator=generator).cuda(),
                               std=(torch.rand(1, 4, side, side, generator=generator) * 0.1).cuda())

    small = posterior(8)

    def train(checkpointing):
        trainer = LoraTrainer(unet, editor.components.scheduler, small, text, editor.components.scaling_factor,
                              LoraConfig(), seed=5, cuda_graph=True, checkpointing=checkpointing)
        start = {k: v.detach().float().cpu() for k, v in adapter_state(unet).items()}
        losses = torch.stack([trainer.step() for _ in range(8)]).cpu()
        replayed = trainer.graph is not None
        trainer.finish()
        return losses, {k: v.detach().float().cpu() - start[k] for k, v in adapter_state(unet).items()}, replayed

    losses, change, replayed = train(False)
    checkpointed_losses, checkpointed_change, checkpointed_replayed = train(True)
    assert replayed and checkpointed_replayed and torch.isfinite(checkpointed_losses).all()
    torch.testing.assert_close(checkpointed_losses, losses, rtol=2e-2, atol=2e-2)
    kept_all = torch.cat([v.flatten() for v in change.values()])
    checkpointed_all = torch.cat([checkpointed_change[k].flatten() for k in change])
    assert kept_all.abs().max() > 0
    assert ((checkpointed_all - kept_all).norm() / kept_all.norm()).item() < 0.1

    large = posterior(64)

    def peak(checkpointing):
        trainer = LoraTrainer(unet, editor.components.scheduler, large, text, editor.components.scaling_factor,
                              LoraConfig(), seed=5, checkpointing=checkpointing)
        trainer.step()  # cuDNN's algorithm search and the norms' fp32 weights
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        trainer.step()
        torch.cuda.synchronize()
        trainer.finish()
        return torch.cuda.max_memory_allocated() - base

    kept_peak, checkpointed_peak = peak(False), peak(True)
    assert checkpointed_peak < 0.7 * kept_peak, (kept_peak / 2**20, checkpointed_peak / 2**20)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_guided_inversion_and_denoising_replay_their_doubled_batches_as_the_eager_ones_run(dtype, no_tf32):
    """`guidance_scale` through the graphed denoiser: inversion at batch 2 and the swapped pair at batch 4, each
    a graph of its own shape, give what the eager calls give."""
    from fastdrag.config import DenoiseConfig
    from fastdrag.ddim import DdimSchedule
    from fastdrag.denoise import denoise_pair
    from fastdrag.denoiser import TorchDenoiser
    from fastdrag.inversion import invert
    from fastdrag.models import build_tiny
    from fastdrag.vae import encode_prompt

    tiny = build_tiny().to("cuda", dtype)
    generator = torch.Generator().manual_seed(12)
    latents = torch.randn(1, 4, 8, 10, generator=generator).cuda()
    text = encode_prompt(tiny.tokenizer, tiny.text_encoder, "a cat")
    uncond = encode_prompt(tiny.tokenizer, tiny.text_encoder, "")
    schedule = DdimSchedule.from_scheduler(tiny.scheduler, 10, 7)
    guided = dict(progress=False, unconditional=uncond, guidance_scale=3.0)
    results = []
    for graphs in (False, True):
        denoiser = TorchDenoiser(tiny.unet, cuda_graphs=graphs)
        with torch.no_grad():
            z_t = invert(denoiser, latents, text, schedule, **guided)
            pair = denoise_pair(denoiser, z_t, z_t + 0.1, text, schedule, DenoiseConfig(), **guided)
        results.append((z_t.float().cpu(), pair.float().cpu()))
    (eager_z, eager_pair), (graph_z, graph_pair) = results
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    for got, want in ((graph_z, eager_z), (graph_pair, eager_pair)):
        assert torch.isfinite(got).all()
        assert ((got - want).norm() / want.norm()).item() < tolerance


def test_a_bound_onnx_runtime_run_reads_what_torch_wrote_last(tmp_path):
    """ONNX Runtime's CUDA provider runs on a stream of its own: bound to a tensor that torch's stream is
    still writing (queued behind a long sleep here), a run that did not wait would read the old zeros.
    `run_bound` waits for torch's stream, so the graph sees the ones."""
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu (ONNX Runtime's CUDA provider); this onnxruntime has only "
                    + ", ".join(ort.get_available_providers()))
    from test_export import _scaling_graph

    from fastdrag.export.runtime import run_bound

    shape = (64, 1024)
    spec = _scaling_graph(tmp_path / "scaling.onnx", shape)
    session = ort.InferenceSession(str(tmp_path / "scaling.onnx"),
                                   providers=[("CUDAExecutionProvider", {"device_id": torch.cuda.current_device()})])
    x = torch.zeros(shape, device="cuda", dtype=torch.float16)
    run_bound(session, spec, {"x": x})  # the session's first run (its allocations) before the race
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of the GPU's clock on torch's stream
    x.fill_(1.0)  # queued behind the sleep
    outputs = run_bound(session, spec, {"x": x})
    assert torch.equal(outputs["doubled"], torch.full(shape, 2.0, device="cuda", dtype=torch.float16))
    assert torch.equal(outputs["tripled"], torch.full(shape, 3.0, device="cuda"))
