"""TensorRT engines from the exported ONNX graphs: build (fp16, static shapes, refittable, timing
cache on disk), refit with another image's LoRA-merged weights, run with torch CUDA tensors.

Written against the TensorRT 10 Python API; `tensorrt` is imported only when used.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..errors import FastDragError

logger = logging.getLogger(__name__)


class TensorRTUnavailable(FastDragError):
    """TensorRT or a CUDA GPU is missing."""


class TensorRTRefitError(FastDragError):
    """An engine would not take the weights it was given (not refittable, or built in a way that needs others)."""


class TensorRTEngineMismatch(FastDragError):
    """An engine built by another TensorRT version or for another kind of GPU: TensorRT cannot load it here."""


def plan_target() -> Dict[str, str]:
    """What an engine built here is tied to: the TensorRT version and the GPU's compute capability (an
    engine loads only where both are the same; `device`, the GPU's name, is for the reader)."""
    trt = require_tensorrt()
    major, minor = torch.cuda.get_device_capability()
    return {"tensorrt_version": str(trt.__version__), "compute_capability": f"{major}.{minor}",
            "device": torch.cuda.get_device_name()}


def plan_key(target: Dict[str, str]) -> str:
    """A name part that tells engines of one TensorRT version and compute capability from others'."""
    return f"trt{target['tensorrt_version']}-sm{target['compute_capability'].replace('.', '')}"


def _described(target: Dict[str, str]) -> str:
    return f"TensorRT {target['tensorrt_version']} for compute capability {target['compute_capability']} ({target['device']})"


def check_plan_target(built_for: Dict[str, str], where: str) -> None:
    """Refuse engines recorded as built for another TensorRT version or compute capability than this one's,
    naming both, before TensorRT is asked to load them."""
    here = plan_target()
    if any(built_for.get(field) != here[field] for field in ("tensorrt_version", "compute_capability")):
        raise TensorRTEngineMismatch(f"the TensorRT engines in {where} were built by {_described(built_for)}; this is "
                                     f"{_described(here)}, and an engine loads only on the TensorRT version and the "
                                     f"kind of GPU that built it: export them again here (--format tensorrt)")


def require_tensorrt() -> Any:
    """The `tensorrt` module; TensorRTUnavailable, saying what is missing, without it or a CUDA GPU."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailable("TensorRT is not installed (pip install 'fastdrag[tensorrt]')") from exc
    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT engines need a CUDA GPU; none is available")
    return trt


@dataclass(frozen=True)
class BuildSettings:
    """How an engine is built; recorded in the manifest."""

    fp16: bool = True
    refittable: bool = True
    workspace_bytes: int = 8 * 2**30
    timing_cache: str = "timing.cache"

    def flags(self) -> List[str]:
        """The names of the `tensorrt.BuilderFlag`s these settings set."""
        return [name for name, on in (("FP16", self.fp16), ("REFIT", self.refittable)) if on]


def build_engine(onnx_path: Path, engine_path: Path, settings: BuildSettings) -> Path:
    """Build a static-shape engine from an ONNX graph, reusing and updating the timing cache."""
    trt = require_tensorrt()
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise FastDragError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    for flag in settings.flags():
        config.set_flag(getattr(trt.BuilderFlag, flag))
    cache_path = engine_path.parent / settings.timing_cache
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise FastDragError(f"TensorRT failed to build an engine from {onnx_path}")
    engine_path.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return engine_path


_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "INT32": torch.int32, "INT64": torch.int64}


class Engine:
    """A deserialised engine with its execution context; outputs allocated once and reused."""

    def __init__(self, engine_path: Path):
        trt = require_tensorrt()
        self.trt: Any = trt
        self.logger: Any = trt.Logger(trt.Logger.WARNING)
        self.engine: Any = trt.Runtime(self.logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:  # TensorRT logs why; its usual reason is a plan from another version or GPU
            raise TensorRTEngineMismatch(f"TensorRT {trt.__version__} could not load the engine {engine_path} on "
                                         f"{torch.cuda.get_device_name()}: an engine loads only on the TensorRT version "
                                         f"and the kind of GPU that built it (TensorRT's log above says more)")
        self.context: Any = self.engine.create_execution_context()
        self.inputs: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {}  # name -> (shape, dtype)
        self.outputs: Dict[str, torch.Tensor] = {}  # name -> the buffer each run writes
        for index in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(index)
            shape = tuple(self.engine.get_tensor_shape(name))
            dtype = _TORCH_DTYPES[self.engine.get_tensor_dtype(name).name]
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.inputs[name] = (shape, dtype)
            else:
                self.outputs[name] = torch.empty(shape, dtype=dtype, device="cuda")

    def infer(self, feed: Dict[str, torch.Tensor], stream: Optional[torch.cuda.Stream] = None) -> Dict[str, torch.Tensor]:
        """Run on CUDA tensors (bound by address; contiguous ones without a copy); returns the engine's
        output buffers."""
        # a non-contiguous input's contiguous copy must live until the engine is enqueued: freed earlier,
        # the next input's copy could take its memory; freed after, only work the stream orders after the
        # engine can reuse it
        bound = []
        for name, (shape, dtype) in self.inputs.items():
            tensor = feed[name]
            if tuple(tensor.shape) != shape or tensor.dtype != dtype or not tensor.is_cuda:
                raise FastDragError(f"input {name} must be a CUDA {dtype} tensor of shape {shape}; "
                                    f"got {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}")
            bound.append(tensor.contiguous())
            self.context.set_tensor_address(name, bound[-1].data_ptr())
        for name, tensor in self.outputs.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        stream = stream or torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise FastDragError("TensorRT execution failed")
        return self.outputs

    def refit(self, arrays: Dict[str, np.ndarray],
              unchanged: Optional[Callable[[List[str]], Dict[str, np.ndarray]]] = None) -> None:
        """Replace named weights (ONNX initializer names) and update the engine in place, without a rebuild.

        Where the build combined a given weight with others (TensorRT then reports those as missing),
        `unchanged(names)` supplies their values as they were (e.g. `initializer_arrays` of the ONNX graph
        the engine was built from; a KeyError from it means it cannot). Raises `TensorRTRefitError`, naming
        the weights, when the engine has no such weight or still misses some."""
        refitter = self.trt.Refitter(self.engine, self.logger)
        kept = []  # TensorRT's Weights point into these arrays without owning them: alive until the refit is done

        def give(name: str, array: np.ndarray) -> bool:
            kept.append(np.ascontiguousarray(array))
            return refitter.set_named_weights(name, self.trt.Weights(kept[-1]))

        for name, array in arrays.items():
            if not give(name, array):
                raise TensorRTRefitError(f"the engine has no refittable weight named {name} (of the same size)")
        missing = list(refitter.get_missing_weights())
        if missing and unchanged is not None:
            try:
                given_back = unchanged(missing)
            except KeyError as exc:  # a weight TensorRT made up or took from elsewhere than the graph's initializers
                raise TensorRTRefitError(f"the refit also needs weights the graph cannot give back: {exc.args[0]}") from exc
            for name, array in given_back.items():
                if not give(name, array):
                    raise TensorRTRefitError(f"the engine refused its own weight {name} back")
            missing = list(refitter.get_missing_weights())
        if missing:
            raise TensorRTRefitError(f"the refit also needs {len(missing)} weights the build combined with the given "
                                     f"ones: {', '.join(sorted(missing)[:5])}{', ...' if len(missing) > 5 else ''}")
        if not refitter.refit_cuda_engine():
            raise TensorRTRefitError("TensorRT refit failed")
