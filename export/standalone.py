"""Run the exported inversion loop from the export folder alone: the model for a C++ service
(`export/cpp/fastdrag_edit.cpp` is that service's loop in C++, tested to write these numbers bit for bit).

Reads only `manifest.json`, the ONNX graphs and the text-embedding file (numpy + onnxruntime; no
fastdrag, tokenizer or diffusers):

    python export/standalone.py EXPORT_DIR IMAGE.npy OUT.npy [--refit WEIGHTS.safetensors]
    python export/standalone.py edit EXPORT_DIR IMAGE.npy POINTS.json OUT.npy [MASK.npy] [--refit WEIGHTS.safetensors]

IMAGE.npy is a (1, 3, H, W) float32 image in [-1, 1] at the export's size; OUT.npy receives the
latent z_t at the drag timestep, or with `edit` (an export with a drag graph) the edited image, as
`edit` below makes it from POINTS.json ([[[hx, hy], [tx, ty]], ...] in pixels) and MASK.npy ((H, W)). A service runs the denoising loop the same way with the
`unet_reference` graph and `schedule.denoise`, then `vae_decoder` on latent / scaling_factor:
`denoise` below. An export made with `keep_source_kv` has the `unet_kept` graph too, and `denoise`
shows the manifest's `source_kv` protocol: the pair's denoising keeps the keys and values each swapped
step gives, and a later edit of the same image denoises its edited latent alone with them. An export
made with `drag_points` has the `unet_drag` graph, and `drag` runs the manifest's `drag` protocol
(the drag loop, its Adam steps on the service's side) between the two.

`--refit` runs another image on the same export: WEIGHTS.safetensors (`fastdrag refit`) holds that
image's merged LoRA-target weights and its prompt's text embeddings. Each graph's session takes the
weights in place of its initializers as `refit.json` maps them (`Export.session`; a TensorRT service
refits its engines by the same names), and the text embeddings replace `text_embedding.bin`.
"""
import json
import os
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
import onnxruntime as ort


def read_tensor(folder: Path, entry: dict) -> np.ndarray:
    data = np.frombuffer((folder / entry["file"]).read_bytes(), dtype=np.dtype(entry["dtype"]).newbyteorder("<"))
    return data.reshape(entry["shape"])


def ddim(x: np.ndarray, eps: np.ndarray, alpha_from: float, alpha_to: float) -> np.ndarray:
    x0 = (x - np.sqrt(1.0 - alpha_from) * eps) / np.sqrt(alpha_from)
    return np.sqrt(alpha_to) * x0 + np.sqrt(1.0 - alpha_to) * eps


SAFETENSORS_DTYPES = {"F16": "<f2", "F32": "<f4"}


def read_safetensors(path: Path) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """(tensors, metadata) of a safetensors file: 8 bytes (little-endian) giving the header's length,
    the header (JSON: each tensor's dtype, shape and byte range in what follows; `__metadata__`), the bytes."""
    raw = Path(path).read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    metadata = header.pop("__metadata__", {})
    body = memoryview(raw)[8 + length:]
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        tensors[name] = np.frombuffer(body[begin:end], dtype=SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])
    return tensors, metadata


