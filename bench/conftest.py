"""Options of the benchmark suites: `pytest bench/ --benchmark-only [--device cuda] [--dtype fp16]`."""
import os

import pytest
import torch


def pytest_addoption(parser):
    group = parser.getgroup("fastdrag benchmarks")
    group.addoption("--device", default=None, help="cpu or cuda (default: cuda if available)")
    group.addoption("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on CUDA, fp32 on CPU)")


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
