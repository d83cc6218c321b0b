"""What a LoRA step's and a drag iteration's UNet forward keep for the backward, counted at full
size on the meta device (no memory, no GPU): the bytes of the distinct activations autograd keeps
(weights excluded), by the autograd node that keeps them.

    python bench/kept_memory.py [--model sd15-random] [--size 512] [--no-frozen-conv] [--no-lean-blocks] [--lora-checkpointing] [--top 12] [--json FILE]

Why: a LoRA step's CUDA graph holds its forward's kept activations at the start of its backward,
and that pool is the largest part of an edit's GPU memory (bench/RESULTS.md), so what a change does to
it can be counted here before a GPU measures it.

What is counted, and how it differs from a GPU run:
- the UNet as an editor runs it on CUDA: frozen convolutions (`--no-frozen-conv`: PyTorch's own) and
  the lean blocks (`--no-lean-blocks`: diffusers' stock blocks, e.g. GEGLUs that keep their GELU's output);
- the UNet runs in fp16, channels-last, without autocast (the meta device has none). CUDA autocast
  runs norms in fp32, so the stock GroupNorm + SiLU keep fp32 copies on a GPU: these counts are a
  lower bound for the stock model, and what a path without those casts keeps;
- the LoRA step: the adapter at the defaults, trained (in fp16 here, as autocast runs it), on a batch
  of `lora_batch_size`; the drag iteration: batch 1, the adapter merged (nothing trains), the latent
  the only leaf, the whole UNet (the drag with a mask term);
- `--lora-checkpointing`: the LoRA step with its resnets and transformer blocks recomputed in the
  backward (`fastdrag.block_checkpointing`), counted by a saved-tensor hook (`count_by_hooks`): what the
  rest of the UNet keeps and the blocks' inputs, which checkpoint keeps; and, apart, what the largest
  block keeps inside, which the backward holds beside them while it recomputes that block;
- attention is counted as a flash kernel keeps it (query, key, value, output and an fp32
  log-sum-exp per query and head): on the meta device SDPA runs its math path, which keeps the
  attention matrix that no GPU kernel keeps.
"""
import argparse
import contextlib
import json
from collections import defaultdict
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

from fastdrag import block_checkpointing
from fastdrag.atomic import atomic_path
from fastdrag.block_checkpointing import checkpointed_blocks
from fastdrag.config import LoraConfig
from fastdrag.frozen_conv import install_frozen_conv
from fastdrag.lean_blocks import install_lean_blocks
from fastdrag.lora import install_adapter, lora_parameters
from fastdrag.models import SD_ARCHITECTURES, build_sd_random, build_tiny


class _FlashLike(torch.autograd.Function):
    """Attention that keeps what a flash kernel keeps; its values are not computed (meta tensors)."""

    @staticmethod
    def forward(ctx, query, key, value):
        log_sum_exp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        out = torch.empty_like(query)
        ctx.save_for_backward(query, key, value, out, log_sum_exp)
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, _, _ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


@contextlib.contextmanager
def flash_like_attention() -> Iterator[None]:
    """SDPA replaced by `_FlashLike` for the duration (diffusers calls it through `F`)."""
    original = F.scaled_dot_product_attention

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        return _FlashLike.apply(query, key, value)

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _saved_tensors(node) -> List[torch.Tensor]:
    """The tensors an autograd node keeps: a built-in node's `_saved_*` attributes, a custom
    function's `saved_tensors`."""
    tensors = []
    for attr in dir(node):
        if not attr.startswith("_saved_"):
            continue
        try:
            value = getattr(node, attr)
        except RuntimeError:  # released, or not a tensor-valued attribute
            continue
        values = value if isinstance(value, (tuple, list)) else [value]
        tensors += [(attr, v) for v in values if isinstance(v, torch.Tensor)]
    try:
        tensors += [("saved_tensors", t) for t in getattr(node, "saved_tensors", ())]
    except RuntimeError:
        pass
    return tensors


