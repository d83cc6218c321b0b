import inspect
import logging
from pathlib import Path

import pytest
import torch
from diffusers import ModelMixin

from fastdrag.errors import ModelLoadError
from fastdrag.models import build_tiny, load_components


def test_tiny_is_deterministic_and_sd_shaped():
    first, second = build_tiny(), build_tiny()
    for a, b in zip(first.unet.parameters(), second.unet.parameters(), strict=True):
        assert torch.equal(a, b)
    unet = first.unet
    cross_up = [b for b in unet.up_blocks if getattr(b, "has_cross_attention", False)]
    assert len(cross_up) == 3
    assert first.vae_scale == 8 and first.scaling_factor == pytest.approx(0.18215)
    ids = first.tokenizer("a red ball", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (1, 77) and ids[0, 0] == 512 and ids[0, 1] != 513


def test_diffusers_folder_round_trip(tmp_path):
    tiny = build_tiny()  # fresh: the shared fixture may carry a LoRA adapter from other tests
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        getattr(tiny, name).save_pretrained(tmp_path / name)
    loaded = load_components(str(tmp_path))
    x, text = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.unet(x, 10, text).sample, tiny.unet(x, 10, text).sample)
    assert loaded.identity.startswith("folder:")
    assert not any(p.requires_grad for p in loaded.unet.parameters())


@pytest.mark.parametrize("name, words", [
    ("/no/such/folder", "model '/no/such/folder' not found"),
    ("missing.safetensors", "model file missing.safetensors does not exist"),
])
def test_missing_models(name, words):
    with pytest.raises(ModelLoadError, match=words):
        load_components(name)


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError, match="missing vae/, text_encoder/, tokenizer/"):
        load_components(str(tmp_path))


def test_corrupt_single_file(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="could not load the single-file checkpoint"):
        load_components(str(bad))


def test_unreachable_hub_id_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="could not load 'someone/some-model' from the Hugging Face hub"):
        load_components("someone/some-model")


