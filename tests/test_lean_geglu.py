"""`fastdrag.lean_geglu`: a GEGLU that keeps only its projection, bit for bit the stock one."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.activations import GEGLU

from fastdrag.fused_blocks import install_fused_blocks, remove_fused_blocks
from fastdrag.lean_geglu import GegluProduct, geglu_product, install_lean_geglu, lean_geglu_count, remove_lean_geglu

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from op_count import cuda_like_autocast  # noqa: E402


def stock_product(projection):
    value, gate = projection.chunk(2, dim=-1)
    return value * F.gelu(gate)


def kept_bytes(fn, x):
    """`fn(x)` and the bytes of the distinct storages autograd keeps for its backward."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn(x)
    return out, sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 77, 2 * 37), (3, 33, 2 * 65), (1, 5, 2 * 3), (2, 96, 2 * 160)])
def test_the_product_and_its_gradient_are_the_stock_ones_bit_for_bit(dtype, shape):
    generator = torch.Generator().manual_seed(sum(shape))
    projection = torch.randn(shape, generator=generator).mul(3).to(dtype).requires_grad_(True)
    grad = torch.randn(shape[:-1] + (shape[-1] // 2,), generator=generator).to(dtype)
    stock = stock_product(projection)
    (stock_grad,) = torch.autograd.grad(stock, projection, grad)
    lean = geglu_product(projection)
    assert type(lean.grad_fn).__name__ == "GegluProductBackward"
    (lean_grad,) = torch.autograd.grad(lean, projection, grad)
    assert torch.isfinite(stock_grad).all() and stock_grad.abs().sum() > 0
    assert torch.equal(lean, stock) and torch.equal(lean_grad, stock_grad)
    assert lean_grad.is_contiguous()


def test_it_keeps_the_projection_alone():
    """The stock product keeps the projection and the GELU's output: half the projection's size more."""
    projection = torch.randn(2, 50, 2 * 48, requires_grad=True)
    _, stock = kept_bytes(stock_product, projection)
    _, lean = kept_bytes(GegluProduct.apply, projection)
    size = projection.numel() * projection.element_size()
    assert lean == size and stock == size + size // 2


def test_it_steps_aside_where_there_is_no_backward_or_the_projection_is_strided():
    projection = torch.randn(2, 9, 2 * 11)
    with torch.no_grad():
        assert geglu_product(projection.requires_grad_(True)).grad_fn is None
    assert geglu_product(torch.randn(2, 9, 22)).grad_fn is None
    strided = torch.randn(2, 22, 9, requires_grad=True).transpose(1, 2)
    out = geglu_product(strided)
    assert type(out.grad_fn).__name__ == "MulBackward0" and torch.equal(out, stock_product(strided))


def geglu_module(seed=0):
    torch.manual_seed(seed)
    module = GEGLU(24, 40)
    with torch.no_grad():
        module.proj.bias.normal_()
    return module


@pytest.mark.parametrize("autocast", [False, True])
def test_the_lean_module_computes_the_stock_forward_and_gradients(autocast):
    """Input and weight gradients of a GEGLU module, fp32 and under (CUDA-like) bf16 autocast."""
    module = geglu_module()
    x = torch.randn(3, 17, 24, requires_grad=True)
    grad = torch.randn(3, 17, 40)

    def run():
        with cuda_like_autocast(torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False):
            out = module(x)
        return [out, *torch.autograd.grad(out, (x, module.proj.weight, module.proj.bias), grad.to(out.dtype))]

    stock = run()
    assert install_lean_geglu(module) == lean_geglu_count(module) == 1
    lean = run()
    assert stock[0].dtype == (torch.bfloat16 if autocast else torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(lean, stock, strict=True))
    assert remove_lean_geglu(module) == 1 and lean_geglu_count(module) == 0
    assert "forward" not in vars(module)


def test_the_fused_geglu_takes_over_and_gives_the_lean_forward_back():
    module = geglu_module()
    install_lean_geglu(module)
    install_fused_blocks(module, group_norm=False)
    assert lean_geglu_count(module) == 0
    assert install_lean_geglu(module) == 0  # a fused GEGLU stays fused
    assert remove_fused_blocks(module) == 1
    assert lean_geglu_count(module) == 1


def test_it_refuses_a_second_derivative():
    projection = torch.randn(2, 4, 6, requires_grad=True)
    (grad,) = torch.autograd.grad(GegluProduct.apply(projection).sum(), projection, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()
