"""Load the Stable Diffusion components: built-in tiny model, diffusers folder, single file, hub id."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from diffusers import AutoencoderKL, DDIMScheduler, ModelMixin, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .ddim import PREDICTION_TYPES, check_prediction_type
from .errors import ModelLoadError
from .tokenizer_files import write_byte_tokenizer

logger = logging.getLogger(__name__)

BUILTIN_MODELS = ("tiny", "toy", "sd15-random", "sd21-random")
SD_SCALING_FACTOR = 0.18215


@dataclass
class Components:
    """The pieces of an SD 1.x model that an edit needs, plus an identity string for caching."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    identity: str

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", SD_SCALING_FACTOR))

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device: Union[str, torch.device], dtype: torch.dtype, channels_last: bool = False) -> "Components":
        """Move and cast in one step per tensor, and with `channels_last` lay the UNet's convolution
        weights out channels-last in that same step: each weight reaches a GPU once, in its final dtype
        and layout. Moving first put fp32 copies on the GPU, twice the final size; converting the layout
        after the move frees each convolution weight's first copy inside segments that stay reserved
        (for SD 1.5 in fp16, 137 MiB free in the load's segments against 11 MiB, by a replay of the
        caching allocator's rules: bench/load_fragments.py)."""
        for module in (self.unet, self.vae, self.text_encoder):
            layout = torch.channels_last if channels_last and module is self.unet else torch.preserve_format
            _move(module, device, dtype, layout)
            module.requires_grad_(False)
            module.eval()
        return self


def check_supported(components: Components) -> None:
    """Refuse, by name, a model whose UNet is not a text-to-image SD 1.x/2.x UNet for its VAE and text
    encoder: inpainting, depth or instruction UNets (more input channels than the latent has), UNets
    with extra conditioning (SDXL's text and time embeddings, class labels) or a text width the
    cross-attention does not take. Each would otherwise fail deep inside the first stage."""
    unet, vae, text = components.unet.config, components.vae.config, components.text_encoder.config
    latent = vae.latent_channels
    if unet.in_channels != latent:
        raise ModelLoadError(
            f"the UNet takes {unet.in_channels} input channels and the VAE's latent has {latent}: an inpainting, "
            "depth or instruction model (9, 5 or 8 channels) cannot drag; load the text-to-image model")
    if unet.out_channels != latent:
        raise ModelLoadError(f"the UNet outputs {unet.out_channels} channels and the VAE's latent has {latent}: "
                             "only a UNet that predicts the latent's own channels can be inverted and denoised")
    extra = [f"{name}={getattr(unet, name)!r}" for name in ("addition_embed_type", "class_embed_type")
             if getattr(unet, name, None) is not None]
    if extra:
        raise ModelLoadError(f"the UNet needs conditioning besides the text ({', '.join(extra)}; SDXL's is "
                             "'text_time'): fastdrag edits SD 1.x and 2.x architectures")
    widths = unet.cross_attention_dim if isinstance(unet.cross_attention_dim, (list, tuple)) else [unet.cross_attention_dim]
    if any(width != text.hidden_size for width in widths):
        raise ModelLoadError(f"the UNet's cross-attention takes text of width {unet.cross_attention_dim} and the text "
                             f"encoder gives {text.hidden_size}: the text encoder is not this UNet's")


def _move(module: torch.nn.Module, device: Union[str, torch.device], dtype: torch.dtype,
          memory_format: torch.memory_format = torch.preserve_format) -> None:
    """`module.to(device=device, dtype=dtype, memory_format=memory_format)` (the format of 4-D weights)
    without diffusers' spurious warning: its `ModelMixin.to` (0.42) says that modules "should be kept
    in float32: []" at every cast with a dtype, whether the model keeps any module in fp32 or not, so
    every load printed it twice. A model that does keep some still goes through diffusers' `to`."""
    if isinstance(module, ModelMixin) and not module._keep_in_fp32_modules:
        torch.nn.Module.to(module, device=device, dtype=dtype, memory_format=memory_format)
    else:
        module.to(device=device, dtype=dtype, memory_format=memory_format)


