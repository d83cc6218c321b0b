"""DragEditor: models loaded once, edits run through the four stages on demand."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple, TypeVar, Union, cast

import numpy as np
import torch
from PIL import Image

from .attention import check_sdpa_priority, choose_backend, sdpa_priority, self_attention_processor_names
from .cache_usage import touch
from .config import EditConfig
from .cuda_graph import CapturedCalls, GraphPool
from .ddim import DdimSchedule
from .denoise import denoise_edited, denoise_pair
from .denoiser import TorchDenoiser
from .drag import DragLoop
from .errors import ConfigError, InputError
from .file_lock import held
from .frozen_conv import install_frozen_conv
from .lean_blocks import install_lean_blocks
from .inputs import (EditInputs, ImageLike, Points, load_image, prepare_inputs, size_advice, sup_to_image,
                     working_size)
from .inversion import invert
from .lora import (LoraCache, LoraTrainer, adapter_state, install_adapter, load_adapter_state, lora_key, merged_adapter,
                   run_trainer)
from .models import Components, check_supported, load_components
from .progress import Progress, StepCallback
from .source_kv import SourceKV
from .vae import capture_decoder, decode, encode_posterior, encode_prompt

if TYPE_CHECKING:  # for the type checker only (the export modules are imported where an export runs)
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from .export.manifest import Manifest

logger = logging.getLogger(__name__)


@dataclass
class EditResult:
    """What an edit returns: the edited image, where the handles ended up, and how long each stage took."""

    image: Image.Image
    handles: List[Tuple[float, float]]   # final handle positions, image (x, y) pixels
    targets: List[Tuple[float, float]]
    timings: Dict[str, float]            # seconds per stage
    config: EditConfig
    drag_steps: int = 0
    lora_cached: bool = False
    lora_key: str = ""


class LazyPosterior:
    """The image's VAE posterior, encoded on first use: an edit whose LoRA comes from the cache and whose
    inversion the editor kept (a repeated edit of the image) needs none."""

    def __init__(self, encode: Callable[[], DiagonalGaussianDistribution]):
        self._encode: Callable[[], DiagonalGaussianDistribution] = encode
        self._value: Optional[DiagonalGaussianDistribution] = None

    @property
    def encoded(self) -> bool:
        return self._value is not None

    def get(self) -> DiagonalGaussianDistribution:
        """The posterior, encoded at the first call."""
        if self._value is None:
            self._value = self._encode()
        return self._value


@dataclass
class PreparedImage:
    """What an edit derives from the image and prompt before the drag: reusable across drags."""

    inputs: EditInputs
    text_embeddings: torch.Tensor
    lazy_posterior: LazyPosterior
    lora_key: str
    lora_cached: bool
    timings: Dict[str, float] = field(default_factory=dict)

    @property
    def posterior(self) -> DiagonalGaussianDistribution:
        """The image's VAE posterior (encoded now if it was not yet)."""
        return self.lazy_posterior.get()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _parse_device(device: Union[str, torch.device, None]) -> torch.device:
    """`device`, or CUDA when there is a GPU and the CPU otherwise; a ConfigError for a CUDA device this
    machine does not have (instead of PyTorch's assertion at the first tensor moved)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device} asked for, but this machine has no usable CUDA GPU "
                              f"(torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device} does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def _parse_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise InputError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _one_at_a_time(method: _Method) -> _Method:
    """Run `method` under the editor's lock: the UNet's adapter, attention processors, captured CUDA
    graphs and caches are shared state, so a server's threads calling one editor take turns. On CUDA
    the editor's GPU is the current device meanwhile: Triton kernels, current streams and graph
    captures take the current device, which for an editor on `cuda:1` need not be its own. The
    method keeps its signature for a type checker."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with self._lock, on_device:
            if self._in_callback:  # holding the (re-entrant) lock: the edit's own thread, inside its callback
                raise RuntimeError(f"an edit's on_step callback called DragEditor.{method.__name__}: the edit is "
                                   "still running (raise EditCancelled to stop it instead)")
            return method(self, *args, **kwargs)

    return cast(_Method, locked)


# what an error calls each stage `DragEditor._timed` runs
STAGE_NAMES = {"text": "text encoding", "vae_encode": "VAE encoding", "lora": "LoRA", "export": "export",
               "inversion": "inversion", "drag": "drag", "denoise": "denoising", "vae_decode": "VAE decoding"}


