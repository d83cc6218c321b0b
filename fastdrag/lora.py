"""Stage 1: identity-preserving LoRA fine-tuning of the UNet on the input image, and its cache."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_path
from .autocast import unet_autocast
from .block_checkpointing import checkpointed_blocks
from .cache_usage import touch
from .config import LoraConfig
from .cuda_graph import OptimizerStep
from .ddim import noised, prediction_type_of, training_target
from .errors import ConfigError, InputError
from .shared_casts import HALF
from .half_norms import enabled as half_norms_enabled
from .lean_blocks import install_lean_lora, lean_lora_layers, runs_lean
from .lora_casts import half_adapter_weights
from .progress import Progress, as_progress
from .weights import first_weight

logger = logging.getLogger(__name__)

ADAPTER = "fastdrag"


def default_cache_dir() -> Path:
    """`$FASTDRAG_CACHE/lora`, else `$XDG_CACHE_HOME/fastdrag/lora`, else `~/.cache/fastdrag/lora`."""
    if os.environ.get("FASTDRAG_CACHE"):
        return Path(os.environ["FASTDRAG_CACHE"]) / "lora"
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "fastdrag" / "lora"


def lora_key(model_identity: str, image: Image.Image, prompt: str, config: LoraConfig, seed: int,
             precision: torch.dtype) -> str:
    """Hash of everything that determines the trained adapter (`precision`: the model's dtype, which
    decides whether the UNet ran under fp16/bf16 autocast while it trained)."""
    described = {
        "model": model_identity,
        "precision": str(precision).replace("torch.", ""),
        "image_size": list(image.size),
        "prompt": prompt,
        "lora": dataclasses.asdict(config),
        "seed": seed,
    }
    if precision in HALF and half_norms_enabled():  # only then: the keys of every other adapter stay as they were
        described["half_norms"] = True
    digest = hashlib.sha256()
    digest.update(json.dumps(described, sort_keys=True).encode())
    digest.update(np.asarray(image.convert("RGB")).tobytes())
    return digest.hexdigest()[:32]


class LoraCache:
    """Trained adapters as `<dir>/<key>.safetensors`."""

    def __init__(self, directory: Optional[Path] = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def load(self, key: str) -> Optional[Dict[str, torch.Tensor]]:
        path = self.path(key)
        if not path.is_file():
            return None
        touch(path)  # recently used: pruning the cache (`fastdrag cache`) removes the least recently used
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:  # truncated or damaged on disk: a miss, not a failed edit
            logger.warning("the cached LoRA %s is unreadable (%s); it is trained again and replaced", path, exc)
            return None

    def require(self, key: str) -> Dict[str, torch.Tensor]:
        """The adapter stored under `key`; a clear error when there is none."""
        state = self.load(key)
        if state is None:
            raise InputError(f"LoRA key {key!r} is not in the cache at {self.directory}: run `fastdrag lora` for that image first")
        return state

    def save(self, key: str, state: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> Path:
        path = self.path(key)
        with atomic_path(path) as tmp:
            save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
        return path


def peft_config(config: LoraConfig) -> PeftLoraConfig:
    return PeftLoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank, init_lora_weights=True,
                          target_modules=list(config.lora_targets))


def named_lora_layers(unet: torch.nn.Module) -> List[Tuple[str, LoraLayer]]:
    """(module name, layer) of each LoRA layer of the package's adapter."""
    return [(name, module) for name, module in unet.named_modules()
            if isinstance(module, LoraLayer) and ADAPTER in module.lora_A]


def lora_layers(unet: torch.nn.Module) -> List[LoraLayer]:
    return [layer for _, layer in named_lora_layers(unet)]


def lora_parameters(unet: torch.nn.Module) -> List[torch.nn.Parameter]:
    return [p for name, p in unet.named_parameters() if f".{ADAPTER}." in name and "lora_" in name]


