"""The two pieces every CUDA-graph capture here needs: warm-up on a side stream, and a capture
whose one host sync is allowed even while `FASTDRAG_SYNC_DEBUG` makes syncs raise; the optimiser
step that the LoRA trainer and the drag loop both run eagerly or replay from a graph; and the one
memory pool that an editor's graphs share."""
from __future__ import annotations

import contextlib
import gc
import inspect
import weakref
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
    """Capture the block into `graph` (capture synchronises once; the replays never do).

    Python's cyclic garbage collector is off inside: a collection there may destroy a dropped CUDA
    graph, which CUDA forbids while a stream captures, and the capture fails ("operation not
    permitted when stream is capturing"; it happened once in 48 edits on an H200).
    """
    previous = torch.cuda.get_sync_debug_mode()
    collecting = gc.isenabled()
    gc.disable()
    torch.cuda.set_sync_debug_mode(0)
    try:
        with torch.cuda.graph(graph, pool=pool):
            yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)
        if collecting:
            gc.enable()


class GraphPool:
    """One CUDA memory pool for several graphs, held open while this object lives.

    Graphs captured into one pool reuse each other's temporaries, so together they hold what the
    largest needs, not the sum: an editor's LoRA step, drag iteration and denoiser forwards share
    one. That is safe for graphs that never replay at the same time and whose captured outputs are
    written before they are read in every replay and read (or copied) right after it, which the
    editor's are: everything they carry from one replay to the next lives in tensors allocated
    outside the capture. `handle` is what `capture(graph, pool)` takes.
    """

    def __init__(self, device: torch.device):
        with torch.cuda.device(device):
            # a MemPool keeps the pool open between graphs (a bare handle's pool closes with its last graph)
            self._pool = torch.cuda.MemPool() if hasattr(torch.cuda, "MemPool") else None
            self.handle = self._pool.id if self._pool is not None else torch.cuda.graph_pool_handle()

    @property
    def persistent(self) -> bool:
        """Whether the pool outlives its graphs, so that graphs captured after them reuse their memory."""
        return self._pool is not None


class CapturedCalls:
    """No-grad calls `fn(x) -> tensor` replayed from CUDA graphs, one per (name, input shape and dtype),
    each captured into `pool` after one eager call on a side stream.

    A replay returns the graph's own output buffer: read or copy it before any other graph of the
    pool replays. At most `MAX_GRAPHS` are kept (a server that sees many sizes recaptures).
    """

    MAX_GRAPHS = 4

    def __init__(self, pool=None):
        self.pool = pool
        self.graphs: dict = {}

    def reset(self) -> None:
        self.graphs.clear()

    @staticmethod
    def _key(name: str, x: torch.Tensor) -> tuple:
        return name, tuple(x.shape), x.dtype, x.device

    def has(self, name: str, x: torch.Tensor) -> bool:
        return self._key(name, x) in self.graphs

    @torch.no_grad()
    def __call__(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        key = self._key(name, x)
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.MAX_GRAPHS:
                self.reset()
            static = x.clone()
            with on_side_stream(torch.cuda.Stream(x.device)):
                fn(static)
            graph = torch.cuda.CUDAGraph()
            with capture(graph, self.pool):
                output = fn(static)
            entry = self.graphs[key] = (graph, static, output)
        graph, static, output = entry
        static.copy_(x)
        graph.replay()
        return output


class OptimizerStep:
    """An in-place training step — forward, backward and optimiser step on tensors its owner keeps —
    run eagerly, or with `graphed` (CUDA) eagerly on a side stream for the first `warmup` calls, so
    lazy initialisation settles, then captured once and replayed.

    Gradients are cleared after every eager call. A captured backward writes the same gradient
    buffers at every replay, so they are cleared once, before the capture, and never inside it.
    """

    def __init__(self, compute: Callable[..., None], optimizer: torch.optim.Optimizer, graphed: bool, warmup: int,
                 device: torch.device, pool=None):
        # the owner's bound method, held weakly: an owner that holds this step (and its graph) is then
        # freed, graph and memory, as soon as it is dropped, not by a later garbage collection
        self._compute = weakref.WeakMethod(compute) if inspect.ismethod(compute) else (lambda: compute)
        self.optimizer, self.warmup, self.pool = optimizer, warmup, pool
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
        if self.graph is None:
            compute = self._compute()
            if self.side_stream is None:
                compute()
                self.optimizer.zero_grad(set_to_none=True)
            elif self.calls < self.warmup:
                with on_side_stream(self.side_stream):
                    compute()
                    self.optimizer.zero_grad(set_to_none=True)
            else:
                self.optimizer.zero_grad(set_to_none=True)
                graph = torch.cuda.CUDAGraph()
                with capture(graph, self.pool):
                    compute()
                self.graph = graph
        if self.graph is not None:
            self.graph.replay()
        self.calls += 1
