"""Drag-loop kernels: fused Triton vs the PyTorch reference at the SD 1.5 shape.

C = 640 features at 64x64 read at 256x256, 1 to 8 pairs; forward + backward of the motion loss,
and point tracking. The fused GroupNorm + SiLU and GEGLU against the stock operators, at the LoRA
step's largest (1 and 4 x 320 x 64 x 64 channels-last; 4 x 4096 x 2560), under autocast as the step runs. Peak memory is recorded on CUDA. The fused kernels run only on a GPU (the
interpreter is no speed path), so on the CPU only the reference runs.
"""
import pytest
import torch

from fastdrag.kernels import reference

SIZE = (256, 256)


def inputs(device, dtype, pairs):
    generator = torch.Generator().manual_seed(pairs)
    feat = torch.randn(1, 640, 64, 64, generator=generator).to(device, dtype).requires_grad_(True)
    handles = (torch.rand(pairs, 2, generator=generator) * 200 + 28).round().to(device)
    targets = (handles + torch.tensor([9.0, -12.0], device=device)).clamp(0, 255)
    return feat, handles, targets


def implementation(kind, device):
    if kind == "reference":
        return reference.motion_supervision_loss, reference.track_points
    if device.type != "cuda":
        pytest.skip("the fused Triton kernels are benchmarked on a CUDA GPU only (none here)")
    from fastdrag.kernels.motion_supervision import motion_supervision_loss
    from fastdrag.kernels.point_tracking import track_points
    return motion_supervision_loss, track_points


def measure(benchmark, device, synchronize, fn):
    def run():
        fn()
        synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        benchmark.extra_info["peak_extra_MiB"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    benchmark(run)


@pytest.mark.parametrize("pairs", [1, 8])
@pytest.mark.parametrize("kind", ["reference", "fused"])
def test_motion_loss_forward_backward(benchmark, device, dtype, synchronize, kind, pairs):
    loss_fn, _ = implementation(kind, device)
    feat, handles, targets = inputs(device, dtype, pairs)
    benchmark.group = f"motion loss fwd+bwd, {pairs} pairs"

    def step():
        loss = loss_fn(feat, handles, targets, 1, SIZE)
        loss.backward()
        feat.grad = None

    measure(benchmark, device, synchronize, step)


@pytest.mark.parametrize("pairs", [1, 8])
@pytest.mark.parametrize("kind", ["reference", "fused"])
def test_track_points(benchmark, device, dtype, synchronize, kind, pairs):
    _, track_fn = implementation(kind, device)
    feat, handles, _ = inputs(device, dtype, pairs)
    feat = feat.detach()
    handle_feats = reference.point_features(feat, handles, SIZE)
    benchmark.group = f"track points, {pairs} pairs"
    measure(benchmark, device, synchronize, lambda: track_fn(feat, handle_feats, handles, 3, SIZE))


def drag_step(loss_fn, track_fn, feat, handles, targets, handle_feats):
    """What one drag iteration asks of the kernels: loss forward + backward, then tracking."""
    def step():
        loss_fn(feat, handles, targets, 1, SIZE).backward()
        feat.grad = None
        return track_fn(feat.detach(), handle_feats, handles, 3, SIZE)
    return step


@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "cuda-graph"])
@pytest.mark.parametrize("kind", ["reference", "fused"])
def test_loss_and_tracking(benchmark, device, dtype, synchronize, kind, graphed):
    """Loss fwd+bwd and tracking of 8 pairs together; replayed from a CUDA graph, the host's launch
    cost drops out and the device time is left (as in the graphed drag loop)."""
    loss_fn, track_fn = implementation(kind, device)
    if graphed and device.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA GPU (none here)")
    feat, handles, targets = inputs(device, dtype, 8)
    handle_feats = reference.point_features(feat.detach(), handles, SIZE)
    step = drag_step(loss_fn, track_fn, feat, handles, targets, handle_feats)
    benchmark.group = "loss + tracking, 8 pairs"
    if graphed:
        from fastdrag.cuda_graph import capture, on_side_stream

        with on_side_stream(torch.cuda.Stream(device)):
            for _ in range(3):
                step()
        graph = torch.cuda.CUDAGraph()
        with capture(graph):
            step()
        measure(benchmark, device, synchronize, graph.replay)
    else:
        measure(benchmark, device, synchronize, step)


def autocast_step(device, dtype, forward, x, dy):
    """A benchmark step: `forward()` under autocast (as the LoRA step and the drag run a UNet op), then
    the gradient of `x` for the output gradient `dy`."""
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast:
            y = forward()
        torch.autograd.grad(y, x, dy.to(y.dtype))
    return step


