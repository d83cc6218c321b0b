"""Which ONNX initializers hold which UNet weights, so an engine can be refitted with a new LoRA.

A LoRA changes only the weights of its target projections (`to_q`, `to_k`, `to_v`, `to_out.0`).
The exporter may rename or transpose a weight while folding constants, so the map is found by
value: each target weight of the merged UNet is matched to the initializer holding it (as is or
transposed). The same graph refitted with another image's merged weights is that image's model:
an engine refitted (TensorRT), or a session given them as initializer overrides (ONNX Runtime).
Every export writes its maps to `refit.json`.

A service that has an export but no PyTorch runs another image on it from a refit-weights file
(`save_refit_weights`, written by `DragEditor.refit_weights` / `fastdrag refit`): one safetensors file
with that image's merged LoRA-target weights, by the parameter names `refit.json` maps to each
graph's initializers, and its prompt's text embeddings.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Tuple, Union

import numpy as np
import torch


@dataclass(frozen=True)
class RefitEntry:
    initializer: str   # ONNX initializer (and TensorRT weight) name
    transposed: bool   # the initializer holds the weight transposed
    dtype: str


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


def target_weights(unet: torch.nn.Module, targets: Iterable[str]) -> Dict[str, torch.Tensor]:
    """Weights of the modules a LoRA with these `targets` changes, by parameter name."""
    targets = tuple(targets)
    return {f"{name}.weight": module.weight for name, module in unet.named_modules()
            if isinstance(module, torch.nn.Linear) and name.endswith(targets) and ".attn" in name}


def refit_map(onnx_model, unet: torch.nn.Module, targets: Iterable[str],
              unused: Iterable[str] = ()) -> Dict[str, List[RefitEntry]]:
    """For every LoRA-target weight of `unet` (the merged model the graph was exported from), the
    initializers of `onnx_model` that hold it. Raises if one is missing: such a graph cannot be refitted.
    `unused` names weights the graph does not compute with (the kept graph's swapped layers' key and
    value projections, whose results are its inputs): they map to nothing."""
    from onnx import numpy_helper

    by_digest: Dict[str, List[Tuple[str, str]]] = {}
    for initializer in onnx_model.graph.initializer:
        array = numpy_helper.to_array(initializer)
        if array.ndim == 2:
            by_digest.setdefault(_digest(array), []).append((initializer.name, array.dtype.name))
    mapping: Dict[str, List[RefitEntry]] = {}
    missing = []
    unused = set(unused)
    for name, weight in target_weights(unet, targets).items():
        if name in unused:
            mapping[name] = []
            continue
        array = weight.detach().cpu().numpy()
        found = [RefitEntry(n, False, d) for n, d in by_digest.get(_digest(array), [])]
        found += [RefitEntry(n, True, d) for n, d in by_digest.get(_digest(array.T), [])]
        if not found:
            missing.append(name)
        mapping[name] = found
    if missing:
        raise ValueError(f"{len(missing)} LoRA-target weights are not initializers of the graph (e.g. {missing[0]}): "
                         "it cannot be refitted")
    return mapping


def merged_target_weights(unet: torch.nn.Module, targets: Iterable[str]) -> Dict[str, torch.Tensor]:
    """The LoRA-target weights of `unet` with its active adapters merged in, by the merged model's
    parameter names: what `merged_unet(unet)` would hold there, without copying the UNet."""
    from peft.tuners.lora import LoraLayer

    from ..lora import add_adapter_deltas_

    targets = tuple(targets)
    weights = {}
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer) and name.endswith(targets) and ".attn" in name:
            weights[f"{name}.weight"] = add_adapter_deltas_(module.get_base_layer().weight.detach().clone(), module)
    return weights or target_weights(unet, targets)  # a UNet without adapter: its own weights


def initializer_arrays(onnx_path: Path, names: Iterable[str]) -> Dict[str, np.ndarray]:
    """The values of the initializers `names` of the ONNX graph at `onnx_path`, reading only theirs of a
    graph's external data (a whole SD 1.5 UNet is 1.6 GiB): a TensorRT refit's weights that must be given
    again as they are. Raises KeyError naming an initializer the graph does not have."""
    import onnx
    from onnx import numpy_helper

    wanted = set(names)
    model = onnx.load(str(onnx_path), load_external_data=False)
    found = {initializer.name: numpy_helper.to_array(initializer, base_dir=str(Path(onnx_path).parent))
             for initializer in model.graph.initializer if initializer.name in wanted}
    absent = sorted(wanted - set(found))
    if absent:
        raise KeyError(f"{onnx_path} has no initializer named {absent[0]}" + (f" (nor {len(absent) - 1} others)"
                                                                              if len(absent) > 1 else ""))
    return found


def save_refit_maps(path: Path, maps: Dict[str, Dict[str, List[RefitEntry]]], targets: Iterable[str]) -> None:
    """Write each graph's map (weight -> initializers) as JSON, for refitting the graphs later."""
    data = {"targets": list(targets),
            "graphs": {graph: {name: [[e.initializer, e.transposed, e.dtype] for e in entries]
                               for name, entries in mapping.items()} for graph, mapping in maps.items()}}
    path.write_text(json.dumps(data))


