"""Regional `torch.compile` (opt-in `compile_blocks`): the compiled residual and feed-forward blocks
compute what the eager ones do, forward and input gradient; a new adapter or a second edit compiles
nothing new; the LoRA, the inversion and the denoising come out as the eager ones do; export
traces plain modules.

Whole drags are not compared image for image: the tiny model's random features make the drag
chaotic (Adam's first steps are about lr * sign(grad), so a 1e-7 difference in a near-zero
gradient element becomes an lr-sized change of the latent), and the two paths differ by that
much. The drag's own arithmetic is checked through the gradient above; whether compiled edits
score the same is the toy quality benchmark's question (`fastdrag toy eval --compile-blocks`)."""
import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from fastdrag.errors import ConfigError
from fastdrag.regional_compile import BLOCK_TYPES, check_compile_support, compile_blocks, is_compiled


def _why_not_compilable() -> str:
    try:
        check_compile_support(torch.device("cpu"))
    except ConfigError as exc:
        return str(exc)
    return ""


_NOT_COMPILABLE = _why_not_compilable()  # one probe of the compiler, not one per use
needs_compiler = pytest.mark.skipif(bool(_NOT_COMPILABLE), reason=_NOT_COMPILABLE or "-")


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def forward_and_input_grad(unet, latents, text):
    latents = latents.clone().requires_grad_(True)
    eps = unet(latents, 681, encoder_hidden_states=text).sample
    weights = torch.linspace(-1.0, 1.0, eps.numel()).view_as(eps)  # a loss whose gradient is not uniform
    (eps * weights).sum().backward()
    return eps.detach(), latents.grad


@needs_compiler
def test_compiled_blocks_match_the_eager_ones_and_compile_once():
    from fastdrag.lora import install_adapter
    from fastdrag.config import LoraConfig
    from fastdrag.models import load_components

    unet = load_components("tiny", device=torch.device("cpu"), dtype=torch.float32).unet.eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(5)
    latents = torch.randn(1, 4, 8, 12, generator=generator)  # not square, not a power of two across
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    install_adapter(unet, LoraConfig(), seed=1)
    for name, param in unet.named_parameters():  # a trained-looking adapter: lora_B starts at zero
        if "lora_B" in name:
            param.data.normal_(0, 0.05, generator=generator)
    eager_eps, eager_grad = forward_and_input_grad(unet, latents, text)

    count = compile_blocks(unet)
    assert count == sum(isinstance(m, BLOCK_TYPES) for m in unet.modules()) > 0
    assert all(is_compiled(m) for m in unet.modules() if isinstance(m, BLOCK_TYPES))
    eps, grad = forward_and_input_grad(unet, latents, text)
    for got, want in ((eps, eager_eps), (grad, eager_grad)):
        assert torch.isfinite(got).all()
        assert torch.linalg.norm(got - want) <= 1e-5 * torch.linalg.norm(want)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    graphs = compiled_graphs()
    install_adapter(unet, LoraConfig(), seed=2)  # the next image's adapter: new LoRA weights, same blocks
    forward_and_input_grad(unet, latents + 0.5, text)
    assert compiled_graphs() == graphs


@needs_compiler
def test_a_compiled_editor_edits_like_an_eager_one_and_exports_plain_modules(picture, tmp_path, fast):
    from fastdrag import DragEditor
    from fastdrag.export.merge import merged_unet
    from fastdrag.lora import adapter_state

    plain = DragEditor.from_pretrained("tiny", device="cpu", cache_dir=tmp_path / "a", progress=False)
    compiled = DragEditor.from_pretrained("tiny", device="cpu", cache_dir=tmp_path / "b", progress=False,
                                          compile_blocks=True)
    no_drag = {**fast, "drag_steps": 0}  # LoRA training, inversion and reference-controlled denoising
    first = plain.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, **no_drag)
    second = compiled.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, **no_drag)
    for name, value in adapter_state(plain.components.unet).items():
        torch.testing.assert_close(adapter_state(compiled.components.unet)[name], value, rtol=1e-4, atol=1e-5)
    difference = np.abs(np.asarray(first.image, dtype=np.float32) - np.asarray(second.image, dtype=np.float32))
    assert difference.max() <= 1, difference.max()

    compiled.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, seed=3, **fast)  # compiles the drag's
    graphs = compiled_graphs()
    compiled.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, seed=4, **fast)  # a new LoRA
    assert compiled_graphs() == graphs
    # `lora_checkpointing`: the compiled blocks run again in the backward, as compiled; the adapter is the
    # eager editor's, and nothing new compiles
    settings = dict(seed=5, lora_steps=fast["lora_steps"])
    compiled.train_lora(picture.image, picture.prompt, lora_checkpointing=True, **settings)
    plain.train_lora(picture.image, picture.prompt, **settings)
    for name, value in adapter_state(plain.components.unet).items():
        torch.testing.assert_close(adapter_state(compiled.components.unet)[name], value, rtol=1e-4, atol=1e-5)
    assert compiled_graphs() == graphs

    merged = merged_unet(compiled.components.unet)
    assert not any(is_compiled(m) for m in merged.modules())
    assert any(is_compiled(m) for m in compiled.components.unet.modules())  # the editor's own UNet stays compiled


def test_a_missing_compiler_is_named_before_any_edit(monkeypatch):
    from torch._inductor import cpp_builder

    from fastdrag.models import load_components

    unet = load_components("tiny", device=torch.device("cpu"), dtype=torch.float32).unet

    def no_compiler():
        raise RuntimeError("No working C++ compiler found in ('g++',)")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.raises(ConfigError, match=r"needs a C\+\+ compiler .*No working C\+\+ compiler found"):
        compile_blocks(unet)
    assert not any(is_compiled(m) for m in unet.modules())  # nothing half-done
