"""Reference control: the self-attention K/V swap of stage 4, as a diffusers attention processor.

The batch holds consecutive (source, edited) pairs: `[source, edited]` at guidance scale 1, or
`[uncond source, uncond edited, cond source, cond edited]` with classifier-free guidance. In the
selected self-attention layers every row's queries attend to the keys and values of the source
row of its pair. Keys and values are projected for the source rows only, and the two rows of a
pair are viewed as one query sequence of twice the length (a free view of the contiguous
batch), so no K/V copy and no query concatenation is ever made. The attention itself runs on
xformers' memory-efficient kernel where it works, else on PyTorch SDPA.

With a `SourceKV` the processor either records the source rows' keys and values of each step, or
(a repeated edit of an image) takes a batch of edited rows alone and reads the recorded ones.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import ConfigError
from .source_kv import SourceKV
from .weights import first_weight

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "xformers")
# PyTorch SDPA's backends in priority order, by name. "default" keeps PyTorch's own, which differs by
# GPU: flash, memory-efficient, math (then cuDNN), except on sm90/sm100 GPUs (H100, H200, B200) with a
# recent cuDNN, where PyTorch tries cuDNN's attention first (`check_prefer_cudnn_attention` in its
# sdp_utils.cpp; an H100 profile of a LoRA step shows cuDNN's SDPA kernels, bench/RESULTS.md).
# "flash" tries FlashAttention-2 first, "cudnn" cuDNN's attention, "efficient" the memory-efficient kernel.
SDPA_PRIORITIES: Dict[str, Optional[List[SDPBackend]]] = {
    "default": None,
    "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH],
    "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH],
}
SDPA_BACKEND_NAMES = {SDPBackend.FLASH_ATTENTION: "FlashAttention", SDPBackend.EFFICIENT_ATTENTION: "memory-efficient",
                      SDPBackend.CUDNN_ATTENTION: "cuDNN", SDPBackend.MATH: "math"}


def check_sdpa_priority(name: str) -> str:
    """`name` if it is one of `SDPA_PRIORITIES`, else a ConfigError naming them."""
    if name not in SDPA_PRIORITIES:
        raise ConfigError(f"sdpa_priority must be one of {', '.join(SDPA_PRIORITIES)}; got {name!r}")
    return name


_CAN_RUN = {SDPBackend.CUDNN_ATTENTION: "can_use_cudnn_attention",
            SDPBackend.EFFICIENT_ATTENTION: "can_use_efficient_attention",
            SDPBackend.FLASH_ATTENTION: "can_use_flash_attention"}


def first_backend_runs(name: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       debug: bool = False) -> bool:
    """Whether the backend `sdpa_priority(name)` tries first can run this SDPA call (no mask, no
    dropout), else SDPA falls back to the next; "default" is always true. `debug` has PyTorch warn why not."""
    from torch.nn.attention import SDPAParams

    backends = SDPA_PRIORITIES[check_sdpa_priority(name)]
    if backends is None:
        return True
    if not query.is_cuda:  # none of them runs other tensors; asking would start CUDA, which fails without a driver
        return False
    can_run = getattr(torch.backends.cuda, _CAN_RUN[backends[0]])
    return can_run(SDPAParams(query, key, value, None, 0.0, False, False), debug)


def chosen_backend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> str:
    """The backend SDPA picks for this call (no mask, no dropout) under the order in force, by name."""
    choice = SDPBackend(torch._fused_sdp_choice(query, key, value))
    return SDPA_BACKEND_NAMES.get(choice, choice.name)


def sdpa_choices(device: torch.device) -> Dict[str, str]:
    """For each `SDPA_PRIORITIES` order, the backend SDPA picks here at SD 1.5's smallest head size
    (40; fp16 on CUDA, fp32 elsewhere; diffusers' layout): what `--sdpa-priority` would change."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    query = torch.zeros(1, 64, 8, 40, device=device, dtype=dtype).transpose(1, 2)
    choices = {}
    for name in SDPA_PRIORITIES:
        with sdpa_priority(name):
            choices[name] = chosen_backend(query, query, query)
    return choices


@contextlib.contextmanager
def sdpa_priority(name: str) -> Iterator[None]:
    """PyTorch SDPA tries its backends in the order `SDPA_PRIORITIES[name]` for the duration, each
    where it supports the call, and only those ("default": PyTorch's order, untouched).

    Why: on a GPU the UNet's own attention (the LoRA step's, the drag's, the unswapped layers of
    inversion and denoising) runs on SDPA, whose default order depends on the GPU (see
    `SDPA_PRIORITIES`: cuDNN's attention first on an H100, FlashAttention-2 first on an A100). Both
    support SD's head sizes (40, 80, 160) forward and backward; which is faster at SD's calls is for
    the attention benchmark to say (bench/test_attention.py). The choice is process-wide state while
    it lasts (PyTorch keeps it in global flags), and CUDA graphs keep the kernels they captured under it.
    """
    backends = SDPA_PRIORITIES[check_sdpa_priority(name)]
    if backends is None:
        yield
        return
    with sdpa_kernel(backends, set_priority=True):
        yield


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, Lq, H, d) x (B, Lk, H, d) -> (B, Lq, H, d) with PyTorch SDPA."""
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


def _xformers(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, Lq, H, d) x (B, Lk, H, d) -> (B, Lq, H, d) with xformers' memory-efficient attention."""
    import xformers.ops

    return xformers.ops.memory_efficient_attention(query, key, value, scale=scale)


