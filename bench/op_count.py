"""The tensor operations of each UNet stage and the bytes they touch, counted at full size on the meta
device (no memory, no GPU), with the package's blocks against diffusers' stock ones.

    python bench/op_count.py [--model sd15-random] [--size 512] [--stages lora,drag,denoise,decode] [--top 8] [--json FILE]

Why: a drag iteration on an H100 is about 3,100 kernels in 18.6 ms (bench/RESULTS.md), 6 µs each,
so at batch 1 the number of kernels counts as much as the bytes they move. Each operation counted
here is at least one kernel on a GPU (a cuDNN convolution or an SDPA backward is several), so what a
change removes can be counted before a GPU times it.

What is counted: every ATen operation that computes (views, `detach` and allocations are not), and
the bytes of its tensor inputs and outputs (weights included). The stages:
- `lora`: one LoRA step's forward and backward (batch `lora_batch_size`, the adapter trained, the
  UNet in training mode); the optimiser step is not counted;
- `drag`: one drag iteration's UNet forward and backward (batch 1, the adapter merged, the latent the
  only leaf, the whole UNet: the drag with a mask term), with the lean blocks inside the drag loop's
  kept conditioning (`fastdrag.fixed_conditioning`, computed once per drag: not counted);
- `denoise`: one denoising step's forward (batch 2, the reference K/V swap on);
- `decode`: the VAE decoding one latent.
The UNet runs in fp16 with channels-last weights and the frozen convolutions (the CUDA defaults);
attention is one operation each way, as a fused kernel runs it (`kept_memory.flash_like_attention`).
Autocast's casts are not seen on the meta device (it has no autocast); `autocast_casts` counts them
on the CPU instead, with every copy the profiler sees (casts and layout copies, forward and
backward), on the tiny model (SD 1.5's layers at small widths, so the same counts) in bf16 and
channels-last, under CPU autocast made to treat norms as CUDA's does (`cuda_like_autocast`): the last
lines of the output.
Layout copies are not seen either, because the meta device's convolution returns NCHW activations
where a CUDA one with channels-last weights returns channels-last ones (so, for one, the LoRA step's
copies of a resnet's input before its shortcut convolution, which the lean blocks remove, are
counted on the CPU with real tensors instead: tests/test_lean_blocks.py).
"""
import argparse
import contextlib
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.profiler import profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kept_memory import flash_like_attention, meta_model, meta_unet  # noqa: E402

from fastdrag.atomic import atomic_path  # noqa: E402
from fastdrag.attention import reference_control  # noqa: E402
from fastdrag.config import DenoiseConfig, LoraConfig  # noqa: E402
from fastdrag.fixed_conditioning import FixedConditioning  # noqa: E402
from fastdrag.lean_blocks import install_lean_blocks, lean_lora_layers  # noqa: E402
from fastdrag.lora import install_adapter, lora_parameters  # noqa: E402
from fastdrag.lora_casts import half_adapter_weights  # noqa: E402
from fastdrag.models import build_tiny  # noqa: E402
from fastdrag import shared_casts  # noqa: E402

STAGES = ("lora", "drag", "denoise", "decode")
NOT_COMPUTING = {"view", "_unsafe_view", "t", "transpose", "permute", "unsqueeze", "squeeze", "expand", "slice",
                 "select", "split", "split_with_sizes", "chunk", "unbind", "as_strided", "alias", "detach",
                 "empty", "empty_like", "new_empty", "new_empty_strided", "empty_strided", "lift_fresh"}


