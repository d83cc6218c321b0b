"""Options of the benchmark suites: `pytest bench/ --benchmark-only [--device cuda] [--dtype fp16]
[--model sd15|sd21] [--size 512] [--fused-unet-kernels]`."""

import argparse

import pytest
import torch


def image_side(text: str) -> int:
    """--size: an image side in px, at least 64 (the editor works at a multiple of 64, at least 64: a smaller
    image would be timed at 64 px)."""
    side = int(text)
    if side < 64:
        raise argparse.ArgumentTypeError(f"the image side must be at least 64 px, got {side}")
    return side


def pytest_addoption(parser):
    group = parser.getgroup("fastdrag benchmarks")
    group.addoption("--device", default=None, help="cpu or cuda (default: cuda if available)")
    group.addoption("--dtype", default=None, choices=("fp32", "fp16", "bf16"),
                    help="fp32, fp16 or bf16 (default: fp16 on CUDA, fp32 on CPU)")
    group.addoption("--model", default="tiny", choices=("tiny", "sd15", "sd21"),
                    help="tiny, sd15: the SD 1.5 architecture with random weights (no download), or sd21: SD 2.1's "
                         "(768 px, v-prediction)")
    group.addoption("--size", type=image_side, default=None,
                    help="image side in pixels (default: 64 for tiny, 512 for sd15, 768 for sd21)")
    group.addoption("--fused-unet-kernels", action="store_true",
                    help="the stage benchmarks' UNet with its GroupNorm + SiLU and GEGLU as Triton kernels (fastdrag.fused_blocks)")


@pytest.fixture(scope="session")
def device(request):
    name = request.config.getoption("--device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@pytest.fixture(scope="session")
def dtype(request, device):
    name = request.config.getoption("--dtype") or ("fp16" if device.type == "cuda" else "fp32")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


@pytest.fixture(scope="session")
def synchronize(device):
    """A callable that waits for the device, so a benchmark times finished work."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def pytest_terminal_summary(terminalreporter, config):
    """A table of FLOPs and achieved TFLOP/s next to the times, for benchmarks that counted them."""
    session = getattr(config, "_benchmarksession", None)
    rows = [b for b in getattr(session, "benchmarks", []) if b and "TFLOP/s" in b.extra_info]
    if not rows:
        return
    terminalreporter.section("FLOPs and achieved rate")
    terminalreporter.write_line(f"{'benchmark':<48} {'mean ms':>10} {'TFLOP':>10} {'TFLOP/s':>9} {'peak GiB':>9}")
    for bench in rows:
        info = bench.extra_info
        peak = f"{info['peak_GiB']:>9.2f}" if "peak_GiB" in info else f"{'':>9}"
        terminalreporter.write_line(f"{bench.name:<48} {bench.stats.mean * 1e3:>10.2f} {info['TFLOP']:>10.4f} "
                                    f"{info['TFLOP/s']:>9.3f} {peak}")
