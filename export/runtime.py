"""Denoisers that run the exported graphs: ONNX Runtime (CPU or CUDA) and TensorRT.

Both implement the `Denoiser` interface of `fastdrag.denoiser`: `__call__(latents, t, text)` runs
the batch-1 inversion graph (row by row for a larger batch), and inside `reference_control(...)`
a (source, edited) batch runs the batch-2 graph that carries the K/V swap. An export made with
`keep_source_kv` also keeps the source branch's keys and values (`fastdrag.source_kv`): the batch-2
graph outputs them, and its `unet_kept` graph takes them with the edited latent alone.
"""
from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from ..errors import ConfigError
from ..source_kv import SourceKV
from .graphs import GraphSpec
from .manifest import Manifest

if TYPE_CHECKING:
    from .tensorrt import Engine

logger = logging.getLogger(__name__)

_NP = {"float32": np.float32, "float16": np.float16}
_TORCH = {"float32": torch.float32, "float16": torch.float16}


class _GraphDenoiser:
    """Shared logic: which graph answers a call, the start-layer check, and the kept keys and values."""

    fixed_batch = True  # the graphs take fixed batches: guidance runs its two halves as two calls
    UNET_GRAPHS = ("unet_inversion", "unet_reference", "unet_kept")

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.reference: bool = False  # inside reference_control: the pair's graph answers
        self.source_kv: Optional[SourceKV] = None
        self.start_layer: int = int(manifest.data["artifacts"]["unet_reference"]["reference_control"]["start_layer"])
        self.graph_names: List[str] = [name for name in self.UNET_GRAPHS if name in manifest.data["artifacts"]]
        self.keeps_source_kv: bool = "unet_kept" in self.graph_names
        tensors = manifest.data.get("source_kv", {}).get("tensors", [])
        self.kv_tensors: List[Tuple[str, str]] = list(zip(tensors[0::2], tensors[1::2], strict=True))  # (key, value) names per swapped layer

    def _run(self, graph: str, feeds: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The graph's outputs by name, each in the caller's hands (not a buffer the next run overwrites)."""
        raise NotImplementedError

    def _eps(self, graph: str, latents: torch.Tensor, timestep: int, text: torch.Tensor,
             **extra: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        feeds = {"latents": latents, "timestep": torch.full((1,), float(timestep), device=latents.device),
                 "text_embeddings": text, **extra}
        outputs = self._run(graph, feeds)
        return outputs.pop("eps").to(latents.dtype), outputs

    def __call__(self, latents: torch.Tensor, timestep: int, text_embeddings: torch.Tensor) -> torch.Tensor:
        if self.reference and self.source_kv is not None and not self.source_kv.recording:
            if latents.shape[0] != 1:
                raise ValueError(f"the exported kept graph takes one edited latent; got {latents.shape[0]}")
            kept: Dict[str, torch.Tensor] = {}
            for index, (key_name, value_name) in enumerate(self.kv_tensors):
                kept[key_name], kept[value_name] = self.source_kv.read(str(index))
            return self._eps("unet_kept", latents, timestep, text_embeddings, **kept)[0]
        if self.reference:
            if latents.shape[0] != 2:
                raise ValueError(f"the exported reference graph takes a batch of 2; got {latents.shape[0]}")
            eps, outputs = self._eps("unet_reference", latents, timestep, text_embeddings)
            if self.source_kv is not None:
                for index, (key_name, value_name) in enumerate(self.kv_tensors):
                    self.source_kv.record(str(index), outputs[key_name], outputs[value_name])
            return eps
        rows = [self._eps("unet_inversion", latents[i:i + 1], timestep, text_embeddings[i:i + 1])[0]
                for i in range(latents.shape[0])]
        return torch.cat(rows) if len(rows) > 1 else rows[0]

    @contextlib.contextmanager
    def reference_control(self, start_layer: int, backend: str = "auto",
                          source_kv: Optional[SourceKV] = None) -> Iterator[None]:
        """The batch-2 reference graph within; with `source_kv` (an export with `keep_source_kv`) it also
        records the source keys and values, or, while `source_kv` reads, the kept graph runs instead."""
        if start_layer != self.start_layer:
            raise ConfigError(f"the exported reference graph swaps K/V from layer {self.start_layer}, "
                              f"not {start_layer}: export again with that start_layer")
        if source_kv is not None and not self.keeps_source_kv:
            raise ConfigError(f"{self.manifest.folder} has no kept-keys-and-values graph: export with keep_source_kv")
        self.reference, self.source_kv = True, source_kv
        try:
            yield
        finally:
            self.reference, self.source_kv = False, None


# an ONNX Runtime execution provider: its name, or its name and options
Provider = Union[str, Tuple[str, Dict[str, Any]]]


def session_providers(device: Union[str, torch.device, None], available: List[str]) -> List[Provider]:
    """ONNX Runtime's providers for graphs fed on `device` (None: torch's current GPU, or the CPU
    where torch has none): CUDA's on that GPU by its index, then the CPU's for what CUDA lacks; the
    CPU's alone for a CPU device or a library without CUDA. The index matters: ONNX Runtime's CUDA
    provider otherwise runs on GPU 0, whatever GPU the inputs it is bound to live on."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and "CUDAExecutionProvider" in available:
        index = device.index if device.index is not None else torch.cuda.current_device()
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    if device.type == "cuda":
        logger.warning("this ONNX Runtime has no CUDA provider (only %s): the exported graphs of an editor on %s run "
                       "on the CPU, its tensors copied there and back every step; install onnxruntime-gpu in place "
                       "of onnxruntime", ", ".join(available), device)
    return ["CPUExecutionProvider"]


