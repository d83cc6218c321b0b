"""The fused GroupNorm(+SiLU) kernel against an fp64 oracle (on the CPU under TRITON_INTERPRET=1)."""
import importlib.util

import pytest
import torch

from fastdrag import kernels
from fastdrag.kernels import reference

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the relative error allowed against the fp64 oracle of the rounded inputs: one rounding of the output
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

CASES = [
    # shape, groups, channels-last, SiLU
    ((2, 12, 7, 9), 4, True, True),
    ((3, 30, 5, 6), 3, False, False),
    ((1, 40, 13, 17), 4, True, True),    # 10 channels per group, as SD 1.5's 320 in 32 groups
    ((2, 32, 19, 23), 2, True, False),   # 16 per group: the position loop runs twice
    ((1, 60, 5, 7), 2, True, True),      # 30 per group, as SD 1.5's 960 (an up block's concatenation)
    ((1, 8, 1, 1), 2, True, True),       # one position
    ((2, 6, 11), 3, False, True),        # one spatial axis
    ((3, 12), 4, False, True),           # none
]


@pytest.fixture(autouse=True)
def force_triton(monkeypatch):
    monkeypatch.setenv("FASTDRAG_FORCE_TRITON", "1")


def inputs(shape, channels_last, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * 3 + 1.5  # an offset mean: the variance is not E[x^2]
    weight = torch.randn(shape[1], generator=generator)
    bias = torch.randn(shape[1], generator=generator)
    x, weight, bias = (t.to(DEVICE, dtype) for t in (x, weight, bias))
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, weight, bias


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def oracle(x, groups, weight, bias, silu, dy):
    """Output and gradients of the stock operators in fp64 on the same (rounded) inputs."""
    exact = [t.detach().double().requires_grad_(True) for t in (x, weight, bias)]
    y = reference.group_norm(exact[0], groups, exact[1], exact[2], 1e-5, silu)
    return (y, *torch.autograd.grad(y, exact, dy.double()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape, groups, channels_last, silu", CASES)
def test_group_norm_matches_the_oracle(shape, groups, channels_last, silu, dtype):
    x, weight, bias = inputs(shape, channels_last, dtype, seed=sum(shape) + groups)
    for t in (x, weight, bias):
        t.requires_grad_(True)
    y = kernels.group_norm(x, groups, weight, bias, 1e-5, silu)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    grads = torch.autograd.grad(y, (x, weight, bias), dy)
    expected = oracle(x, groups, weight, bias, silu, dy)
    assert y.dtype == dtype and y.stride() == x.stride() and grads[0].stride() == x.stride()
    for name, got, want in zip(("y", "dx", "dweight", "dbias"), (y, *grads), expected, strict=True):
        assert torch.isfinite(got).all(), name
        assert relative_error(got, want) <= TOLERANCE[dtype], (name, relative_error(got, want))


@pytest.mark.skipif(DEVICE == "cpu", reason="SD 1.5 sizes take minutes under Triton's interpreter: run on a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape, channels_last", [((4, 320, 64, 64), True), ((1, 320, 64, 64), True),
                                                  ((2, 960, 32, 32), True), ((1, 2560, 8, 8), True),
                                                  ((2, 640, 32, 32), False)])
def test_group_norm_at_sd15_sizes(shape, channels_last, dtype):
    test_group_norm_matches_the_oracle(shape, 32, channels_last, True, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_output_is_rounded_once(dtype):
    """The stock half-precision GroupNorm rounds its output and the SiLU rounds again; the kernel
    rounds once from fp32, so it is closer to the exact value."""
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("Triton's interpreter truncates fp32 to bf16 (a GPU rounds to nearest): run on a GPU")
    x, weight, bias = inputs((2, 40, 13, 17), True, dtype, seed=3)
    exact = reference.group_norm(x.double(), 4, weight.double(), bias.double(), 1e-5, True)
    fused = kernels.group_norm(x, 4, weight, bias, 1e-5, silu=True)
    rounded_once = exact.to(dtype)
    assert (fused.double() - exact).abs().max() <= 2 * (rounded_once.double() - exact).abs().max()
    stock = reference.group_norm(x.float(), 4, weight.float(), bias.float(), 1e-5, False).to(dtype)
    stock = torch.nn.functional.silu(stock.float()).to(dtype).float().to(dtype)  # rounded after each operator
    assert relative_error(fused, exact) < relative_error(stock, exact)


def test_statistics_hold_for_a_mean_far_larger_than_the_spread():
    """The tiles' partial moments are combined by Chan's formula, not as E[x^2] - E[x]^2, which in
    fp32 puts a group's variance here 4 % low (2.31 for 2.40: a spread of a few units around 1000);
    a ramp down the rows gives the two tiles of each group different means, which the combination
    must account for."""
    generator = torch.Generator().manual_seed(11)
    ramp = torch.linspace(0, 4, 40).view(1, 1, 40, 1)
    x = (1000 + ramp + torch.randn(1, 8, 40, 50, generator=generator)).to(DEVICE).to(memory_format=torch.channels_last)
    weight, bias = torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE)
    y = kernels.group_norm(x, 2, weight, bias, 1e-5, False)
    assert relative_error(y, reference.group_norm(x.double(), 2, weight.double(), bias.double(), 1e-5)) <= 1e-3


def test_inputs_that_do_not_flatten_and_gradients_in_another_layout():
    x, weight, bias = inputs((2, 12, 7, 12), True, torch.float32, seed=5)
    sliced = x[..., :9].detach().requires_grad_(True)  # width 9 of 12: its positions do not flatten to one stride
    y = kernels.group_norm(sliced, 4, weight, bias, 1e-5, True)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE).contiguous()  # NCHW
    (dx,) = torch.autograd.grad(y, sliced, dy)
    y_want, dx_want, _, _ = oracle(sliced, 4, weight, bias, True, dy)
    assert relative_error(y, y_want) <= 1e-5 and relative_error(dx, dx_want) <= 1e-5


def test_without_affine_weights_and_with_frozen_ones():
    x, weight, bias = inputs((2, 12, 5, 7), False, torch.float32, seed=6)
    x.requires_grad_(True)
    y = kernels.group_norm(x, 3, None, None, 1e-5, True)
    ones, zeros = torch.ones_like(weight), torch.zeros_like(bias)
    assert relative_error(y, reference.group_norm(x.double(), 3, ones.double(), zeros.double(), 1e-5, True)) <= 1e-5
    frozen = kernels.group_norm(x, 3, weight, bias, 1e-5, True)
    frozen.sum().backward()
    assert weight.grad is None and bias.grad is None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_traced_graphs_get_the_stock_operators(monkeypatch):
    """Inside torch.compile or an export the dispatcher runs the reference, so graphs hold stock operators."""
    x, weight, bias = inputs((1, 8, 3, 3), False, torch.float32, seed=7)
    calls = []
    monkeypatch.setattr(reference, "group_norm", lambda *args: calls.append(args) or torch.zeros(()))
    kernels.group_norm(x, 2, weight, bias, 1e-5, True)
    assert calls == []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    kernels.group_norm(x, 2, weight, bias, 1e-5, True)
    assert len(calls) == 1