def load_refit_maps(path: Path) -> Tuple[Tuple[str, ...], Dict[str, Dict[str, List[RefitEntry]]]]:
    """(targets, each graph's map) as `save_refit_maps` wrote them."""
    data = json.loads(path.read_text())
    maps = {graph: {name: [RefitEntry(n, bool(t), d) for n, t, d in entries] for name, entries in mapping.items()}
            for graph, mapping in data["graphs"].items()}
    return tuple(data["targets"]), maps


def refit_arrays(mapping: Dict[str, List[RefitEntry]],
                 unet: Union[torch.nn.Module, Mapping[str, Union[torch.Tensor, np.ndarray]]]) -> Dict[str, np.ndarray]:
    """Initializer name -> new value, from a newly merged UNet (or its `merged_target_weights`, or the
    weights of a refit-weights file), laid out as the graph holds it."""
    weights = dict(unet.named_parameters()) if isinstance(unet, torch.nn.Module) else unet
    arrays = {}
    for name, entries in mapping.items():
        value = weights[name]
        value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        for entry in entries:
            arrays[entry.initializer] = np.ascontiguousarray(value.T if entry.transposed else value).astype(entry.dtype)
    return arrays


REFIT_WEIGHTS_FORMAT = "fastdrag-refit-weights"
TEXT_EMBEDDING = "text_embedding"  # the refit-weights file's tensor of the prompt's text embeddings


def save_refit_weights(path: Path, weights: Dict[str, torch.Tensor], text_embeddings: torch.Tensor,
                       metadata: Dict[str, str]) -> None:
    """Write a refit-weights file atomically: `weights` (merged LoRA-target weights by parameter name),
    the prompt's `text_embeddings` (fp32) as `text_embedding`, and `metadata` (strings) beside the format."""
    from safetensors.torch import save_file

    from ..atomic import atomic_path

    tensors = {name: weight.detach().cpu().contiguous() for name, weight in weights.items()}
    tensors[TEXT_EMBEDDING] = text_embeddings.detach().float().cpu().contiguous()
    with atomic_path(path) as staged:
        save_file(tensors, str(staged), metadata={"format": REFIT_WEIGHTS_FORMAT, "version": "1", **metadata})


def load_refit_weights(path: Path) -> Tuple[Dict[str, np.ndarray], np.ndarray, Dict[str, str]]:
    """(weights by parameter name, text embeddings, metadata) of a refit-weights file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as opened:
        metadata = opened.metadata() or {}
        if metadata.get("format") != REFIT_WEIGHTS_FORMAT:
            raise ValueError(f"{path} is not a fastdrag refit-weights file (format {metadata.get('format')!r})")
        arrays = {name: opened.get_tensor(name) for name in opened.keys()}
    text = arrays.pop(TEXT_EMBEDDING)
    return arrays, text, metadata