class DragEditor:
    """Holds a model warm and runs DragDiffusion edits with it.

    Safe to call from several threads: calls run one at a time (a lock). For edits in parallel,
    run one editor per GPU, each in its own process (a CUDA graph capture in one thread forbids
    synchronising calls in the others).
    """

    EXPORT_WAIT_S = 1800  # how long an edit waits for another process's export to the same folder (engine builds)
    LORA_WAIT_S = 600  # how long it waits for another process's training of the same LoRA
    EXPORTED_DENOISERS_KEPT = 2  # ONNX Runtime sessions or TensorRT engines, one per LoRA: each holds a UNet
    PROMPTS_KEPT = 8  # text embeddings of the most recent prompts (118 KB each at SD 1.5 in fp16)
    # inverted latents z_t of the most recent images (64 KB each at 512 px): a server whose users take
    # turns editing their images skips the inversion of each one's next edit, not only of the last image's
    INVERSIONS_KEPT = 8

    def __init__(self, components: Components, device: torch.device, dtype: torch.dtype,
                 config: Optional[EditConfig] = None, cache_dir: Optional[Union[str, Path]] = None,
                 progress: bool = True, release_cached_memory: bool = False, sdpa_priority: str = "default"):
        check_supported(components)  # components built by hand, not through `load_components`, too
        self.components = components
        self.device = device
        self.dtype = dtype
        self.config: EditConfig = config or EditConfig()
        self.config.validate()  # a config built by hand, not through `replace`, is checked here
        self.cache: LoraCache = LoraCache(Path(cache_dir) if cache_dir is not None else None)
        self.progress = progress
        # after each stage, return the CUDA caching allocator's free blocks to the driver, so the eager
        # stages' do not stay reserved beside the graphs' pool between edits (H100, SD 1.5: 3.78 -> 2.78
        # GiB in the default pool between edits, but the same 8.17 GiB peak, the VAE's; off by default)
        self.release_cached_memory = release_cached_memory
        self.denoiser: TorchDenoiser = TorchDenoiser(components.unet, scheduler=components.scheduler)
        self._graph_denoisers: "OrderedDict[tuple, tuple]" = OrderedDict()  # exported denoisers, least recent first
        self._loaded_key: Optional[str] = None  # the adapter now in the UNet: a repeated edit reuses it as is
        self._inversions: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()  # key -> z_t, least recent first
        self._source_kv = SourceKV()  # the last denoising's source keys and values (config.keep_source_kv)
        self._drag_loop: Optional[DragLoop] = None  # the last drag's loop (and graph), restarted when it fits
        self._lora_trainer: Optional[LoraTrainer] = None  # the last LoRA trainer (and graph), restarted when it fits
        self._merged_mode = True  # whether the graphs kept ran with the LoRA merged (config.merge_lora)
        self._weight_storage: Optional[tuple] = None  # the UNet weights' addresses the kept graphs read
        self._graph_pool: Optional[GraphPool] = None  # the memory every kept graph of this editor captures into
        self._vae_graphs = CapturedCalls()  # the VAE encoder's and decoder's graphs, in that pool
        self._lock = threading.RLock()  # re-entrant: export() calls text_embeddings()
        self._sdpa_priority = check_sdpa_priority(sdpa_priority)
        self._prompt_embeddings: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self._on_step: Optional[StepCallback] = None  # the running call's callback (`edit`'s `on_step`)
        self._in_callback = False  # whether that callback is running (it may not call the editor)
        self._working_size: Optional[Tuple[int, int]] = None  # the last prepared image's

    @property
    def sdpa_priority(self) -> str:
        """The order in which the UNet stages' SDPA attention tries its backends (`fastdrag.attention.
        sdpa_priority`): "default" (PyTorch's), "flash", "cudnn" or "efficient". Setting it drops the kept CUDA
        graphs, which hold the kernels they captured."""
        return self._sdpa_priority

    @sdpa_priority.setter
    def sdpa_priority(self, name: str) -> None:
        if check_sdpa_priority(name) != self._sdpa_priority:
            self._sdpa_priority = name
            self.release()

    @classmethod
    def from_pretrained(cls, name_or_path: Union[str, Path] = "tiny", device: Union[str, torch.device, None] = None,
                        dtype: Union[str, torch.dtype, None] = None, config: Optional[EditConfig] = None,
                        cache_dir: Optional[Union[str, Path]] = None, progress: bool = True,
                        channels_last: Optional[bool] = None, compile_blocks: bool = False,
                        fused_unet_kernels: bool = False, frozen_conv: Optional[bool] = None,
                        sdpa_priority: str = "default", lean_blocks: bool = True,
                        prediction_type: Optional[str] = None,
                        single_file_config: Union[str, Path, None] = None,
                        variant: Optional[str] = None) -> "DragEditor":
        """Load `name_or_path` (built-in name, diffusers folder, single file or hub id) once.

        What the UNet outputs comes from the model's scheduler config; `prediction_type` ("epsilon",
        "v_prediction" as SD 2.x's 768 px models, or "sample") overrides it (`load_components`).
        `single_file_config` is the diffusers folder (or hub id) whose configuration a single-file
        checkpoint has: without it diffusers fetches the configuration from the hub. `variant` picks a
        diffusers model's weights variant ("fp16"); a local folder with only one variant's files loads unasked.

        `channels_last` stores the UNet's convolution weights channels-last; None (the default) does
        so on CUDA only. On an H100 at SD 1.5 / 512 px, each variant in a process of its own, it made a
        repeated edit 2.52 s instead of 2.87 s and a first edit 9.01 s instead of 9.41 s, at the same
        peak memory (bench/RESULTS.md); on the CPU it is not measured to pay, so it stays off there.
        `compile_blocks` compiles the UNet's residual and feed-forward blocks with `torch.compile`
        (`fastdrag.regional_compile`): on the H100 the SD 1.5 compilation ran past 200 s without
        finishing; off by default.
        `fused_unet_kernels` runs the UNet's GroupNorms with the SiLUs after them, its LayerNorms and its
        GEGLUs as fused Triton kernels on CUDA (`fastdrag.fused_blocks`); experimental: on an H100 a first
        edit took 4.94 s instead of 6.30, but it stays off until a larger paired toy run shows its edits
        score the same (bench/RESULTS.md).
        `frozen_conv` lets the UNet's convolutions keep only their weights for the backward of the LoRA
        step and the drag (`fastdrag.frozen_conv`): the same numbers, 452 MiB less kept by an SD 1.5
        LoRA step (counted on the meta device). None (the default) turns it on on CUDA only: on the CPU
        PyTorch's convolution backward copies the input's stand-in out in full, and a tiny model's
        LoRA step took 0.29 s instead of 0.25 (bench/RESULTS.md).
        `sdpa_priority` orders the backends of the UNet stages' SDPA attention (see the property).
        `lean_blocks` leaves out the operations of diffusers' blocks that change no number (`fastdrag.
        lean_blocks`: divisions by 1, LoRA's multiplication by its scale of 1, layout copies, autocast's
        repeated casts, the GEGLUs' kept GELU outputs and gradient concatenations), and lets the drag
        keep its conditioning across iterations
        (`fastdrag.fixed_conditioning`): bit for bit the same edits, an SD 1.5 drag iteration 1,178 tensor
        operations instead of 1,393 and a LoRA step 2,206 instead of 2,585 (counted on the meta device:
        `bench/op_count.py`), and 250 and 826 casts fewer under autocast (counted on the CPU; the LoRA
        step's weights cast in one pass, `fastdrag.lora_casts`).
        """
        check_sdpa_priority(sdpa_priority)
        device = _parse_device(device)
        dtype = _parse_dtype(dtype, device)
        if device.type == "cpu" and dtype != torch.float32:
            raise InputError("half precision runs on CUDA only; use dtype float32 on the CPU")
        if channels_last is None:
            channels_last = device.type == "cuda"
        components = load_components(name_or_path, device=device, dtype=dtype, channels_last=channels_last,
                                     prediction_type=prediction_type, single_file_config=single_file_config,
                                     variant=variant, progress=progress)
        if frozen_conv is None:
            frozen_conv = device.type == "cuda"
        if frozen_conv:
            install_frozen_conv(components.unet)
        if lean_blocks:
            install_lean_blocks(components.unet)
            install_lean_blocks(components.vae)
        if fused_unet_kernels:
            from .fused_blocks import install_fused_blocks
            from .kernels import uses_triton

            install_fused_blocks(components.unet)
            if not uses_triton(components.unet.conv_in.weight):
                logger.info("fused UNet kernels: Triton does not run for %s tensors here (FASTDRAG_KERNELS=%s); "
                            "the stock operators run", device.type, os.environ.get("FASTDRAG_KERNELS", "triton"))
        if compile_blocks:
            from .regional_compile import compile_blocks as compile_unet_blocks

            compile_unet_blocks(components.unet)
        return cls(components, device, dtype, config=config, cache_dir=cache_dir, progress=progress,
                   sdpa_priority=sdpa_priority)

    def _schedule(self, config: EditConfig) -> DdimSchedule:
        inv = config.inversion
        return DdimSchedule.from_scheduler(self.components.scheduler, inv.num_inference_steps, inv.num_inversion_steps)

    def _timed(self, timings: Dict[str, float], name: str, fn, *args, **kwargs):
        """Run one stage to its end on the device and add its seconds to `timings`; at its end, with
        `release_cached_memory`, the caching allocator's free blocks go back to the driver."""
        start = time.perf_counter()
        try:
            result = fn(*args, **kwargs)
            _synchronize(self.device)
        except torch.OutOfMemoryError as exc:
            if getattr(exc, "stage", None):  # said already, where more is known (the LoRA stage)
                raise
            raise self._out_of_memory(exc, name, self._working_size) from exc
        if self.release_cached_memory and self.device.type == "cuda":
            torch.cuda.empty_cache()
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
        return result

    def _progress(self) -> Progress:
        """How the stage about to run reports its steps: the bar (`progress`) and the call's `on_step`."""
        return Progress(self.progress, self._on_step)

    @contextlib.contextmanager
    def _reporting(self, on_step: Optional[StepCallback]):
        """Report the stages of the call inside to `on_step` (and restore the outer call's afterwards)."""
        def guarded(stage: str, done: int, total: int) -> None:
            self._in_callback = True
            try:
                on_step(stage, done, total)
            finally:
                self._in_callback = False

        outer, self._on_step = self._on_step, (guarded if on_step is not None else None)
        try:
            yield
        finally:
            self._on_step = outer

    @_one_at_a_time
    def prepare(self, image: ImageLike, prompt: str, points: Optional[Points], mask: Optional[ImageLike] = None,
                config: Optional[EditConfig] = None) -> PreparedImage:
        """Validate inputs, encode the prompt, and train or load the image's LoRA; the image is VAE-encoded
        here when the LoRA trains, else when an inversion first needs it (`PreparedImage.posterior`).
        `points` None: none yet (`preload`)."""
        config = config or self.config
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be a string; got {type(prompt).__name__}")
        if not prompt.strip():
            logger.info("empty prompt: the edit is conditioned on the empty text")
        sup_res = config.drag.sup_res
        inputs = prepare_inputs(image, points, mask, config.size, sup_res)
        self._check_sizes(inputs, config)
        self._working_size = inputs.working_size  # (what an out-of-memory error names)
        timings: Dict[str, float] = {}
        text = self._timed(timings, "text", self.text_embeddings, prompt)
        posterior = LazyPosterior(lambda: self._encode(inputs, config))
        key = self._lora_key(inputs.image, prompt, config)
        if not self.cache.path(key).is_file():
            self._timed(timings, "vae_encode", posterior.get)  # the LoRA trains on it
        key, cached = self._timed(timings, "lora", self._lora, inputs.image, prompt, text, posterior.get, config, key)
        return PreparedImage(inputs, text, posterior, key, cached, timings)

    @_one_at_a_time
    def text_embeddings(self, prompt: str) -> torch.Tensor:
        """The prompt's CLIP text embeddings (1, 77, D). The `PROMPTS_KEPT` most recent prompts' are kept
        until `release()`: a server's repeated edits mostly reuse a prompt (its encoding took 11 ms of
        an H100 edit), and a server may call this ahead of a request."""
        if prompt in self._prompt_embeddings:
            self._prompt_embeddings.move_to_end(prompt)
            return self._prompt_embeddings[prompt]
        c = self.components
        text = encode_prompt(c.tokenizer, c.text_encoder, prompt)
        self._prompt_embeddings[prompt] = text
        while len(self._prompt_embeddings) > self.PROMPTS_KEPT:
            self._prompt_embeddings.popitem(last=False)
        return text

    def _lora_key(self, image: Image.Image, prompt: str, config: EditConfig) -> str:
        return lora_key(self.components.identity, image, prompt, config.lora, config.seed, self.dtype)

    def _check_sizes(self, inputs: EditInputs, config: EditConfig) -> None:
        width, height = inputs.working_size
        scale = self.components.vae_scale
        down = 2 ** (len(self.components.unet.config.block_out_channels) - 1)
        if width % (scale * down) or height % (scale * down):
            raise InputError(f"working size {width}x{height} must be a multiple of {scale * down} for this model")
        self_attention_processor_names(self.components.unet, config.denoise.start_layer)
        choose_backend(config.denoise.attention_backend, self.device, self.dtype)
        if config.backend != "torch":  # before the LoRA trains, not after
            from .backends import onnxruntime_status, tensorrt_status

            status = onnxruntime_status() if config.backend == "onnxruntime" else tensorrt_status()
            if not status.usable:
                raise ConfigError(f"backend {config.backend} cannot run here: {status.reason}")
        sample_size = self.components.unet.config.sample_size  # latent pixels it was trained at, if known
        if sample_size:
            native = scale * (max(sample_size) if isinstance(sample_size, (tuple, list)) else sample_size)
            advice = size_advice((width, height), native)
            if advice:
                logger.warning(advice)

    def _forget_adapter(self) -> None:
        """The UNet's adapter is about to change: the next edit loads or trains its own.

        Captured graphs (the denoiser's, the drag loop's) read weights by address, and a new adapter is
        initialised, trained, loaded or merged in place, so they stay: `_check_weight_storage` drops
        them when the weights move instead (a new adapter rank, say). Kept inversions stay too: each is
        keyed by its adapter's cache key, and an adapter loaded from the cache is the one it was
        inverted with (one trained again is not: `_lora` drops its inversions)."""
        self._loaded_key = None

    def _forget_inversions(self, which: Optional[Callable[[tuple], bool]] = None) -> None:
        """Drop the kept inversions (those whose key `which` picks), and the source keys and values of
        the last denoising (their slots stay)."""
        for key in [key for key in self._inversions if which is None or which(key)]:
            del self._inversions[key]
        self._source_kv.forget()

    def _drop_graphs(self) -> None:
        """Drop the graphs that read the UNet's weights. Where the VAE's graphs are in their pool and
        it outlives them (a `MemPool`), the pool and the VAE's graphs stay, and the graphs captured
        next reuse its memory; otherwise the pool goes with them."""
        self.denoiser.reset()
        self._drag_loop = None
        self._lora_trainer = None
        self._weight_storage = None
        if not (self._vae_graphs.graphs and self._graph_pool.persistent):  # VAE graphs live only in a pool
            self._drop_pool()

    def _drop_pool(self) -> None:
        """Drop the VAE's graphs and the pool: its memory goes with the last graph in it."""
        self._vae_graphs.reset()
        self._graph_pool = None
        self.denoiser.graph_pool = None

    def _shared_graph_pool(self):
        """The pool handle that the kept LoRA step's, the drag loop's and the denoiser's CUDA graphs
        share (None off CUDA). The stages never run at the same time, so the kept graphs together hold
        about what the largest of them (the LoRA step's) needs instead of the sum (`GraphPool`)."""
        if self.device.type != "cuda":
            return None
        if self._graph_pool is None:
            self._graph_pool = GraphPool(self.device)
        return self._graph_pool.handle

    def _vae_graphs_for(self, config: EditConfig) -> Optional[CapturedCalls]:
        """The VAE's graphs (CUDA, with `cuda_graphs` and `cuda_graph_vae`), in the shared pool, or None (eager)."""
        if not (config.cuda_graphs and config.cuda_graph_vae and self.device.type == "cuda"):
            return None
        self._vae_graphs.pool = self._shared_graph_pool()
        return self._vae_graphs

    def _encode(self, inputs: EditInputs, config: EditConfig):
        """The image's VAE posterior; with the VAE's graphs, the decoder's for this size is captured
        first, before the encoder's and the edit's other graphs.

        Eager, the VAE's activations took about 1 GiB beside the pool, whose 4.3 GiB sit idle while
        the VAE runs (H100, SD 1.5 / 512 px: the encoder raised the reservation by 0.52 GiB, the decoder
        by 0.47 GiB more; bench/RESULTS.md). At the image's full size the decoder's activations are the
        largest blocks any graph here asks for: captured first, the graphs captured after it can carve
        theirs out of them, where the LoRA step's freed blocks would likely not hold the decoder's (the
        caching allocator does not merge blocks across segments). Measured on an H100 (twenty-fourth
        session): 6.89 -> 6.10 GiB reserved through SD 1.5 edits, the same edit times."""
        vae, graphs = self.components.vae, self._vae_graphs_for(config)
        if graphs is not None:
            width, height = inputs.working_size
            scale = self.components.vae_scale
            capture_decoder(vae, (1, vae.config.latent_channels, height // scale, width // scale), graphs)
        return encode_posterior(vae, inputs.image, graphs)

    def _check_weight_storage(self) -> None:
        """Drop the kept graphs if any UNet weight (adapter included) now lives elsewhere than when they were captured."""
        storage = tuple(param.data_ptr() for param in self.components.unet.parameters())
        if storage != self._weight_storage:
            self._drop_graphs()
            self._weight_storage = storage

    @_one_at_a_time
    def release(self) -> None:
        """Free what the editor holds between edits beyond its models: captured CUDA graphs, the last
        drag's loop, the kept inversions and the exported denoisers' sessions or engines (e.g. before
        a long idle spell). The next edit loads its LoRA from the cache and captures again."""
        self._forget_adapter()
        self._forget_inversions()
        self._source_kv.clear()
        self._drop_graphs()
        self._drop_pool()
        self._graph_denoisers.clear()
        self._prompt_embeddings.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _lora(self, image: Image.Image, prompt: str, text: torch.Tensor, posterior: Callable[[], object],
              config: EditConfig, key: Optional[str] = None):
        """(key, was cached) of the image's adapter, loaded or trained into the UNet; `posterior()` gives
        the image's VAE posterior, asked for only when the adapter trains; `key`, if known, its cache key."""
        c = self.components
        key = key or self._lora_key(image, prompt, config)
        if key == self._loaded_key and self.cache.path(key).is_file():
            return key, True
        self._forget_adapter()
        install_adapter(c.unet, config.lora, config.seed)  # in place unless its rank or targets change
        if self._load_cached_adapter(key):
            return key, True
        # one process trains it; another sharing the cache (a server per GPU) waits, then loads that adapter
        with held(self.cache.directory / f".{key}.lock", f"training of the LoRA {key}", self.LORA_WAIT_S,
                  self._waiting("lora", config.lora.lora_steps)):
            if self._load_cached_adapter(key):
                return key, True
            self._train_adapter(key, image, prompt, text, posterior, config)
        return key, False

    def _waiting(self, stage: str, total: int) -> Callable[[], None]:
        """What runs while an edit waits for another process's work: the stage's `on_step(stage, 0, total)`,
        so that a cancel or a deadline still stops the edit."""
        progress = self._progress()
        return lambda: progress.on_step(stage, 0, total) if progress.on_step is not None else None

    def _load_cached_adapter(self, key: str) -> bool:
        """Load the adapter cached under `key` into the UNet; whether there was one."""
        state = self.cache.load(key)
        if state is None:
            return False
        load_adapter_state(self.components.unet, state)
        self._check_weight_storage()
        logger.info("LoRA loaded from the cache (%s)", self.cache.path(key))
        self._loaded_key = key
        return True

    def _train_adapter(self, key: str, image: Image.Image, prompt: str, text: torch.Tensor,
                       posterior: Callable[[], object], config: EditConfig) -> None:
        """Train the image's adapter into the UNet (installed and initialised) and cache it under `key`."""
        c = self.components
        self._check_weight_storage()  # before training: stale graphs' memory is not held through it
        self._forget_inversions(lambda kept: kept[0] == key)  # inverted with this key's adapter of before
        graphed = config.cuda_graphs and config.cuda_graph_lora and self.device.type == "cuda"
        posterior = posterior()
        trainer = self._lora_trainer
        checkpointing = config.lora_checkpointing
        if trainer is not None and trainer.fits(c.unet, posterior, text, config.lora, cuda_graph=graphed,
                                                checkpointing=checkpointing):
            trainer.restart(posterior, text, config.seed)
        else:
            self._lora_trainer = None  # the old graph's memory goes before another capture
            # a kept trainer's graph shares the other graphs' pool; one dropped after this stage gets a
            # pool of its own, freed with it: the shared pool would hold its memory after it (and its eager
            # steps' memory comes on top of the pool's), which took an H200 from 9.6 to 12.6 GiB reserved
            pool = self._shared_graph_pool() if config.keep_lora_trainer else None
            trainer = LoraTrainer(c.unet, c.scheduler, posterior, text, c.scaling_factor, config.lora, config.seed,
                                  cuda_graph=graphed, graph_pool=pool, checkpointing=checkpointing)
        keep = config.keep_lora_trainer
        try:
            with sdpa_priority(self._sdpa_priority):
                losses = run_trainer(trainer, config.lora.lora_steps, self._progress(), keep_graph=keep)
        except torch.OutOfMemoryError as exc:
            raise self._out_of_memory(exc, "lora", image.size, config) from exc
        self._lora_trainer = trainer if keep else None
        try:
            self.cache.save(key, adapter_state(c.unet), {"model": c.identity, "prompt": prompt,
                                                         "final_loss": f"{losses[-1]:.6f}" if losses else ""})
        except OSError as exc:  # a full disk or a read-only cache costs the cache, not the trained edit
            logger.warning("the LoRA could not be cached in %s (%s); this edit goes on, and the next edit "
                           "of this image trains it again", self.cache.directory, exc)
        self._loaded_key = key

    def _out_of_memory(self, error: torch.OutOfMemoryError, stage: str, size: Optional[Tuple[int, int]],
                       config: Optional[EditConfig] = None) -> torch.OutOfMemoryError:
        """`stage`'s out-of-memory error, saying what to change (its `stage` attribute names the stage). The
        kept graphs (one may be half captured) and their pool are dropped and the allocator's cache emptied,
        so the next edit starts clean; the adapter and the kept inversions stay."""
        self._drop_graphs()
        self._drop_pool()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        advice = []
        if stage == "lora" and config is not None and not config.lora_checkpointing:
            advice.append("lora_checkpointing=True (--lora-checkpointing true) recomputes the UNet's blocks in the "
                          "LoRA step's backward instead of keeping them: about a sixth of the activations kept, for "
                          "a third more computation")
        advice.append("a smaller working size (size=(W, H), --size WxH) needs less")
        where = f" at {size[0]}x{size[1]}" if size else ""
        batch = f" with batch {config.lora.lora_batch_size}" if stage == "lora" and config is not None else ""
        said = torch.OutOfMemoryError(f"the {STAGE_NAMES.get(stage, stage)} stage ran out of memory{where}{batch}: "
                                      f"{'; '.join(advice)}. ({error})")
        said.stage = stage
        return said

    @_one_at_a_time
    def train_lora(self, image: ImageLike, prompt: str, on_step: Optional[StepCallback] = None,
                   **overrides: Any) -> Tuple[str, bool]:
        """Train (or find in the cache) the LoRA of an image; returns (key, was cached). `on_step` as in `edit`."""
        with self._reporting(on_step):
            return self._train_lora(image, prompt, **overrides)

    def _train_lora(self, image: ImageLike, prompt: str, **overrides: Any) -> Tuple[str, bool]:
        config = self.config.replace(**overrides)
        picture = load_image(image)
        size = working_size(picture.size, config.size)
        if size != picture.size:
            picture = picture.resize(size, Image.BICUBIC)
        vae = self.components.vae
        return self._lora(picture, prompt, self.text_embeddings(prompt), lambda: encode_posterior(vae, picture), config)

    @_one_at_a_time
    def export(self, image: ImageLike, prompt: str, output: Union[str, Path], fmt: str = "onnx", fp16: bool = False,
               overwrite: bool = False, drag_points: int = 0, on_step: Optional[StepCallback] = None,
               **overrides: Any) -> Manifest:
        """Train or load the image's LoRA, merge it, and write the fixed-shape graphs and manifest to `output`;
        with `drag_points` > 0 also the drag iteration's graph for up to that many point pairs (`unet_drag`).
        `on_step` as in `edit`: the LoRA stage reports, then "export" (one step per graph written) and, for
        TensorRT, "engines"."""
        with self._reporting(on_step):
            return self._export(image, prompt, output, fmt, fp16, overwrite, drag_points, **overrides)

    def _export(self, image: ImageLike, prompt: str, output: Union[str, Path], fmt: str, fp16: bool, overwrite: bool,
                drag_points: int, **overrides: Any) -> Manifest:
        from .export.pipeline import check_output, export_loaded

        config = self.config.replace(**overrides)
        if config.inversion.guidance_scale != 1.0:  # before the LoRA trains
            raise ConfigError(f"an export's manifest describes the loops at guidance_scale 1 (DragDiffusion's); got "
                              f"{config.inversion.guidance_scale}: guidance runs in the editor's backends only")
        check_output(Path(output), overwrite, fmt)
        picture = load_image(image)
        size = working_size(picture.size, config.size)
        key, _ = self._train_lora(picture, prompt, **overrides)
        text = self.text_embeddings(prompt)
        return export_loaded(self.components, key, config.lora, size, text, config, Path(output), fmt, fp16, overwrite,
                             drag_points, progress=self._progress())

    @_one_at_a_time
    def merged_unet_for(self, lora_key: str, **overrides: Any) -> torch.nn.Module:
        """A LoRA-merged copy of the UNet with the cached adapter `lora_key` (e.g. to refit an engine)."""
        from .export.merge import merged_unet

        config = self.config.replace(**overrides)
        state = self.cache.require(lora_key)
        self._forget_adapter()
        install_adapter(self.components.unet, config.lora, config.seed)
        load_adapter_state(self.components.unet, state)
        self._check_weight_storage()
        self._loaded_key = lora_key
        return merged_unet(self.components.unet)

    @_one_at_a_time
    def refit_weights(self, image: ImageLike, prompt: str, export: Union[str, Path], output: Union[str, Path],
                      overwrite: bool = False, on_step: Optional[StepCallback] = None, **overrides: Any) -> Path:
        """Write what a service needs to edit `image` on `export`, an export made from another image.

        The file (safetensors) holds this image's merged LoRA-target weights, by the parameter names
        that the export's `refit.json` maps to each UNet graph's initializers, and its prompt's text
        embeddings (`text_embedding`, fp32), in place of the export's. The LoRA is trained here, or
        found in the cache. The weights are fp16 when the editor is, else fp32; the service casts each
        weight to its initializer's dtype. `export/standalone.py` shows how a service applies them.
        A new image then costs this file, not a whole export and its engine builds. `on_step` as in `edit`.
        """
        from .atomic import check_writable
        from .export import load_manifest
        from .export.refit import merged_target_weights, save_refit_weights

        config = self.config.replace(**overrides)
        output = check_writable(output, overwrite)
        manifest = load_manifest(Path(export))
        data, identity = manifest.data, self.components.identity
        if data["model"]["identity"] != identity:
            raise InputError(f"{manifest.folder} was exported from model {data['model']['identity']!r}; "
                             f"this editor holds {identity!r}")
        if "refit" not in data:
            raise InputError(f"{manifest.folder} has no refit map (refit.json): its graphs cannot take another "
                             "image's weights; export the image itself instead")
        targets, _ = self._refit_maps(manifest, config)
        picture = load_image(image)
        size = working_size(picture.size, config.size)
        exported = (data["image"]["width"], data["image"]["height"])
        if size != exported:
            raise InputError(f"the image works at {size[0]}x{size[1]}, but {manifest.folder}'s graphs take "
                             f"{exported[0]}x{exported[1]}: pass size={exported} (--size "
                             f"{exported[0]}x{exported[1]}) or use an export of that size")
        with self._reporting(on_step):
            key, _ = self._train_lora(picture, prompt, **overrides)
        dtype = torch.float16 if self.dtype == torch.float16 else torch.float32
        weights = {name: weight.to(dtype) for name, weight in merged_target_weights(self.components.unet, targets).items()}
        save_refit_weights(output, weights, self.text_embeddings(prompt),
                           {"model": identity, "lora_key": key, "prompt": prompt, "width": str(size[0]),
                            "height": str(size[1]), "targets": json.dumps(list(targets))})
        return output

    def _exported_denoiser(self, prepared: PreparedImage, config: EditConfig):
        """The exported-graph denoiser of this image's LoRA, exporting on first use (into the cache).

        One export per model, size and settings: another image's LoRA runs on the same graphs, its merged
        weights put in place of the exported ones (the graphs' `refit.json` says where they go), so a new
        image costs no export: ONNX Runtime takes them as initializer overrides, TensorRT's loaded engines
        are refitted with them (the engine files keep the first image's). An engine that will not take
        them (`TensorRTRefitError`) gets the image an export and engines of its own, as before refits.
        With `keep_source_kv` the export has the graphs that keep the source branch's keys and values (a
        folder of its own).
        """
        fmt = "tensorrt" if config.backend == "tensorrt" else "onnx"
        fp16 = self.dtype == torch.float16
        width, height = prepared.inputs.working_size
        settings = f"{width}x{height}-L{config.denoise.start_layer}-{fmt}-{'fp16' if fp16 else 'fp32'}"
        if config.keep_source_kv:  # the reference graph with the keys and values as outputs, and the kept graph
            settings += "-kv"
        if fmt == "tensorrt":  # engines load only on the TensorRT version and kind of GPU that built them
            from .export.tensorrt import plan_key, plan_target

            settings += f"-{plan_key(plan_target())}"
        own = self.cache.directory / "exports" / f"{prepared.lora_key}-{settings}"
        shared = hashlib.sha256(json.dumps([self.components.identity, sorted(config.lora.lora_targets)]).encode())
        folder = self.cache.directory / "exports" / f"shared-{shared.hexdigest()[:16]}-{settings}"
        key = (folder, prepared.lora_key)
        if key not in self._graph_denoisers:
            from .export.runtime import load_denoiser
            from .export.tensorrt import TensorRTRefitError

            # this LoRA's own export where it has one (its weights built in: nothing to refit), else the shared
            manifest = self._load_or_export(own if (own / "manifest.json").is_file() else folder, prepared, config,
                                            fmt, fp16)
            overrides = None
            if manifest.data["lora"]["key"] != prepared.lora_key:
                if "refit" in manifest.data:
                    overrides = self._refit_overrides(manifest, config)
                else:  # graphs whose LoRA weights cannot be found: this LoRA gets an export of its own
                    manifest = self._load_or_export(own, prepared, config, fmt, fp16)
            while len(self._graph_denoisers) >= self.EXPORTED_DENOISERS_KEPT:  # each holds a whole UNet
                self._graph_denoisers.popitem(last=False)
            try:
                denoiser = load_denoiser(config.backend, manifest, overrides, device=self.device)
            except TensorRTRefitError as exc:
                logger.warning("the TensorRT engines in %s could not be refitted with this image's LoRA (%s): "
                               "exporting and building engines of its own instead", manifest.folder, exc)
                manifest = self._load_or_export(own, prepared, config, fmt, fp16)
                denoiser = load_denoiser(config.backend, manifest, device=self.device)
            self._graph_denoisers[key] = (manifest, denoiser)  # (`_load_or_export` marked it used)
        else:
            manifest, _ = self._graph_denoisers[key]
            touch(manifest.folder / "manifest.json")  # used again, for `fastdrag cache --prune-to`
        self._graph_denoisers.move_to_end(key)
        return self._graph_denoisers[key][1]

    def _load_or_export(self, folder: Path, prepared: PreparedImage, config: EditConfig, fmt: str, fp16: bool):
        from .export import load_manifest
        from .export.pipeline import export_loaded

        width, height = prepared.inputs.working_size
        manifest = None
        if not (folder / "manifest.json").is_file():
            # one process exports it; others sharing the cache (a server per GPU) wait, then load that export
            from .export.graphs import graph_count

            with held(folder.with_name(f".{folder.name}.lock"), f"export to {folder}", self.EXPORT_WAIT_S,
                      self._waiting("export", graph_count(config.keep_source_kv, vae_graphs=False))):
                if not (folder / "manifest.json").is_file():
                    logger.info("exporting the denoiser for backend %s to %s", config.backend, folder)
                    # the UNet graphs alone: the backend replaces the denoiser, the VAE stays PyTorch's
                    manifest = export_loaded(self.components, prepared.lora_key, config.lora, (width, height),
                                             prepared.text_embeddings, config, folder, fmt, fp16, overwrite=True,
                                             progress=self._progress(), vae_graphs=False)
        if manifest is None:
            manifest = load_manifest(folder)
        manifest.check_size(width, height)
        touch(folder / "manifest.json")  # used now, before its graphs load: a prune by another process passes it over
        return manifest

    @staticmethod
    def _refit_maps(manifest, config: EditConfig):
        """(targets, each UNet graph's refit map) of an export, refused if they are for other LoRA targets."""
        from .export.refit import load_refit_maps

        targets, maps = load_refit_maps(manifest.folder / manifest.data["refit"]["file"])
        if sorted(targets) != sorted(config.lora.lora_targets):
            raise InputError(f"{manifest.folder} can be refitted for LoRA targets {list(targets)}, "
                             f"not {list(config.lora.lora_targets)}")
        return targets, maps

    def _refit_overrides(self, manifest, config: EditConfig):
        """The loaded LoRA's merged weights, per UNet graph, under the initializer names that hold them."""
        from .export.refit import merged_target_weights, refit_arrays

        targets, maps = self._refit_maps(manifest, config)
        weights = merged_target_weights(self.components.unet, targets)
        return {graph: refit_arrays(mapping, weights) for graph, mapping in maps.items()}

    @staticmethod
    def _inversion_key(prepared: PreparedImage, schedule: DdimSchedule, config: EditConfig) -> tuple:
        return (prepared.lora_key, prepared.inputs.working_size, tuple(schedule.inversion_timesteps), config.backend,
                config.inversion.guidance_scale)

    def _inversion_kept(self, prepared: PreparedImage, schedule: DdimSchedule, config: EditConfig) -> bool:
        return self._inversion_key(prepared, schedule, config) in self._inversions

    def _invert(self, denoiser, latents: Optional[torch.Tensor], prepared: PreparedImage, schedule: DdimSchedule,
                config: EditConfig) -> torch.Tensor:
        """z_t of the image; a repeated edit of the same image, prompt and adapter reuses its kept one
        (then `latents`, the clean latent, may be None: `edit` computes it only when `_inversion_kept` is false)."""
        key = self._inversion_key(prepared, schedule, config)
        if key in self._inversions:
            self._inversions.move_to_end(key)
            return self._inversions[key]
        z_t = invert(denoiser, latents, prepared.text_embeddings, schedule, progress=self._progress(),
                     **self._guidance(config))
        while len(self._inversions) >= self.INVERSIONS_KEPT:
            self._inversions.popitem(last=False)
        self._inversions[key] = z_t
        return z_t

    def _guidance(self, config: EditConfig) -> Dict[str, object]:
        """Inversion's and denoising's guidance arguments: the empty prompt's embeddings where the scale is not 1."""
        scale = config.inversion.guidance_scale
        return {} if scale == 1.0 else {"unconditional": self.text_embeddings(""), "guidance_scale": scale}

    def _drag(self, z_t: torch.Tensor, prepared: PreparedImage, schedule: DdimSchedule, config: EditConfig,
              inversion_kept: bool = False):
        """Stage 3; a drag that fits the last one's loop restarts it, skipping the graph's warm-up and capture
        (and, for a repeated edit of the image, `inversion_kept`, the forward that gives `F_0`)."""
        inputs, unet = prepared.inputs, self.components.unet
        args = (z_t, schedule.drag_timestep, prepared.text_embeddings, inputs.handles)
        loop = self._drag_loop
        if loop is not None and loop.fits(unet, *args, inputs.mask, schedule, config.drag, inputs.sup_res,
                                          config.cuda_graphs):
            # a kept inversion means the same adapter, merged the same way: the same UNet
            loop.restart(z_t, prepared.text_embeddings, inputs.handles, inputs.targets, inputs.mask,
                         drag_steps=config.drag.drag_steps, same_weights=inversion_kept)
        else:
            self._drag_loop = None  # free the old graph's memory before capturing another
            loop = DragLoop(unet, *args, inputs.targets, inputs.mask, schedule, config.drag, inputs.sup_res,
                            cuda_graph=config.cuda_graphs, graph_pool=self._shared_graph_pool())
            self._drag_loop = loop
        return loop.run(progress=self._progress())

    def _denoise(self, denoiser, z_t: torch.Tensor, edited: torch.Tensor, prepared: PreparedImage,
                 schedule: DdimSchedule, config: EditConfig) -> torch.Tensor:
        """Stage 4; returns the edited branch's clean latent. With `keep_source_kv` (PyTorch backend) a
        denoising records the source branch's keys and values, and a repeated edit of the image, whose
        inversion is the recorded one's, denoises the edited branch alone with them."""
        text, source_kv = prepared.text_embeddings, self._source_kv
        if not (config.keep_source_kv and getattr(denoiser, "keeps_source_kv", False)):
            source_kv.clear()  # off: hold nothing
            return denoise_pair(denoiser, z_t, edited, text, schedule, config.denoise, progress=self._progress(),
                                **self._guidance(config))[1:]
        key = (self._inversion_key(prepared, schedule, config), config.denoise, config.merge_lora, self._sdpa_priority)
        if source_kv.holds(key):
            return denoise_edited(denoiser, edited, text, schedule, config.denoise, source_kv, progress=self._progress())
        pair = denoise_pair(denoiser, z_t, edited, text, schedule, config.denoise, progress=self._progress(),
                            record=source_kv, record_key=key)
        return pair[1:]

    @_one_at_a_time
    def warm_up(self, size: Optional[Tuple[int, int]] = None, **overrides: Any) -> Dict[str, float]:
        """Run one short edit of a synthetic `size` image (default: the model's native size) and forget it.

        A server calls this once at start-up, so that its first request does not pay what a process
        pays once: Triton's kernel compilation, cuDNN's and cuBLAS's first calls, CUDA's lazy
        initialisation (on an H100 at SD 1.5 / 512 px the first edit of a process took 27 s, the
        next new image 15 s, with the LoRA step eager as it then was; bench/RESULTS.md). Every stage
        runs, each past its CUDA graph capture, at the edit settings (`overrides` as in `edit`) but
        with few LoRA and drag steps, on the PyTorch backend (an exported backend would export into
        the scratch cache, which is deleted). Nothing reaches the LoRA cache. What it captured stays
        where a later edit fits it: the denoiser's graphs at this size, the LoRA trainer's (with
        `keep_lora_trainer`, the default) and the drag loop's (for one handle and a mask: the warm-up
        drags one, under a mask, at the edit's own schedule, whose drag timestep the graph holds), so
        a first request pays neither their eager steps nor their capture. With `keep_source_kv` it edits
        the image twice, so that a repeated edit's batch-1 denoising is captured too.
        Returns the (first) warm-up edit's seconds per stage.
        """
        native = self.components.unet.config.sample_size * self.components.vae_scale
        width, height = size or (native, native)
        rng = np.random.default_rng(0)
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        mask = np.zeros((height, width))
        mask[height // 4:3 * height // 4, width // 4:3 * width // 4] = 1
        points = [((0.4 * width, 0.4 * height), (0.55 * width, 0.5 * height))]
        short = dict(lora_steps=LoraTrainer.GRAPH_WARMUP + 2, drag_steps=DragLoop.GRAPH_WARMUP + 2, backend="torch")
        user_cache, kept_before = self.cache, set(self._inversions)
        with tempfile.TemporaryDirectory(prefix="fastdrag-warm-up-") as scratch:
            self.cache = LoraCache(Path(scratch))
            try:
                result = self.edit(image, "", points, mask=mask, **{**overrides, **short})
                if result.config.keep_source_kv:  # a repeated edit's denoising: its graph, at batch 1
                    self.edit(image, "", points, mask=mask, **{**overrides, **short})
            finally:
                self.cache = user_cache
                self._forget_adapter()
                self._forget_inversions(lambda key: key not in kept_before)
        return result.timings

    @_one_at_a_time
    def edit(self, image: ImageLike, prompt: str, points: Points, mask: Optional[ImageLike] = None,
             on_step: Optional[StepCallback] = None, **overrides: Any) -> EditResult:
        """Move the content under each handle to its target; points are `[((hx, hy), (tx, ty)), ...]`.

        `on_step(stage, done, total)`, if given, is called by the stages that loop ("lora", "inversion",
        "drag", "denoise"; a stage the editor skips, as a cached LoRA's, calls nothing) with 0 before their
        first step and after each step (`fastdrag.progress`). An exception it raises (`EditCancelled`, say)
        ends the edit there: it propagates from here, nothing is cached from the unfinished stage, and the
        editor's next edit is what it would have been without this one.
        """
        with self._reporting(on_step):
            return self._edit(image, prompt, points, mask, **overrides)

    @_one_at_a_time
    def preload(self, image: ImageLike, prompt: str, on_step: Optional[StepCallback] = None,
                **overrides: Any) -> Dict[str, float]:
        """Train (or load) an image's LoRA and invert it before its points are known; returns seconds per stage.

        An interactive server calls this when a user opens an image, while they place the points: the
        image's first edit (same prompt and settings, `overrides` as in `edit`) then keeps the inversion
        and finds the LoRA in the cache, and runs what a repeated edit runs (drag, denoising, decoding).
        The inversion is kept as an edit's is (the `INVERSIONS_KEPT` most recent images). `on_step` as in
        `edit` ("lora", "inversion")."""
        with self._reporting(on_step):
            config = self.config.replace(**overrides)
            total_start = time.perf_counter()
            prepared = self.prepare(image, prompt, None, None, config)
            timings = dict(prepared.timings)
            with self._inversion_stage(prepared, config, timings):
                pass
            timings["total"] = time.perf_counter() - total_start
            return timings

    @contextlib.contextmanager
    def _inversion_stage(self, prepared: PreparedImage, config: EditConfig, timings: Dict[str, float]):
        """Stage 2 (or the kept inversion), inside the adapter's merge: yields (denoiser, schedule, z_t, whether
        the inversion was kept) for the stages after it, which run in the same merge."""
        c = self.components
        schedule = self._schedule(config)
        denoiser = self.denoiser
        denoiser.cuda_graphs = config.cuda_graphs
        if config.backend != "torch":
            denoiser = self._timed(timings, "export", self._exported_denoiser, prepared, config)
        if config.merge_lora != self._merged_mode:  # what the other mode captured or inverted runs other kernels
            self._merged_mode = config.merge_lora
            self.denoiser.reset()
            self._drag_loop = None
            self._forget_inversions()
        self.denoiser.graph_pool = self._shared_graph_pool()
        latents = None  # the clean latent: only an inversion needs it, and a repeated edit keeps its inversion
        kept = self._inversion_kept(prepared, schedule, config)
        if not kept:
            if not prepared.lazy_posterior.encoded:  # the LoRA came from the cache
                self._timed(timings, "vae_encode", prepared.lazy_posterior.get)
            latents = (prepared.posterior.mean * c.scaling_factor).float()
        merged = merged_adapter(c.unet) if config.merge_lora else contextlib.nullcontext()
        with merged, sdpa_priority(self._sdpa_priority):
            z_t = self._timed(timings, "inversion", self._invert, denoiser, latents, prepared, schedule, config)
            yield denoiser, schedule, z_t, kept

    def _edit(self, image: ImageLike, prompt: str, points: Points, mask: Optional[ImageLike],
              **overrides: Any) -> EditResult:
        config = self.config.replace(**overrides)
        total_start = time.perf_counter()
        prepared = self.prepare(image, prompt, points, mask, config)
        inputs, timings = prepared.inputs, dict(prepared.timings)
        c = self.components
        with self._inversion_stage(prepared, config, timings) as (denoiser, schedule, z_t, inversion_kept):
            result = self._timed(timings, "drag", self._drag, z_t, prepared, schedule, config, inversion_kept)
            edited_latent = self._timed(timings, "denoise", self._denoise, denoiser, z_t, result.latent,
                                        prepared, schedule, config)
        edited = self._timed(timings, "vae_decode", decode, c.vae, edited_latent, c.scaling_factor,
                             self._vae_graphs_for(config))
        if edited.size != inputs.original_size:
            edited = edited.resize(inputs.original_size, Image.BICUBIC)
        timings["total"] = time.perf_counter() - total_start
        return EditResult(
            image=edited,
            handles=sup_to_image(result.handles.cpu(), inputs.sup_res, inputs.original_size),
            targets=sup_to_image(inputs.targets, inputs.sup_res, inputs.original_size),
            timings=timings,
            config=config,
            drag_steps=result.steps,
            lora_cached=prepared.lora_cached,
            lora_key=prepared.lora_key,
        )
