"""Seconds of whole edits at the defaults, stage by stage, and peak GPU memory, outside the
benchmark harness (a lease-sized check of the performance targets; `bench/test_stages.py` is the
full suite with FLOP counts).

    python bench/edit_timing.py [--model sd15-random] [--repeats 2] [--variant NAME[:KEY=VALUE,...]] [--json FILE]

Each variant (edit settings, e.g. `eager:cuda_graphs=false` or `lora-eager:cuda_graph_lora=false`,
`channels_last=true|false`, which converts the UNet's weights for that variant (default: the
package's, channels-last on CUDA only), `compile_blocks=true`, which compiles its blocks for this
variant and every later one in the process, `fused_unet_kernels=true`, which runs the UNet's GroupNorm + SiLU, LayerNorm and GEGLU as fused
Triton kernels for this variant only (`fastdrag.fused_blocks`; `fused_group_norm`, `fused_layer_norm`,
`fused_geglu=true|false` set each kind on its own), `lean_blocks=false`, which gives the UNet and the VAE diffusers'
stock blocks back for the variant (`fastdrag.lean_blocks`; default: on), `frozen_conv=true|false`, which gives the UNet's convolutions
the input-gradient-only backward (`fastdrag.frozen_conv`; default: the package's, on CUDA only) for the
variant, `sdpa_priority=flash|cudnn|efficient|default`, the order in which the UNet's SDPA attention
tries its backends (the editor's `sdpa_priority`), `half_norms=true|false`, which sets `FASTDRAG_HALF_NORMS`
for the variant (`fastdrag.half_norms`), `mask=false`, which edits without the demo case's mask (so the drag has no
mask term), `keep_source_kv=true` (an edit setting: each row's `kept_kv_GB` says what it holds), `cudnn_benchmark=true`, which lets cuDNN time its convolution algorithms for each new shape
(`torch.backends.cudnn.benchmark`) for the variant, `release_cached_memory=true`, the editor's option that empties the CUDA caching
allocator's cache after every stage, `preload=true`, which adds a `preload` row (`DragEditor.preload` of a
new image: its LoRA and inversion before its points) and a `preloaded` row (that image's first edit), and `graph_warmup=N`, the eager steps the LoRA trainer and the drag loop run before their
CUDA-graph capture (default: their `GRAPH_WARMUP`); default: one with the package defaults) runs
`DragEditor.warm_up()` (a short edit that pays Triton's compilation, cuDNN's first calls and the
like, as a server would at start-up), a first edit on a new LoRA key, the next new image (another
new key: what a server pays for each new image once it has edited one, the graphs it keeps
restarted), and `--repeats` repeated edits of that one (LoRA and inversion cached).
The model loads once for all variants.
"""
import argparse
import json
import os
import tempfile
import time
from typing import Any, Callable, Dict, Tuple

import torch

from fastdrag import DragEditor
from fastdrag.atomic import atomic_path
from fastdrag.demo import demo_case
from fastdrag.drag import DragLoop
from fastdrag.frozen_conv import install_frozen_conv, remove_frozen_conv
from fastdrag.fused_blocks import install_fused_blocks, remove_fused_blocks
from fastdrag.lean_blocks import install_lean_blocks, remove_lean_blocks
from fastdrag.half_norms import ENV as HALF_NORMS_ENV
from fastdrag.lora import LoraTrainer
from fastdrag.regional_compile import compile_blocks


def parse_variant(text: str) -> Tuple[str, Dict[str, Any]]:
    """`name:key=value,key=value` -> (name, settings); values are booleans, numbers or text."""
    name, _, settings = text.partition(":")
    parsed = {}
    for item in filter(None, settings.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"variant {text!r}: expected KEY=VALUE, got {item!r}")
        lowered = value.lower()
        if lowered in ("true", "false"):
            parsed[key] = lowered == "true"
        else:
            try:
                parsed[key] = json.loads(value)
            except ValueError:
                parsed[key] = value
    return name, parsed


def reserved_by_pool(segments) -> Dict[str, float]:
    """GiB reserved and allocated now, in the default pool and in CUDA-graph pools, from the segments
    of `torch.cuda.memory_snapshot()`: what a process's reservation is made of (kept graphs' pools,
    or blocks the default pool caches)."""
    totals = {"default_reserved_GiB": 0.0, "default_allocated_GiB": 0.0,
              "graph_pools_reserved_GiB": 0.0, "graph_pools_allocated_GiB": 0.0}
    for segment in segments:
        where = "default" if tuple(segment.get("segment_pool_id", (0, 0))) == (0, 0) else "graph_pools"
        totals[f"{where}_reserved_GiB"] += segment["total_size"] / 2**30
        totals[f"{where}_allocated_GiB"] += segment["allocated_size"] / 2**30
    return totals