def wait_for_torch(device: torch.device) -> None:
    """Let the host go on only once the work torch has queued on `device` is done (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def run_bound(session: Any, spec: GraphSpec, feeds: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Run an ONNX Runtime session on torch tensors bound by address (no copy through the host); the outputs
    are new tensors on the inputs' device, in the dtypes `spec` gives.

    ONNX Runtime's CUDA provider runs on a stream of its own, which does not wait for torch's: the inputs'
    casts queued here, and torch's last uses of the memory `torch.empty` hands the outputs (blocks freed to
    its cache are reused in the order of torch's stream alone), must be done before the run starts, hence
    `wait_for_torch`. The run returns once its stream is done, so torch may read the outputs at once."""
    device = next(iter(feeds.values())).device
    dtypes = {tensor.name: tensor.dtype for tensor in spec.inputs}
    binding = session.io_binding()
    bound = []  # the cast inputs: alive until the run is done
    for name, tensor in feeds.items():
        bound.append(tensor.to(_TORCH[dtypes[name]]).contiguous())
        binding.bind_input(name, device.type, device.index or 0, _NP[dtypes[name]], tuple(bound[-1].shape),
                           bound[-1].data_ptr())
    outputs: Dict[str, torch.Tensor] = {}
    for out_spec in spec.outputs:
        out = outputs[out_spec.name] = torch.empty(out_spec.shape, dtype=_TORCH[out_spec.dtype], device=device)
        binding.bind_output(out_spec.name, device.type, device.index or 0, _NP[out_spec.dtype], tuple(out.shape),
                            out.data_ptr())
    wait_for_torch(device)
    session.run_with_iobinding(binding)
    return outputs


