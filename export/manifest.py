"""The export manifest: everything a service needs to run the exported loops without Python.

`manifest.json` (schema version 1) lists every artifact with its inputs and outputs, the model
and LoRA identity, the image size, the latent scaling factor, and the fixed DDIM schedule of the
inversion and denoising loops with the coefficients each step needs. The prompt's text embedding
is a raw little-endian tensor file beside it. See the README for the field list.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from ..ddim import DdimSchedule
from ..errors import FastDragError
from ..jsonfile import read_json
from .graphs import GraphSpec, TensorSpec

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
DDIM_RULE = ("x0 = (x - sqrt(1 - alpha_from) * eps) / sqrt(alpha_from); "
             "x_next = sqrt(alpha_to) * x0 + sqrt(1 - alpha_to) * eps")


class ManifestError(FastDragError):
    """A manifest or its artifacts cannot be used as asked."""


def schedule_entries(schedule: DdimSchedule) -> Dict[str, object]:
    """Both loops' timesteps with the alphas of each step (alphas_cumprod, final alpha below 0)."""
    inversion = [{"t": t, "alpha_from": schedule.alpha(t - schedule.step_size), "alpha_to": schedule.alpha(t)}
                 for t in schedule.inversion_timesteps]
    denoise = [{"t": t, "alpha_from": schedule.alpha(t), "alpha_to": schedule.alpha(t - schedule.step_size)}
               for t in schedule.denoise_timesteps]
    return {
        "num_inference_steps": len(schedule.timesteps),
        "num_inversion_steps": schedule.num_inversion_steps,
        "step_size": schedule.step_size,
        "drag_timestep": schedule.drag_timestep,
        "final_alpha_cumprod": schedule.final_alpha_cumprod,
        "update_rule": DDIM_RULE,
        "inversion": inversion,
        "denoise": denoise,
    }


def write_tensor(array: np.ndarray, path: Path) -> Dict[str, object]:
    """Write a raw little-endian row-major tensor file; returns its manifest entry."""
    array = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)
    path.write_bytes(array.tobytes())
    return {"file": path.name, "shape": list(array.shape), "dtype": array.dtype.name, "layout": "row-major little-endian"}


def read_tensor(folder: Path, entry: Dict[str, object]) -> np.ndarray:
    data = np.frombuffer((folder / entry["file"]).read_bytes(), dtype=np.dtype(entry["dtype"]).newbyteorder("<"))
    return data.reshape(entry["shape"])


@dataclass
class Manifest:
    """A loaded manifest with its folder."""

    folder: Path
    data: Dict[str, object]

    @property
    def graphs(self) -> Dict[str, GraphSpec]:
        result = {}
        for name, entry in self.data["artifacts"].items():
            if entry.get("format") == "onnx":
                result[name] = GraphSpec(name, [TensorSpec.from_dict(t) for t in entry["inputs"]],
                                         [TensorSpec.from_dict(t) for t in entry["outputs"]], entry["file"])
        return result

    def path(self, artifact: str) -> Path:
        return self.folder / self.data["artifacts"][artifact]["file"]

    @property
    def image_size(self) -> Tuple[int, int]:
        return int(self.data["image"]["width"]), int(self.data["image"]["height"])

    def text_embedding(self) -> np.ndarray:
        return read_tensor(self.folder, self.data["artifacts"]["text_embedding"])

    def check_size(self, width: int, height: int) -> None:
        """Raise unless the artifacts were exported for a `width` x `height` image."""
        if (width, height) != self.image_size:
            raise ManifestError(f"the artifacts in {self.folder} are for {self.image_size[0]}x{self.image_size[1]} images, "
                                f"not {width}x{height}: export again at that size")
        latent = tuple(self.data["latent_shape"])
        for spec in self.graphs.values():
            for tensor in spec.inputs + spec.outputs:
                if tensor.name in ("latents", "eps", "latent_mean") and tuple(tensor.shape[1:]) != latent[1:]:
                    raise ManifestError(f"{spec.name}.{tensor.name} has shape {list(tensor.shape)}, "
                                        f"which does not match the latent shape {list(latent)} of a {width}x{height} image")


SCHEMA_FILE = Path(__file__).with_name("manifest.schema.json")  # JSON Schema (draft 2020-12) of manifest.json


def manifest_schema() -> Dict[str, object]:
    """The JSON Schema of `manifest.json` at `SCHEMA_VERSION`: the contract a service (C++ or other) can
    validate an export against, or generate its reader from."""
    return json.loads(SCHEMA_FILE.read_text())


def schema_problems(data: Dict[str, object]) -> List[str]:
    """Where `data` (a manifest's contents) breaks the schema, one line each (none: it conforms).
    Needs the `jsonschema` package (`pip install 'fastdrag[export]'`)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(manifest_schema())
    return [f"{error.json_path}: {error.message}" for error in validator.iter_errors(data)]


def save_manifest(folder: Path, data: Dict[str, object]) -> Path:
    path = folder / MANIFEST
    path.write_text(json.dumps({"schema_version": SCHEMA_VERSION, **data}, indent=2))
    return path


def load_manifest(folder: Path) -> Manifest:
    """Read and check `folder/manifest.json`."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ManifestError(f"no {MANIFEST} in {folder}: not an export folder")
    data = read_json(path, "export manifest", ManifestError)
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ManifestError(f"{path} has schema version {version!r}; this fastdrag reads version {SCHEMA_VERSION}")
    missing: List[str] = [entry["file"] for entry in data.get("artifacts", {}).values()
                          if not (folder / entry["file"]).is_file()]
    if missing:
        raise ManifestError(f"{folder} lacks artifact files named in its manifest: {', '.join(missing)}")
    return Manifest(folder, data)
