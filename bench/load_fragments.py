"""What a model's load leaves reserved but free on a GPU, estimated on any machine: a replay of the
CUDA caching allocator's segment rules over the load's weight allocations, in the order
`Module.to` makes them.

    python bench/load_fragments.py [--model sd15-random] [--dtype-bytes 2]

Why: memory the caching allocator reserved but holds free counts against the memory target, and a
load that frees a weight's first copy (a cast or a layout change after the move) leaves such holes
in its segments. The replay compares the load the package does (the UNet's convolution weights
reach the device channels-last in the one move and cast) with the layout converted after the move.

The rules replayed (PyTorch's `CUDACachingAllocator.cpp`, one stream, its default settings):
requests round up to 512 B; up to 1 MiB they come from a small pool of 2 MiB segments, larger ones
from a large pool whose new segments are 20 MiB below 10 MiB and the request rounded up to 2 MiB
above; a request takes the smallest free block that fits, which is split when more than 512 B
(small pool) or 1 MiB (large pool) remain; a freed block merges with free neighbours in its
segment. Not replayed: several streams, `max_split_size_mb`, expandable segments, ties between
equal free blocks (PyTorch picks the lowest address, the replay the first made).
"""
import argparse
from typing import Iterator, List, Optional, Tuple

import torch

from fastdrag.models import build_sd15_random, build_tiny

MiB = 1 << 20
SMALL_REQUEST, SMALL_SEGMENT = MiB, 2 * MiB
LARGE_SEGMENT, LARGE_REQUEST_MIN, LARGE_ROUNDING = 20 * MiB, 10 * MiB, 2 * MiB


class Block:
    __slots__ = ("size", "free")

    def __init__(self, size: int, free: bool = True):
        self.size, self.free = size, free


class Segment:
    def __init__(self, size: int, small: bool):
        self.size, self.small, self.blocks = size, small, [Block(size)]


class CachingAllocator:
    """The segments and blocks of one stream's pools (see the module docstring for the rules)."""

    def __init__(self):
        self.segments: List[Segment] = []

    def malloc(self, nbytes: int) -> Tuple[Segment, Block]:
        size = max(512, -(-nbytes // 512) * 512)
        small = size <= SMALL_REQUEST
        fits = [(block.size, segment, block) for segment in self.segments if segment.small == small
                for block in segment.blocks if block.free and block.size >= size]
        if fits:
            _, segment, block = min(fits, key=lambda fit: fit[0])
        else:
            if small:
                segment_size = SMALL_SEGMENT
            elif size < LARGE_REQUEST_MIN:
                segment_size = LARGE_SEGMENT
            else:
                segment_size = -(-size // LARGE_ROUNDING) * LARGE_ROUNDING
            segment = Segment(segment_size, small)
            self.segments.append(segment)
            block = segment.blocks[0]
        remaining = block.size - size
        if remaining >= 512 if small else remaining > SMALL_REQUEST:
            segment.blocks.insert(segment.blocks.index(block) + 1, Block(remaining))
            block.size = size
        block.free = False
        return segment, block

    def free(self, handle: Tuple[Segment, Block]) -> None:
        segment, block = handle
        block.free = True
        merged: List[Block] = []
        for each in segment.blocks:
            if merged and merged[-1].free and each.free:
                merged[-1].size += each.size
            else:
                merged.append(each)
        segment.blocks = merged

    def reserved(self) -> int:
        return sum(segment.size for segment in self.segments)

    def allocated(self) -> int:
        return sum(block.size for segment in self.segments for block in segment.blocks if not block.free)


def tensors_in_move_order(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Parameters and buffers in the order `Module.to` converts them (each module's children first)."""
    for child in module.children():
        yield from tensors_in_move_order(child)
    for tensor in (*module._parameters.values(), *module._buffers.values()):
        if tensor is not None:
            yield tensor


def replay_load(modules: List[torch.nn.Module], dtype_bytes: int, layout_after_move: Optional[torch.nn.Module] = None
                ) -> CachingAllocator:
    """The load's allocations: every tensor of `modules` moved in turn; then, with `layout_after_move`,
    each 4-D weight of that module converted as `module.to(memory_format=...)` does (the new copy
    made, then the first freed)."""
    allocator, handles = CachingAllocator(), {}
    for module in modules:
        for tensor in tensors_in_move_order(module):
            handles[id(tensor)] = allocator.malloc(tensor.numel() * dtype_bytes)
    if layout_after_move is not None:
        for tensor in tensors_in_move_order(layout_after_move):
            if tensor.dim() == 4:
                converted = allocator.malloc(tensor.numel() * dtype_bytes)
                allocator.free(handles[id(tensor)])
                handles[id(tensor)] = converted
    return allocator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["sd15-random", "tiny"], default="sd15-random")
    parser.add_argument("--dtype-bytes", type=int, default=2, help="bytes per element on the device (fp16: 2)")
    args = parser.parse_args()
    components = build_sd15_random(device="meta") if args.model == "sd15-random" else build_tiny()
    modules = [components.unet, components.vae, components.text_encoder]
    weights = sum(t.numel() for m in modules for t in tensors_in_move_order(m)) * args.dtype_bytes
    print(f"{args.model}: weights {weights / MiB:.0f} MiB")
    for name, after in (("layout in the move (the package's load)", None),
                        ("layout converted after the move", components.unet)):
        allocator = replay_load(modules, args.dtype_bytes, after)
        reserved, allocated = allocator.reserved(), allocator.allocated()
        print(f"{name}: reserved {reserved / MiB:.0f} MiB, allocated {allocated / MiB:.0f} MiB, "
              f"free in the load's segments {(reserved - allocated) / MiB:.0f} MiB")


if __name__ == "__main__":
    main()