# The training noise schedule of SD 1.x and 2.x (DESIGN.md's defaults); a model folder may say another
NOISE_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "trained_betas": None}


def ddim_scheduler(prediction_type: str = "epsilon", **noise_schedule) -> DDIMScheduler:
    """The DDIM scheduler of DESIGN.md: SD's betas (`NOISE_SCHEDULE`, unless a model trained with others
    gives them), no clipping, final alpha not forced to one; the model's `prediction_type` (what its
    UNet outputs)."""
    check_prediction_type(prediction_type)
    unknown = set(noise_schedule) - set(NOISE_SCHEDULE)
    if unknown:
        raise TypeError(f"ddim_scheduler() takes the noise schedule's {', '.join(NOISE_SCHEDULE)}; got {sorted(unknown)}")
    return DDIMScheduler(
        **{**NOISE_SCHEDULE, **noise_schedule},
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def scheduler_from_config(config: dict, source: str) -> DDIMScheduler:
    """The DDIM scheduler for a model whose scheduler config is `config`: its prediction type and its
    training noise schedule (betas), with a warning when those are not SD's; the rest as DESIGN.md says."""
    schedule = {key: config[key] for key in NOISE_SCHEDULE if config.get(key) is not None}
    other = {key: value for key, value in schedule.items() if value != NOISE_SCHEDULE[key]}
    if other:
        logger.warning("%s was trained with another noise schedule than SD's (%s): the edit uses it", source,
                       ", ".join(f"{key}={value!r}" for key, value in other.items()))
    return ddim_scheduler(config.get("prediction_type", "epsilon"), **schedule)


def noise_schedule_of(scheduler: DDIMScheduler) -> dict:
    """The training noise schedule a scheduler was built with (to rebuild it with another prediction type)."""
    return {key: scheduler.config[key] for key in NOISE_SCHEDULE}


def tokenizer_folder() -> Path:
    """Folder holding the built-in byte-level tokenizer files (written on first use)."""
    folder = Path(os.environ.get("FASTDRAG_CACHE", Path.home() / ".cache" / "fastdrag")) / "tokenizer-bytes-v1"
    if not (folder / "vocab.json").exists() or not (folder / "merges.txt").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=folder.parent))  # beside it: a rename, not a copy across disks
        try:
            write_byte_tokenizer(tmp)
            os.replace(tmp, folder)
        except OSError:  # another process wrote it first
            if not (folder / "vocab.json").exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def build_tiny(seed: int = 0) -> Components:
    """An SD-shaped model small enough to edit a 64x64 image on a CPU in seconds.

    Same block arrangement as SD 1.x (3 cross-attention down blocks + 1 plain, 1 plain up block
    + 3 cross-attention up blocks, 2 layers per block: 16 transformer blocks), so `start_layer`
    and `up_blocks[2]` features mean what they mean in SD. Random weights drawn from `seed`.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(16, 32, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=SD_SCALING_FACTOR,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=514,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=512,
                eos_token_id=513,
                pad_token_id=513,
            )
        )
    folder = tokenizer_folder()
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    return Components(unet, vae, text_encoder, tokenizer, ddim_scheduler(), identity=f"builtin:tiny:seed={seed}")


# The published architectures, by built-in name: the UNet's and the text encoder's settings that differ
# (SD 2.1 at 768 px: OpenCLIP-H's 1024-wide text, 64-wide heads, linear projections, the velocity as output).
SD_ARCHITECTURES = {
    "sd15-random": dict(
        unet=dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  hidden_act="quick_gelu"),
        prediction_type="epsilon", vae_sample_size=512),
    "sd21-random": dict(
        unet=dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                  use_linear_projection=True, upcast_attention=True),
        text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  hidden_act="gelu", projection_dim=512),
        prediction_type="v_prediction", vae_sample_size=768),
}


def build_sd_random(name: str = "sd15-random", seed: int = 0, device: Union[str, torch.device] = "cpu") -> Components:
    """A published Stable Diffusion architecture with random weights (`SD_ARCHITECTURES`: SD 1.5, or
    SD 2.1 at 768 px): for benchmarks (speed does not depend on weight values), built from its
    configuration with no download."""
    architecture = SD_ARCHITECTURES[name]
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            **architecture["unet"],
        )
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=architecture["vae_sample_size"],
            scaling_factor=SD_SCALING_FACTOR,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513,
            **architecture["text"],
        ))
    folder = tokenizer_folder()
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    return Components(unet, vae, text_encoder, tokenizer, ddim_scheduler(architecture["prediction_type"]),
                      identity=f"builtin:{name}:seed={seed}")


def build_sd15_random(seed: int = 0, device: Union[str, torch.device] = "cpu") -> Components:
    """The Stable Diffusion 1.5 architecture with random weights (`build_sd_random`)."""
    return build_sd_random("sd15-random", seed, device)


def _fingerprint(folder: Path) -> str:
    """Identity of a local model: its path and the size and mtime of its weight files."""
    digest = hashlib.sha256(str(folder.resolve()).encode())
    for path in sorted(folder.rglob("*")):
        if path.suffix in (".safetensors", ".bin", ".ckpt", ".pt"):
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _from_diffusers(source: str, **kwargs) -> Components:
    with warnings.catch_warnings():
        # diffusers passes an argument huggingface_hub has deprecated; the warning is not the user's concern
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        return _from_diffusers_folders(source, **kwargs)


def _from_diffusers_folders(source: str, variant: Optional[str] = None, **kwargs) -> Components:
    weights = lambda part: {"variant": variant or _local_variant(Path(source) / part)}
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **weights("unet"), **kwargs)
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **weights("vae"), **kwargs)
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **weights("text_encoder"), **kwargs)
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)
    return Components(unet, vae, text_encoder, tokenizer, _folder_scheduler(source, **kwargs), identity="")


WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _local_variant(folder: Path) -> Optional[str]:
    """The weights variant a local component folder holds, when it holds only variant files (a model
    saved or downloaded with `variant="fp16"` has `diffusion_pytorch_model.fp16.safetensors` and no plain
    file, which diffusers does not look for unless told). None: plain files, or not a local folder."""
    if not folder.is_dir():
        return None
    stems = [path.name[: -len(path.suffix)] for path in folder.iterdir() if path.suffix in WEIGHT_SUFFIXES]
    # "diffusion_pytorch_model.fp16-00001-of-00002": variant fp16, one shard of two
    variants = {re.sub(r"-\d+-of-\d+$", "", stem.split(".", 1)[1]) if "." in stem else None for stem in stems}
    return variants.pop() if len(variants) == 1 else None


def _folder_scheduler(source: str, **kwargs) -> DDIMScheduler:
    """The DDIM scheduler for a diffusers model, from its `scheduler/` config (`scheduler_from_config`);
    SD's, taking the UNet for a noise predictor, when it has none."""
    try:
        config = DDIMScheduler.load_config(source, subfolder="scheduler", **kwargs)
    except (OSError, ValueError):  # diffusers' error for a model without a scheduler folder
        logger.warning("%s has no scheduler/scheduler_config.json: its UNet is taken to predict noise (epsilon); "
                       "for a v-model (SD 2.x at 768 px) pass prediction_type='v_prediction'", source)
        return ddim_scheduler()
    return scheduler_from_config(config, source)


