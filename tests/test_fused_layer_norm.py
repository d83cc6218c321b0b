"""The fused LayerNorm kernel against an fp64 oracle (on the CPU under TRITON_INTERPRET=1)."""
import importlib.util

import pytest
import torch

from fastdrag import kernels
from fastdrag.kernels import reference

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the relative error allowed against the fp64 oracle of the rounded inputs: one rounding of the output
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

SHAPES = [
    (3, 7, 22),     # rows that do not fill the last program, a width that is not a power of two
    (2, 77, 40),    # many rows a program
    (1, 1, 5),      # one row
    (2, 9, 320),    # SD 1.5's narrowest width
    (5, 1030),      # a row wider than half a program's tile: two rows a program
]


@pytest.fixture(autouse=True)
def force_triton(monkeypatch):
    monkeypatch.setenv("FASTDRAG_FORCE_TRITON", "1")


def inputs(shape, dtype, seed, affine_grads=False):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * 3 + 40.0  # a mean far from 0: the variance is not E[x^2]
    weight = torch.randn(shape[-1], generator=generator)
    bias = torch.randn(shape[-1], generator=generator)
    x, weight, bias = (t.to(DEVICE, dtype) for t in (x, weight, bias))
    return x.requires_grad_(True), weight.requires_grad_(affine_grads), bias.requires_grad_(affine_grads)


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def oracle(x, weight, bias, dy):
    """Output and gradients of the stock operator in fp64 on the same (rounded) inputs."""
    exact = [t.detach().double().requires_grad_(True) for t in (x, weight, bias)]
    y = reference.layer_norm(exact[0], exact[1], exact[2], 1e-5)
    return (y, *torch.autograd.grad(y, exact, dy.double()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm_matches_the_oracle(shape, dtype):
    x, weight, bias = inputs(shape, dtype, seed=sum(shape), affine_grads=True)
    y = kernels.layer_norm(x, weight, bias, 1e-5)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(len(shape))).to(DEVICE, dtype)
    got = (y, *torch.autograd.grad(y, (x, weight, bias), dy))
    want = oracle(x, weight, bias, dy)
    assert y.dtype == dtype and y.shape == x.shape
    for name, g, w in zip(("y", "dx", "dweight", "dbias"), got, want, strict=True):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        assert relative_error(g, w) <= TOLERANCE[dtype], (name, relative_error(g, w))


@pytest.mark.skipif(DEVICE == "cpu", reason="SD 1.5 sizes take minutes under Triton's interpreter: run on a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 4096, 320), (4, 1024, 640), (4, 256, 1280), (1, 64, 1280)])
def test_layer_norm_at_sd15_sizes(shape, dtype):
    test_layer_norm_matches_the_oracle(shape, dtype)


def test_frozen_weights_get_no_gradient_and_the_input_gradient_is_the_same():
    x, weight, bias = inputs((4, 6, 24), torch.float32, seed=3)
    y = kernels.layer_norm(x, weight, bias, 1e-5)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    (dx,) = torch.autograd.grad(y, x, dy)
    x_exact = x.detach().double().requires_grad_(True)
    (dx_want,) = torch.autograd.grad(reference.layer_norm(x_exact, weight.double(), bias.double(), 1e-5), x_exact,
                                     dy.double())
    assert weight.grad is None and relative_error(dx, dx_want) <= 1e-5


def test_an_empty_input_takes_the_stock_operator():
    x = torch.empty(2, 0, 24, device=DEVICE, requires_grad=True)
    weight, bias = torch.ones(24, device=DEVICE), torch.zeros(24, device=DEVICE)
    y = kernels.layer_norm(x, weight, bias, 1e-5)
    assert y.shape == x.shape and y.grad_fn.name() == "NativeLayerNormBackward0"


def test_strided_input_and_no_affine_weights():
    """A transposed input (no unit stride on the normalised axis) and a LayerNorm without weights."""
    generator = torch.Generator().manual_seed(6)
    wide = torch.randn(10, 3, 7, generator=generator).to(DEVICE).requires_grad_(True)
    x = wide.transpose(0, 2)  # (7, 3, 10), the normalised axis strided
    y = kernels.layer_norm(x, None, None, 1e-6)
    dy = torch.randn(y.shape, generator=generator).to(DEVICE)
    (dx,) = torch.autograd.grad(y, wide, dy)
    exact = wide.detach().double().requires_grad_(True)
    y_want = reference.layer_norm(exact.transpose(0, 2), None, None, 1e-6)
    (dx_want,) = torch.autograd.grad(y_want, exact, dy.double())
    assert relative_error(y, y_want) <= 1e-5 and relative_error(dx, dx_want) <= 1e-5


def test_half_precision_output_is_autocasts_fp32_layer_norm_rounded_once():
    """Under CUDA autocast the stock LayerNorm computes in fp32 and its readers round its output to half
    precision: the kernel's half output is that value, within the fp32 statistics' last bits."""
    x, weight, bias = inputs((3, 50, 64), torch.float16, seed=7)
    fused = kernels.layer_norm(x, weight, bias, 1e-5)
    autocast_like = reference.layer_norm(x.detach().float(), weight.float(), bias.float(), 1e-5).half()
    differ = (fused != autocast_like).sum().item()
    assert differ <= fused.numel() // 100, differ  # an element whose fp32 value lies at a rounding boundary
    one_ulp = (autocast_like.float().abs() * 2.0 ** -10).clamp_min(2.0 ** -24)
    assert ((fused.float() - autocast_like.float()).abs() <= one_ulp).all()


def test_it_keeps_only_its_input_and_two_floats_a_row():
    """Autocast's fp32 LayerNorm keeps an fp32 copy of its input; the kernel keeps the half input itself."""
    x, weight, bias = inputs((2, 33, 48), torch.float16, seed=8)
    kept = {}

    def pack(tensor):
        kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        kernels.layer_norm(x, weight, bias, 1e-5)
    rows = 2 * 33
    assert sum(kept.values()) == x.numel() * 2 + weight.numel() * 2 + 2 * rows * 4, kept