class Export:
    """An export folder as a service reads it: the manifest, a session per graph, each input's dtype;
    with `refit`, another image's weights and text embeddings (a `fastdrag refit` file) in place of its own."""

    def __init__(self, folder: Path, refit: Optional[Path] = None):
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / "manifest.json").read_text())
        if self.manifest.get("vae_graphs") is False:
            raise ValueError(f"{self.folder} holds only the UNet graphs of an editor's backend (vae_graphs: false), not "
                             "the VAE graphs a service encodes and decodes with: write its export with `fastdrag export`")
        self.artifacts = self.manifest["artifacts"]
        self.overrides: Dict[str, Dict[str, np.ndarray]] = {}  # per graph: initializer -> value
        self.refit_text = None
        if refit is not None:
            weights, metadata = read_safetensors(refit)
            if metadata.get("format") != "fastdrag-refit-weights":
                raise ValueError(f"{refit} is not a fastdrag refit-weights file")
            identity, size = self.manifest["model"]["identity"], self.manifest["image"]
            if metadata.get("model") != identity:
                raise ValueError(f"{refit} holds weights of model {metadata.get('model')!r}; {self.folder} was "
                                 f"exported from {identity!r}")
            if (metadata.get("width"), metadata.get("height")) != (str(size["width"]), str(size["height"])):
                raise ValueError(f"{refit} is for {metadata.get('width')}x{metadata.get('height')} images; "
                                 f"{self.folder}'s graphs take {size['width']}x{size['height']}")
            if "refit" not in self.manifest:
                raise ValueError(f"{self.folder} has no refit map: its graphs cannot take another image's weights")
            self.refit_text = weights.pop("text_embedding")
            maps = json.loads((self.folder / self.manifest["refit"]["file"]).read_text())["graphs"]
            for graph, mapping in maps.items():  # weight name -> [[initializer, transposed, dtype], ...]
                self.overrides[graph] = {
                    initializer: np.ascontiguousarray(weights[name].T if transposed else weights[name]).astype(dtype)
                    for name, entries in mapping.items() for initializer, transposed, dtype in entries}
        self._values = []  # ONNX Runtime reads the overriding values while its sessions live

    def session(self, graph: str) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        for initializer, array in self.overrides.get(graph, {}).items():
            value = ort.OrtValue.ortvalue_from_numpy(array)
            self._values.append(value)
            options.add_initializer(initializer, value)
        return ort.InferenceSession(str(self.folder / self.artifacts[graph]["file"]), options,
                                    providers=["CPUExecutionProvider"])

    def dtype(self, graph: str, tensor: str) -> np.dtype:
        return np.dtype(next(t["dtype"] for t in self.artifacts[graph]["inputs"] if t["name"] == tensor))

    def text(self) -> np.ndarray:
        if self.refit_text is not None:
            return self.refit_text
        return read_tensor(self.folder, self.artifacts["text_embedding"])


def as_export(folder: Union[Path, str, Export]) -> Export:
    """An export folder's path, or an `Export` already read (one with refit weights, say)."""
    return folder if isinstance(folder, Export) else Export(Path(folder))


def invert(folder: Union[Path, Export], image: np.ndarray) -> np.ndarray:
    export = as_export(folder)
    encoder, unet = export.session("vae_encoder"), export.session("unet_inversion")
    (mean,) = encoder.run(None, {"image": image.astype(export.dtype("vae_encoder", "image"))})
    x = mean.astype(np.float64) * export.manifest["model"]["scaling_factor"]
    text = export.text().astype(export.dtype("unet_inversion", "text_embeddings"))
    for step in export.manifest["schedule"]["inversion"]:
        feed = {"latents": x.astype(export.dtype("unet_inversion", "latents")),
                "timestep": np.array([step["t"]], dtype=np.float32), "text_embeddings": text}
        (eps,) = unet.run(None, feed)
        x = ddim(x, eps.astype(np.float64), step["alpha_from"], step["alpha_to"])
    return x.astype(np.float32)


def denoise(folder: Union[Path, Export], source: np.ndarray, edited: np.ndarray, kept=None):
    """(clean latents, kept keys and values). Without `kept`: the (source, edited) pair through
    `unet_reference` (plain attention before `start_step`, as that graph's batch-1 rows are the
    inversion graph's), returning the (2, ...) latents and, where the export keeps them, each swapped
    step's keys and values by name. With `kept` (what a pair's run of the same source returned): the
    edited latent alone through `unet_kept`, returning its (1, ...) latent."""
    export = as_export(folder)
    manifest = export.manifest
    start_step = manifest["reference_control"]["start_step"]
    text = export.text()
    names = manifest.get("source_kv", {}).get("tensors", [])
    graph = "unet_kept" if kept is not None else "unet_reference"
    plain, swapped = export.session("unet_inversion"), export.session(graph)
    x = (edited if kept is not None else np.concatenate([source, edited])).astype(np.float64)
    recorded = []
    for index, step in enumerate(manifest["schedule"]["denoise"]):
        t = np.array([step["t"]], dtype=np.float32)
        if index < start_step:  # ordinary attention: each row alone
            rows = [plain.run(None, {"latents": row[None].astype(export.dtype("unet_inversion", "latents")),
                                     "timestep": t,
                                     "text_embeddings": text.astype(export.dtype("unet_inversion", "text_embeddings"))})[0]
                    for row in x]
            eps = np.concatenate(rows)
        else:
            feed = {"latents": x.astype(export.dtype(graph, "latents")), "timestep": t,
                    "text_embeddings": np.repeat(text, len(x), axis=0).astype(export.dtype(graph, "text_embeddings"))}
            if kept is not None:
                feed.update(kept[index - start_step])
            outputs = swapped.run(None, feed)
            eps = outputs[0]
            if kept is None and names:
                recorded.append(dict(zip(names, outputs[1:], strict=True)))
        x = ddim(x, eps.astype(np.float64), step["alpha_from"], step["alpha_to"])
    return x.astype(np.float32), (recorded if kept is None and names else None)


