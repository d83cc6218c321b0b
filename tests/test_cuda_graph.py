"""The eager / warm-up / capture / replay sequence of `OptimizerStep`, and `capture`'s guard against
garbage collections, checked on the CPU with the CUDA pieces replaced by recorders
(tests/test_gpu.py runs the real thing on a GPU)."""
import contextlib
import gc
import weakref

import pytest
import torch

from fastdrag import cuda_graph
from fastdrag.cuda_graph import OptimizerStep


class Recorder:
    def __init__(self):
        self.events = []

    def compute(self):
        self.events.append(("compute",))

    def zero_grad(self, set_to_none=True):
        self.events.append(("zero_grad",))


@pytest.fixture()
def recorder(monkeypatch):
    """A compute function and optimiser that record their calls, with CUDA's streams and graphs faked."""
    recorder = Recorder()
    recorder.pools = []
    events = recorder.events
    class Graph:
        def replay(self):
            events.append(("replay",))

    @contextlib.contextmanager
    def side(stream):
        events.append(("side stream",))
        yield

    @contextlib.contextmanager
    def capture(graph, pool=None):
        events.append(("capture",))
        recorder.pools.append(pool)
        yield

    monkeypatch.setattr(torch.cuda, "Stream", lambda device: object())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(cuda_graph, "on_side_stream", side)
    monkeypatch.setattr(cuda_graph, "capture", capture)
    return recorder


def test_graphed_step_warms_up_captures_once_then_only_replays(recorder):
    step = OptimizerStep(recorder.compute, recorder, graphed=True, warmup=2, device=torch.device("cpu"))
    for _ in range(5):
        step()
    assert recorder.events == [
        ("side stream",), ("compute",), ("zero_grad",),
        ("side stream",), ("compute",), ("zero_grad",),
        ("zero_grad",), ("capture",), ("compute",), ("replay",),  # gradients cleared before, never inside
        ("replay",), ("replay",),
    ]
    assert step.graph is not None and step.calls == 5


def test_eager_step_computes_and_clears_gradients_every_time(recorder):
    step = OptimizerStep(recorder.compute, recorder, graphed=False, warmup=2, device=torch.device("cpu"))
    for _ in range(4):
        step()
    assert recorder.events == [("compute",), ("zero_grad",)] * 4
    assert step.graph is None


def test_the_capture_goes_into_the_pool_given(recorder):
    step = OptimizerStep(recorder.compute, recorder, graphed=True, warmup=1, device=torch.device("cpu"),
                         pool=("pool", 7))
    for _ in range(3):
        step()
    assert recorder.pools == [("pool", 7)]


class Owner:
    """Holds its step, as the LoRA trainer and the drag loop do, and steps through its own method."""

    def __init__(self, recorder):
        self.recorder = recorder
        self.step = OptimizerStep(self.compute, recorder, graphed=True, warmup=1, device=torch.device("cpu"))

    def compute(self):
        self.recorder.events.append(("owner computes",))


def test_a_dropped_owner_frees_its_step_and_graph_at_once(recorder):
    """No reference cycle through the step's compute method: the graph (and its memory) goes when its
    owner is dropped, not at a later garbage collection, which might fall inside another capture."""
    owner = Owner(recorder)
    owner.step()
    owner.step()  # captured
    assert ("owner computes",) in recorder.events and owner.step.graph is not None
    graph, step = weakref.ref(owner.step.graph), weakref.ref(owner.step)
    was_collecting = gc.isenabled()
    gc.disable()
    try:
        del owner
        assert step() is None and graph() is None
    finally:
        if was_collecting:
            gc.enable()


def test_captured_calls_capture_once_per_name_and_shape_then_replay(recorder, monkeypatch):
    """`CapturedCalls` (the VAE's graphs): one warm-up and capture per (name, shape, dtype), into the
    pool given; later calls copy their input into the captured one and replay; past `MAX_GRAPHS` it
    starts again."""
    from fastdrag.cuda_graph import CapturedCalls

    monkeypatch.setattr(CapturedCalls, "MAX_GRAPHS", 3)
    calls = CapturedCalls(pool=("pool", 3))
    seen = []

    def double(x):
        seen.append(x)
        return x * 2

    first = torch.randn(2, 3)
    output = calls("decode", double, first)
    assert recorder.events == [("side stream",), ("capture",), ("replay",)] and recorder.pools == [("pool", 3)]
    assert seen[0] is seen[1] and seen[0] is not first  # warm-up and capture read the captured input
    torch.testing.assert_close(output, first * 2)
    second = torch.randn(2, 3)
    assert calls("decode", double, second) is output and recorder.events[3:] == [("replay",)]
    torch.testing.assert_close(seen[0], second)  # the replay's input
    assert calls.has("decode", second) and not calls.has("decode", torch.randn(2, 4))
    assert not calls.has("encode", second) and not calls.has("decode", second.double())
    calls("encode", double, second)
    calls("decode", double, torch.randn(3, 3))
    assert len(calls.graphs) == 3 and recorder.events.count(("capture",)) == 3
    calls("decode", double, torch.randn(4, 3))  # a fourth: the others go
    assert list(calls.graphs) == [("decode", (4, 3), torch.float32, torch.device("cpu"))]
    calls.reset()
    assert not calls.graphs


def test_no_garbage_collection_runs_inside_a_capture(monkeypatch):
    seen = []

    @contextlib.contextmanager
    def graph(cuda_graph, pool=None):
        seen.append(("inside", gc.isenabled(), pool))
        yield

    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: seen.append(("sync debug", mode)))
    assert gc.isenabled()
    with cuda_graph.capture(object(), pool=("pool", 1)):
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with cuda_graph.capture(object()):
            raise RuntimeError("a failed capture")
    assert gc.isenabled()  # restored after a failure too
    assert seen == [("sync debug", 0), ("inside", False, ("pool", 1)), ("sync debug", 2),
                    ("sync debug", 0), ("inside", False, None), ("sync debug", 2)]
