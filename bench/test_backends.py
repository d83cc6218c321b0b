"""Denoiser backends: one inversion step (batch 1) and one reference-controlled denoising step
(batch 2) on torch, ONNX Runtime, and TensorRT where it runs, at the tiny model's shape; and one
drag iteration: PyTorch's drag loop against the exported drag graph (`unet_drag`) with the Adam
step in numpy, as `export/standalone.py` runs it; and what a new image's denoiser costs on the export
(its LoRA's weights into the graphs).

The exported graphs carry a freshly trained LoRA merged in (what an edit exports on first use).
"""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdrag.denoiser import TorchDenoiser


@pytest.fixture(scope="module")
def exported(tmp_path_factory, device, dtype):
    from fastdrag import DragEditor
    from fastdrag.demo import demo_case

    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime is not installed")
    from fastdrag.export import export_loaded

    folder = tmp_path_factory.mktemp("bench-export")
    editor = DragEditor.from_pretrained("tiny", device=device, dtype=dtype, cache_dir=folder / "cache", progress=False)
    case = demo_case()
    fmt = "tensorrt" if importlib.util.find_spec("tensorrt") and device.type == "cuda" else "onnx"
    config = editor.config.replace(lora_steps=1)
    lora_key, _ = editor.train_lora(case.image, case.prompt, lora_steps=1)  # (and leaves it loaded)
    # the UNet graphs alone, as an editor's backend exports them (no benchmark here runs the VAE's), and the drag's
    manifest = export_loaded(editor.components, lora_key, config.lora, case.image.size, editor.text_embeddings(case.prompt),
                             config, folder / "out", fmt, fp16=dtype == torch.float16, drag_points=1, vae_graphs=False)
    return editor, manifest


def denoiser_for(backend, editor, manifest):
    if backend == "torch":
        return TorchDenoiser(editor.components.unet)
    if backend == "tensorrt" and "engines" not in manifest.data:
        pytest.skip("TensorRT needs the tensorrt package and a CUDA GPU (not available here)")
    from fastdrag.export.runtime import load_denoiser

    return load_denoiser(backend, manifest, device=editor.device)


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


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_new_image_denoiser(benchmark, exported, device, backend):
    """What a new image costs an editor's exported backend on the shared export: its LoRA-merged weights
    put into the UNet graphs (ONNX Runtime: new sessions with initializer overrides; TensorRT: the engines
    loaded and refitted), where an export of its own would write the graphs again (and build engines)."""
    from fastdrag.export.runtime import load_denoiser

    editor, manifest = exported
    if backend == "tensorrt" and "engines" not in manifest.data:
        pytest.skip("TensorRT needs the tensorrt package and a CUDA GPU (not available here)")
    # the editor's own overrides of the loaded LoRA (the fixture's: any LoRA costs the same)
    overrides = editor._refit_overrides(manifest, editor.config)
    benchmark.group = "a new image's denoiser on the shared export (tiny, 64x64)"
    benchmark.extra_info["export_seconds"] = manifest.data["export_seconds"]  # what the first image's export took
    benchmark(lambda: load_denoiser(backend, manifest, overrides, device=device))


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "tensorrt"])
def test_drag_iteration(benchmark, exported, device, synchronize, backend):
    """One drag iteration (forward, tracking, loss, backward, Adam) with one point pair and a mask."""
    from fastdrag.config import DragConfig
    from fastdrag.ddim import DdimSchedule
    from fastdrag.drag import DragLoop
    from fastdrag.lora import merged_adapter

    editor, manifest = exported
    protocol = manifest.data["drag"]
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(*manifest.data["latent_shape"], generator=generator)
    text = torch.from_numpy(manifest.text_embedding().copy())
    handles, targets = torch.tensor([[10.0, 12.0]]), torch.tensor([[20.0, 25.0]])
    mask = torch.ones(1, 1, *latent.shape[2:])
    mask[..., :2, :] = 0
    benchmark.group = "drag iteration (1 point, mask, tiny, 64x64)"
    if backend == "torch":
        schedule = DdimSchedule.from_scheduler(editor.components.scheduler, 50, 35)
        unet = editor.components.unet
        with merged_adapter(unet):
            loop = DragLoop(unet, latent.to(device), protocol["timestep"], text.to(device, editor.dtype), handles,
                            targets, mask, schedule, DragConfig(drag_steps=10**6, reach_distance=0.0),
                            tuple(protocol["supervision_size"]), cuda_graph=device.type == "cuda")
            counter = iter(range(10**6))

            def step():
                loop.step(next(counter))
                synchronize()

            benchmark(step)
        return
    run = _graph_runner(backend, manifest, device)
    spec = importlib.util.spec_from_file_location("standalone", Path(__file__).resolve().parents[1] / "export" / "standalone.py")
    standalone = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(standalone)
    adam = standalone.Adam(protocol["lr"], protocol["adam"]["betas"], protocol["adam"]["eps"])
    channels = manifest.data["artifacts"]["unet_drag"]["inputs"][4]["shape"][1]
    state = {"latents": latent.numpy(), "handles": handles.numpy()}
    fixed = {"text_embeddings": text.float().numpy(), "targets": targets.numpy(), "x_prev0": latent.numpy(),
             "handle_features": np.zeros((1, channels), np.float32), "mask": mask.numpy(),
             "tracking": np.ones(1, np.float32)}

    def step():
        out = run({**fixed, **state})
        state["handles"] = out["tracked_handles"]
        state["latents"] = adam.step(state["latents"], out["grad"])

    benchmark(step)


def _graph_runner(backend, manifest, device):
    """The drag graph as a function of numpy feeds, on ONNX Runtime or as its TensorRT engine."""
    if backend == "tensorrt":
        if "engines" not in manifest.data:
            pytest.skip("TensorRT needs the tensorrt package and a CUDA GPU (not available here)")
        from fastdrag.export.tensorrt import Engine

        engine = Engine(manifest.folder / manifest.data["engines"]["unet_drag"]["file"])
        return lambda feed: {name: value.cpu().numpy() for name, value in engine.infer(
            {name: torch.from_numpy(value).to(device) for name, value in feed.items()}).items()}
    import onnxruntime as ort

    providers = (["CUDAExecutionProvider"] if device.type == "cuda" else []) + ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(manifest.path("unet_drag")), providers=providers)
    names = [output.name for output in session.get_outputs()]
    return lambda feed: dict(zip(names, session.run(None, feed), strict=True))
