"""Where a step's time goes: device time of one step of each UNet stage, by kind of kernel.

    python bench/profile_stages.py [--model sd15-random] [--size 512] [--steps 3] [--json FILE]

The per-stage benchmarks say how long a step takes; this says what it spends it on (convolutions,
matrix products, attention, normalisation, layout copies, elementwise, the optimiser), so the next
speed-up is chosen from a measurement: fusing elementwise work (e.g. `torch.compile`) pays only if
that share is large, channels-last only if layout copies are. Steps run eagerly under
`torch.profiler`; a CUDA graph replays the same kernels without the host's gaps, so the kernel sum
here is what a graphed step costs at best. On the CPU it groups PyTorch operators' own time instead
of kernels (a smoke test; the GPU is where the answer matters). The layout copies are also
traced to where they come from (one more profiled step, with shapes): the operator chain that made
each copy, its input shapes and the autograd node in a backward pass.
"""
import argparse
import json
import re
import tempfile
import time
from collections import defaultdict
from typing import Callable, Dict, Iterator, List, Tuple

import torch
from torch.profiler import ProfilerActivity, profile

from fastdrag import DragEditor
from fastdrag.atomic import atomic_path
from fastdrag.config import LoraConfig
from fastdrag.ddim import DdimSchedule
from fastdrag.demo import demo_case
from fastdrag.denoiser import TorchDenoiser
from fastdrag.drag import DragLoop
from fastdrag.inputs import prepare_inputs
from fastdrag.lora import LoraTrainer, merged_adapter
from fastdrag.vae import encode_posterior, encode_prompt

# first match wins: kernel names (cuDNN, cuBLAS, CUTLASS, Triton, ATen) and ATen operator names
KINDS: List[Tuple[str, str]] = [
    ("fused by torch.compile", r"^triton_(poi|red|per|tem)_"),
    ("attention", r"fmha|flash|attention|softmax|_efficient_attention|sdpa"),
    ("optimizer", r"multi_tensor|adam|foreach"),
    ("convolution", r"conv|fprop|dgrad|wgrad|implicit_gemm|winograd"),
    ("layout copy", r"nchwtonhwc|nhwctonchw|transpose|permute|copy_|contiguous|clone|cat"),
    ("matmul", r"gemm|cutlass|cublas|addmm|\bmm\b|bmm|matmul|linear|sm\d+_xmma"),
    ("normalisation", r"group_?norm|layer_?norm|batch_?norm|welford|rowwisemoments|fusedparams"),
    ("fastdrag Triton kernels", r"_motion_loss|_track_points|_point_features|_masked_l1"),
    ("fastdrag UNet kernels", r"^_(partial_moments|normalise|backward_partials|input_gradient|geglu_)"),
    ("reduction", r"reduce|sum|mean|norm"),
    ("elementwise", r"elementwise|vectorized|unrolled|silu|gelu|mul|add|div|sub|where|fill|exp|neg|abs"),
]


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, lowered):
            return kind
    return "other"


def stage_steps(editor: DragEditor, size: int) -> Iterator[Tuple[str, Callable[[], object]]]:
    """One step of each UNet stage at the defaults, eager, on the demo image, yielded in edit order
    (the LoRA trainer is finished, its adapter frozen, before the later stages are built)."""
    c = editor.components
    case = demo_case(size)
    inputs = prepare_inputs(case.image, case.points, case.mask)
    text = encode_prompt(c.tokenizer, c.text_encoder, case.prompt)
    posterior = encode_posterior(c.vae, inputs.image)
    schedule = DdimSchedule.from_scheduler(c.scheduler, 50, 35)
    z0 = (posterior.mean * c.scaling_factor).float()
    trainer = LoraTrainer(c.unet, c.scheduler, posterior, text, c.scaling_factor, LoraConfig(), seed=0)
    yield "LoRA step (batch 4)", trainer.step
    trainer.finish()
    with merged_adapter(c.unet):  # as an edit runs the later stages
        denoiser = TorchDenoiser(c.unet)
        yield "inversion step", lambda: denoiser(z0, 341, text)
        far = inputs.targets.clone()
        far[:, 1] = inputs.sup_res[1] - 1  # keep the handle from arriving
        loop = DragLoop(c.unet, z0, schedule.drag_timestep, text, inputs.handles, far, inputs.mask, schedule,
                        editor.config.drag, inputs.sup_res, check_every=10**9)
        yield "drag iteration", lambda: loop.step(1)
        pair, text2 = torch.cat([z0, z0 + 0.1]), text.expand(2, -1, -1)
        with denoiser.reference_control(editor.config.denoise.start_layer):
            yield "denoising step (batch 2, K/V swap)", lambda: denoiser(pair, 341, text2)


