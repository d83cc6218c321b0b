"""Export an image's edit denoiser: merge its LoRA, write the graphs, the engines and the manifest."""
from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from ..atomic import check_folder_writable, replace_path
from ..attention import self_attention_processor_names
from .. import __version__
from ..ddim import DdimSchedule
from ..errors import ConfigError, OutputExistsError
from ..progress import Progress, as_progress
from .drag_graph import check_drag_graph_torch, drag_job, drag_protocol
from .graphs import export_onnx, graph_count, graph_jobs
from .manifest import Manifest, load_manifest, save_manifest, schedule_entries, write_tensor
from .merge import merged_unet

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "tensorrt")


def check_output(folder: Path, overwrite: bool, fmt: str = "onnx") -> None:
    """What can be known before minutes of LoRA training and export: the format (and for TensorRT, that
    it is installed), no non-empty output folder unless `overwrite`, and a parent folder, where the
    export is staged, that can be written."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; use {' or '.join(FORMATS)}")
    if fmt == "tensorrt":
        from .tensorrt import require_tensorrt

        require_tensorrt()
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        raise OutputExistsError(f"{folder} exists and is not empty; pass --overwrite (overwrite=True) to replace it")
    check_folder_writable(folder.parent, folder)


REFITTABLE = ("unet_inversion", "unet_reference", "unet_kept", "unet_drag")  # the UNet graphs an export may hold


def _refit_map_of(folder: Path, artifacts: Dict[str, object], name: str, unet, targets, unused):
    """One graph's refit map, or None (with a log line) when a LoRA-target weight is not among its initializers."""
    import onnx

    from .refit import refit_map

    try:
        return refit_map(onnx.load(str(folder / artifacts[name]["file"])), unet, targets, unused=unused)
    except ValueError as exc:
        logger.info("%s cannot be refitted with another LoRA: %s", name, exc)
        return None


def _write_refit_maps(folder: Path, artifacts: Dict[str, object], unet, targets, start_layer: int,
                      known: Dict[str, object]) -> Optional[Dict[str, object]]:
    """Which initializers of the UNet graphs hold the LoRA-target weights (`refit.json`), so the same
    graphs can later run another image's LoRA (ONNX Runtime initializer overrides, TensorRT refit)
    instead of being exported again. `known` holds maps already found (the fp32 drag graph's, found
    before the UNet was halved). None when a graph's weights are not all found."""
    from .refit import save_refit_maps

    # the kept graph takes the swapped layers' keys and values as inputs: their projections are not in it
    swapped = [name[:-len(".processor")] for name in self_attention_processor_names(unet, start_layer)]
    kept_unused = [f"{layer}.{projection}.weight" for layer in swapped for projection in ("to_k", "to_v")]
    graphs = [name for name in REFITTABLE if name in artifacts]
    maps = {}
    for name in graphs:
        maps[name] = known[name] if name in known else _refit_map_of(
            folder, artifacts, name, unet, targets, kept_unused if name == "unet_kept" else ())
        if maps[name] is None:
            return None
    save_refit_maps(folder / "refit.json", maps, targets)
    return {"file": "refit.json", "targets": list(targets), "graphs": graphs, "how": REFIT_HOW}


REFIT_HOW = (
    "refit.json maps, per graph, each LoRA-target weight (by the UNet's parameter name) to the initializers "
    "that hold it: [initializer, transposed, dtype]. To run another image on these graphs, take its refit-weights "
    "file (safetensors, written by `fastdrag refit IMAGE --prompt P --export THIS_FOLDER --output FILE`): for each "
    "graph and weight, put the file's tensor of that name, transposed where the entry says so and cast to its dtype, "
    "in place of each listed initializer (ONNX Runtime initializer overrides; a TensorRT refit by weight name). "
    "Use the file's `text_embedding` tensor in place of artifacts.text_embedding. export/standalone.py --refit "
    "does it with ONNX Runtime.")


def source_kv_protocol(artifacts: Dict[str, object], config) -> Dict[str, object]:
    """The manifest's description of how a service keeps the source branch's keys and values."""
    tensors = [t["name"] for t in artifacts["unet_kept"]["inputs"] if t["name"].startswith("source_")]
    return {
        "tensors": tensors,
        "steps": max(config.inversion.num_inversion_steps - config.denoise.start_step, 0),
        "how": ("At each denoising step from reference_control.start_step on, unet_reference also outputs these "
                "tensors (the source branch's keys and values of the swapped layers). A later edit of the same "
                "image (the same z_t, prompt and LoRA) may run that step as unet_kept instead: the edited latent "
                "alone at batch 1, with the tensors that step gave as inputs of the same names. Its eps is "
                "unet_reference's edited row (batch 2, row 1)."),
    }