class Adam:
    """torch.optim.Adam's update (no weight decay) in float32, as the drag loop takes it."""

    def __init__(self, lr: float, betas, eps: float):
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, eps
        self.m = self.v = None
        self.steps = 0

    def step(self, param: np.ndarray, grad: np.ndarray) -> np.ndarray:
        if self.m is None:
            self.m, self.v = np.zeros_like(param), np.zeros_like(param)
        self.steps += 1
        self.m = self.m + (grad - self.m) * np.float32(1 - self.beta1)
        self.v = self.v * np.float32(self.beta2) + grad * grad * np.float32(1 - self.beta2)
        correction1 = 1 - self.beta1 ** self.steps
        correction2 = 1 - self.beta2 ** self.steps
        denominator = np.sqrt(self.v) / np.float32(np.sqrt(correction2)) + np.float32(self.eps)
        return (param - np.float32(self.lr / correction1) * self.m / denominator).astype(np.float32)


def drag(folder: Union[Path, Export], z_t: np.ndarray, handles: np.ndarray, targets: np.ndarray, mask=None, steps=None):
    """(edited z_t, final handles, iterations run): the manifest's `drag` protocol on `unet_drag`.

    `handles` and `targets` are (M, 2) (row, col) at the supervision size, M at most the export's
    `points`: the graph's other pairs are padding, each a handle on its target (such a pair is within
    reach, so it adds nothing to the loss or its gradient, and it does not hold up the stop), its handle
    fed again as it was at every iteration. `mask` is the editable mask at latent size (1 = may change),
    None for none; `steps` replaces the manifest's number of iterations."""
    export = as_export(folder)
    protocol = export.manifest["drag"]
    session = export.session(protocol["graph"])
    handles, targets = np.asarray(handles, np.float32), np.asarray(targets, np.float32)
    count = len(handles)
    if handles.ndim != 2 or handles.shape[1:] != (2,) or targets.shape != handles.shape or not 1 <= count <= protocol["points"]:
        raise ValueError(f"this export's drag graph takes 1 to {protocol['points']} point pairs as (M, 2) arrays; "
                         f"got handles {handles.shape} and targets {targets.shape}")
    padding = np.zeros((protocol["points"] - count, 2), np.float32)
    targets = np.concatenate([targets, padding])
    shape = {t["name"]: t["shape"] for t in export.artifacts[protocol["graph"]]["inputs"]}
    feed = {"text_embeddings": export.text().astype(np.float32), "targets": targets,
            "mask": np.ones(shape["mask"], np.float32) if mask is None else np.asarray(mask, np.float32).reshape(shape["mask"])}

    names = [output.name for output in session.get_outputs()]

    def run(latent, points, tracking, features, x_prev0):
        outputs = session.run(None, {**feed, "latents": latent, "handles": np.concatenate([points, padding]),
                                     "tracking": np.array([tracking], np.float32), "handle_features": features,
                                     "x_prev0": x_prev0})
        return dict(zip(names, outputs, strict=True))

    latent = np.asarray(z_t, np.float32)
    anchors = run(latent, handles, 0.0, np.zeros(shape["handle_features"], np.float32), np.zeros_like(latent))
    features, x_prev0 = anchors["handle_features_now"], anchors["x_prev"]
    adam = Adam(protocol["lr"], protocol["adam"]["betas"], protocol["adam"]["eps"])
    run_steps = 0
    for index in range(protocol["steps"] if steps is None else steps):
        out = run(latent, handles, float(index > 0), features, x_prev0)
        handles = out["tracked_handles"][:count]
        run_steps += 1
        if (np.linalg.norm(targets[:count] - handles, axis=-1) < protocol["reach_distance"]).all():
            break
        latent = adam.step(latent, out["grad"])
    return latent, handles, run_steps


