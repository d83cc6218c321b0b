"""The fused GEGLU kernel against an fp64 oracle (on the CPU under TRITON_INTERPRET=1)."""
import importlib.util

import pytest
import torch

from fastdrag import kernels
from fastdrag.kernels import reference

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def force_triton(monkeypatch):
    monkeypatch.setenv("FASTDRAG_FORCE_TRITON", "1")


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 22), (1, 1, 2), (2, 77, 2 * 160), (5, 1030)])
def test_geglu_matches_the_oracle(shape, dtype):
    generator = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=generator) * 2).to(DEVICE, dtype).requires_grad_(True)
    y = kernels.geglu(x)
    dy = torch.randn(y.shape, generator=generator).to(DEVICE, dtype)
    (dx,) = torch.autograd.grad(y, x, dy)
    exact = x.detach().double().requires_grad_(True)
    y_want = reference.geglu(exact)
    (dx_want,) = torch.autograd.grad(y_want, exact, dy.double())
    assert y.dtype == dtype and y.shape == (*shape[:-1], shape[-1] // 2) and dx.shape == x.shape
    for name, got, want in (("y", y, y_want), ("dx", dx, dx_want)):
        assert torch.isfinite(got).all(), name
        assert relative_error(got, want) <= TOLERANCE[dtype], (name, relative_error(got, want))


@pytest.mark.skipif(DEVICE == "cpu", reason="SD 1.5 sizes take minutes under Triton's interpreter: run on a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_geglu_at_the_sd15_size(dtype):
    test_geglu_matches_the_oracle((4, 4096, 2560), dtype)


def test_geglu_reads_a_strided_projection_and_refuses_an_odd_axis():
    generator = torch.Generator().manual_seed(4)
    wide = torch.randn(6, 5, 16, generator=generator).to(DEVICE)
    x = wide.transpose(0, 1)  # not contiguous
    assert relative_error(kernels.geglu(x), reference.geglu(x.double())) <= 1e-5
    with pytest.raises(ValueError, match="even last axis"):
        kernels.geglu(torch.randn(2, 5, device=DEVICE))


def test_half_precision_output_is_rounded_once():
    """The stock fp16 GEGLU rounds the GELU and then the product; the kernel rounds once."""
    x = (torch.randn(4, 64, 96, generator=torch.Generator().manual_seed(5)) * 2).to(DEVICE, torch.float16)
    exact = reference.geglu(x.double())
    stock = reference.geglu(x)
    assert relative_error(kernels.geglu(x), exact) < relative_error(stock, exact)