ATTENTION = {"sdpa": _sdpa, "xformers": _xformers}


def attention_function(backend: str, head_dim: int):
    """The attention call for `backend` at this head size: xformers' kernels (0.0.35) take head sizes
    that are multiples of 8 only (SD's 40, 80 and 160 are), so other sizes, e.g. a tiny test model's,
    run on SDPA."""
    if backend == "xformers" and head_dim % 8:
        return _sdpa
    return ATTENTION[backend]


@functools.lru_cache(maxsize=None)
def xformers_support(device_type: str, dtype: torch.dtype) -> Tuple[bool, str]:
    """(usable, why) for xformers attention on this device type and dtype; probed once by a tiny call."""
    if importlib.util.find_spec("xformers") is None:
        return False, "xformers is not installed"
    if device_type != "cuda":
        return False, f"xformers has no kernels for {device_type} tensors"
    try:
        q = torch.randn(1, 8, 1, 40, device=device_type, dtype=dtype)
        _xformers(q, q[:, :4], q[:, :4], 40 ** -0.5)
    except Exception as exc:  # noqa: BLE001 - any failure means: not usable here
        return False, f"xformers failed on {dtype}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    return True, f"xformers works on cuda {dtype}"


def choose_backend(requested: str, device: torch.device, dtype: torch.dtype) -> Tuple[str, str]:
    """(backend, reason): 'xformers' where it works, else 'sdpa'; a forced but unusable xformers is an error."""
    if requested not in BACKENDS:
        raise ConfigError(f"attention_backend must be one of {', '.join(BACKENDS)}; got {requested!r}")
    if requested == "sdpa":
        return "sdpa", "requested"
    usable, why = xformers_support(device.type, dtype)
    if usable:
        return "xformers", why
    if requested == "xformers":
        raise ConfigError(f"attention_backend 'xformers' is not usable here: {why}")
    return "sdpa", why