def decode(folder: Union[Path, Export], latent: np.ndarray) -> np.ndarray:
    """`vae_decoder` on latent / scaling_factor: the (1, 3, H, W) image in [-1, 1]."""
    export = as_export(folder)
    scaled = latent / export.manifest["model"]["scaling_factor"]
    (image,) = export.session("vae_decoder").run(None, {"latents": scaled.astype(export.dtype("vae_decoder", "latents"))})
    return image.astype(np.float32)


def edit(folder: Union[Path, Export], image: np.ndarray, points, mask=None, drag_steps=None) -> np.ndarray:
    """A whole edit from the export folder alone: invert, drag (the export's `drag` graph), denoise the
    (source, edited) pair, decode the edited row. `image` is (1, 3, H, W) in [-1, 1] at the export's size;
    `points` are ((hx, hy), (tx, ty)) pairs in its pixels, at most as many as the drag graph takes; `mask` is an
    (H, W) array in [0, 1], above 0.5 where the image may change, or None; `drag_steps` replaces the
    manifest's number of drag iterations. Returns the edited image."""
    export = as_export(folder)
    manifest = export.manifest
    height, width = manifest["image"]["height"], manifest["image"]["width"]
    sup_h, sup_w = manifest["drag"]["supervision_size"]
    z_t = invert(export, image)
    pairs = np.asarray(points, np.float64)  # (N, 2 [handle, target], 2 [x, y])

    def to_supervision(xy: np.ndarray) -> np.ndarray:  # image (x, y) -> (row, col) on the supervision map
        rows = np.clip(np.round(xy[:, 1] * sup_h / height), 0, sup_h - 1)
        cols = np.clip(np.round(xy[:, 0] * sup_w / width), 0, sup_w - 1)
        return np.stack([rows, cols], -1).astype(np.float32)

    latent_mask = None
    if mask is not None and (np.asarray(mask) > 0.5).any():  # nearest, as the editor downsamples it
        scale = manifest["model"]["vae_scale_factor"]
        latent_mask = (np.asarray(mask) > 0.5).astype(np.float32)[::scale, ::scale][None, None]
    edited, _, _ = drag(export, z_t, to_supervision(pairs[:, 0]), to_supervision(pairs[:, 1]), latent_mask, drag_steps)
    clean, _ = denoise(export, z_t, edited)
    return decode(export, clean[1:])


def save_array(path: Union[str, Path], array: np.ndarray) -> Path:
    """`np.save` (which adds `.npy` to a name without it) through a file beside the output, renamed over it
    when whole: an interrupted run leaves the old output, not half a new one. (`fastdrag.atomic.atomic_path`
    does this for the package; importing it would import fastdrag, which this script must run without.)"""
    path = Path(path)
    if path.suffix != ".npy":
        path = path.with_name(path.name + ".npy")
    staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(staged, "wb") as file:
            np.save(file, array)
        os.replace(staged, path)
    finally:
        if staged.exists():
            staged.unlink()
    return path


if __name__ == "__main__":
    args = sys.argv[1:]
    refit = None
    if "--refit" in args:
        at = args.index("--refit")
        if at + 1 >= len(args):
            sys.exit("--refit needs the refit-weights file (fastdrag refit) after it")
        refit, args = Path(args[at + 1]), args[:at] + args[at + 2:]
    if args[0] == "edit":
        export, image_path, points_path, out_path = Export(Path(args[1]), refit), args[2], args[3], args[4]
        mask_array = np.load(args[5]) if len(args) > 5 else None
        save_array(out_path, edit(export, np.load(image_path), json.loads(Path(points_path).read_text()), mask_array))
    else:
        export, image_path, out_path = Export(Path(args[0]), refit), args[1], args[2]
        save_array(out_path, invert(export, np.load(image_path)))
    assert not any(name.split(".")[0] in ("fastdrag", "torch", "diffusers", "transformers") for name in sys.modules), \
        "the standalone loop must not need the Python stack"
