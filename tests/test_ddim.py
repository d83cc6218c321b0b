import torch

from fastdrag.ddim import DdimSchedule, ddim_inversion_step, ddim_step
from fastdrag.denoiser import TorchDenoiser
from fastdrag.inversion import invert
from fastdrag.models import ddim_scheduler


def test_schedule_at_defaults():
    schedule = DdimSchedule.from_scheduler(ddim_scheduler(), 50, 35)
    assert schedule.timesteps[:2] == [981, 961] and schedule.timesteps[-1] == 1
    assert schedule.drag_timestep == 681
    assert len(schedule.denoise_timesteps) == 35 and schedule.denoise_timesteps[0] == 681
    assert schedule.inversion_timesteps[:3] == [1, 21, 41] and schedule.inversion_timesteps[-1] == 681


def test_ddim_step_matches_diffusers():
    scheduler = ddim_scheduler()
    schedule = DdimSchedule.from_scheduler(scheduler, 50, 35)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 7, 9, generator=generator, dtype=torch.float64)
    eps = torch.randn(2, 4, 7, 9, generator=generator, dtype=torch.float64)
    for t in (981, 681, 21, 1):
        expected = scheduler.step(eps, t, x).prev_sample
        torch.testing.assert_close(ddim_step(schedule, x, eps, t), expected, rtol=1e-6, atol=1e-6)


def test_inversion_step_inverts_the_step_for_a_fixed_eps():
    schedule = DdimSchedule.from_scheduler(ddim_scheduler(), 50, 35)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 5, 6, generator=generator, dtype=torch.float64)
    eps = torch.randn(1, 4, 5, 6, generator=generator, dtype=torch.float64)
    for t in (1, 341, 681):
        torch.testing.assert_close(ddim_step(schedule, ddim_inversion_step(schedule, x, eps, t), eps, t), x)


def _round_trip_error(denoiser, z0, text, steps):
    schedule = DdimSchedule.from_scheduler(ddim_scheduler(), steps, int(steps * 0.7))
    z_t = invert(denoiser, z0, text, schedule, progress=False)
    x = z_t
    for t in schedule.denoise_timesteps:
        x = ddim_step(schedule, x, denoiser(x, t, text), t)
    return ((x - z0).norm() / z0.norm()).item(), ((z_t - z0).norm() / z0.norm()).item()


def test_inversion_then_denoising_returns_to_the_latent(tiny):
    denoiser = TorchDenoiser(tiny.unet)
    generator = torch.Generator().manual_seed(2)
    z0 = torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 77, 32, generator=generator)
    error_50, moved = _round_trip_error(denoiser, z0, text, 50)
    error_200, _ = _round_trip_error(denoiser, z0, text, 200)
    assert moved > 0.5              # inversion really noised the latent ...
    assert error_50 < 0.1           # ... and denoising brought it back
    assert error_200 < error_50 / 2  # DDIM inversion error shrinks with the step size


def test_graph_cache_is_bounded(monkeypatch):
    """A server seeing many image sizes keeps at most MAX_GRAPHS captured UNet forwards (the capture is
    faked: the bookkeeping is what is tested; real captures are in tests/test_gpu.py)."""
    import fastdrag.denoiser as denoiser_module

    captured = []

    class FakeCapture:
        def __init__(self, unet, latents, text_embeddings, pool):
            captured.append(tuple(latents.shape))

        def __call__(self, latents, timestep, text_embeddings):
            return latents * 0

    monkeypatch.setattr(denoiser_module, "_CapturedForward", FakeCapture)
    monkeypatch.setattr(denoiser_module.torch.cuda, "graph_pool_handle", lambda: object())
    denoiser = TorchDenoiser(torch.nn.Identity(), cuda_graphs=True)
    text = torch.randn(1, 77, 8)
    limit = TorchDenoiser.MAX_GRAPHS
    for side in range(8, 8 + limit):
        denoiser._replay(torch.randn(1, 4, side, side), 500, text)
    denoiser._replay(torch.randn(1, 4, 8, 8), 400, text)  # seen: replayed, not captured again
    assert len(captured) == limit and len(denoiser.graphs) == limit
    denoiser._replay(torch.randn(1, 4, 99, 99), 500, text)  # one size more: the old graphs go
    assert len(captured) == limit + 1
    assert list(denoiser.graphs) == [((1, 4, 99, 99), (1, 77, 8), torch.device("cpu"), None)]


def test_noising_matches_the_scheduler(tiny):
    from fastdrag.ddim import noised

    generator = torch.Generator().manual_seed(7)
    latents, noise = torch.randn(5, 4, 6, 7, generator=generator), torch.randn(5, 4, 6, 7, generator=generator)
    timesteps = torch.tensor([0, 1, 499, 998, 999])
    torch.testing.assert_close(noised(latents, noise, timesteps, tiny.scheduler.alphas_cumprod),
                               tiny.scheduler.add_noise(latents, noise, timesteps), rtol=1e-6, atol=1e-6)
