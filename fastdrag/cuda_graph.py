"""The two pieces every CUDA-graph capture here needs: warm-up on a side stream, and a capture
whose one host sync is allowed even while `FASTDRAG_SYNC_DEBUG` makes syncs raise."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def on_side_stream(stream: torch.cuda.Stream) -> Iterator[None]:
    """Run the block on `stream`, ordered after and before the current stream's work (warm-up before capture)."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream().wait_stream(stream)


@contextlib.contextmanager
def capture(graph: torch.cuda.CUDAGraph, pool=None) -> Iterator[None]:
    """Capture the block into `graph` (capture synchronises once; the replays never do)."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        with torch.cuda.graph(graph, pool=pool):
            yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)
