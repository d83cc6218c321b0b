"""The two pieces every CUDA-graph capture here needs: warm-up on a side stream, and a capture
whose one host sync is allowed even while `FASTDRAG_SYNC_DEBUG` makes syncs raise; and the
optimiser step that the LoRA trainer and the drag loop both run eagerly or replay from a graph."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

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


class OptimizerStep:
    """An in-place training step — forward, backward and optimiser step on tensors its owner keeps —
    run eagerly, or with `graphed` (CUDA) eagerly on a side stream for the first `warmup` calls, so
    lazy initialisation settles, then captured once and replayed.

    Gradients are cleared after every eager call. A captured backward writes the same gradient
    buffers at every replay, so they are cleared once, before the capture, and never inside it.
    """

    def __init__(self, compute: Callable[..., None], optimizer: torch.optim.Optimizer, graphed: bool, warmup: int,
                 device: torch.device):
        self.compute, self.optimizer, self.warmup = compute, optimizer, warmup
        self.side_stream = torch.cuda.Stream(device) if graphed else None
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.calls = 0

    def reset_optimizer(self) -> None:
        """The optimiser's state as before its first step, in place (a captured step reads it by
        address): what its owner's `restart` needs so that the next run trains as a fresh one."""
        with torch.no_grad():
            for state in self.optimizer.state.values():
                for value in state.values():
                    value.zero_()

    def __call__(self) -> None:
        """One step: eager, a warm-up on the side stream, the capture (and its first replay), or a replay."""
        if self.side_stream is None:
            self.compute()
            self.optimizer.zero_grad(set_to_none=True)
        elif self.graph is None and self.calls < self.warmup:
            with on_side_stream(self.side_stream):
                self.compute()
                self.optimizer.zero_grad(set_to_none=True)
        else:
            if self.graph is None:
                self.optimizer.zero_grad(set_to_none=True)
                graph = torch.cuda.CUDAGraph()
                with capture(graph):
                    self.compute()
                self.graph = graph
            self.graph.replay()
        self.calls += 1
