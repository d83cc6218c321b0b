"""The eager / warm-up / capture / replay sequence of `OptimizerStep`, checked on the CPU with the
CUDA pieces replaced by recorders (tests/test_gpu.py runs the real thing on a GPU)."""
import contextlib

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
