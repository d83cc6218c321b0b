"""Triton kernels against the PyTorch references (on the CPU under TRITON_INTERPRET=1)."""
import importlib.util
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from fastdrag import kernels
from fastdrag.kernels import reference

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def force_triton(monkeypatch):
    monkeypatch.setenv("FASTDRAG_FORCE_TRITON", "1")


def fused():
    from fastdrag.kernels.mask_term import masked_l1
    from fastdrag.kernels.motion_supervision import motion_supervision_loss
    from fastdrag.kernels.point_tracking import point_features, track_points
    return motion_supervision_loss, track_points, point_features, masked_l1


def edge_points(n, height, width, generator):
    """Handles on and next to every border and corner, two overlapping patches, targets in all directions."""
    special = [(0, 0), (height - 1, width - 1), (0, width // 2), (height // 2, 0), (1, width - 2), (height - 2, 1),
               (height // 2, width // 2), (height // 2, width // 2 + 1)]
    shifts = [(0, 5), (5, 0), (0, -4), (-6, 0), (3, 3), (-3, 4), (4, -7), (1, 1)]  # the last one: closer than 2
    handles = torch.tensor(special[:n], dtype=torch.float32)
    if n > len(special):
        extra = torch.rand(n - len(special), 2, generator=generator) * torch.tensor([height - 1, width - 1])
        handles = torch.cat([handles, extra.round()])
    offsets = torch.tensor([shifts[i % len(shifts)] for i in range(n)], dtype=torch.float32)
    targets = handles + offsets
    targets[:, 0] = targets[:, 0].clamp(0, height - 1)
    targets[:, 1] = targets[:, 1].clamp(0, width - 1)
    return handles.to(DEVICE), targets.to(DEVICE)


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


CASES = [
    # channels, native (h, w), supervision size, pairs
    (37, (13, 17), (27, 35), 3),
    (37, (13, 17), None, 8),
    (640, (13, 17), (27, 35), 1),
    (200, (11, 10), (20, 23), 8),  # two channel blocks, the second part full, for every pair
    (8, (64, 64), (256, 256), 8),   # the SD 1.5 geometry at a reduced channel count
]


@pytest.mark.parametrize("channels, native, size, n", CASES)
def test_motion_loss_value_and_gradient(channels, native, size, n):
    motion_supervision_loss, *_ = fused()
    generator = torch.Generator().manual_seed(channels * 31 + n)
    feat = torch.randn(1, channels, *native, generator=generator).to(DEVICE).requires_grad_(True)
    handles, targets = edge_points(n, *(size or native), generator)
    expected = reference.motion_supervision_loss(feat, handles, targets, 1, size)
    value = motion_supervision_loss(feat, handles, targets, 1, size)
    assert torch.isfinite(value) and value > 0
    assert relative_error(value, expected) <= 1e-5, (value.item(), expected.item())
    (grad_expected,) = torch.autograd.grad(expected, feat)
    (grad,) = torch.autograd.grad(value, feat)
    assert torch.isfinite(grad).all()
    worst = (grad - grad_expected).abs().flatten().argmax().item()
    assert relative_error(grad, grad_expected) <= 1e-5, (relative_error(grad, grad_expected), worst,
                                                         grad.flatten()[worst].item(), grad_expected.flatten()[worst].item())


def test_motion_loss_gradient_does_not_depend_on_rounding(monkeypatch):
    """At 4x upsampling the border rows and columns repeat, so border patches hold exact ties where
    rounding alone (FMA on a GPU, fp64 here) would pick the sign of |x|'s slope. Ties get slope 0 on
    every path: the fp32 kernel and the fp32 reference match an fp64 reference."""
    motion_supervision_loss, *_ = fused()
    generator = torch.Generator().manual_seed(8 * 31 + 8)
    feat = torch.randn(1, 8, 64, 64, generator=generator).to(DEVICE).requires_grad_(True)
    handles, targets = edge_points(8, 256, 256, generator)
    exact = feat.detach().double().requires_grad_(True)
    (oracle,) = torch.autograd.grad(reference.motion_supervision_loss(exact, handles, targets, 1, (256, 256)), exact)
    for loss_fn in (motion_supervision_loss, reference.motion_supervision_loss):
        (grad,) = torch.autograd.grad(loss_fn(feat, handles, targets, 1, (256, 256)), feat)
        assert relative_error(grad, oracle) <= 1e-5, loss_fn
    # the case does hold ties: with a plain |x| the reference disagrees with itself across precisions
    monkeypatch.setattr(reference, "tie_safe_abs", lambda fixed, moved: (fixed - moved).abs())
    (plain32,) = torch.autograd.grad(reference.motion_supervision_loss(feat, handles, targets, 1, (256, 256)), feat)
    (plain64,) = torch.autograd.grad(reference.motion_supervision_loss(exact, handles, targets, 1, (256, 256)), exact)
    assert relative_error(plain32, plain64) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_motion_loss_half_precision_maps(dtype):
    if DEVICE == "cuda" and dtype == torch.bfloat16:
        # this case never finished on the first H100 run (Triton 3.6): run it where a hang fails the
        # test instead of stopping the suite
        code = f"import runpy, torch; runpy.run_path({__file__!r})['half_precision_case'](torch.bfloat16)"
        env = {**os.environ, "FASTDRAG_FORCE_TRITON": "1"}
        try:  # within bench/gpu_session.sh's per-test limit (100 s), so a hang fails this test only
            run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the bf16 motion loss did not finish in 60 s on this GPU")
        assert run.returncode == 0, run.stderr[-3000:]
        return
    half_precision_case(dtype)


def half_precision_case(dtype):
    motion_supervision_loss, *_ = fused()
    generator = torch.Generator().manual_seed(7)
    feat = torch.randn(1, 37, 13, 17, generator=generator).to(DEVICE, dtype).requires_grad_(True)
    handles, targets = edge_points(3, 27, 35, generator)
    # the kernels accumulate in fp32: compare with the fp32 reference on the same (rounded) values
    feat32 = feat.detach().float().requires_grad_(True)
    expected = reference.motion_supervision_loss(feat32, handles, targets, 1, (27, 35))
    value = motion_supervision_loss(feat, handles, targets, 1, (27, 35))
    (grad_expected,) = torch.autograd.grad(expected, feat32)
    (grad,) = torch.autograd.grad(value, feat)
    assert grad.dtype == dtype and torch.isfinite(grad.float()).all()
    assert relative_error(value, expected) <= TOLERANCE[dtype]
    assert relative_error(grad, grad_expected) <= TOLERANCE[dtype]


@pytest.mark.parametrize("r_m", [0, 2])
def test_motion_loss_other_patch_radii(r_m):
    motion_supervision_loss, *_ = fused()
    generator = torch.Generator().manual_seed(r_m)
    feat = torch.randn(1, 19, 9, 12, generator=generator).to(DEVICE).requires_grad_(True)
    handles, targets = edge_points(4, 17, 25, generator)
    expected = reference.motion_supervision_loss(feat, handles, targets, r_m, (17, 25))
    value = motion_supervision_loss(feat, handles, targets, r_m, (17, 25))
    assert relative_error(value, expected) <= 1e-5
    assert relative_error(torch.autograd.grad(value, feat)[0], torch.autograd.grad(expected, feat)[0]) <= 1e-5


def test_pairs_within_two_contribute_nothing():
    motion_supervision_loss, *_ = fused()
    feat = torch.randn(1, 16, 10, 10, generator=torch.Generator().manual_seed(0)).to(DEVICE).requires_grad_(True)
    handles = torch.tensor([[3.0, 3.0], [6.0, 6.0]], device=DEVICE)
    value = motion_supervision_loss(feat, handles, handles + torch.tensor([[1.0, 1.0], [0.0, 1.0]], device=DEVICE))
    (grad,) = torch.autograd.grad(value, feat)
    assert value.item() == 0 and grad.abs().max().item() == 0


@pytest.mark.parametrize("channels, native, size, n", CASES)
def test_track_points_identical_positions(channels, native, size, n):
    _, track_points, point_features, _ = fused()
    generator = torch.Generator().manual_seed(channels + n)
    feat0 = torch.randn(1, channels, *native, generator=generator).to(DEVICE)
    feat = feat0 + 0.3 * torch.randn(1, channels, *native, generator=generator).to(DEVICE)
    handles, _ = edge_points(n, *(size or native), generator)
    handle_feats = point_features(feat0, handles, size)
    assert relative_error(handle_feats, reference.point_features(feat0, handles, size)) <= 1e-5
    moved = track_points(feat, handle_feats, handles, 3, size)
    assert torch.equal(moved, reference.track_points(feat, handle_feats, handles, 3, size))
    assert moved.device == handles.device


def test_track_points_ties_first_in_row_major_order():
    _, track_points, _, _ = fused()
    feat = torch.zeros(1, 3, 10, 10, device=DEVICE)
    feat[0, :, 4, 6] = 1.0
    feat[0, :, 6, 2] = 1.0
    handles = torch.tensor([[5.0, 4.0]], device=DEVICE)
    moved = track_points(feat, torch.ones(1, 3, device=DEVICE), handles, 3)
    assert moved.tolist() == [[4.0, 6.0]] == reference.track_points(feat, torch.ones(1, 3, device=DEVICE), handles, 3).tolist()


@pytest.mark.parametrize("mask_kind", ["random", "zeros", "ones"])
def test_masked_l1_value_and_gradient(mask_kind):
    *_, masked_l1 = fused()
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(1, 4, 37, 29, generator=generator).to(DEVICE).requires_grad_(True)
    x0 = torch.randn(1, 4, 37, 29, generator=generator).to(DEVICE)
    mask = {"random": (torch.rand(1, 1, 37, 29, generator=generator) > 0.5).float(),
            "zeros": torch.zeros(1, 1, 37, 29), "ones": torch.ones(1, 1, 37, 29)}[mask_kind].to(DEVICE)
    expected = reference.masked_l1(x, x0, mask)
    value = masked_l1(x, x0, mask)
    (grad_expected,) = torch.autograd.grad(expected, x)
    (grad,) = torch.autograd.grad(value, x)
    if mask_kind == "ones":
        assert value.item() == 0 and grad.abs().max().item() == 0
    else:
        assert relative_error(value, expected) <= 1e-5
        assert torch.equal(grad, grad_expected)


def test_dispatch(monkeypatch):
    cpu = torch.zeros(1)
    cuda_half, cuda_bf16 = SimpleNamespace(is_cuda=True, dtype=torch.float16), SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    assert kernels.uses_triton(cuda_bf16)  # forced: everything
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert kernels.uses_triton(cpu)
    else:  # (a GPU run compiles the kernels: CPU tensors cannot be forced there)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            kernels.uses_triton(cpu)
    monkeypatch.delenv("FASTDRAG_FORCE_TRITON")
    monkeypatch.delenv("FASTDRAG_KERNELS", raising=False)
    assert kernels.uses_triton(cuda_half) and kernels.uses_triton(cuda_bf16) and not kernels.uses_triton(cpu)  # default
    monkeypatch.setenv("FASTDRAG_KERNELS", "reference")
    assert not any(kernels.uses_triton(t) for t in (cpu, cuda_half, cuda_bf16))
    monkeypatch.setenv("FASTDRAG_KERNELS", "triton")
    assert kernels.uses_triton(cuda_half) and not kernels.uses_triton(cpu)
    monkeypatch.setenv("FASTDRAG_KERNELS", "fast")
    with pytest.raises(ValueError, match="FASTDRAG_KERNELS must be reference or triton"):
        kernels.uses_triton(cuda_half)


def test_whole_drag_gives_the_same_handles(tiny, picture, monkeypatch):
    from fastdrag.config import DragConfig
    from fastdrag.ddim import DdimSchedule
    from fastdrag.denoiser import TorchDenoiser
    from fastdrag.drag import drag
    from fastdrag.inputs import prepare_inputs
    from fastdrag.inversion import invert
    from fastdrag.vae import encode_posterior, encode_prompt

    inputs = prepare_inputs(picture.image, picture.points, picture.mask)
    text = encode_prompt(tiny.tokenizer, tiny.text_encoder, picture.prompt)
    z0 = encode_posterior(tiny.vae, inputs.image).mean * tiny.scaling_factor
    schedule = DdimSchedule.from_scheduler(tiny.scheduler, 20, 14)
    z_t = invert(TorchDenoiser(tiny.unet), z0, text, schedule, progress=False)
    unet = tiny.unet
    if DEVICE == "cuda":  # compiled kernels on the GPU against the references on the GPU
        import copy
        unet, z_t, text = copy.deepcopy(tiny.unet).cuda(), z_t.cuda(), text.cuda()
    run = lambda: drag(unet, z_t, schedule.drag_timestep, text, inputs.handles.to(DEVICE), inputs.targets.to(DEVICE),
                       inputs.mask.to(DEVICE), schedule, DragConfig(drag_steps=12), inputs.sup_res, progress=False)
    change = lambda result: result.latent - z_t
    with_triton = run()
    triton_again = run() if DEVICE == "cuda" else with_triton
    monkeypatch.delenv("FASTDRAG_FORCE_TRITON")
    monkeypatch.setenv("FASTDRAG_KERNELS", "reference")
    with_reference = run()
    reference_again = run() if DEVICE == "cuda" else with_reference
    assert with_triton.steps == with_reference.steps
    assert torch.equal(with_triton.handles, with_reference.handles)
    error = relative_error(change(with_triton), change(with_reference))
    # On the CPU every run is bit-reproducible. On a GPU the UNet's and the interpolation's backward
    # passes add in a varying order, and Adam's first steps (about lr * sign(grad)) turn that rounding
    # into lr-sized changes where a gradient is near zero: on an H100 the Triton and reference
    # latents were 2.5e-2 apart and the reference 9.7e-3 from itself. There the bound is each path
    # against itself, run again.
    run_to_run = max(relative_error(change(triton_again), change(with_triton)),
                     relative_error(change(reference_again), change(with_reference)))
    print(f"drag latent change, Triton vs reference: {error:.2e}; each against itself: up to {run_to_run:.2e}")
    assert error < max(1e-3, 3 * run_to_run)