class OnnxRuntimeDenoiser(_GraphDenoiser):
    """Runs the exported UNet graphs under ONNX Runtime; CUDA tensors are bound in place (no host copy)."""

    def __init__(self, manifest: Manifest, providers: Optional[List[Provider]] = None,
                 overrides: Optional[Dict[str, Dict[str, np.ndarray]]] = None,
                 device: Union[str, torch.device, None] = None):
        """`overrides`: per graph, initializer name -> value to use instead of the file's (another
        image's LoRA-merged weights, from `fastdrag.export.refit`). `device`: where the inputs will
        live, which picks the providers (`session_providers`) unless `providers` are given."""
        import onnxruntime as ort

        super().__init__(manifest)
        if providers is None:
            providers = session_providers(device, ort.get_available_providers())
        self.override_values: List[Any] = []  # ONNX Runtime reads them while its sessions live: keep them
        self.sessions: Dict[str, Any] = {}  # graph name -> onnxruntime.InferenceSession
        for name in self.graph_names:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            for initializer, array in (overrides or {}).get(name, {}).items():
                value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
                self.override_values.append(value)
                options.add_initializer(initializer, value)
            self.sessions[name] = ort.InferenceSession(str(manifest.path(name)), options, providers=providers)
        self.specs: Dict[str, GraphSpec] = manifest.graphs

    def _run(self, graph: str, feeds: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        spec = self.specs[graph]
        session = self.sessions[graph]
        device = feeds["latents"].device
        if device.type == "cuda" and "CUDAExecutionProvider" in session.get_providers():
            return run_bound(session, spec, feeds)
        dtypes = {t.name: t.dtype for t in spec.inputs}
        arrays = {name: tensor.detach().cpu().numpy().astype(_NP[dtypes[name]]) for name, tensor in feeds.items()}
        results = session.run(None, arrays)
        return {out_spec.name: torch.from_numpy(array).to(device)
                for out_spec, array in zip(spec.outputs, results, strict=True)}


class TensorRTDenoiser(_GraphDenoiser):
    """Runs the TensorRT engines built from the exported UNet graphs (CUDA tensors in place)."""

    def __init__(self, manifest: Manifest, refit: Optional[Dict[str, Dict[str, np.ndarray]]] = None):
        """`refit`: per graph, initializer name -> value (another image's LoRA-merged weights, from
        `fastdrag.export.refit`), refitted into the loaded engine; the engine files keep their own weights.
        Raises `TensorRTRefitError` where an engine will not take them."""
        from .refit import initializer_arrays
        from .tensorrt import Engine, check_plan_target

        super().__init__(manifest)
        engines = manifest.data.get("engines", {})
        missing = [name for name in self.graph_names if name not in engines]
        if missing:
            raise ConfigError(f"{manifest.folder} has no TensorRT engines for {', '.join(missing)}: export with --format tensorrt")
        for name in self.graph_names:
            if "tensorrt_version" in engines[name]:  # (older exports do not record what their engines were built for)
                check_plan_target(engines[name], str(manifest.folder))
        self.engines: Dict[str, Engine] = {name: Engine(manifest.folder / engines[name]["file"]) for name in self.graph_names}
        for name, arrays in (refit or {}).items():
            graph = manifest.path(name)
            self.engines[name].refit(arrays, unchanged=lambda names, graph=graph: initializer_arrays(graph, names))

    def _run(self, graph: str, feeds: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        engine = self.engines[graph]
        feed = {name: feeds[name].to(dtype) for name, (_, dtype) in engine.inputs.items()}
        return {name: out.clone() for name, out in engine.infer(feed).items()}  # the engine reuses its buffers


def load_denoiser(backend: str, manifest: Manifest, overrides: Optional[Dict[str, Dict[str, np.ndarray]]] = None,
                  device: Union[str, torch.device, None] = None) -> Union[OnnxRuntimeDenoiser, TensorRTDenoiser]:
    """The exported-graph denoiser for `backend` ('onnxruntime' or 'tensorrt'); `overrides` replace
    initializers of the UNet graphs, e.g. with another LoRA's weights (ONNX Runtime: initializer overrides;
    TensorRT: a refit of the loaded engines). `device`: where its inputs live (ONNX Runtime's providers
    follow it; TensorRT runs on the current GPU)."""
    if backend == "onnxruntime":
        return OnnxRuntimeDenoiser(manifest, overrides=overrides, device=device)
    if backend == "tensorrt":
        return TensorRTDenoiser(manifest, refit=overrides)
    raise ConfigError(f"unknown backend {backend!r}; use torch, onnxruntime or tensorrt")