class OpCount(TorchDispatchMode):
    """Inside, every computing operation adds one to `ops[name]` and its tensors' bytes to `bytes[name]`."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.bytes: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._overloadpacket.__name__
        if name not in NOT_COMPUTING:
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            self.ops[name] += 1
            self.bytes[name] += sum(t.numel() * t.element_size() for t in tensors)
        return out

    def summary(self) -> dict:
        return {"ops": sum(self.ops.values()), "bytes": sum(self.bytes.values()),
                "by_op": {name: {"ops": n, "bytes": self.bytes[name]} for name, n in self.ops.most_common()}}


class CudaNormPolicy(TorchFunctionMode):
    """CUDA's GroupNorm and LayerNorm, on the CPU: under CPU autocast every floating tensor argument of
    `F.group_norm` and `F.layer_norm` cast to fp32 (a copy where it is not fp32) and the norm computed
    with autocast off, as CUDA autocast computes it (CPU autocast leaves norms in the input's dtype);
    and GroupNorm's input made NCHW-contiguous first, as CUDA's GroupNorm does (the CPU's keeps a
    channels-last input's layout), so that its output is NCHW."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.group_norm, F.layer_norm) and torch.is_autocast_enabled("cpu"):
            args, kwargs = tree_map(lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
                                    (args, kwargs))
            if func is F.group_norm:
                args = (args[0].contiguous(),) + tuple(args[1:])
            with torch.autocast("cpu", enabled=False):
                return func(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_like_autocast(dtype: torch.dtype = torch.bfloat16):
    """CPU autocast to `dtype` with CUDA's fp32 norms (`CudaNormPolicy`), and the package's norms treating
    the CPU as they treat CUDA (`fastdrag.shared_casts.FP32_NORM_DEVICES`): what the CUDA stages cast,
    counted on the CPU."""
    added = "cpu" not in shared_casts.FP32_NORM_DEVICES
    shared_casts.FP32_NORM_DEVICES.add("cpu")
    try:
        with torch.autocast("cpu", dtype=dtype, cache_enabled=False), CudaNormPolicy():
            yield
    finally:
        if added:
            shared_casts.FP32_NORM_DEVICES.discard("cpu")


def autocast_casts(lean: bool = True, size: int = 64) -> Dict[str, Dict[str, int]]:
    """{stage: {"casts": n, "copies": m}}: the casts (`_to_copy`) and all the copies the profiler sees
    (`aten::copy_`: casts, layout conversions, NCHW copies), forward and backward, of a LoRA step and a
    drag iteration under `cuda_like_autocast`, on the tiny model in bf16 and channels-last (as on CUDA):
    SD 1.5's layers (16 transformer blocks, 22 resnets, 61 GroupNorms, 48 LayerNorms, 128 LoRA layers)
    at small widths, so the same counts. The LoRA step's latents and text reach the UNet in half
    precision, as `fastdrag.lora.lora_loss` passes them, and the drag's fp32 latent is cast, as
    `fastdrag.drag` does; the drag runs the adapter merged (here: disabled, the same layers)."""
    from peft.helpers import disable_input_dtype_casting

    dtype = torch.bfloat16
    # half-precision channels-last weights and fp32 LoRA master weights, as on CUDA
    unet = build_tiny().unet.to(dtype).to(memory_format=torch.channels_last)
    install_adapter(unet, LoraConfig(), seed=0)
    params = lora_parameters(unet)
    for param in params:
        param.requires_grad_(True)
    if lean:
        install_lean_blocks(unet)
    side, batch = size // 8, LoraConfig().lora_batch_size
    text = torch.randn(batch, 77, unet.config.cross_attention_dim).to(dtype)
    counts = {}
    with cuda_like_autocast(dtype), disable_input_dtype_casting(unet):
        unet.train()
        with torch.no_grad():  # a step before: what is made once (the norms' fp32 weights) is not counted
            unet(torch.randn(batch, 4, side, side).to(dtype), torch.randint(0, 1000, (batch,)), text)
        with OpCount() as counter, profile() as prof, half_adapter_weights(lean_lora_layers(unet) if lean else []):
            out = unet(torch.randn(batch, 4, side, side).to(dtype), torch.randint(0, 1000, (batch,)), text).sample
            torch.autograd.grad(out.float().square().mean(), params)
        counts["lora"] = {"casts": counter.ops["_to_copy"], "copies": _copies(prof)}
        unet.eval()
        unet.disable_adapters()
        latent = torch.randn(1, 4, side, side, requires_grad=True)  # the fp32 leaf, cast in the forward
        with OpCount() as counter, profile() as prof:
            eps = unet(latent.to(dtype), torch.tensor([500]), text[:1]).sample
            torch.autograd.grad(eps.float().sum(), latent)
        counts["drag"] = {"casts": counter.ops["_to_copy"], "copies": _copies(prof)}
    return counts


def _copies(prof) -> int:
    """The profiler's copies, a multi-tensor copy (`_foreach_copy_`: one launch per few dozen tensors on
    CUDA, a copy each on the CPU) counted as one."""
    def within_foreach(event) -> bool:
        parent = event.cpu_parent
        while parent is not None and parent.name != "aten::_foreach_copy_":
            parent = parent.cpu_parent
        return parent is not None

    return sum(event.name in ("aten::copy_", "aten::_foreach_copy_") and not within_foreach(event)
               for event in prof.events())


def meta_components(model: str):
    """The model's UNet (`kept_memory.meta_unet`: fp16, channels-last, frozen convolutions, a fresh
    adapter at the defaults) and VAE (fp16) on the meta device."""
    components = meta_model(model)
    vae = components.vae.to(torch.float16).requires_grad_(False).eval()
    return meta_unet(model, frozen_conv=True, unet=components.unet), vae


def _latent(batch: int, channels: int, side: int, leaf: bool = False) -> torch.Tensor:
    return torch.empty(batch, channels, side, side, device="meta", dtype=torch.float16, requires_grad=leaf)


def _text(unet, batch: int) -> torch.Tensor:
    return torch.empty(batch, 77, unet.config.cross_attention_dim, device="meta", dtype=torch.float16)


def stage_calls(unet, vae, size: int, lean: bool = True) -> Dict[str, Callable[[], None]]:
    """Each stage as a call that runs it once; `lean`: the drag with its kept conditioning, as the drag loop runs it."""
    side, batch = size // 8, LoraConfig().lora_batch_size
    channels = unet.config.in_channels

    def lora() -> None:
        unet.enable_adapters()
        unet.train()
        for param in lora_parameters(unet):
            param.requires_grad_(True)
        try:
            out = unet(_latent(batch, channels, side), torch.full((batch,), 500, device="meta"), _text(unet, batch)).sample
            out.float().square().mean().backward()
        finally:
            for param in lora_parameters(unet):
                param.requires_grad_(False)
                param.grad = None
            unet.eval()

    drag_timestep, drag_text = torch.full((), 500, device="meta"), _text(unet, 1)
    fixed = None
    if lean:  # computed once per drag (here, before counting), with the adapter merged
        unet.disable_adapters()
        fixed = FixedConditioning(unet, _latent(1, channels, side), drag_timestep, drag_text)
        unet.enable_adapters()

    def drag() -> None:
        unet.disable_adapters()  # merged into the weights in the drag: the branch runs no more
        try:
            latent = _latent(1, channels, side, leaf=True)
            with fixed.active() if fixed is not None else contextlib.nullcontext():
                out = unet(latent, drag_timestep, drag_text).sample
            out.float().sum().backward()
        finally:
            unet.enable_adapters()

    def denoise() -> None:
        unet.disable_adapters()
        try:
            with torch.no_grad(), reference_control(unet, DenoiseConfig().start_layer, "sdpa"):
                unet(_latent(2, channels, side), torch.full((2,), 500, device="meta"), _text(unet, 2))
        finally:
            unet.enable_adapters()

    def decode() -> None:
        with torch.no_grad():
            vae.decode(torch.empty(1, vae.config.latent_channels, side, side, device="meta", dtype=torch.float16))

    return {"lora": lora, "drag": drag, "denoise": denoise, "decode": decode}


def count(model: str = "sd15-random", size: int = 512, stages=STAGES, lean: bool = True) -> Dict[str, dict]:
    """{stage: OpCount.summary()} with the package's blocks (`lean`: the lean blocks, and the drag's kept
    conditioning) or diffusers' stock ones (and every drag iteration computing its conditioning)."""
    unet, vae = meta_components(model)
    if lean:
        install_lean_blocks(unet)
        install_lean_blocks(vae)
    calls = stage_calls(unet, vae, size, lean)
    results = {}
    with flash_like_attention():
        for stage in stages:
            if stage not in calls:
                raise SystemExit(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
            with OpCount() as counter:
                calls[stage]()
            results[stage] = counter.summary()
    return results


def compare(model: str = "sd15-random", size: int = 512, stages=STAGES) -> Dict[str, Dict[str, dict]]:
    """{"stock": count(lean=False), "lean": count(lean=True)}."""
    return {"stock": count(model, size, stages, lean=False), "lean": count(model, size, stages, lean=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15-random", help="sd15-random or tiny")
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (latents are 1/8)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated: " + ", ".join(STAGES))
    parser.add_argument("--top", type=int, default=8, help="operations listed per stage, by count")
    parser.add_argument("--json", default=None, help="write the counts here")
    args = parser.parse_args()
    results = compare(args.model, args.size, [s for s in args.stages.split(",") if s])
    print(f"{args.model}, {args.size} px: operations (GB touched), diffusers' stock blocks -> the package's lean ones")
    for stage, stock in results["stock"].items():
        lean = results["lean"][stage]
        print(f"{stage:8s} {stock['ops']:6d} ({stock['bytes'] / 1e9:6.2f} GB) -> {lean['ops']:6d} "
              f"({lean['bytes'] / 1e9:6.2f} GB): {stock['ops'] - lean['ops']} operations fewer")
        for name, entry in list(lean["by_op"].items())[:args.top]:
            before = stock["by_op"].get(name, {"ops": 0})["ops"]
            print(f"   {entry['ops']:5d} {name}" + (f" (stock {before})" if before != entry["ops"] else ""))
        gone = {name: entry["ops"] - lean["by_op"].get(name, {"ops": 0})["ops"] for name, entry in stock["by_op"].items()}
        removed = {name: n for name, n in gone.items() if n}
        if removed:
            print("   removed: " + ", ".join(f"{n} {name}" for name, n in sorted(removed.items(), key=lambda kv: -kv[1])))
    casts = {"stock": autocast_casts(lean=False), "lean": autocast_casts(lean=True)}
    print("under CUDA's autocast (norms in fp32; counted on the CPU on the tiny model, which has SD 1.5's layers), "
          "forward and backward, stock -> lean:")
    for stage, stock in casts["stock"].items():
        lean = casts["lean"][stage]
        print(f"{stage:8s} casts {stock['casts']:5d} -> {lean['casts']:5d}; all copies (casts and layout copies) "
              f"{stock['copies']:5d} -> {lean['copies']:5d}: {stock['copies'] - lean['copies']} fewer")
    results["autocast_casts"] = casts
    if args.json:
        with atomic_path(args.json) as staged, open(staged, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