def _load_folder(folder: Path, variant: Optional[str] = None) -> Components:
    missing = [name for name in ("unet", "vae", "text_encoder", "tokenizer") if not (folder / name).is_dir()]
    if missing:
        raise ModelLoadError(f"model folder {folder} is not a diffusers Stable Diffusion folder: missing {', '.join(m + '/' for m in missing)}")
    try:
        components = _from_diffusers(str(folder), variant=variant)
    except Exception as exc:  # noqa: BLE001 - any library failure becomes one clear error
        raise ModelLoadError(f"could not load the model folder {folder}: {exc}") from exc
    components.identity = f"folder:{_fingerprint(folder)}"
    return components


@contextlib.contextmanager
def _no_safety_checker_notice() -> Iterator[None]:
    """Inside, diffusers' paragraph on `safety_checker=None` (logged at every single-file load) is left out."""
    pipeline_logger = logging.getLogger("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("You have disabled the safety checker")

    pipeline_logger.addFilter(keep)
    try:
        yield
    finally:
        pipeline_logger.removeFilter(keep)


def _load_single_file(path: Path, config: Optional[str]) -> Components:
    from diffusers import StableDiffusionPipeline

    try:
        kwargs = {"config": config} if config else {}
        with _no_safety_checker_notice():  # none is asked for: an edit keeps the user's own image
            pipe = StableDiffusionPipeline.from_single_file(str(path), safety_checker=None, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(
            f"could not load the single-file checkpoint {path}: {exc}. "
            "A single file needs the model's configuration: from the hub (network) or a local diffusers folder "
            "given as `single_file_config`."
        ) from exc
    stat = path.stat()
    identity = f"file:{hashlib.sha256(f'{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}'.encode()).hexdigest()[:16]}"
    kind = pipe.scheduler.config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ModelLoadError(f"the single-file checkpoint {path} has prediction_type {kind!r}, not one of "
                             f"{', '.join(PREDICTION_TYPES)}")
    scheduler = scheduler_from_config(dict(pipe.scheduler.config), str(path))
    return Components(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, scheduler, identity=identity)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers a TCP connection (quickly, instead of the client's long retries)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_hub(repo_id: str, variant: Optional[str] = None) -> Components:
    """A hub model from the local cache, else downloaded; a clear error when neither works."""
    try:
        components = _from_diffusers(repo_id, local_files_only=True, variant=variant)
    except Exception:  # noqa: BLE001 - not cached: download below
        if not _hub_reachable():
            raise ModelLoadError(
                f"could not load {repo_id!r} from the Hugging Face hub: the hub is not reachable from this machine "
                "(or HF_HUB_OFFLINE is set) and the model is not in the local cache. "
                "Pass a local diffusers folder or a .safetensors/.ckpt file instead."
            ) from None
        try:
            components = _from_diffusers(repo_id, variant=variant)
        except Exception as exc:  # noqa: BLE001
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(
                f"could not load {repo_id!r} from the Hugging Face hub ({reason}). "
                "Check the id, or pass a local diffusers folder or a .safetensors/.ckpt file."
            ) from exc
    components.identity = f"hub:{repo_id}"
    return components


@contextlib.contextmanager
def _library_bars(enabled: bool) -> Iterator[None]:
    """With `enabled` off, the progress bars transformers, diffusers and the hub client draw while a model
    loads (transformers 5's "Loading weights" among them) stay off, and each library's own setting is
    put back after: `--quiet` and `--progress-json` (whose stderr a program reads) get no bars."""
    if enabled:
        yield
        return
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as transformers_logging

    restore = []
    if transformers_logging.is_progress_bar_enabled():
        transformers_logging.disable_progress_bar()
        restore.append(transformers_logging.enable_progress_bar)
    if diffusers_logging.is_progress_bar_enabled():
        diffusers_logging.disable_progress_bar()
        restore.append(diffusers_logging.enable_progress_bar)
    if not hub_utils.are_progress_bars_disabled():
        hub_utils.disable_progress_bars()
        restore.append(hub_utils.enable_progress_bars)
    try:
        yield
    finally:
        for undo in restore:
            undo()


def load_components(
    name_or_path: Union[str, Path],
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
    single_file_config: Union[str, Path, None] = None,
    channels_last: bool = False,
    prediction_type: Optional[str] = None,
    variant: Optional[str] = None,
    progress: bool = True,
) -> Components:
    """Load a model by built-in name (`tiny`, `toy`, `sd15-random`, `sd21-random`), local diffusers folder, toy weights
    folder (written by `fastdrag toy train`), single file, or hub id; `channels_last` lays the UNet's
    convolution weights out channels-last as they move (`Components.to`).

    What the UNet outputs (noise, "epsilon"; velocity, "v_prediction", as SD 2.x's 768 px models; or
    the clean latent, "sample") comes from the model's scheduler config; `prediction_type` overrides it
    for a checkpoint that does not say (a single file of a v-model loaded without its config).
    `variant` picks a diffusers model's weights variant ("fp16": `*.fp16.safetensors`, half the download);
    a local folder that holds only one variant's files is loaded with it unasked. `progress=False` keeps
    the libraries' loading and download bars off."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ModelLoadError(f"prediction_type {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")
    with _library_bars(progress):
        config_folder = None if single_file_config is None else str(single_file_config)
        components = _load(str(name_or_path), device, config_folder, variant)
    check_supported(components)
    if prediction_type is not None:
        components.scheduler = ddim_scheduler(prediction_type, **noise_schedule_of(components.scheduler))
    components.identity += _scheduler_identity(components.scheduler)
    return components.to(device, dtype, channels_last)


def _scheduler_identity(scheduler: DDIMScheduler) -> str:
    """What the model identity must add for a scheduler other than SD's noise-predicting one: a LoRA trained
    against one output or noise schedule does not fit another, and the LoRA cache is keyed by the identity
    (a folder's fingerprint covers its weights, not its scheduler config)."""
    suffix = "" if scheduler.config.prediction_type == "epsilon" else f":{scheduler.config.prediction_type}"
    schedule = noise_schedule_of(scheduler)
    if schedule != NOISE_SCHEDULE:
        suffix += ":betas-" + hashlib.sha256(repr(sorted(schedule.items())).encode()).hexdigest()[:12]
    return suffix


def _load(name: str, device: Union[str, torch.device], single_file_config: Optional[str],
          variant: Optional[str]) -> Components:
    """The components `name` stands for, as stored (`load_components` checks, casts and moves them)."""
    single_file = Path(name).suffix in (".safetensors", ".ckpt")
    if single_file_config is not None and not single_file:
        raise ModelLoadError(f"single_file_config is for a .safetensors/.ckpt model, and {name!r} is not one")
    if variant is not None and (single_file or name in BUILTIN_MODELS):
        raise ModelLoadError(f"variant is for a diffusers folder or hub id, and {name!r} is "
                             f"{'a single file' if single_file else 'a built-in model'}")
    if name == "tiny":
        components = build_tiny()
    elif name == "toy":
        from .toy.model import load_toy

        components = load_toy()
    elif name in SD_ARCHITECTURES:
        components = build_sd_random(name, device=device)  # random initialisation is fast there, slow on the CPU
        if torch.device(device).type == "cuda":
            # then load as a checkpoint loads: from the CPU, once, in the final dtype. Cast in place,
            # 0.51 GiB of the segments reserved while loading stayed free between the weights (H100,
            # bench/RESULTS.md), likely fp16 copies placed in part of the freed fp32 blocks' segments
            components.to("cpu", torch.float32)
            torch.cuda.empty_cache()
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            from .toy.model import load_toy, missing_parts  # a folder written by `fastdrag toy train`?

            components = _load_folder(path, variant) if missing_parts(path) else load_toy(path)
        elif path.suffix in (".safetensors", ".ckpt"):
            if not path.is_file():
                raise ModelLoadError(f"model file {path} does not exist")
            components = _load_single_file(path, single_file_config)
        elif path.exists():
            raise ModelLoadError(f"{path} is neither a diffusers folder nor a .safetensors/.ckpt file")
        elif name.count("/") == 1 and not name.startswith((".", "/", "~")):
            components = _load_hub(name, variant)
        else:
            raise ModelLoadError(
                f"model {name!r} not found: it is not a built-in model ({', '.join(BUILTIN_MODELS)}), "
                "an existing folder or file, or a hub id of the form 'owner/name'"
            )
    return components
