"""Denoisers that run the exported graphs: ONNX Runtime (CPU or CUDA) and TensorRT.

Both implement the `Denoiser` interface of `fastdrag.denoiser`: `__call__(latents, t, text)` runs
the batch-1 inversion graph (row by row for a larger batch), and inside `reference_control(...)`
a (source, edited) batch runs the batch-2 graph that carries the K/V swap.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch

from ..errors import ConfigError
from .manifest import Manifest

_NP = {"float32": np.float32, "float16": np.float16}
_TORCH = {"float32": torch.float32, "float16": torch.float16}


class _GraphDenoiser:
    """Shared logic: which graph answers a call, and the start-layer check."""

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.reference = False
        self.start_layer = int(manifest.data["artifacts"]["unet_reference"]["reference_control"]["start_layer"])

    def _run(self, graph: str, latents: torch.Tensor, timestep: int, text: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, latents: torch.Tensor, timestep: int, text_embeddings: torch.Tensor) -> torch.Tensor:
        if self.reference:
            if latents.shape[0] != 2:
                raise ValueError(f"the exported reference graph takes a batch of 2; got {latents.shape[0]}")
            return self._run("unet_reference", latents, timestep, text_embeddings)
        rows = [self._run("unet_inversion", latents[i:i + 1], timestep, text_embeddings[i:i + 1])
                for i in range(latents.shape[0])]
        return torch.cat(rows) if len(rows) > 1 else rows[0]

    @contextlib.contextmanager
    def reference_control(self, start_layer: int, backend: str = "auto") -> Iterator[None]:
        if start_layer != self.start_layer:
            raise ConfigError(f"the exported reference graph swaps K/V from layer {self.start_layer}, "
                              f"not {start_layer}: export again with that start_layer")
        self.reference = True
        try:
            yield
        finally:
            self.reference = False


class OnnxRuntimeDenoiser(_GraphDenoiser):
    """Runs the exported UNet graphs under ONNX Runtime; CUDA tensors are bound in place (no host copy)."""

    def __init__(self, manifest: Manifest, providers: Optional[List[str]] = None,
                 overrides: Optional[Dict[str, Dict[str, np.ndarray]]] = None):
        """`overrides`: per graph, initializer name -> value to use instead of the file's (another
        image's LoRA-merged weights, from `fastdrag.export.refit`)."""
        import onnxruntime as ort

        super().__init__(manifest)
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.override_values = []  # ONNX Runtime reads them while its sessions live: keep them
        self.sessions = {}
        for name in ("unet_inversion", "unet_reference"):
            options = ort.SessionOptions()
            options.log_severity_level = 3
            for initializer, array in (overrides or {}).get(name, {}).items():
                value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
                self.override_values.append(value)
                options.add_initializer(initializer, value)
            self.sessions[name] = ort.InferenceSession(str(manifest.path(name)), options, providers=providers)
        self.specs = manifest.graphs

    def _run(self, graph: str, latents: torch.Tensor, timestep: int, text: torch.Tensor) -> torch.Tensor:
        spec = self.specs[graph]
        dtypes = {t.name: t.dtype for t in spec.inputs}
        session = self.sessions[graph]
        feeds = {"latents": latents, "timestep": torch.full((1,), float(timestep), device=latents.device),
                 "text_embeddings": text}
        if latents.is_cuda and "CUDAExecutionProvider" in session.get_providers():
            binding = session.io_binding()
            keep = []
            for name, tensor in feeds.items():
                tensor = tensor.to(_TORCH[dtypes[name]]).contiguous()
                keep.append(tensor)
                binding.bind_input(name, "cuda", tensor.device.index or 0, _NP[dtypes[name]], tuple(tensor.shape), tensor.data_ptr())
            out_spec = spec.outputs[0]
            out = torch.empty(out_spec.shape, dtype=_TORCH[out_spec.dtype], device=latents.device)
            binding.bind_output(out_spec.name, "cuda", out.device.index or 0, _NP[out_spec.dtype], tuple(out.shape), out.data_ptr())
            session.run_with_iobinding(binding)
            return out.to(latents.dtype)
        arrays = {name: tensor.detach().cpu().numpy().astype(_NP[dtypes[name]]) for name, tensor in feeds.items()}
        (eps,) = session.run(None, arrays)
        return torch.from_numpy(eps).to(device=latents.device, dtype=latents.dtype)


class TensorRTDenoiser(_GraphDenoiser):
    """Runs the TensorRT engines built from the exported UNet graphs (CUDA tensors in place)."""

    def __init__(self, manifest: Manifest):
        from .tensorrt import Engine

        super().__init__(manifest)
        engines = manifest.data.get("engines", {})
        missing = [name for name in ("unet_inversion", "unet_reference") if name not in engines]
        if missing:
            raise ConfigError(f"{manifest.folder} has no TensorRT engines for {', '.join(missing)}: export with --format tensorrt")
        self.engines = {name: Engine(manifest.folder / engines[name]["file"]) for name in ("unet_inversion", "unet_reference")}

    def _run(self, graph: str, latents: torch.Tensor, timestep: int, text: torch.Tensor) -> torch.Tensor:
        engine = self.engines[graph]
        dtype = engine.inputs["latents"][1]
        feed = {"latents": latents.to(dtype), "timestep": torch.full((1,), float(timestep), device=latents.device),
                "text_embeddings": text.to(dtype)}
        return engine.infer(feed)["eps"].to(latents.dtype).clone()


def load_denoiser(backend: str, manifest: Manifest, overrides: Optional[Dict[str, Dict[str, np.ndarray]]] = None):
    """The exported-graph denoiser for `backend` ('onnxruntime' or 'tensorrt'); `overrides` (ONNX
    Runtime only) replace initializers of the UNet graphs, e.g. with another LoRA's weights."""
    if backend == "onnxruntime":
        return OnnxRuntimeDenoiser(manifest, overrides=overrides)
    if overrides:
        raise ConfigError(f"initializer overrides are for onnxruntime, not {backend!r}")
    if backend == "tensorrt":
        return TensorRTDenoiser(manifest)
    raise ConfigError(f"unknown backend {backend!r}; use torch, onnxruntime or tensorrt")