def test_a_hub_id_loads_from_the_local_cache_first_and_a_failed_download_names_its_reason(monkeypatch):
    """A hub id: the local cache first, with no network call; where the hub answers but the download fails,
    the error gives the first line of the hub's reason (stand-ins for the hub: no network here)."""
    from fastdrag import models

    calls = []

    def from_diffusers(source, local_files_only=False, variant=None):
        calls.append((source, local_files_only, variant))
        if source == "owner/cached" and local_files_only:
            return build_tiny()
        raise OSError("404 Client Error: Repository Not Found for url: https://huggingface.co/owner/gone\nmore detail")

    monkeypatch.setattr(models, "_from_diffusers", from_diffusers)
    monkeypatch.setattr(models, "_hub_reachable", lambda: calls.append("reachable?") or True)
    components = load_components("owner/cached", variant="fp16")
    assert components.identity == "hub:owner/cached" and calls == [("owner/cached", True, "fp16")]
    calls.clear()
    with pytest.raises(ModelLoadError, match=r"^could not load 'owner/gone' from the Hugging Face hub \(404 Client Error: "
                                             r"Repository Not Found for url: https://huggingface.co/owner/gone\)\. Check the id"):
        load_components("owner/gone")
    assert calls == [("owner/gone", True, None), "reachable?", ("owner/gone", False, None)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
def test_weights_reach_the_device_already_in_their_dtype(channels_last):
    """`Components.to` moves and casts each tensor in one step: no fp32 copy of a weight is ever made on
    the target device (on a GPU such copies took twice the final memory and left free fragments). With
    `channels_last` the UNet's convolution weights get their layout in that same step: each is made on
    the device once, already channels-last (converting after the move left the first copies' blocks
    free in reserved segments)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    made = []

    class Copies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                made.append(out)
            return out

    components = build_tiny()
    with Copies():
        components.to("meta", torch.float16, channels_last=channels_last)
    assert {(t.device.type, t.dtype) for t in made if t.is_floating_point()} == {("meta", torch.float16)}
    for module in (components.unet, components.vae, components.text_encoder):
        assert {p.dtype for p in module.parameters()} == {torch.float16} and module.device.type == "meta"
        assert not any(p.requires_grad for p in module.parameters())
    made_4d = [t for t in made if t.dim() == 4]
    unet_4d = [p for p in components.unet.parameters() if p.dim() == 4]
    vae_4d = [p for p in components.vae.parameters() if p.dim() == 4]
    assert len(made_4d) == len(unet_4d) + len(vae_4d)  # each convolution weight made once
    spatial = [p for p in unet_4d if p.shape[-1] > 1]
    assert spatial and all(p.is_contiguous(memory_format=torch.channels_last) == channels_last for p in spatial)
    assert all(p.is_contiguous() for p in vae_4d)  # the VAE keeps its layout


class _Records(logging.Handler):
    """Every record a logger handles (diffusers' loggers do not propagate to the root, so caplog misses them)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_loading_a_model_logs_no_warning():
    """diffusers 0.42 warns that modules "should be kept in float32: []" at every cast with a dtype, even
    for a model that keeps none: a load must not pass that on to users. A model that does keep some in
    fp32 still hears it from diffusers."""
    records, library = _Records(), logging.getLogger("diffusers")
    library.addHandler(records)
    try:
        components = load_components("tiny", dtype=torch.float16)
        assert records.messages == []
        assert components.unet.dtype == torch.float16 and components.vae.dtype == torch.float16

        if "should be kept in float32" not in inspect.getsource(ModelMixin.to):
            return  # diffusers before that warning (0.33 to 0.38): nothing for a load to hold back
        keeping = build_tiny()
        keeping.vae._keep_in_fp32_modules = ["decoder"]
        keeping.to("cpu", torch.float16)
        assert len(records.messages) == 1 and "should be kept in float32: ['decoder']" in records.messages[0]
    finally:
        library.removeHandler(records)


def test_the_load_replay_follows_the_caching_allocators_rules():
    """bench/load_fragments.py, the replay behind the load's estimate: its segment sizes, best fit,
    splits and merges are the CUDA caching allocator's, and a convolution weight's layout converted
    after the move leaves its first copy's segment reserved and free."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from load_fragments import MiB, CachingAllocator, replay_load

    allocator = CachingAllocator()
    allocator.malloc(300_000)
    large = allocator.malloc(5 * MiB)
    allocator.malloc(31 * MiB + 1)
    assert [s.size for s in allocator.segments] == [2 * MiB, 20 * MiB, 32 * MiB]
    # 31 MiB + 1 byte rounds to 31 MiB + 512 B; under 1 MiB of its segment would remain: not split
    assert allocator.allocated() == 300_032 + 5 * MiB + 32 * MiB
    again = allocator.malloc(5 * MiB)  # the 15 MiB left of the 20 MiB segment, not a new one
    assert len(allocator.segments) == 3 and again[0] is large[0]
    allocator.free(large)
    allocator.free(again)
    assert [b.size for b in large[0].blocks] == [20 * MiB]  # merged back into one free block
    tight = allocator.malloc(19 * MiB + 512 * 1024)
    assert tight[1].size == 20 * MiB and len(allocator.segments) == 3

    model = torch.nn.Sequential(torch.nn.Conv2d(640, 640, 3, device="meta"), torch.nn.Linear(64, 64, device="meta"))
    in_move = replay_load([model], 4)  # the 14.06 MiB fp32 weight: a 16 MiB segment; the rest: one of 2 MiB
    after_move = replay_load([model], 4, layout_after_move=model)
    assert in_move.reserved() == 18 * MiB and in_move.allocated() == after_move.allocated()
    assert after_move.reserved() == 34 * MiB  # the first copy's 16 MiB segment stays, free


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_first_weight_gives_the_device_and_dtype_diffusers_properties_give(dtype):
    """`fastdrag.weights.first_weight` stands in for diffusers' `device` and `dtype` on the hot path,
    also with an adapter's fp32 weights inside a half-precision UNet."""
    from fastdrag.config import LoraConfig
    from fastdrag.lora import install_adapter
    from fastdrag.models import build_tiny
    from fastdrag.weights import first_weight

    components = build_tiny()
    unet, vae = components.unet.to(dtype), components.vae.to(dtype)
    install_adapter(unet, LoraConfig(lora_rank=4), seed=0)  # fp32 master weights in a `dtype` UNet
    for model in (unet, vae):
        weight = first_weight(model)
        assert (weight.device, weight.dtype) == (model.device, model.dtype) == (torch.device("cpu"), dtype)


def test_the_tokenizer_files_are_written_once_inside_a_new_cache_and_a_lost_race_leaves_nothing(tmp_path,
                                                                                                 monkeypatch):
    """The files are staged beside their folder (a rename, never a copy across disks from /tmp), in a
    cache folder that may not exist yet; a process that loses the race to another leaves no staging."""
    import os

    from fastdrag import models

    cache = tmp_path / "new" / "cache"
    monkeypatch.setenv("FASTDRAG_CACHE", str(cache))
    staged = []
    real_mkdtemp = models.tempfile.mkdtemp
    monkeypatch.setattr(models.tempfile, "mkdtemp", lambda **kw: staged.append(kw["dir"]) or real_mkdtemp(**kw))
    folder = models.tokenizer_folder()
    assert staged == [cache] and sorted(p.name for p in folder.iterdir()) >= ["merges.txt", "vocab.json"]
    assert [p.name for p in cache.iterdir()] == [folder.name]

    other = tmp_path / "other"
    monkeypatch.setenv("FASTDRAG_CACHE", str(other))
    real_replace = os.replace

    def another_process_first(source, destination):
        models.write_byte_tokenizer(Path(destination))  # the winner's files land first
        raise OSError(39, "Directory not empty")

    monkeypatch.setattr(models.os, "replace", another_process_first)
    folder = models.tokenizer_folder()
    monkeypatch.setattr(models.os, "replace", real_replace)
    assert (folder / "vocab.json").is_file() and [p.name for p in other.iterdir()] == [folder.name]


def _unet_like_tiny(**changes):
    from diffusers import UNet2DConditionModel

    config = {key: value for key, value in build_tiny().unet.config.items() if not key.startswith("_")}
    config.update(changes)
    return UNet2DConditionModel.from_config(config)


@pytest.mark.parametrize("changes, words", [
    ({"in_channels": 9}, "the UNet takes 9 input channels and the VAE's latent has 4: an inpainting"),
    ({"out_channels": 8}, "the UNet outputs 8 channels"),
    ({"addition_embed_type": "text_time", "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 80},
     "conditioning besides the text (addition_embed_type='text_time'"),
    ({"cross_attention_dim": 48}, "takes text of width 48 and the text encoder gives 32"),
])
def test_a_unet_that_cannot_drag_is_refused_by_name_before_any_stage(changes, words, tmp_path):
    """Each of these failed inside the LoRA's first forward with a shape or type error."""
    from fastdrag import DragEditor

    components = build_tiny()
    components.unet = _unet_like_tiny(**changes)
    with pytest.raises(ModelLoadError, match=words.replace("(", r"\(")):
        DragEditor(components, torch.device("cpu"), torch.float32, cache_dir=tmp_path)
    for name in ("unet", "vae", "text_encoder", "tokenizer"):  # and from a folder, through load_components
        getattr(components, name).save_pretrained(tmp_path / "model" / name)
    with pytest.raises(ModelLoadError, match=words.replace("(", r"\(")):
        load_components(str(tmp_path / "model"))


def test_a_folder_of_fp16_variant_weights_loads_unasked_and_a_variant_can_be_chosen(tmp_path):
    """A model saved or downloaded with variant="fp16" has only `*.fp16.safetensors`, which diffusers
    does not look for unless told: loading it failed with "no file named diffusion_pytorch_model.bin"."""
    from fastdrag.cli import main

    tiny = build_tiny()
    for name in ("unet", "vae", "text_encoder"):
        getattr(tiny, name).half().save_pretrained(tmp_path / "half" / name, variant="fp16")
        getattr(tiny, name).float()
    tiny.tokenizer.save_pretrained(tmp_path / "half" / "tokenizer")
    loaded = load_components(str(tmp_path / "half"))
    for name in ("unet", "vae", "text_encoder"):
        stored_values = getattr(tiny, name).state_dict().values()
        for (key, value), stored in zip(getattr(loaded, name).state_dict().items(), stored_values, strict=True):
            assert torch.equal(value, stored.half().float()), (name, key)
    # beside plain weights (a folder of both) the plain ones load, unless the variant is asked for
    for name in ("unet", "vae", "text_encoder"):
        (getattr(tiny, name).state_dict()[next(iter(getattr(tiny, name).state_dict()))]).add_(1)  # tell them apart
        getattr(tiny, name).save_pretrained(tmp_path / "half" / name)
    plain, chosen = load_components(str(tmp_path / "half")), load_components(str(tmp_path / "half"), variant="fp16")
    first = lambda components: next(iter(components.unet.state_dict().values()))
    assert torch.equal(first(plain), first(tiny)) and not torch.equal(first(chosen), first(tiny))
    with pytest.raises(ModelLoadError, match="could not load the model folder"):
        load_components(str(tmp_path / "half"), variant="bf16")
    assert main(["lora", str(_picture_file(tmp_path)), "--prompt", "a ball", "--model", str(tmp_path / "half"),
                 "--variant", "fp16", "--lora-steps", "1", "--quiet", "--cache-dir", str(tmp_path / "c")]) == 0


def _picture_file(tmp_path):
    from PIL import Image

    path = tmp_path / "picture.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path)
    return path


@pytest.mark.parametrize("name, options, words", [
    ("tiny", {"single_file_config": "some/folder"}, "single_file_config is for a .safetensors/.ckpt model, and 'tiny'"),
    ("tiny", {"variant": "fp16"}, "variant is for a diffusers folder or hub id, and 'tiny' is a built-in model"),
    ("model.safetensors", {"variant": "fp16"}, "'model.safetensors' is a single file"),
])
def test_a_loading_option_the_model_cannot_use_is_refused_not_ignored(name, options, words):
    with pytest.raises(ModelLoadError, match=words):
        load_components(name, **options)


def test_a_load_without_progress_draws_no_library_bars_and_leaves_their_settings_as_they_were(tmp_path, capfd):
    """transformers 5 draws a "Loading weights" bar on stderr for every text encoder it loads: it broke the
    JSON lines of `--progress-json` and the silence of `--quiet`."""
    from transformers.utils import logging as transformers_logging

    from fastdrag.cli import main

    tiny = build_tiny()
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        getattr(tiny, name).save_pretrained(tmp_path / "model" / name)
    capfd.readouterr()
    load_components(str(tmp_path / "model"), progress=False)
    assert "Loading weights" not in capfd.readouterr().err
    assert transformers_logging.is_progress_bar_enabled()  # put back
    picture = _picture_file(tmp_path)
    assert main(["lora", str(picture), "--prompt", "a ball", "--model", str(tmp_path / "model"), "--lora-steps", "1",
                 "--progress-json", "--cache-dir", str(tmp_path / "c")]) == 0
    lines = [line for line in capfd.readouterr().err.splitlines() if not line.startswith("WARNING ")]
    assert lines and all(line.startswith('{"stage": "lora"') for line in lines), lines[:3]
