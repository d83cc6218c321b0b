"""Shared fixtures: the tiny model built once, small fast edit settings, a synthetic picture."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# MKL's matrix products take a code path by the memory alignment of their operands, so on the CPU the same
# drag could end a rounding apart from run to run (its backward; about one run in three on an AVX-512
# machine), and the tests that compare edits byte for byte failed at random. Read at MKL's first call.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
if not torch.cuda.is_available():
    # Triton kernels run on the CPU only under the interpreter; set before any kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # `pytest -n N` (the README's test command): the cores shared among the workers, so that their
    # torch threads do not outnumber them; the processes a test starts (fastdrag commands, standalone.py)
    # take the same share through OMP_NUM_THREADS. Outnumbered, torch's threads wait on each other: beside
    # another process busy on two threads, test_lora's two-process test took 145 s, and 16 s with one thread
    # a process (9 s on an idle machine).
    threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))



@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep every test's caches (LoRA, tokenizer files) out of the user's home folder."""
    os.environ["FASTDRAG_CACHE"] = str(tmp_path_factory.mktemp("fastdrag-cache"))


@pytest.fixture(scope="session")
def tiny():
    from fastdrag.models import build_tiny

    components = build_tiny()
    return components.to("cpu", torch.float32)


@pytest.fixture()
def editor(tiny, tmp_path):
    from fastdrag import DragEditor

    return DragEditor(tiny, torch.device("cpu"), torch.float32, cache_dir=tmp_path / "lora", progress=False)


@pytest.fixture()
def picture():
    from fastdrag.demo import demo_case

    return demo_case()


@pytest.fixture()
def rng():
    return np.random.default_rng(1234)


@pytest.fixture()
def fast():
    """Edit settings that keep an edit on the tiny model to a second or two on a CPU."""
    return dict(lora_steps=4, num_inference_steps=10, inversion_strength=0.7, drag_steps=6)


# The files that take a minute or more on a 2-core CPU (ONNX exports, the toy model's edits, compilation, many
# edits), the slowest first, run first: `pytest -n 2 --dist loadfile` hands out whole files in
# collection order (see pytest_configure), and one of them started last would run alone at the end.
SLOW_FIRST = ("test_drag_export.py", "test_quality.py", "test_export.py", "test_editor.py", "test_regional_compile.py",
              "test_drag.py", "test_block_checkpointing.py", "test_serve.py", "test_gpu_session.py")


def pytest_configure(config):
    # pytest-xdist >= 3.8 hands out a `--dist loadfile` run's files by their number of tests, most first,
    # unless told not to: a file of many quick tests would go before the slow ones above
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: each file's tests keep their order
