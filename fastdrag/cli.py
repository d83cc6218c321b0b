"""The `fastdrag` command: edit, serve, demo, lora, export, refit, cache, toy, info."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

from .config import EditConfig, field_names
from . import __version__
from .errors import FastDragError, InputError
from .jsonfile import read_json

logger = logging.getLogger("fastdrag")


def _parse_size(text: str) -> tuple:
    try:
        first, second = text.lower().split("x")
        return int(first), int(second)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected AxB (e.g. 512x512), got {text!r}") from exc


def _count_at_least(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from exc
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
    return value


def _positive_int(text: str) -> int:
    """A count that must be at least one (cases, scenes, a batch)."""
    return _count_at_least(text, 1)


def _non_negative_int(text: str) -> int:
    """A count that may be zero (point pairs of an optional graph)."""
    return _count_at_least(text, 0)


def _world_size(text: str) -> int:
    """A toy-world side in px: a multiple of 64 (the model's working size), at least 64."""
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a size in px (e.g. 256), got {text!r}") from exc
    if value < 64 or value % 64:
        raise argparse.ArgumentTypeError(f"the toy world's size must be a multiple of 64 px and at least 64, got {value}")
    return value


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _stage_fields():
    """(name, default, help) for every overridable config field."""
    defaults = EditConfig()
    for name, stage in field_names().items():
        holder = getattr(defaults, stage) if stage else defaults
        yield name, getattr(holder, name), stage


# what the edit-wide fields do (a stage's fields are described by their stage)
EDIT_FIELD_HELP = {
    "seed": "seed of the LoRA adapter's initialisation and training batches",
    "backend": "denoiser of inversion and denoising: torch, onnxruntime or tensorrt (exported graphs)",
    "cuda_graphs": "CUDA only: replay the UNet's calls as CUDA graphs",
    "cuda_graph_lora": "CUDA only, with --cuda-graphs: replay the LoRA training step too",
    "keep_lora_trainer": "keep the LoRA trainer and its CUDA graph for the next image of the same size",
    "cuda_graph_vae": "CUDA only, with --cuda-graphs: replay the VAE's encoder and decoder too",
    "merge_lora": "fold the frozen LoRA into the UNet's weights for inversion, drag and denoising",
    "keep_source_kv": "keep the source branch's keys and values, so a repeated edit denoises one branch",
    "lora_checkpointing": "recompute the UNet's blocks in the LoRA step's backward: less memory, more time",
}
# stage fields that act beyond their stage
FIELD_HELP = {"guidance_scale": "classifier-free guidance of inversion and denoising (1: none)"}


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per config field (`--drag-steps`, `--lora-lr`, ...); unset options keep the defaults."""
    group = parser.add_argument_group("method parameters (defaults: DragDiffusion's published values)")
    for name, default, stage in _stage_fields():
        flag = "--" + name.replace("_", "-")
        where = FIELD_HELP.get(name) or (f"{stage} stage" if stage else EDIT_FIELD_HELP.get(name, "edit"))
        if name == "size":
            group.add_argument(flag, type=_parse_size, default=None, metavar="WxH",
                               help="working size (default: image size rounded to a multiple of 64)")
        elif name == "sup_res":
            group.add_argument(flag, type=_parse_size, default=None, metavar="HxW",
                               help="supervision resolution (default: half the working size)")
        elif name == "lora_targets":
            group.add_argument(flag, type=lambda s: tuple(p for p in s.split(",") if p), default=None,
                               metavar="A,B", help=f"LoRA target modules (default: {','.join(default)})")
        elif isinstance(default, bool):
            group.add_argument(flag, type=_parse_bool, default=None, metavar="BOOL", help=f"{where} (default: {default})")
        else:
            group.add_argument(flag, type=type(default), default=None, help=f"{where} (default: {default})")


def config_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    return {name: getattr(args, name) for name in field_names() if getattr(args, name, None) is not None}


def parse_drag(text: str):
    """`HX,HY:TX,TY` to ((hx, hy), (tx, ty))."""
    try:
        handle, target = text.split(":")
        hx, hy = (float(v) for v in handle.split(","))
        tx, ty = (float(v) for v in target.split(","))
    except ValueError as exc:
        raise InputError(f"--drag {text!r} is not of the form HX,HY:TX,TY") from exc
    return (hx, hy), (tx, ty)


def load_points_file(path: str):
    """Points from JSON: `[[[hx, hy], [tx, ty]], ...]` or `{"handles": [...], "targets": [...]}`."""
    from .inputs import points_from_json

    file = Path(path)
    return points_from_json(read_json(file, "points file"), f"points file {file}")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny",
                        help="built-in name (tiny, toy, sd15-random, sd21-random), diffusers folder, toy weights folder "
                             "(from `fastdrag toy train`), .safetensors/.ckpt file or hub id")
    parser.add_argument("--single-file-config", default=None,
                        help="for a .safetensors/.ckpt --model: the diffusers folder or hub id whose configuration "
                             "it has (without one, diffusers fetches it from the hub)")
    parser.add_argument("--variant", default=None,
                        help="a diffusers model's weights variant, e.g. fp16 (*.fp16.safetensors; a local folder that "
                             "holds only one variant loads it unasked)")
    parser.add_argument("--prediction-type", default=None, choices=["epsilon", "v_prediction", "sample"],
                        help="what the model's UNet outputs (default: its scheduler config says; epsilon for SD 1.x, "
                             "v_prediction for SD 2.x's 768 px models)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--cache-dir", default=None, help="LoRA cache folder (default: ~/.cache/fastdrag/lora)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="UNet convolution weights channels-last (default: on CUDA only, where it is faster: "
                             "bench/RESULTS.md)")
    parser.add_argument("--compile-blocks", action="store_true",
                        help="torch.compile the UNet's residual and feed-forward blocks (minutes of compilation "
                             "on the first edit: over 200 s for SD 1.5 on an H100)")
    parser.add_argument("--fused-unet-kernels", action="store_true",
                        help="experimental: the UNet's GroupNorm + SiLU, LayerNorm and GEGLU as fused Triton kernels on "
                             "CUDA (fastdrag.fused_blocks; on an H100 a first edit 22%% faster, its edits' quality "
                             "still being checked)")
    parser.add_argument("--frozen-conv", action=argparse.BooleanOptionalAction, default=None,
                        help="the UNet's convolutions keep only their weights for the LoRA step's and the drag's "
                             "backward: the same numbers, less memory (fastdrag.frozen_conv; default: on CUDA only)")
    parser.add_argument("--lean-blocks", action=argparse.BooleanOptionalAction, default=True,
                        help="leave out the UNet's and VAE's operations that change no number (divisions by 1, LoRA's "
                             "scale of 1, layout copies, autocast's repeated casts; GEGLUs keep only their projection): "
                             "the same edits, fewer kernels, less memory (fastdrag.lean_blocks, fastdrag.shared_casts, "
                             "fastdrag.lean_geglu; default: on)")
    parser.add_argument("--sdpa-priority", default="default", choices=["default", "flash", "cudnn", "efficient"],
                        help="the order in which the UNet's SDPA attention tries its backends (default: PyTorch's, "
                             "which takes cuDNN's attention first on an H100 and FlashAttention first on an A100; "
                             "flash, cudnn, efficient: that kernel first; `fastdrag info` says which runs here)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or log messages")


def _add_progress_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress-json", action="store_true",
                        help='instead of progress bars, one JSON line per step on stderr: {"stage": "drag", "done": 3, '
                             '"total": 80} (for a program that runs this one; other stderr lines are log messages)')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdrag", description="DragDiffusion point-based image editing")
    parser.add_argument("--version", action="version", version=f"fastdrag {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    edit = commands.add_parser("edit", help="drag points of an image to new positions")
    edit.add_argument("image", help="input image file")
    edit.add_argument("--prompt", required=True, help="text describing the image")
    edit.add_argument("--drag", action="append", default=[], metavar="HX,HY:TX,TY", help="a handle and its target (repeatable)")
    edit.add_argument("--points", help="JSON file of point pairs instead of --drag")
    edit.add_argument("--mask", help="mask image of the editable region (white = may change)")
    edit.add_argument("--output", help="edited image path (default: IMAGE-edited.png beside the input)")
    edit.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _add_common(edit)
    _add_progress_json(edit)
    add_config_options(edit)

    serve = commands.add_parser("serve", help="edit request after request with one warm editor: a JSON request a "
                                              "line on stdin, a JSON answer a line on stdout")
    serve.add_argument("--warm-up", action="store_true",
                       help="before the first request, run a short edit of a synthetic image (at --size, or the "
                            "model's own) that pays what a process pays once (DragEditor.warm_up)")
    serve.add_argument("--prune-cache-to", default=None, metavar="SIZE",
                       help="after each request served, prune the LoRA cache to SIZE (e.g. 20GB), least recently "
                            "used first, as `fastdrag cache --prune-to` does (default: keep everything)")
    _add_common(serve)
    _add_progress_json(serve)
    add_config_options(serve)

    demo = commands.add_parser("demo", help="drag a shape in a toy scene (model `toy`) and write a side-by-side view")
    demo.add_argument("--output", default="fastdrag-demo", help="output folder (default: fastdrag-demo)")
    demo.add_argument("--overwrite", action="store_true", help="replace existing pictures")
    _add_common(demo)
    _add_progress_json(demo)
    demo.set_defaults(model="toy")
    add_config_options(demo)

    lora = commands.add_parser("lora", help="train and cache the LoRA of an image (no edit)")
    lora.add_argument("image", help="input image file")
    lora.add_argument("--prompt", required=True, help="text describing the image")
    _add_common(lora)
    _add_progress_json(lora)
    add_config_options(lora)

    export = commands.add_parser("export", help="export the image's LoRA-merged denoiser to ONNX (and TensorRT)")
    export.add_argument("image", help="input image file")
    export.add_argument("--prompt", required=True, help="text describing the image")
    export.add_argument("--output", required=True, help="folder for the graphs, engines and manifest.json")
    export.add_argument("--format", default="onnx", choices=("onnx", "tensorrt"), help="onnx, or onnx plus TensorRT engines")
    export.add_argument("--fp16", action="store_true", help="write the UNet graphs in fp16")
    export.add_argument("--drag-points", type=_non_negative_int, default=0, metavar="N",
                        help="also write unet_drag: one drag iteration (with the UNet's input gradient, fp32) for up "
                             "to N point pairs, so a service can run the drag (default 0: no drag graph)")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    _add_common(export)
    _add_progress_json(export)
    add_config_options(export)

    refit = commands.add_parser("refit", help="write an image's weights and text embeddings for an export made "
                                                     "from another image (a service runs it without a new export)")
    refit.add_argument("image", help="input image file")
    refit.add_argument("--prompt", required=True, help="text describing the image")
    refit.add_argument("--export", required=True, help="an export folder (fastdrag export) of the same model and size")
    refit.add_argument("--output", required=True, help="the .safetensors file to write")
    refit.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    _add_common(refit)
    _add_progress_json(refit)
    add_config_options(refit)

    cache = commands.add_parser("cache", help="what the LoRA cache holds on disk; prune it to a size")
    cache.add_argument("--cache-dir", default=None, help="LoRA cache folder (default: ~/.cache/fastdrag/lora)")
    cache.add_argument("--prune-to", default=None, metavar="SIZE",
                       help="remove the least recently used LoRAs and exports until the cache holds at most SIZE "
                            "(e.g. 20GB, 500MB, 0)")
    cache.add_argument("--quiet", action="store_true", help="no log messages")

    toy = commands.add_parser("toy", help="the toy world: train its model, score edits against the truth")
    toy_commands = toy.add_subparsers(dest="toy_command", required=True)
    train = toy_commands.add_parser("train", help="train the toy model (resumable; GPU when there is one)")
    train.add_argument("--out", required=True, help="folder for checkpoints and the trained weights")
    train.add_argument("--vae-steps", type=int, default=None, help="VAE training steps")
    train.add_argument("--unet-steps", type=int, default=None, help="UNet training steps")
    train.add_argument("--scenes", type=_positive_int, default=None, help="scenes encoded for UNet training")
    train.add_argument("--unet-batch", type=_positive_int, default=None, help="UNet batch size")
    train.add_argument("--scene-size", type=_world_size, default=None, metavar="PX",
                       help="side of the UNet's training scenes (default 128; the VAE trains at 128 either way)")
    train.add_argument("--unet-lr", type=float, default=None, help="UNet peak learning rate")
    train.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                       help="fit the UNet steps into this many seconds (rate measured on the first steps); "
                            "without --unet-steps the budget alone sets the step count")
    train.add_argument("--vae-from", default=None, metavar="DIR",
                       help="reuse the VAE of a weights folder ('toy': the built-in model) instead of training one")
    train.add_argument("--decoder-steps", type=int, default=None,
                       help="whole-scene decoder fine-tuning steps (also for a VAE reused with --vae-from)")
    train.add_argument("--colour-weight", type=float, default=None,
                       help="weight of the shape-colour term in decoder fine-tuning (default 2.0)")
    train.add_argument("--feature-weight", type=float, default=None,
                       help="weight of an auxiliary loss making the drag's features predict the clean latent "
                            "(an experiment; default 0: off)")
    train.add_argument("--seed", type=int, default=None, help="seed of scenes and sampling (default 0)")
    train.add_argument("--unet-from", default=None, metavar="DIR",
                       help="start the UNet from a weights folder's UNet ('toy': the built-in model)")
    train.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    evaluate = toy_commands.add_parser("eval", help="edit toy drag cases and print the quality table")
    evaluate.add_argument("--cases", type=_positive_int, default=16, help="number of drag cases (default 16)")
    evaluate.add_argument("--case-seed", type=int, default=0, help="seed of the drag cases (default 0)")
    evaluate.add_argument("--out", default="toy-quality", help="results folder (JSON, Markdown, contact sheet)")
    evaluate.add_argument("--world-size", type=_world_size, default=128, metavar="PX",
                          help="render the cases at this size: the same scenes, shapes and drags scaled (default 128)")
    _add_common(evaluate)
    evaluate.set_defaults(model="toy")
    add_config_options(evaluate)

    compare = toy_commands.add_parser("compare", help="paired differences between two quality reports of the same cases")
    compare.add_argument("base", help="quality.json (or its folder) of the model to compare against")
    compare.add_argument("new", help="quality.json (or its folder) of the candidate")

    commands.add_parser("info", help="versions, device and which optional backends are usable")
    return parser


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fastdrag").setLevel(logging.WARNING if quiet else logging.INFO)


def _json_progress(args):
    """The `on_step` of --progress-json (None without it): one JSON line per step on stderr."""
    if not getattr(args, "progress_json", False):
        return None

    def report(stage: str, done: int, total: int) -> None:
        print(json.dumps({"stage": stage, "done": done, "total": total}), file=sys.stderr, flush=True)

    return report


def _editor(args):
    from .editor import DragEditor

    bars = not (args.quiet or getattr(args, "progress_json", False))
    return DragEditor.from_pretrained(args.model, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir,
                                      progress=bars, channels_last=args.channels_last,
                                      compile_blocks=args.compile_blocks, fused_unet_kernels=args.fused_unet_kernels,
                                      frozen_conv=args.frozen_conv, sdpa_priority=args.sdpa_priority,
                                      lean_blocks=args.lean_blocks, prediction_type=args.prediction_type,
                                      single_file_config=args.single_file_config, variant=args.variant)


def cmd_edit(args) -> int:
    from .atomic import check_image_output, save_image
    from .serve import edit_summary

    points: List = [parse_drag(text) for text in args.drag]
    if args.points:
        points += load_points_file(args.points)
    if not points:
        raise InputError("no drag points: give --drag HX,HY:TX,TY or --points FILE")
    image_path = Path(args.image)
    output = Path(args.output) if args.output else image_path.with_name(f"{image_path.stem}-edited.png")
    check_image_output(output, args.overwrite)
    editor = _editor(args)
    result = editor.edit(args.image, args.prompt, points, mask=args.mask, on_step=_json_progress(args),
                         **config_overrides(args))
    save_image(result.image, output, args.overwrite)
    print(json.dumps(edit_summary(result, output)))
    return 0


def cmd_serve(args) -> int:
    from contextlib import redirect_stdout

    from .cache_usage import parse_size
    from .serve import serve

    defaults = config_overrides(args)
    prune_to = parse_size(args.prune_cache_to) if args.prune_cache_to is not None else None  # before the model loads
    editor = _editor(args)
    if args.warm_up:
        with redirect_stdout(sys.stderr):  # stdout carries answers only
            seconds = editor.warm_up(size=defaults.get("size"), **{k: v for k, v in defaults.items() if k != "size"})
        logger.info("warmed up in %.1f s", seconds["total"])
    logger.info("serving: one JSON request a line on stdin, one answer a line on stdout")
    try:
        failed = serve(editor, sys.stdin, sys.stdout, defaults, progress_json=args.progress_json, prune_to=prune_to)
    except BrokenPipeError:  # the client closed its end of stdout: no answer can reach it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (nor can Python's last flush at exit)
        print("fastdrag: error: the reader of the answers (stdout) went away; stopped serving", file=sys.stderr)
        return 1
    logger.info("input ended; %d request(s) answered with an error", failed)
    return 0


def cmd_demo(args) -> int:
    from .demo import demo_paths, run_demo

    demo_paths(Path(args.output), args.overwrite)  # before the model loads
    paths, result = run_demo(Path(args.output), model=args.model, overwrite=args.overwrite, editor=_editor(args),
                             on_step=_json_progress(args), **config_overrides(args))
    print(f"wrote {paths['input']}, {paths['edited']} and {paths['side_by_side']} "
          f"in {result.timings['total']:.1f} s ({result.drag_steps} drag steps)")
    return 0


def cmd_lora(args) -> int:
    editor = _editor(args)
    key, cached = editor.train_lora(args.image, args.prompt, on_step=_json_progress(args), **config_overrides(args))
    state = "found in the cache" if cached else "trained and cached"
    print(f"LoRA {key} {state}: {editor.cache.path(key)}")
    return 0


def cmd_export(args) -> int:
    editor = _editor(args)
    manifest = editor.export(args.image, args.prompt, args.output, fmt=args.format, fp16=args.fp16,
                             overwrite=args.overwrite, drag_points=args.drag_points, on_step=_json_progress(args),
                             **config_overrides(args))
    files = ", ".join(entry["file"] for entry in manifest.data["artifacts"].values())
    print(f"wrote {manifest.folder}: manifest.json, {files} ({manifest.data['export_seconds']} s)")
    return 0


def cmd_refit(args) -> int:
    editor = _editor(args)
    path = editor.refit_weights(args.image, args.prompt, args.export, args.output, overwrite=args.overwrite,
                                on_step=_json_progress(args), **config_overrides(args))
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB) for {args.export}")
    return 0


BUDGETED_STEP_CAP = 1_000_000  # with --time-budget and no --unet-steps, the budget alone sets the step count


def train_config(args):
    """The toy TrainConfig the `toy train` options ask for (unset options keep the defaults)."""
    from .toy.train import TrainConfig

    unet_steps = args.unet_steps
    if unet_steps is None and args.time_budget is not None:
        unet_steps = BUDGETED_STEP_CAP
    chosen = {"vae_steps": args.vae_steps, "unet_steps": unet_steps, "scenes": args.scenes,
              "unet_batch": args.unet_batch, "unet_lr": args.unet_lr, "unet_time_budget_s": args.time_budget,
              "vae_from": args.vae_from, "unet_from": args.unet_from, "decoder_steps": args.decoder_steps,
              "decoder_steps_on_reuse": args.decoder_steps, "colour_weight": args.colour_weight, "seed": args.seed,
              "scene_size": args.scene_size, "feature_weight": args.feature_weight}
    return TrainConfig(**{name: value for name, value in chosen.items() if value is not None})


def cmd_toy(args) -> int:
    if args.toy_command == "train":
        from .toy.train import train_toy

        timings = train_toy(Path(args.out), train_config(args), device=args.device, progress=not args.quiet)
        print(f"trained into {args.out}: VAE {timings['vae_s']:.0f} s, UNet {timings['unet_s']:.0f} s")
        return 0
    if args.toy_command == "compare":
        from .toy.compare import changed_cases, changed_line, load_report, markdown, paired_differences, size_note

        base, new = load_report(args.base), load_report(args.new)
        name = lambda path: Path(path).resolve().parent.name if Path(path).name == "quality.json" else Path(path).name
        print(markdown(paired_differences(base, new), name(args.base), name(args.new), size_note(base, new)), end="")
        print("\n" + changed_line(changed_cases(base, new)))
        return 0
    from .toy.quality import evaluate

    report = evaluate(_editor(args), cases=args.cases, seed=args.case_seed, out=Path(args.out),
                      title=f"{args.model}: {args.cases} toy drag cases at {args.world_size} px",
                      world_size=args.world_size, **config_overrides(args))
    print(report["markdown"])
    print(f"wrote {args.out}/quality.json, quality.md and contact_sheet.png")
    return 0


def cmd_cache(args) -> int:
    from .cache_usage import entries, human, parse_size, prune
    from .lora import default_cache_dir

    directory = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    limit = parse_size(args.prune_to) if args.prune_to is not None else None

    def summary() -> str:
        items = entries(directory) if directory.is_dir() else []
        names = {"lora": "LoRA", "export": "export", "partial": "partial write"}
        kinds = {name: [e for e in items if e.kind == kind] for kind, name in names.items()}
        parts = [f"{len(found)} {name}{'s' if len(found) != 1 else ''} {human(sum(e.size for e in found))}"
                 for name, found in kinds.items() if found or name != "partial write"]
        return f"{directory}: {', '.join(parts)}; total {human(sum(e.size for e in items))}"

    print(summary())
    if limit is not None and directory.is_dir():
        removed = prune(directory, limit)
        print(f"pruned to {human(limit)}: removed {len(removed)} (least recently used first), "
              f"freed {human(sum(e.size for e in removed))}")
        print(summary())
    return 0


def cmd_info(args) -> int:
    import torch

    from .backends import _version, all_backends

    lines = [f"fastdrag {_version('fastdrag') or 'source'} on Python {platform.python_version()} ({platform.machine()})"]
    for package in ("torch", "diffusers", "transformers", "peft"):
        lines.append(f"  {package:<13} {_version(package) or 'not installed'}")
    if torch.cuda.is_available():
        lines.append(f"device: cuda ({torch.cuda.get_device_name(0)}), default dtype fp16")
    else:
        lines.append("device: cpu (no CUDA GPU), default dtype fp32")
    from .attention import choose_backend

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend, why = choose_backend("auto", device, torch.float16 if device.type == "cuda" else torch.float32)
    lines.append(f"reference attention of an edit here: {backend} ({why})")
    from .errors import ConfigError
    from .regional_compile import check_compile_support

    try:
        check_compile_support(device)
        lines.append("--compile-blocks: usable here (torch.compile; off by default)")
    except ConfigError as exc:
        lines.append(f"--compile-blocks: not usable: {exc}")
    from .kernels import kernel_choice, uses_triton

    if uses_triton(torch.empty(0, device=device)):
        lines.append("--fused-unet-kernels: usable here (Triton on CUDA; experimental, off by default)")
    else:
        lines.append(f"--fused-unet-kernels: the stock operators would run (device {device.type}, "
                     f"FASTDRAG_KERNELS={kernel_choice()})")
    from .attention import sdpa_choices

    choices = sdpa_choices(device)
    lines.append("--sdpa-priority: SDPA at SD's head size 40 here runs "
                 + ", ".join(f"{backend} ({name})" for name, backend in choices.items()))
    lines.append("optional backends:")
    for status in all_backends():
        state = "usable" if status.usable else "not usable"
        lines.append(f"  {status.name:<12} {status.version or '-':<10} {state}: {status.reason}")
    print("\n".join(lines))
    return 0


COMMANDS = {"edit": cmd_edit, "serve": cmd_serve, "demo": cmd_demo, "lora": cmd_lora, "export": cmd_export, "refit": cmd_refit,
            "cache": cmd_cache, "toy": cmd_toy, "info": cmd_info}


class Terminated(KeyboardInterrupt):
    """SIGTERM, as a service manager (systemd, Docker, Kubernetes) stops a process: it unwinds as Ctrl-C does."""


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While a command runs, SIGTERM raises `Terminated` in it instead of killing the process outright, so
    the stopped edit keeps nothing, and outputs and staged exports are removed, not left half-written."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "quiet", False))
    try:
        with _sigterm_unwinds():
            return COMMANDS[args.command](args)
    except FastDragError as exc:
        print(f"fastdrag: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:  # one line, the shell's status for SIGTERM; every output written whole or not at all
        print("fastdrag: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; every output file is written whole or not at all
        print("fastdrag: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        if not _out_of_memory(exc):
            raise
        print(f"fastdrag: error: out of memory: {exc}", file=sys.stderr)  # with what to change, where known
        return 3


def _out_of_memory(error: BaseException) -> bool:
    """Whether `error` is torch's out-of-memory error (torch is imported by then if a command ran out)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(error, torch.OutOfMemoryError)


if __name__ == "__main__":
    sys.exit(main())