class StageGrowth:
    """Which stages of an edit raise the reservation's high-water mark, and by how much (GiB): wraps
    the editor's stage timer, so each row says where the memory a process holds was first reserved.
    `read` is the high-water mark in bytes (`torch.cuda.max_memory_reserved`)."""

    def __init__(self, editor: DragEditor, read: Callable[[], int]):
        self.growth: Dict[str, float] = {}
        timed = editor._timed

        def watched(timings, name, fn, *args, **kwargs):
            before = read()
            try:
                return timed(timings, name, fn, *args, **kwargs)
            finally:
                self.growth[name] = self.growth.get(name, 0.0) + (read() - before) / 2**30

        editor._timed = watched

    def take(self) -> Dict[str, float]:
        """The growth by stage since the last take, as `<stage>_grew_GiB` row entries."""
        taken, self.growth = self.growth, {}
        return {f"{stage}_grew_GiB": grown for stage, grown in taken.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15-random")
    parser.add_argument("--size", type=int, default=None, help="image side (default: the model's own, its VAE's sample_size)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME[:KEY=VALUE,...]")
    parser.add_argument("--json", default=None, help="write every row here")
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variant] or [("defaults", {})]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    start = time.perf_counter()
    editor = DragEditor.from_pretrained(args.model, device=device, dtype=dtype, cache_dir=tempfile.mkdtemp(),
                                        progress=False)
    rows = [{"variant": "", "edit": "load", "total_s": time.perf_counter() - start}]
    args.size = args.size or editor.components.vae.config.sample_size
    case = demo_case(args.size)
    seed = 0
    unet = editor.components.unet
    user_half_norms = os.environ.get(HALF_NORMS_ENV)
    growth = StageGrowth(editor, torch.cuda.max_memory_reserved) if device.type == "cuda" else None
    default_warmup = {LoraTrainer: LoraTrainer.GRAPH_WARMUP, DragLoop: DragLoop.GRAPH_WARMUP}
    for name, settings in variants:
        settings = dict(settings)
        channels_last = settings.pop("channels_last", device.type == "cuda")  # the package's default
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        unet.to(memory_format=memory_format)
        if settings.pop("compile_blocks", False):
            compile_blocks(unet)  # compilation is paid in warm_up()
        fused_all = settings.pop("fused_unet_kernels", False)
        remove_fused_blocks(unet)
        lean = settings.pop("lean_blocks", True)  # the package's default
        for model in (unet, editor.components.vae):
            remove_lean_blocks(model)
            if lean:
                install_lean_blocks(model)
        install_fused_blocks(unet, group_norm=settings.pop("fused_group_norm", fused_all),
                             geglu=settings.pop("fused_geglu", fused_all),
                             layer_norm=settings.pop("fused_layer_norm", fused_all))
        remove_frozen_conv(unet)
        if settings.pop("frozen_conv", device.type == "cuda"):  # the package's default
            install_frozen_conv(unet)
        editor.sdpa_priority = settings.pop("sdpa_priority", "default")
        # cuDNN times the algorithms of each new convolution shape and keeps the fastest (in warm_up(),
        # before any capture) instead of taking its heuristics' choice: a process-wide flag
        torch.backends.cudnn.benchmark = bool(settings.pop("cudnn_benchmark", False))
        use_mask = settings.pop("mask", True)
        editor.release_cached_memory = settings.pop("release_cached_memory", False)
        graph_warmup = settings.pop("graph_warmup", None)
        for loop_class, default in default_warmup.items():
            loop_class.GRAPH_WARMUP = default if graph_warmup is None else int(graph_warmup)
        half_norms = settings.pop("half_norms", None)  # an environment switch (experimental: fastdrag.half_norms)
        switch = user_half_norms if half_norms is None else ("1" if half_norms else "0")
        if switch is None:
            os.environ.pop(HALF_NORMS_ENV, None)
        else:
            os.environ[HALF_NORMS_ENV] = switch
        preload = settings.pop("preload", False)
        editor.release()  # captured graphs read the weights' old storage
        kinds = ["warm_up()", "first", "new", *["repeated"] * args.repeats, *(["preload", "preloaded"] if preload else [])]
        for kind in kinds:
            # a new LoRA key for each new image, the last one's for the repeats and a preloaded image's edit
            seed += kind in ("first", "new", "preload")
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                growth.take()
            start = time.perf_counter()
            if kind == "warm_up()":
                timings, drag_steps = editor.warm_up((args.size, args.size), **settings), None
            elif kind == "preload":
                timings, drag_steps = editor.preload(case.image, case.prompt, seed=seed, **settings), None
            else:
                result = editor.edit(case.image, case.prompt, case.points, mask=case.mask if use_mask else None,
                                     seed=seed, **settings)
                timings, drag_steps = result.timings, result.drag_steps
            if device.type == "cuda":
                torch.cuda.synchronize()
            row = {"variant": name, "edit": kind, "total_s": time.perf_counter() - start,
                   **{f"{stage}_s": seconds for stage, seconds in timings.items()}, "drag_steps": drag_steps,
                   "kept_kv_GB": editor._source_kv.nbytes / 1e9}  # held between edits with keep_source_kv
            if device.type == "cuda":
                row["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
                # what the process holds: replays of kept CUDA graphs use their pools' reserved memory,
                # which max_memory_allocated does not see
                row["reserved_GiB"] = torch.cuda.max_memory_reserved() / 2**30
                row.update(reserved_by_pool(torch.cuda.memory_snapshot()))  # after the edit, not at its peak
                row.update(growth.take())  # the stages that raised the reservation's high-water mark
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
            if args.json:  # after every edit: a run cut short by a time limit keeps what it measured
                with atomic_path(args.json) as staged, open(staged, "w") as handle:
                    json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
