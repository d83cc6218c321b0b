"""Deployment export (imported as `fastdrag.export`): LoRA merge, fixed-shape ONNX graphs with a
manifest for services, TensorRT engines with weight refit, and denoisers that run them."""
from .manifest import SCHEMA_VERSION, Manifest, ManifestError, load_manifest
from .merge import merged_unet

__all__ = ["SCHEMA_VERSION", "Manifest", "ManifestError", "load_manifest", "merged_unet", "export_loaded",
           "load_denoiser"]


def __getattr__(name):
    if name == "export_loaded":
        from .pipeline import export_loaded
        return export_loaded
    if name == "load_denoiser":
        from .runtime import load_denoiser
        return load_denoiser
    raise AttributeError(name)