def add_adapter_deltas_(weight: torch.Tensor, layer: LoraLayer) -> torch.Tensor:
    """`weight` plus the delta (scale·B·A) of each active adapter of `layer`, in place, as peft's merge
    adds it: the delta in the adapter's dtype, the sum rounded once to the weight's."""
    for adapter in layer.active_adapters:
        weight += layer.get_delta_weight(adapter).detach()
    return weight


@contextlib.contextmanager
def merged_adapter(unet: torch.nn.Module) -> Iterator[None]:
    """Run the UNet with its adapter folded into the target weights and the LoRA branch off.

    The stages after training (inversion, drag, denoising) never change the adapter, so each LoRA
    layer can be one matmul with W + scale·B·A (`add_adapter_deltas_`, which the exports' merged
    weights use too). Run unmerged, each layer
    adds two small matmuls, a scale and an add, and in fp16 without autocast casts its input to the
    fp32 of the master weights and back. The weights change in place, so CUDA graphs captured
    inside see the merged values of every later merge; on exit the original weights are written
    back exactly (from a copy kept for the duration) and the branch is on again. A UNet without
    an adapter, or one already merged, runs as it is.
    """
    layers = lora_layers(unet)
    if not layers or getattr(unet, "_fastdrag_merged", False):
        yield
        return
    params = lora_parameters(unet)
    trainable = [p.requires_grad for p in params]
    originals = []
    with torch.no_grad():
        for layer in layers:
            weight = layer.get_base_layer().weight
            originals.append(weight.detach().clone())
            add_adapter_deltas_(weight, layer)
    unet.disable_adapters()
    unet._fastdrag_merged = True
    try:
        yield
    finally:
        with torch.no_grad():
            for layer, original in zip(layers, originals, strict=True):
                layer.get_base_layer().weight.copy_(original)
        unet.enable_adapters()
        for param, flag in zip(params, trainable, strict=True):  # enabling sets the adapter trainable
            param.requires_grad_(flag)
        unet._fastdrag_merged = False


def install_adapter(unet: torch.nn.Module, config: LoraConfig, seed: int) -> None:
    """Give the UNet a freshly initialised adapter (LoRA B = 0, so the model output is unchanged).

    The adapter is added once and re-initialised for each image; it is rebuilt only when the
    rank or targets change. LoRA weights are kept in fp32 (the master weights).
    """
    installed = getattr(unet, "_fastdrag_lora_config", None)
    if installed is not None and (installed.lora_rank, installed.lora_targets) != (config.lora_rank, config.lora_targets):
        unet.delete_adapters(ADAPTER)
        unet._fastdrag_lora_config = installed = None  # gone: if adding the new one fails, the next call adds afresh
    if installed is None:
        _check_targets(unet, config.lora_targets)
        try:
            unet.add_adapter(peft_config(config), adapter_name=ADAPTER)
        except BaseException:
            if not hasattr(unet, "peft_config"):  # diffusers marked an adapter loaded before peft failed
                unet._hf_peft_config_loaded = False
            raise
    layers = lora_layers(unet)
    params = [weight for layer in layers for weight in _adapter_weights(layer)]
    for param in params:
        if param.dtype != torch.float32:
            param.data = param.data.float()
    # initialised here, in fp32, not by add_adapter (whose layer construction draws first, in the
    # model's dtype): the same seed gives the same adapter on a fresh or a used model of any dtype
    device = params[0].device if params else torch.device("cpu")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for layer in layers:
            layer.reset_lora_parameters(ADAPTER, True)
    if installed is None:
        unet.requires_grad_(False)
        if runs_lean(unet):  # the new LoRA layers too (fastdrag.lean_blocks)
            install_lean_lora(unet)
    else:  # the same layers re-initialised: only their weights may have been set training (LoraTrainer)
        for param in params:
            param.requires_grad_(False)
    unet._fastdrag_lora_config = config


