"""Dataclass configs for the four stages, holding the published DragDiffusion defaults."""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from .errors import ConfigError


@dataclass(frozen=True)
class LoraConfig:
    """Stage 1: identity-preserving LoRA fine-tuning of the UNet on the input image."""

    lora_rank: int = 16
    lora_targets: Tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    lora_lr: float = 5e-4
    lora_steps: int = 80
    lora_batch_size: int = 4


@dataclass(frozen=True)
class InversionConfig:
    """Stage 2: DDIM inversion; the schedule is shared with the drag and denoising stages."""

    num_inference_steps: int = 50
    inversion_strength: float = 0.7
    guidance_scale: float = 1.0  # classifier-free guidance of inversion and denoising (1: none; `fastdrag.guidance`)

    @property
    def num_inversion_steps(self) -> int:
        """Steps walked by inversion and by denoising (35 at the defaults)."""
        return int(round(self.num_inference_steps * self.inversion_strength))


@dataclass(frozen=True)
class DragConfig:
    """Stage 3: latent optimisation by motion supervision and point tracking."""

    feature_block: int = 2          # index into unet.up_blocks whose output is the feature map
    sup_res: Optional[Tuple[int, int]] = None  # (h, w); None = half the working image size
    r_m: int = 1
    r_p: int = 3
    drag_lr: float = 0.01
    drag_steps: int = 80
    lam: float = 0.1
    reach_distance: float = 2.0
    mixed_precision: bool = True    # autocast in the UNet dtype on CUDA (fp32 on the CPU)


@dataclass(frozen=True)
class DenoiseConfig:
    """Stage 4: reference-controlled denoising (self-attention K/V swap)."""

    start_step: int = 0     # first denoising step with the K/V swap
    start_layer: int = 10   # first transformer block (forward order) with the K/V swap
    attention_backend: str = "auto"  # auto (xformers where it works, else SDPA), sdpa or xformers