def export_loaded(components, lora_key: str, lora_config, image_size, text_embeddings: torch.Tensor, config,
                  output: Path, fmt: str = "onnx", fp16: bool = False, overwrite: bool = False,
                  drag_points: int = 0, progress: Union[bool, Progress] = False, vae_graphs: bool = True) -> Manifest:
    """Export the UNet of `components` with its loaded LoRA merged in, for `image_size` (width, height).

    Without `vae_graphs` the export holds the UNet graphs alone (manifest `vae_graphs: false`): what an
    editor's ONNX Runtime or TensorRT backend runs, which encodes and decodes in PyTorch. A service
    needs the VAE graphs too, and refuses such a folder.

    With `drag_points` > 0 the export also holds `unet_drag` (`export/drag_graph.py`): one drag
    iteration for that many point pairs, in fp32, with the UNet's input gradient, so a service can run
    the drag too. Everything is written into a temporary folder beside `output` and moved there at the
    end, so a failed export leaves nothing half-written. `progress` reports the stage "export" (one step
    per graph written) and, for TensorRT, "engines" (one per engine built): minutes each at SD 1.5.
    """
    if isinstance(drag_points, bool) or not isinstance(drag_points, int) or drag_points < 0:
        raise ConfigError(f"drag_points must be a whole number >= 0 (0: no drag graph); got {drag_points!r}")
    if drag_points:
        check_drag_graph_torch()
    output = Path(output)
    check_output(output, overwrite, fmt)
    width, height = image_size
    started = time.perf_counter()
    unet = merged_unet(components.unet)
    schedule = DdimSchedule.from_scheduler(components.scheduler, config.inversion.num_inference_steps,
                                           config.inversion.num_inversion_steps)
    vae = components.vae
    latent_shape = (1, vae.config.latent_channels, height // components.vae_scale, width // components.vae_scale)
    sup_res = tuple(config.drag.sup_res) if config.drag.sup_res is not None else (height // 2, width // 2)
    text_dim = int(text_embeddings.shape[-1])
    unet_dtype = torch.float16 if fp16 else torch.float32
    vae_dtype = torch.float32 if (not fp16 or getattr(vae.config, "force_upcast", True)) else torch.float16
    if not vae_graphs:
        vae_dtype = vae.dtype  # nothing of the VAE is traced: leave it as it is
    original_vae_dtype = vae.dtype
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        artifacts: Dict[str, object] = {}
        opset = None

        def write(job) -> None:
            nonlocal opset
            job.spec.file = f"{job.spec.name}.onnx"
            logger.info("exporting %s", job.spec.name)
            opset = export_onnx(job, staging / job.spec.file)
            data_file = staging / f"{job.spec.file}.data"
            if data_file.exists():  # weights as ONNX external data: ship the side file with the graph
                job.spec.extra["external_data"] = data_file.name
            artifacts[job.spec.name] = job.spec.to_dict()

        def jobs():
            """Each graph's job in the order written; the UNet and VAE are cast between the drag graph's
            (fp32: the traced graph holds its weights) and the others' (each cast is in place)."""
            if drag_points:
                yield drag_job(unet.float(), latent_shape, text_dim, drag_points, schedule, config.drag, sup_res)
            if fp16:
                unet.half()  # (.half(), not .to(): diffusers warns on every dtype cast through .to)
            if vae_dtype != original_vae_dtype:
                vae.to(vae_dtype)
            yield from graph_jobs(unet, vae, width, height, text_dim, config.denoise.start_layer, unet_dtype, vae_dtype,
                                  keep_source_kv=config.keep_source_kv, scheduler=components.scheduler,
                                  vae_graphs=vae_graphs)

        known_maps = {}
        total = graph_count(config.keep_source_kv, vae_graphs) + bool(drag_points)
        # (steps first: it reports the last; strict: a miscounted total fails instead of leaving a graph out)
        for _, job in zip(as_progress(progress).steps("export", total), jobs(), strict=True):
            write(job)
            if job.spec.name == "unet_drag":  # its refit map before the UNet is halved
                known_maps["unet_drag"] = _refit_map_of(staging, artifacts, "unet_drag", unet,
                                                        lora_config.lora_targets, ())
        refit = _write_refit_maps(staging, artifacts, unet, lora_config.lora_targets, config.denoise.start_layer,
                                  known_maps)
        artifacts["text_embedding"] = write_tensor(text_embeddings.detach().float().cpu().numpy(), staging / "text_embedding.bin")
        data = {
            "created_by": "fastdrag",
            "fastdrag_version": __version__,
            "model": {"identity": components.identity, "scaling_factor": components.scaling_factor,
                      "vae_scale_factor": components.vae_scale, "prediction_type": schedule.prediction_type,
                      "unet_graphs_output": "noise (eps): the model's own output is turned into noise inside each "
                                            "UNet graph"},
            "lora": {"key": lora_key, "config": dataclasses.asdict(lora_config)},
            "image": {"width": width, "height": height},
            "latent_shape": list(latent_shape),
            "precision": {"unet": "fp16" if fp16 else "fp32",
                          **({"vae": "fp16" if vae_dtype == torch.float16 else "fp32"} if vae_graphs else {})},
            "vae_graphs": vae_graphs,
            "opset": opset,
            "reference_control": {"start_layer": config.denoise.start_layer, "start_step": config.denoise.start_step},
            "schedule": schedule_entries(schedule),
            "artifacts": artifacts,
        }
        if refit is not None:
            data["refit"] = refit
        if "unet_kept" in artifacts:
            data["source_kv"] = source_kv_protocol(artifacts, config)
        if drag_points:
            data["drag"] = drag_protocol(config.drag, drag_points, sup_res, schedule.drag_timestep)
        if fmt == "tensorrt":
            from .tensorrt import BuildSettings, build_engine, plan_target

            data["engines"] = {}
            built_for = plan_target()  # an engine loads only on this TensorRT version and kind of GPU
            names = [name for name in artifacts if name != "text_embedding"]
            for index in as_progress(progress).steps("engines", len(names)):
                name = names[index]
                # the drag graph's gradient stays in fp32: in fp16 it would underflow without loss scaling
                settings = BuildSettings(fp16=name != "unet_drag")
                build_started = time.perf_counter()
                build_engine(staging / f"{name}.onnx", staging / f"{name}.plan", settings)
                data["engines"][name] = {"file": f"{name}.plan", "flags": settings.flags(),
                                         "build_seconds": round(time.perf_counter() - build_started, 2), **built_for}
        data["export_seconds"] = round(time.perf_counter() - started, 2)
        save_manifest(staging, data)
        replace_path(staging, output)
    finally:
        if vae.dtype != original_vae_dtype:
            vae.to(original_vae_dtype)
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return load_manifest(output)