def record_bandwidth(benchmark, nbytes: int) -> None:
    """`nbytes` (the least the step must move) per second of the mean round, as GB/s."""
    if benchmark.stats is not None:
        benchmark.extra_info["GB/s (least traffic)"] = nbytes / benchmark.stats.stats.mean / 1e9


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("kind", ["stock", "fused", "fused-8-warps"])
def test_group_norm_silu_forward_backward(benchmark, device, dtype, synchronize, kind, batch, monkeypatch):
    """GroupNorm + SiLU of SD 1.5's first resnet block in a LoRA step (batch 4) or a drag iteration
    (batch 1): 320 channels in 32 groups at 64x64, channels-last, forward and input gradient under
    autocast (fp32 norms, stock). `fused-8-warps` runs the fused kernels with 8 warps a program
    instead of 4 (fewer registers a thread, more warps a multiprocessor: which is faster?).
    In a UNet the stock path pays more: the next convolution casts its fp32 output and copies it
    back to channels-last; that is not in this benchmark."""
    if kind != "stock" and device.type != "cuda":
        pytest.skip("the fused Triton kernels are benchmarked on a CUDA GPU only (none here)")

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 320, 64, 64, generator=generator).to(device, dtype).to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    weight, bias = torch.randn(320, generator=generator).to(device, dtype), torch.randn(320, generator=generator).to(device, dtype)
    dy = torch.randn(x.shape, generator=generator).to(device, dtype).to(memory_format=torch.channels_last)
    if kind != "stock":
        from fastdrag.kernels import fused_group_norm
        monkeypatch.setattr(fused_group_norm, "NUM_WARPS", 8 if kind == "fused-8-warps" else 4)
        norm = fused_group_norm.group_norm
    else:
        norm = reference.group_norm
    benchmark.group = f"GroupNorm + SiLU fwd+bwd, {batch}x320x64x64 channels-last"
    step = autocast_step(device, dtype, lambda: norm(x, 32, weight, bias, 1e-5, True), x, dy)
    measure(benchmark, device, synchronize, step)
    # the least any fwd+bwd moves (read x, write y, read dy, write dx), over the time: against the
    # memory's bandwidth, how far from it each path is
    record_bandwidth(benchmark, 4 * x.numel() * x.element_size())


@pytest.mark.parametrize("kind", ["stock", "fused"])
def test_geglu_forward_backward(benchmark, device, dtype, synchronize, kind):
    """GEGLU of SD 1.5's first feed-forward layer in a LoRA step: its 4 x 4096 x 2560 projection to
    the 1280-wide product, forward and input gradient under autocast."""
    if kind == "fused" and device.type != "cuda":
        pytest.skip("the fused Triton kernels are benchmarked on a CUDA GPU only (none here)")

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4096, 2560, generator=generator).to(device, dtype).requires_grad_(True)
    dy = torch.randn(4, 4096, 1280, generator=generator).to(device, dtype)
    if kind == "fused":
        from fastdrag.kernels.fused_geglu import geglu as gate
    else:
        gate = reference.geglu
    benchmark.group = "GEGLU fwd+bwd, 4x4096x2560"
    measure(benchmark, device, synchronize, autocast_step(device, dtype, lambda: gate(x), x, dy))
    record_bandwidth(benchmark, 2 * (x.numel() + dy.numel()) * x.element_size())  # read x and dy, write dx and y


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("kind", ["stock", "fused"])
def test_layer_norm_forward_backward(benchmark, device, dtype, synchronize, kind, batch):
    """A transformer block's LayerNorm at SD 1.5's widest token count in a LoRA step (batch 4) or a drag
    iteration (batch 1): 4096 tokens of 320 channels, forward and input gradient under autocast (fp32
    norm, stock). In a UNet the stock path also pays the cast of its fp32 output at its readers (once,
    with the lean blocks' shared casts); that is not in this benchmark."""
    if kind == "fused" and device.type != "cuda":
        pytest.skip("the fused Triton kernels are benchmarked on a CUDA GPU only (none here)")

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4096, 320, generator=generator).to(device, dtype).requires_grad_(True)
    weight, bias = torch.randn(320, generator=generator).to(device, dtype), torch.randn(320, generator=generator).to(device, dtype)
    dy = torch.randn(x.shape, generator=generator).to(device, dtype)
    if kind == "fused":
        from fastdrag.kernels.fused_layer_norm import layer_norm as norm
    else:
        norm = reference.layer_norm
    benchmark.group = f"LayerNorm fwd+bwd, {batch}x4096x320"
    measure(benchmark, device, synchronize, autocast_step(device, dtype, lambda: norm(x, weight, bias, 1e-5), x, dy))
    record_bandwidth(benchmark, 4 * x.numel() * x.element_size())  # read x and dy, write y and dx