@dataclass(frozen=True)
class EditConfig:
    """Everything one edit uses; `replace(**overrides)` takes any stage field by name."""

    lora: LoraConfig = field(default_factory=LoraConfig)
    inversion: InversionConfig = field(default_factory=InversionConfig)
    drag: DragConfig = field(default_factory=DragConfig)
    denoise: DenoiseConfig = field(default_factory=DenoiseConfig)
    seed: int = 42
    size: Optional[Tuple[int, int]] = None  # working (width, height); None = rounded to 64
    backend: str = "torch"  # denoiser of stages 2 and 4: torch, onnxruntime or tensorrt (exported graphs)
    # CUDA only (ignored elsewhere): replay the drag iteration and the UNet forwards as captured CUDA
    # graphs; on an H200 at SD 1.5 / 512 px they made a repeated edit 3.5x faster (bench/RESULTS.md)
    cuda_graphs: bool = True
    # CUDA only, with cuda_graphs: also replay the LoRA training step (forward, backward, AdamW) as a
    # CUDA graph; on an H100 it made the step 2.3x faster (127 -> 55 ms) and a first edit 15.4 -> 9.0 s
    cuda_graph_lora: bool = True
    # Keep the LoRA trainer after the LoRA stage, with its CUDA graph where it has one, so the next
    # new image of the same size and LoRA settings restarts it in place instead of paying 3 eager
    # steps and a capture (H100, SD 1.5 / 512 px: a new image 7.52 -> 6.81 s). Its graph then shares
    # the editor's one memory pool with the drag loop's and the denoiser's, so keeping it holds less
    # than not keeping it: 8.18 GiB reserved at every edit, against 9.3-13.7 GiB without (bench/RESULTS.md).
    # `DragEditor.release()` frees it
    keep_lora_trainer: bool = True
    # CUDA only, with cuda_graphs: replay the VAE's encoder and decoder as CUDA graphs in that pool, the
    # decoder captured before the edit's other graphs, so their activations use the pool's idle memory
    # instead of memory of their own beside it (H100, SD 1.5 / 512 px: 6.89 -> 6.10 GiB reserved, the
    # same edit times; bench/RESULTS.md, twenty-fourth session)
    cuda_graph_vae: bool = True
    # Fold the frozen LoRA into the UNet's weights for inversion, drag and denoising (one matmul per
    # LoRA layer; restored exactly after the edit). The same arithmetic up to one rounding of each
    # merged weight, as the exported backends run it; in fp16 on CUDA it removes the LoRA branch's
    # fp32 matmuls and casts (bench/RESULTS.md)
    merge_lora: bool = True
    # PyTorch backend: keep the source branch's self-attention keys and values of the swapped denoising
    # steps after an edit, so that a repeated edit of the image (its inversion kept) denoises the edited
    # branch alone, at batch 1 (`fastdrag.source_kv`). Holds them between edits (SD 1.5 / 512 px in fp16:
    # 0.83 GB for 35 steps). Off until a GPU measures what it saves
    keep_source_kv: bool = False
    # Recompute the UNet's resnets and transformer blocks in the LoRA step's backward instead of keeping
    # their activations (`fastdrag.block_checkpointing`): the same adapter, about one more forward of them
    # per step. What the step keeps, counted on the meta device in fp16 (`bench/kept_memory.py`): SD 1.5 /
    # 512 px 2,258 -> 342 MiB, SD 2.1 / 768 px 5,059 -> 770 MiB. For GPUs the default does not fit; its
    # time and peak memory on a GPU are not measured yet
    lora_checkpointing: bool = False

    STAGES = ("lora", "inversion", "drag", "denoise")

    def replace(self, **overrides: Any) -> "EditConfig":
        """A copy with fields replaced; names are stage fields (e.g. `drag_steps`) or top-level."""
        stage_changes: dict = {name: {} for name in self.STAGES}
        top: dict = {}
        for key, value in overrides.items():
            owner = stage_of_field(key)
            if owner is None:
                raise ConfigError(f"unknown edit option {key!r}; known: {', '.join(sorted(field_names()))}")
            if owner == "":
                top[key] = value
            else:
                stage_changes[owner][key] = value
        for name, changes in stage_changes.items():
            if changes:
                top[name] = dataclasses.replace(getattr(self, name), **changes)
        result = dataclasses.replace(self, **top)
        result.validate()
        return result

    def validate(self) -> None:
        """Raise ConfigError for values the method cannot run with."""
        for holder in (self, self.lora, self.inversion, self.drag, self.denoise):
            for spec in dataclasses.fields(holder):
                problem = _type_problem(spec.type, getattr(holder, spec.name))
                if problem:
                    raise ConfigError(f"{spec.name} must be {problem}; got {getattr(holder, spec.name)!r}")
        checks = [
            (self.lora.lora_rank >= 1, "lora_rank must be >= 1"),
            (self.lora.lora_steps >= 0, "lora_steps must be >= 0"),
            (self.lora.lora_batch_size >= 1, "lora_batch_size must be >= 1"),
            (self.inversion.num_inference_steps >= 1, "num_inference_steps must be >= 1"),
            (0.0 < self.inversion.inversion_strength <= 1.0, "inversion_strength must be in (0, 1]"),
            (self.inversion.num_inversion_steps >= 1, "inversion_strength * num_inference_steps must give at least one step"),
            (self.drag.r_m >= 0 and self.drag.r_p >= 0, "r_m and r_p must be >= 0"),
            (self.drag.drag_steps >= 0, "drag_steps must be >= 0"),
            (self.lora.lora_lr > 0 and self.drag.drag_lr > 0, "lora_lr and drag_lr must be > 0"),
            (self.drag.lam >= 0 and self.drag.reach_distance >= 0, "lam and reach_distance must be >= 0"),
            (self.denoise.start_step >= 0, "start_step must be >= 0"),
            (self.inversion.guidance_scale >= 0, "guidance_scale must be >= 0"),
            (self.inversion.guidance_scale == 1.0 or not self.keep_source_kv,
             "keep_source_kv records the source branch without guidance: it needs guidance_scale 1"),
            (self.drag.sup_res is None or min(self.drag.sup_res) >= 1, "sup_res must be None or (h, w), each >= 1"),
            (self.denoise.start_layer >= 0, "start_layer must be >= 0"),
            (self.denoise.attention_backend in ("auto", "sdpa", "xformers"), "attention_backend must be auto, sdpa or xformers"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.backend not in ("torch", "onnxruntime", "tensorrt"):
            raise ConfigError(f"backend must be torch, onnxruntime or tensorrt; got {self.backend!r}")
        if self.size is not None and (len(self.size) != 2 or any(int(s) < 64 or int(s) % 8 for s in self.size)):
            raise ConfigError(f"size must be (width, height), each a multiple of 8 and >= 64; got {self.size}")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _type_problem(annotation: str, value: Any) -> Optional[str]:
    """What `value` should be for a field annotated `annotation` (None if it is that), so that a seed of
    "x" or 2.5 drag steps is refused up front instead of failing somewhere in a stage."""
    if annotation == "int" and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        return "a whole number"  # (numpy's integers are Integral; its bools are not)
    if annotation == "float" and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                  or not math.isfinite(value)):
        return "a finite number"
    if annotation == "bool" and not (isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", "") == "b"):
        return "true or false"
    if annotation == "Optional[Tuple[int, int]]" and value is not None and (
            not isinstance(value, (tuple, list)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in value)):
        return "None or two whole numbers"
    if annotation == "Tuple[str, ...]" and (isinstance(value, str) or not isinstance(value, (tuple, list)) or not value
                                            or not all(isinstance(v, str) and v for v in value)):
        return "a non-empty sequence of module names"
    if annotation == "str" and not isinstance(value, str):
        return "a string"
    return None


def field_names() -> dict:
    """Map every overridable field name to its stage ('' for top-level fields)."""
    names = {f.name: "" for f in dataclasses.fields(EditConfig) if f.name not in EditConfig.STAGES}
    for stage in EditConfig.STAGES:
        stage_type = {f.name: f for f in dataclasses.fields(EditConfig)}[stage].default_factory
        for f in dataclasses.fields(stage_type):
            names[f.name] = stage
    return names


def stage_of_field(name: str) -> Optional[str]:
    return field_names().get(name)