def profile_step(step: Callable[[], object], steps: int, device: torch.device) -> Dict[str, object]:
    """Milliseconds per step of wall time (eager) and of device time, the latter by kind and top kernels,
    and the autograd nodes a step's backward runs."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step()
    step()  # warm-up: Triton compilation, cuDNN's algorithm choice, lazy allocations
    synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize()
        wall = time.perf_counter() - start
    by_kind: Dict[str, float] = defaultdict(float)
    count_by_kind: Dict[str, float] = defaultdict(float)  # kernels (CPU: operator calls) per step
    by_name: Dict[str, float] = defaultdict(float)
    launches = backward_nodes = 0
    for event in prof.key_averages():
        if event.key.startswith("autograd::engine::evaluate_function"):  # one autograd node run by backward()
            backward_nodes += event.count
        if device.type == "cuda":
            # kernels, copies and fills; a user annotation (torch.compile marks its regions) spans kernels counted already
            if event.device_type != torch.autograd.DeviceType.CUDA or getattr(event, "is_user_annotation", False):
                continue
            micros = event.self_device_time_total
            launches += event.count
        else:
            if not event.key.startswith("aten::"):
                continue
            micros = event.self_cpu_time_total
        if micros <= 0:
            continue
        by_kind[kind_of(event.key)] += micros / 1e3 / steps
        count_by_kind[kind_of(event.key)] += event.count / steps
        by_name[event.key] += micros / 1e3 / steps
    top = sorted(by_name.items(), key=lambda item: -item[1])[:12]
    return {"wall_ms": wall * 1e3 / steps, "device_ms": sum(by_kind.values()),
            "kernels_per_step": launches / steps if device.type == "cuda" else None,
            "backward_nodes_per_step": backward_nodes / steps,
            "by_kind_ms": dict(sorted(by_kind.items(), key=lambda item: -item[1])),
            "count_by_kind": dict(count_by_kind),
            "top_ms": [[name[:100], ms] for name, ms in top]}


def copy_origin(event) -> str:
    """`op<op [shapes] | autograd node` of the operator that launched a copy ("forward" outside a backward)."""
    ops, outer, node = [], event, ""
    parent = event
    while parent is not None:
        name = parent.name
        if name.startswith("aten::"):
            ops.append(name[len("aten::"):])
            outer = parent
        elif not node and "Backward" in name and not name.startswith("autograd::"):
            node = name
        parent = parent.cpu_parent
    shapes = [list(shape) for shape in (outer.input_shapes or []) if shape]
    return f"{'<'.join(reversed(ops))} {shapes} | {node or 'forward'}"


def copy_origins(step: Callable[[], object], device: torch.device, top: int = 12) -> Dict[str, List[List[object]]]:
    """Milliseconds of one step's layout copies by `copy_origin` ("by_origin") and by its operator
    chain and autograd node alone, all shapes together ("by_mechanism"), largest first."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    by_origin: Dict[str, float] = defaultdict(float)
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        if device.type == "cuda":
            micros = sum(kernel.duration for kernel in event.kernels if kind_of(kernel.name) == "layout copy")
        else:
            micros = event.self_cpu_time_total if event.name == "aten::copy_" else 0.0
        if micros > 0:
            by_origin[copy_origin(event)] += micros / 1e3
    by_mechanism: Dict[str, float] = defaultdict(float)
    for origin, ms in by_origin.items():
        chain, node = origin.split(" | ")
        by_mechanism[f"{chain.split(' [')[0]} | {node}"] += ms

    def largest(table: Dict[str, float]) -> List[List[object]]:
        return [[key, ms] for key, ms in sorted(table.items(), key=lambda item: -item[1])[:top]]

    return {"by_origin": largest(by_origin), "by_mechanism": largest(by_mechanism)}


def report(stage: str, row: Dict[str, object]) -> str:
    total = row["device_ms"] or 1.0
    lines = [f"== {stage}: {row['wall_ms']:.2f} ms wall (eager), {row['device_ms']:.2f} ms "
             f"{'kernel' if row['kernels_per_step'] is not None else 'operator'} time"
             + (f", {row['kernels_per_step']:.0f} kernels" if row["kernels_per_step"] is not None else "")]
    counts = row.get("count_by_kind", {})
    unit = "kernels" if row["kernels_per_step"] is not None else "calls"
    lines += [f"   {kind:<20} {ms:8.2f} ms {100 * ms / total:5.1f} %  {counts.get(kind, 0):6.0f} {unit}"
              for kind, ms in row["by_kind_ms"].items()]
    lines += ["   top:"] + [f"   {ms:8.3f} ms  {name}" for name, ms in row["top_ms"]]
    if row.get("copies_from"):
        for table, title in (("by_mechanism", "all shapes"), ("by_origin", "by shape")):
            lines += [f"   layout copies from (one step, {title}):"]
            lines += [f"   {ms:8.3f} ms  {origin}" for origin, ms in row["copies_from"][table]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15-random")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per stage, after 2 warm-up steps")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="the UNet's weights channels-last (default: the package's, on CUDA only)")
    parser.add_argument("--compile-blocks", action="store_true", help="torch.compile the UNet's blocks first")
    parser.add_argument("--fused-unet-kernels", action="store_true",
                        help="the UNet's GroupNorm + SiLU and GEGLU as fused Triton kernels (fastdrag.fused_blocks)")
    parser.add_argument("--copies", action=argparse.BooleanOptionalAction, default=True,
                        help="trace the layout copies to their source (one more profiled step per stage)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    editor = DragEditor.from_pretrained(args.model, device=device, dtype=dtype, cache_dir=tempfile.mkdtemp(),
                                        progress=False, channels_last=args.channels_last,
                                        compile_blocks=args.compile_blocks, fused_unet_kernels=args.fused_unet_kernels)
    rows = {}
    for stage, step in stage_steps(editor, args.size):
        rows[stage] = profile_step(step, args.steps, device)
        if args.copies:
            rows[stage]["copies_from"] = copy_origins(step, device)
        print(report(stage, rows[stage]), flush=True)
    if args.json:
        with atomic_path(args.json) as staged, open(staged, "w") as handle:
            json.dump({"device": str(device), "model": args.model, "size": args.size, "dtype": str(dtype),
                       "channels_last": editor.components.unet.conv_in.weight.is_contiguous(
                           memory_format=torch.channels_last),
                       "compile_blocks": args.compile_blocks, "fused_unet_kernels": args.fused_unet_kernels,
                       "stages": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