class ReferenceAttnProcessor:
    """Self-attention where both rows of each (source, edited) pair use the source row's K/V.

    With `source_kv` (and this layer's `name` in it): while it records, the source rows' keys and
    values are also written into it; otherwise every row of the batch is an edited row, whose
    queries attend to the keys and values recorded for this layer at the current step.
    """

    def __init__(self, backend: str = "sdpa", source_kv: Optional[SourceKV] = None, name: str = ""):
        if backend not in ATTENTION:
            raise ConfigError(f"unknown attention backend {backend!r}; use one of {', '.join(ATTENTION)}")
        self.backend = backend
        self.source_kv = source_kv
        self.name = name

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("ReferenceAttnProcessor is for self-attention layers only")
        if attention_mask is not None:
            raise ValueError("ReferenceAttnProcessor does not take an attention mask")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch, length, _ = hidden_states.shape
        kept = self.source_kv is not None and not self.source_kv.recording
        if batch % 2 and not kept:
            raise ValueError(f"reference control needs (source, edited) pairs in the batch; got batch {batch}")
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        heads = attn.heads
        query = attn.to_q(hidden_states)
        head_dim = query.shape[-1] // heads
        if kept:  # edited rows alone: the source rows' keys and values were recorded
            pairs, rows = batch, 1
            key, value = self.source_kv.read(self.name)
            if key.shape != (pairs, length, heads, head_dim):
                raise ValueError(f"layer {self.name}: recorded keys {tuple(key.shape)} do not fit "
                                 f"{pairs} edited rows of length {length}")
        else:
            pairs, rows = batch // 2, 2
            source = hidden_states[0::2]
            key = attn.to_k(source).reshape(pairs, length, heads, head_dim)
            value = attn.to_v(source).reshape(pairs, length, heads, head_dim)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            if self.source_kv is not None:
                self.source_kv.record(self.name, key, value)
        # the pair's two rows are adjacent in memory: one query sequence of length 2L per pair
        query = query.reshape(pairs, rows * length, heads, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        out = attention_function(self.backend, head_dim)(query, key, value, attn.scale)
        out = out.reshape(batch, length, heads * head_dim).to(query.dtype)

        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        # SD's factor is 1: no division, which would be a kernel each way that changes nothing
        return out if attn.rescale_output_factor == 1.0 else out / attn.rescale_output_factor


def transformer_blocks(unet: torch.nn.Module) -> List[str]:
    """Module names of the UNet's transformer blocks in forward order: down blocks, mid, up blocks
    (built from the stages' attributes, not a walk of every module: it runs at every denoising)."""
    stages = ([(f"down_blocks.{i}", stage) for i, stage in enumerate(unet.down_blocks)] + [("mid_block", unet.mid_block)]
              + [(f"up_blocks.{i}", stage) for i, stage in enumerate(unet.up_blocks)])
    names = []
    for prefix, stage in stages:
        for j, transformer in enumerate(getattr(stage, "attentions", []) or []):
            for k, _ in enumerate(getattr(transformer, "transformer_blocks", [])):
                names.append(f"{prefix}.attentions.{j}.transformer_blocks.{k}")
    return names


def self_attention_processor_names(unet: torch.nn.Module, start_layer: int) -> List[str]:
    """Processor names of the self-attention (`attn1`) of transformer blocks `start_layer` onward."""
    blocks = transformer_blocks(unet)
    if start_layer >= len(blocks):
        raise ConfigError(
            f"start_layer {start_layer} is past the model's last transformer block (it has {len(blocks)}, indices 0-{len(blocks) - 1})"
        )
    return [f"{name}.attn1.processor" for name in blocks[start_layer:]]


@contextlib.contextmanager
def reference_control(unet: torch.nn.Module, start_layer: int, backend: str = "auto",
                      source_kv: Optional[SourceKV] = None) -> Iterator[List[str]]:
    """Install the K/V-swap processor on the chosen self-attention layers; restore the originals on exit.
    With `source_kv`, each chosen layer records into it or reads from it (`ReferenceAttnProcessor`)."""
    chosen = self_attention_processor_names(unet, start_layer)
    weight = first_weight(unet)  # runs at every denoising: not diffusers' `device` and `dtype`
    resolved, why = choose_backend(backend, weight.device, weight.dtype)
    logger.debug("reference attention on %s (%s)", resolved, why)
    # only the chosen layers' processors change (diffusers' `set_attn_processor` walks and sets them all)
    layers = {name: unet.get_submodule(name[:-len(".processor")]) for name in chosen}
    original = {name: layer.processor for name, layer in layers.items()}
    if source_kv is None:
        shared = ReferenceAttnProcessor(resolved)
        swaps = {name: shared for name in chosen}
    else:
        swaps = {name: ReferenceAttnProcessor(resolved, source_kv, name) for name in chosen}
    for name, layer in layers.items():
        layer.set_processor(swaps[name])
    try:
        yield chosen
    finally:
        for name, layer in layers.items():
            layer.set_processor(original[name])
