"""Denoiser backends: one inversion step (batch 1) and one reference-controlled denoising step
(batch 2) on torch, ONNX Runtime, and TensorRT where it runs, at the tiny model's shape.

The exported graphs carry a freshly trained LoRA merged in (what an edit exports on first use).
"""
import importlib.util

import pytest
import torch

from fastdrag.denoiser import TorchDenoiser


@pytest.fixture(scope="module")
def exported(tmp_path_factory, device, dtype):
    from fastdrag import DragEditor
    from fastdrag.demo import demo_case

    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime is not installed")
    folder = tmp_path_factory.mktemp("bench-export")
    editor = DragEditor.from_pretrained("tiny", device=device, dtype=dtype, cache_dir=folder / "cache", progress=False)
    case = demo_case()
    fmt = "tensorrt" if importlib.util.find_spec("tensorrt") and device.type == "cuda" else "onnx"
    manifest = editor.export(case.image, case.prompt, folder / "out", fmt=fmt, fp16=dtype == torch.float16, lora_steps=1)
    return editor, manifest


def denoiser_for(backend, editor, manifest):
    if backend == "torch":
        return TorchDenoiser(editor.components.unet)
    if backend == "tensorrt" and "engines" not in manifest.data:
        pytest.skip("TensorRT needs the tensorrt package and a CUDA GPU (not available here)")
    from fastdrag.export.runtime import load_denoiser

    return load_denoiser(backend, manifest)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "tensorrt"])
def test_inversion_step(benchmark, exported, device, synchronize, backend):
    editor, manifest = exported
    denoiser = denoiser_for(backend, editor, manifest)
    latents = torch.randn(1, 4, 8, 8, device=device)
    text = torch.randn(1, 77, 32, device=device)
    benchmark.group = "inversion step (batch 1, tiny, 64x64)"

    def step():
        denoiser(latents, 421, text)
        synchronize()

    benchmark(step)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "tensorrt"])
def test_denoise_step(benchmark, exported, device, synchronize, backend):
    editor, manifest = exported
    denoiser = denoiser_for(backend, editor, manifest)
    latents = torch.randn(2, 4, 8, 8, device=device)
    text = torch.randn(2, 77, 32, device=device)
    benchmark.group = "reference-controlled denoising step (batch 2, tiny, 64x64)"

    def step():
        denoiser(latents, 421, text)
        synchronize()

    with denoiser.reference_control(manifest.data["reference_control"]["start_layer"]):
        benchmark(step)