def kept_by_node(output: torch.Tensor, weights: List[torch.Tensor]) -> Dict[str, Dict[str, int]]:
    """{"Node.attribute": {"bytes": b, "tensors": n}} of the activations the graph behind `output`
    keeps, each storage counted once (under the first node met that keeps it), weights left out."""
    weight_storages = {w.untyped_storage()._cdata for w in weights}
    seen = set()
    kept: Dict[str, Dict[str, int]] = defaultdict(lambda: {"bytes": 0, "tensors": 0})
    stack, visited = [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for attr, tensor in _saved_tensors(node):
            storage = tensor.untyped_storage()
            if storage._cdata in weight_storages:
                continue
            entry = kept[f"{type(node).__name__}.{attr}"]
            entry["tensors"] += 1
            if storage._cdata not in seen:
                seen.add(storage._cdata)
                entry["bytes"] += storage.nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return dict(kept)


def meta_model(model: str):
    """The model's components, built (sd15-random, sd21-random) or moved (tiny) onto the meta device."""
    if model in SD_ARCHITECTURES:
        return build_sd_random(model, device="meta")
    if model == "tiny":
        components = build_tiny()
        for module in (components.unet, components.vae, components.text_encoder):
            module.to("meta")
        return components
    raise SystemExit(f"--model {model!r}: {', '.join(SD_ARCHITECTURES)} or tiny")


def meta_unet(model: str, frozen_conv: bool, unet=None, lean_blocks: bool = False):
    """The model's UNet (or `unet`, already on the meta device) in fp16, channels-last, with a fresh
    adapter at the defaults; with `lean_blocks`, the lean blocks an editor installs (`fastdrag.lean_blocks`)."""
    unet = unet if unet is not None else meta_model(model).unet
    unet = unet.to(torch.float16).to(memory_format=torch.channels_last).requires_grad_(False)
    install_adapter(unet, LoraConfig(), seed=0)
    for param in lora_parameters(unet):
        param.data = param.data.half()  # as autocast runs the LoRA matmuls
    if frozen_conv:
        install_frozen_conv(unet)
    if lean_blocks:
        install_lean_blocks(unet)
    return unet


def count(model: str = "sd15-random", size: int = 512, frozen_conv: bool = True,
          lean_blocks: bool = True) -> Dict[str, Dict]:
    """{"lora step": kept_by_node(...), "drag iteration": kept_by_node(...)} at this image size."""
    unet = meta_unet(model, frozen_conv, lean_blocks=lean_blocks)
    latent = size // 8
    weights = list(unet.parameters())
    results = {}
    with flash_like_attention():
        for stage, batch, trains in (("lora step", LoraConfig().lora_batch_size, True), ("drag iteration", 1, False)):
            if trains:
                for param in lora_parameters(unet):
                    param.requires_grad_(True)
            else:  # merged into the weights in the drag: the branch runs no more
                unet.disable_adapters()
            x = torch.empty(batch, unet.config.in_channels, latent, latent, device="meta", dtype=torch.float16,
                            requires_grad=not trains)
            text = torch.empty(batch, 77, unet.config.cross_attention_dim, device="meta", dtype=torch.float16)
            out = unet(x, torch.full((batch,), 500, device="meta"), encoder_hidden_states=text).sample
            results[stage] = kept_by_node(out, weights)
    unet.enable_adapters()
    return results


def _storage(tensor: torch.Tensor) -> Tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage._cdata, storage.nbytes()


def _meta_lora_forward(model: str, size: int, frozen_conv: bool, lean_blocks: bool,
                       on_saved: Callable[[torch.Tensor], None], recomputed: Optional[Callable] = None) -> None:
    """A LoRA step's forward on the meta device, `on_saved` called for each activation autograd saves
    (weights left out). With `recomputed`, the UNet's blocks run checkpointed through it: it is called as
    `recomputed(checkpoint_call, block, *args)`, where `checkpoint_call(block, *args)` is the package's."""
    unet = meta_unet(model, frozen_conv, lean_blocks=lean_blocks)
    for param in lora_parameters(unet):
        param.requires_grad_(True)
    weights = {w.untyped_storage()._cdata for w in unet.parameters()}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage()._cdata not in weights:
            on_saved(tensor)
        return tensor

    checkpoint_call = block_checkpointing._recomputed
    batch, latent = LoraConfig().lora_batch_size, size // 8
    x = torch.empty(batch, unet.config.in_channels, latent, latent, device="meta", dtype=torch.float16)
    text = torch.empty(batch, 77, unet.config.cross_attention_dim, device="meta", dtype=torch.float16)
    if recomputed is not None:
        block_checkpointing._recomputed = lambda block, *args: recomputed(checkpoint_call, block, *args)
    try:
        with flash_like_attention(), checkpointed_blocks(unet, recomputed is not None), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            unet(x, torch.full((batch,), 500, device="meta"), encoder_hidden_states=text)
    finally:
        block_checkpointing._recomputed = checkpoint_call


def count_by_hooks(model: str = "sd15-random", size: int = 512, checkpointing: bool = True,
                   frozen_conv: bool = True, lean_blocks: bool = True) -> int:
    """The bytes a LoRA step's forward keeps for its backward, counted as autograd saves them (a saved-tensor
    hook) instead of by walking the graph, whose checkpointed blocks would run again to show what they keep.
    With `checkpointing` (`fastdrag.block_checkpointing`): what the rest of the UNet keeps and the inputs the
    checkpointed blocks keep; without, what `count` gives for the LoRA step (each storage once, weights left out)."""
    kept: Dict[int, int] = {}

    def on_saved(tensor: torch.Tensor) -> None:
        key, nbytes = _storage(tensor)
        kept[key] = nbytes

    def recomputed(checkpoint_call, block, *args):  # checkpoint keeps the block's inputs
        for arg in args:
            if isinstance(arg, torch.Tensor):
                on_saved(arg)
        return checkpoint_call(block, *args)

    _meta_lora_forward(model, size, frozen_conv, lean_blocks, on_saved, recomputed if checkpointing else None)
    return sum(kept.values())


def largest_checkpointed_block(model: str = "sd15-random", size: int = 512, frozen_conv: bool = True,
                               lean_blocks: bool = True) -> int:
    """The most bytes one of the blocks `lora_checkpointing` recomputes keeps inside, weights left out: what a
    checkpointed LoRA step's backward holds on top of `count_by_hooks`' count while it recomputes that block."""
    per_block: List[Dict[int, int]] = []
    running: List[bool] = [False]  # (the checkpointed blocks do not nest)

    def on_saved(tensor: torch.Tensor) -> None:
        if running[0]:
            key, nbytes = _storage(tensor)
            per_block[-1][key] = nbytes

    def plain(checkpoint_call, block, *args):  # the block as it runs when recomputed, its saves counted apart
        per_block.append({})
        running[0] = True
        try:
            return block(*args)
        finally:
            running[0] = False

    _meta_lora_forward(model, size, frozen_conv, lean_blocks, on_saved, plain)
    return max(sum(block.values()) for block in per_block)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15-random", help="sd15-random, sd21-random or tiny")
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (latents are 1/8)")
    parser.add_argument("--no-frozen-conv", action="store_true", help="the stock convolutions (fastdrag.frozen_conv off)")
    parser.add_argument("--no-lean-blocks", action="store_true", help="diffusers' stock blocks (fastdrag.lean_blocks off)")
    parser.add_argument("--lora-checkpointing", action="store_true",
                        help="also what a LoRA step keeps with its blocks recomputed in the backward (lora_checkpointing)")
    parser.add_argument("--top", type=int, default=12, help="rows per stage")
    parser.add_argument("--json", default=None, help="write the counts here")
    args = parser.parse_args()
    results = count(args.model, args.size, frozen_conv=not args.no_frozen_conv, lean_blocks=not args.no_lean_blocks)
    for stage, kept in results.items():
        total = sum(entry["bytes"] for entry in kept.values())
        print(f"{stage}: {total / 2**20:.1f} MiB kept for the backward ({args.model}, {args.size} px, "
              f"frozen_conv {'off' if args.no_frozen_conv else 'on'}, "
              f"lean_blocks {'off' if args.no_lean_blocks else 'on'})")
        for name, entry in sorted(kept.items(), key=lambda item: -item[1]["bytes"])[:args.top]:
            print(f"  {entry['bytes'] / 2**20:9.1f} MiB  {entry['tensors']:5d} tensors  {name}")
    if args.lora_checkpointing:
        options = dict(frozen_conv=not args.no_frozen_conv, lean_blocks=not args.no_lean_blocks)
        plain = count_by_hooks(args.model, args.size, checkpointing=False, **options)
        checkpointed = count_by_hooks(args.model, args.size, checkpointing=True, **options)
        largest = largest_checkpointed_block(args.model, args.size, **options)
        results["lora step, checkpointed blocks"] = {"kept": {"bytes": checkpointed, "tensors": 0},
                                                     "largest block": {"bytes": largest, "tensors": 0}}
        print(f"lora step with lora_checkpointing: {checkpointed / 2**20:.1f} MiB kept for the backward "
              f"(without: {plain / 2**20:.1f} MiB, counted the same way), and up to {largest / 2**20:.1f} MiB "
              f"more while the backward recomputes a block (the largest block's)")
    if args.json:
        with atomic_path(args.json) as staged, open(staged, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