def _check_targets(unet: torch.nn.Module, targets: Tuple[str, ...]) -> None:
    """Refuse LoRA targets that name no module, or a module other than a linear layer (what the merge, the
    exports and their refit maps handle), before the UNet is changed."""
    for target in targets:
        found = [(name, module.get_base_layer() if isinstance(module, LoraLayer) else module)
                 for name, module in unet.named_modules() if name == target or name.endswith("." + target)]
        if not found:
            raise ConfigError(f"lora_targets entry {target!r} names no module of the UNet (the published "
                              f"targets: {', '.join(LoraConfig.lora_targets)})")
        other = [(name, module) for name, module in found if not isinstance(module, torch.nn.Linear)]
        if other:
            name, module = other[0]
            raise ConfigError(f"lora_targets entry {target!r} names {name}, a {type(module).__name__}: LoRA targets "
                              f"must be linear layers, as the published {', '.join(LoraConfig.lora_targets)} are")


def _adapter_weights(layer: LoraLayer) -> List[torch.nn.Parameter]:
    """The adapter's parameters of one LoRA layer (A and B weights, and biases where it has them)."""
    return [param for module in (layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]) for param in module.parameters()]


def adapter_state(unet: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return get_peft_model_state_dict(unet, adapter_name=ADAPTER)


def load_adapter_state(unet: torch.nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Copy a cached adapter (`adapter_state`'s keys) into the installed one.

    A state whose keys are exactly the installed adapter's weights, as `adapter_state` names them, is
    copied straight into them (one multi-tensor copy): peft's `set_peft_model_state_dict` walks the
    model's modules several times, 40 ms of host time for SD 1.5's 256 tensors on a 2-core CPU, and
    a user taking a turn pays it at every return (bench/RESULTS.md). Any other state goes through peft,
    which names what does not fit."""
    slots = {f"{name}.{kind}.weight": matrix.weight for name, layer in named_lora_layers(unet)
             for kind, matrix in (("lora_A", layer.lora_A[ADAPTER]), ("lora_B", layer.lora_B[ADAPTER]))
             if matrix.bias is None}
    if slots and slots.keys() == state.keys():
        targets = list(slots.values())
        sources = [state[key].to(device=param.device, dtype=param.dtype) for key, param in slots.items()]
        with torch.no_grad():
            torch._foreach_copy_(targets, sources)
        return
    device = unet.device
    result = set_peft_model_state_dict(unet, {k: v.to(device) for k, v in state.items()}, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise RuntimeError(f"cached adapter does not fit this model: unexpected keys {unexpected[:3]}")


def lora_loss(unet, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              text_embeddings: torch.Tensor, alphas_cumprod: torch.Tensor,
              prediction_type: str = "epsilon") -> torch.Tensor:
    """The denoising MSE of DreamBooth-style fine-tuning on noised `latents`, against what the UNet
    outputs (`prediction_type`: the noise, the velocity or the clean latents)."""
    noisy, target = _noisy_and_target(latents, noise, timesteps, alphas_cumprod, prediction_type)
    with _lora_forward(unet):
        prediction = _predicted(unet, noisy, timesteps, text_embeddings)
    return F.mse_loss(prediction.float(), target.float())


def lora_backward(unet, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                  text_embeddings: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                  checkpointing: bool = False) -> torch.Tensor:
    """`lora_loss` and its backward, the gradients added to the LoRA weights'; returns the loss, detached.

    With `checkpointing` the UNet's resnets and transformer blocks keep only their inputs and run again in
    the backward (`fastdrag.block_checkpointing`): the same gradients, a fraction of the memory. The
    backward then runs inside the forward's contexts, which the recomputation needs, with autocast off
    as it is outside them (PyTorch's checkpoint turns it back on for each recomputed block)."""
    if not checkpointing:
        loss = lora_loss(unet, latents, noise, timesteps, text_embeddings, alphas_cumprod, prediction_type)
        loss.backward()
        return loss.detach()
    noisy, target = _noisy_and_target(latents, noise, timesteps, alphas_cumprod, prediction_type)
    with _lora_forward(unet, checkpointing=True) as autocast:
        prediction = _predicted(unet, noisy, timesteps, text_embeddings)
        with torch.autocast(unet.device.type, enabled=False) if autocast else contextlib.nullcontext():
            loss = F.mse_loss(prediction.float(), target.float())
            loss.backward()
    return loss.detach()


@contextlib.contextmanager
def _lora_forward(unet, checkpointing: bool = False) -> Iterator[bool]:
    """What a LoRA step's UNet forward runs in: CUDA's half-precision autocast (yields whether it is on),
    the adapters' half weights made in one pass, and the checkpointed blocks if asked."""
    autocast = unet.device.type == "cuda" and unet.dtype != torch.float32
    with checkpointed_blocks(unet, checkpointing), \
            unet_autocast(unet, autocast, norms_in_half=autocast and half_norms_enabled()), \
            half_adapter_weights(lean_lora_layers(unet)):
        yield autocast


def _noisy_and_target(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                      alphas_cumprod: torch.Tensor, prediction_type: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """The noised latents a LoRA step feeds the UNet and what it should output for them."""
    noisy = noised(latents, noise, timesteps, alphas_cumprod)
    if prediction_type == "epsilon":
        return noisy, noise
    alpha = alphas_cumprod[timesteps].view(-1, *[1] * (latents.dim() - 1))
    return noisy, training_target(latents, noise, alpha, prediction_type)


def _predicted(unet, noisy: torch.Tensor, timesteps: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    return unet(noisy.to(unet.dtype), timesteps, encoder_hidden_states=text_embeddings.to(unet.dtype)).sample


class LoraTrainer:
    """Fine-tunes a fresh adapter on one image, one step at a time.

    `posterior` is the VAE posterior of the image, computed once per edit; each step samples it
    afresh for the whole batch, which runs as one forward. Only the LoRA weights train (AdamW,
    fused on CUDA); frozen weights get no gradients. With `cuda_graph` (CUDA only) the step —
    forward, backward, AdamW — is captured after `GRAPH_WARMUP` eager steps and replayed; the
    random draws stay outside the graph, in buffers it reads, so both paths train on the same
    batches. `restart` re-runs it on another image of the same shapes and settings in its own
    tensors, as a fresh trainer would, so a kept graph replays from the first step: a server's next
    image pays neither the eager warm-up steps nor a capture. `graph_pool` (a `GraphPool` handle)
    captures the step into memory that other graphs share. `checkpointing` recomputes the UNet's blocks in
    the backward instead of keeping their activations (`lora_backward`): the same adapter, less memory.
    """

    GRAPH_WARMUP = 3

    def __init__(self, unet, scheduler, posterior, text_embeddings: torch.Tensor, scaling_factor: float,
                 config: LoraConfig, seed: int, cuda_graph: bool = False, graph_pool=None,
                 checkpointing: bool = False):
        install_adapter(unet, config, seed)
        self.unet, self.scaling_factor, self.config = unet, scaling_factor, config
        self.checkpointing = checkpointing
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.prediction_type = prediction_type_of(scheduler)
        self.half_norms = half_norms_enabled()  # what a captured step computes with
        self.params = lora_parameters(unet)
        for param in self.params:
            param.requires_grad_(True)
        device = unet.device
        fused = device.type == "cuda"
        self.cuda_graph = cuda_graph and fused
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lora_lr, fused=fused or None,
                                           foreach=None if fused else True, capturable=self.cuda_graph)
        # (no generator on the meta device, where FLOP budgets are counted at full size)
        self.generator = torch.Generator(device=device).manual_seed(seed) if device.type != "meta" else None
        # the trainer's own copies: a graph reads them by address, and `restart` refills them
        self.mean, self.std = posterior.mean.float().clone(), posterior.std.float().clone()
        self.alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
        self.batch = config.lora_batch_size
        self.text = text_embeddings.clone()
        shape = (self.batch, *self.mean.shape[1:])
        self.sample_noise = torch.empty(shape, device=device)  # draws of one step, refilled in place
        self.noise = torch.empty(shape, device=device)
        self.timesteps = torch.empty(self.batch, dtype=torch.long, device=device)
        self.loss = torch.zeros((), device=device)
        self.optimizer_step = OptimizerStep(self._compute, self.optimizer, self.cuda_graph, self.GRAPH_WARMUP, device,
                                            pool=graph_pool)
        self.param_storage = [param.data_ptr() for param in self.params]
        unet.train()

    @property
    def graph(self) -> Optional[torch.cuda.CUDAGraph]:
        """The captured step, once there is one."""
        return self.optimizer_step.graph

    def fits(self, unet, posterior, text_embeddings: torch.Tensor, config: LoraConfig, cuda_graph: bool = False,
             checkpointing: bool = False) -> bool:
        """Whether `restart` can take this image: the same UNet and weights' storage, shapes and settings
        (the number of steps aside), so the same graph."""
        current = lora_parameters(unet)
        return (unet is self.unet and (cuda_graph and first_weight(unet).is_cuda) == self.cuda_graph
                and len(current) == len(self.params)
                and all(p is q and p.data_ptr() == ptr
                        for p, q, ptr in zip(current, self.params, self.param_storage, strict=True))
                and posterior.mean.shape == self.mean.shape and posterior.mean.device == self.mean.device
                and text_embeddings.shape == self.text.shape
                and dataclasses.replace(config, lora_steps=0) == dataclasses.replace(self.config, lora_steps=0)
                and half_norms_enabled() == self.half_norms and checkpointing == self.checkpointing)

    def restart(self, posterior, text_embeddings: torch.Tensor, seed: int) -> None:
        """Train a fresh adapter on another image (one that `fits`) in this trainer's tensors, in place."""
        install_adapter(self.unet, self.config, seed)  # re-initialised in place
        with torch.no_grad():
            self.mean.copy_(posterior.mean)
            self.std.copy_(posterior.std)
            self.text.copy_(text_embeddings)
        self.optimizer_step.reset_optimizer()  # AdamW as before its first step
        if self.generator is not None:
            self.generator.manual_seed(seed)
        for param in self.params:
            param.requires_grad_(True)
        self.unet.train()

    def step(self) -> torch.Tensor:
        """One optimiser step on a fresh batch; returns the loss (a device tensor)."""
        self.sample_noise.normal_(generator=self.generator)
        self.noise.normal_(generator=self.generator)
        self.timesteps.random_(0, self.num_train_timesteps, generator=self.generator)
        self.optimizer_step()
        return self.loss.clone()

    def _compute(self) -> None:
        """One step on the trainer's own buffers, in place: what a CUDA graph captures."""
        latents = (self.mean + self.std * self.sample_noise) * self.scaling_factor
        text = self.text.expand(self.batch, -1, -1)
        loss = lora_backward(self.unet, latents, self.noise, self.timesteps, text, self.alphas_cumprod,
                             self.prediction_type, self.checkpointing)
        self.optimizer.step()
        self.loss.copy_(loss)

    def finish(self, keep_graph: bool = False) -> None:
        """Freeze the adapter; the captured step's memory pool is freed unless `keep_graph` (for `restart`)."""
        if not keep_graph:
            self.optimizer_step.graph = None
        self.optimizer.zero_grad(set_to_none=True)
        self.unet.eval()
        self.unet.requires_grad_(False)


def train_lora(
    unet,
    scheduler,
    posterior,
    text_embeddings: torch.Tensor,
    scaling_factor: float,
    config: LoraConfig,
    seed: int,
    progress: Union[bool, Progress] = True,
    cuda_graph: bool = False,
    checkpointing: bool = False,
) -> List[float]:
    """Fine-tune a fresh adapter on one image; returns the loss of every step."""
    trainer = LoraTrainer(unet, scheduler, posterior, text_embeddings, scaling_factor, config, seed, cuda_graph,
                          checkpointing=checkpointing)
    return run_trainer(trainer, config.lora_steps, progress)


def run_trainer(trainer: LoraTrainer, steps: int, progress: Union[bool, Progress] = True,
                keep_graph: bool = False) -> List[float]:
    """`steps` steps of a new or restarted trainer, then `finish`; returns the loss of every step."""
    try:
        losses = [trainer.step() for _ in as_progress(progress).steps("lora", steps)]
    finally:
        trainer.finish(keep_graph)
    return [float(v) for v in losses]
