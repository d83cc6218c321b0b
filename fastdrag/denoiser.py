"""The denoiser interface used by the forward-only stages (inversion and denoising).

A denoiser maps (latents, timestep, text embeddings) to predicted noise, whatever its model outputs
(`fastdrag.ddim.predicted_noise`). `reference_control`
switches it to the K/V-swap mode of stage 4 for a batch of (source, edited) pairs. Other backends
(ONNX Runtime, TensorRT) implement the same two methods.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Dict, Iterator, Optional, Protocol

import torch

from .attention import reference_control
from .cuda_graph import capture, on_side_stream
from .ddim import predicted_noise, prediction_type_of
from .source_kv import SourceKV

logger = logging.getLogger(__name__)


class Denoiser(Protocol):
    def __call__(self, latents: torch.Tensor, timestep: int, text_embeddings: torch.Tensor) -> torch.Tensor: ...

    def reference_control(self, start_layer: int, backend: str = "auto") -> contextlib.AbstractContextManager: ...
    # a denoiser that can keep the source branch's keys and values (`fastdrag.source_kv`) also takes
    # `source_kv=` in `reference_control` and says so by `keeps_source_kv = True`


class TorchDenoiser:
    """The UNet itself, run in its own dtype under `torch.no_grad`.

    With `cuda_graphs` set (CUDA only) each forward replays a CUDA graph captured once per input
    shape and attention mode, so a 35-step loop launches 35 graphs instead of thousands of kernels.
    Call `reset()` when the UNet's weights change storage (a new adapter): graphs read weights by address.
    At most `MAX_GRAPHS` are kept: a server that sees many image sizes drops them all and recaptures,
    rather than holding graph memory for every size it has seen.
    `scheduler` says what the UNet outputs (its `prediction_type`; noise without one) and gives the
    alphas that turn another output into noise.
    """

    MAX_GRAPHS = 8  # an edit needs 2 (inversion; denoising with the K/V swap), 3 with kept source keys and values
    keeps_source_kv = True

    def __init__(self, unet: torch.nn.Module, cuda_graphs: bool = False, scheduler=None):
        self.unet = unet
        self.cuda_graphs = cuda_graphs
        self.prediction_type = "epsilon" if scheduler is None else prediction_type_of(scheduler)
        self.alphas_cumprod = None if scheduler is None else scheduler.alphas_cumprod.to(torch.float64).cpu()
        self.mode: Optional[tuple] = None   # the K/V-swap mode now on, part of a graph's key
        self.graphs: Dict[tuple, _CapturedForward] = {}
        self.graph_pool = None  # a `GraphPool` handle shared with other graphs, set by the owner; else one of its own
        self._own_pool = None

    def reset(self) -> None:
        """Drop captured graphs (and the memory of a pool of their own)."""
        self.graphs.clear()
        self._own_pool = None

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, timestep: int, text_embeddings: torch.Tensor) -> torch.Tensor:
        if self.cuda_graphs and latents.is_cuda:
            prediction = self._replay(latents, timestep, text_embeddings)
        else:
            dtype = self.unet.dtype
            t = torch.full((), timestep, device=latents.device, dtype=torch.long)  # a fill, not a host-to-device copy
            prediction = self.unet(latents.to(dtype), t, encoder_hidden_states=text_embeddings.to(dtype)).sample
            prediction = prediction.to(latents.dtype)
        if self.prediction_type == "epsilon":
            return prediction
        return predicted_noise(prediction, latents, float(self.alphas_cumprod[timestep]), self.prediction_type)

    def _replay(self, latents: torch.Tensor, timestep: int, text_embeddings: torch.Tensor) -> torch.Tensor:
        key = (tuple(latents.shape), tuple(text_embeddings.shape), latents.device, self.mode)
        captured = self.graphs.get(key)
        if captured is None:
            if len(self.graphs) >= self.MAX_GRAPHS:
                logger.info("%d CUDA graphs captured: dropping them before capturing another", len(self.graphs))
                self.reset()
            pool = self.graph_pool
            if pool is None:
                if self._own_pool is None:
                    self._own_pool = torch.cuda.graph_pool_handle()  # one pool: the graphs never run at the same time
                pool = self._own_pool
            captured = self.graphs[key] = _CapturedForward(self.unet, latents, text_embeddings, pool)
        return captured(latents, timestep, text_embeddings).to(latents.dtype, copy=True)

    @contextlib.contextmanager
    def reference_control(self, start_layer: int, backend: str = "auto",
                          source_kv: Optional[SourceKV] = None) -> Iterator[None]:
        with reference_control(self.unet, start_layer, backend, source_kv):
            self.mode = (start_layer, backend)
            if source_kv is not None:  # a graph writes or reads the slots of one generation
                self.mode += ("record" if source_kv.recording else "kept", id(source_kv), source_kv.generation)
            try:
                yield
            finally:
                self.mode = None


class _CapturedForward:
    """One UNet forward captured as a CUDA graph over static input, timestep and text buffers."""

    WARMUP = 2

    def __init__(self, unet: torch.nn.Module, latents: torch.Tensor, text_embeddings: torch.Tensor, pool):
        dtype = unet.dtype
        self.x = latents.to(dtype, copy=True)
        self.text = text_embeddings.to(dtype, copy=True)
        self.t = torch.zeros((), device=latents.device, dtype=torch.long)
        run = lambda: unet(self.x, self.t, encoder_hidden_states=self.text).sample
        with on_side_stream(torch.cuda.Stream(latents.device)):
            for _ in range(self.WARMUP):
                run()
        self.graph = torch.cuda.CUDAGraph()
        with capture(self.graph, pool):
            self.eps = run()

    def __call__(self, latents: torch.Tensor, timestep: int, text_embeddings: torch.Tensor) -> torch.Tensor:
        self.x.copy_(latents)
        self.text.copy_(text_embeddings)
        self.t.fill_(timestep)
        self.graph.replay()
        return self.eps
