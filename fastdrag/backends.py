"""Which optional backends (Triton, xformers, ONNX Runtime, TensorRT) are usable here, and why not."""
from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass
from typing import List

import torch

from ._quiet import XFORMERS_LOAD_ERRORS


@dataclass
class BackendStatus:
    name: str
    version: str        # "" when not installed
    usable: bool
    reason: str


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return ""


def triton_status() -> BackendStatus:
    version = _version("triton")
    if not version:
        return BackendStatus("triton", "", False, "not installed (pip install 'fastdrag[gpu]')")
    if not torch.cuda.is_available():
        return BackendStatus("triton", version, False, "no CUDA GPU: the PyTorch reference kernels run instead")
    from .kernels import kernel_choice

    if kernel_choice() == "reference":
        return BackendStatus("triton", version, False, "FASTDRAG_KERNELS=reference: the PyTorch reference kernels run")
    return BackendStatus("triton", version, True, "CUDA GPU present: the drag-loop kernels run in Triton "
                                                  "(FASTDRAG_KERNELS=reference for the PyTorch references)")


def xformers_status() -> BackendStatus:
    version = _version("xformers")
    if not version:
        return BackendStatus("xformers", "", False, "not installed (pip install 'fastdrag[gpu]')")
    try:
        importlib.import_module("xformers.ops")
    except Exception as exc:  # noqa: BLE001
        return BackendStatus("xformers", version, False, f"import failed: {exc}")
    if not torch.cuda.is_available():
        return BackendStatus("xformers", version, False, "no CUDA GPU: attention uses PyTorch SDPA")
    from .attention import xformers_support

    usable, why = xformers_support("cuda", torch.float16)
    if not usable and XFORMERS_LOAD_ERRORS:
        why = f"{why} ({XFORMERS_LOAD_ERRORS[0]})"
    return BackendStatus("xformers", version, usable, why)


def onnxruntime_status() -> BackendStatus:
    version = _version("onnxruntime") or _version("onnxruntime-gpu")
    if not version:
        return BackendStatus("onnxruntime", "", False, "not installed (pip install 'fastdrag[export]')")
    try:
        ort = importlib.import_module("onnxruntime")
    except Exception as exc:  # noqa: BLE001
        return BackendStatus("onnxruntime", version, False, f"import failed: {exc}")
    return BackendStatus("onnxruntime", version, True, "providers: " + ", ".join(ort.get_available_providers()))


def tensorrt_status() -> BackendStatus:
    version = _version("tensorrt") or _version("tensorrt-cu12") or _version("tensorrt-cu13")
    try:
        importlib.import_module("tensorrt")
    except Exception as exc:  # noqa: BLE001
        reason = "not installed (pip install 'fastdrag[tensorrt]')" if isinstance(exc, ImportError) else f"import failed: {exc}"
        return BackendStatus("tensorrt", version, False, reason)
    if not torch.cuda.is_available():
        return BackendStatus("tensorrt", version, False, "no CUDA GPU")
    return BackendStatus("tensorrt", version, True, "CUDA GPU present")


def all_backends() -> List[BackendStatus]:
    return [triton_status(), xformers_status(), onnxruntime_status(), tensorrt_status()]
