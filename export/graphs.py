"""One description per exported graph (names, shapes, dtypes, the module and an example input),
read alike by the export, the manifest and the runtime backends; and the ONNX export itself."""
from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import torch

from ..attention import reference_control, self_attention_processor_names
from ..ddim import predicted_noise, prediction_type_of

logger = logging.getLogger(__name__)

EXTERNAL_DATA_BYTES = 512 * 2**20  # weights above this go to a side file (protobuf caps a file at 2 GB)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: Tuple[int, ...]
    dtype: str  # numpy name: float32 / float16

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "TensorSpec":
        return cls(data["name"], tuple(int(s) for s in data["shape"]), data["dtype"])


@dataclass
class GraphSpec:
    """What one exported graph takes and gives."""

    name: str
    inputs: List[TensorSpec]
    outputs: List[TensorSpec]
    file: str = ""
    extra: Dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {"file": self.file, "format": "onnx", "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs], **self.extra}


class OutputAsNoise(torch.nn.Module):
    """The UNet's output turned into noise inside a graph (`fastdrag.ddim.predicted_noise`, with the
    alpha gathered at the graph's timestep input), so that every exported UNet graph outputs noise
    whatever the model predicts, and a service's loops are the same for SD 2.x's v-models. For a
    noise-predicting model it adds nothing to the graph."""

    def __init__(self, scheduler=None):
        super().__init__()
        self.prediction_type = "epsilon" if scheduler is None else prediction_type_of(scheduler)
        table = None if self.prediction_type == "epsilon" else scheduler.alphas_cumprod.float().cpu()
        self.register_buffer("alphas_cumprod", table, persistent=False)

    def forward(self, output, latents, timestep):
        if self.prediction_type == "epsilon":
            return output
        alpha = self.alphas_cumprod.to(latents.device)[timestep.long()].view(-1, 1, 1, 1)
        return predicted_noise(output.float(), latents.float(), alpha, self.prediction_type).to(output.dtype)


class UNetEps(torch.nn.Module):
    """(latents, timestep, text embeddings) -> predicted noise."""

    def __init__(self, unet, noise: OutputAsNoise):
        super().__init__()
        self.unet, self.noise = unet, noise

    def forward(self, latents, timestep, text):
        return self.noise(self.unet(latents, timestep, encoder_hidden_states=text, return_dict=False)[0], latents, timestep)


class KVExchange:
    """What the swapped layers' `ReferenceAttnProcessor`s read and record in an exported graph: the
    source keys and values become the reference graph's extra outputs (recording) or the kept graph's
    extra inputs (reading), by layer name."""

    def __init__(self, recording: bool):
        self.recording = recording
        self.values: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}

    def record(self, name: str, key: torch.Tensor, value: torch.Tensor) -> None:
        self.values[name] = (key, value)

    def read(self, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.values[name]


def source_kv_names(count: int) -> List[str]:
    """The graphs' names of the swapped layers' source keys and values, in forward order, key then value."""
    return [f"source_{kind}_{index}" for index in range(count) for kind in ("key", "value")]


class UNetEpsRecordingKV(torch.nn.Module):
    """(latents, timestep, text embeddings) of (source, edited) pairs -> (predicted noise, then each
    swapped layer's source keys and values), under `reference_control(..., source_kv=exchange)`."""

    def __init__(self, unet, layers: List[str], exchange: KVExchange, noise: OutputAsNoise):
        super().__init__()
        self.unet, self.layers, self.exchange, self.noise = unet, layers, exchange, noise

    def forward(self, latents, timestep, text):
        eps = self.noise(self.unet(latents, timestep, encoder_hidden_states=text, return_dict=False)[0], latents, timestep)
        return (eps, *[tensor for layer in self.layers for tensor in self.exchange.values[layer]])


class UNetEpsKeptKV(torch.nn.Module):
    """(edited latents, timestep, text embeddings, then each swapped layer's source keys and values)
    -> predicted noise: the edited branch of a reference step alone."""

    def __init__(self, unet, layers: List[str], exchange: KVExchange, noise: OutputAsNoise):
        super().__init__()
        self.unet, self.layers, self.exchange, self.noise = unet, layers, exchange, noise

    def forward(self, latents, timestep, text, *source_kv):
        self.exchange.values = {layer: (source_kv[2 * i], source_kv[2 * i + 1]) for i, layer in enumerate(self.layers)}
        return self.noise(self.unet(latents, timestep, encoder_hidden_states=text, return_dict=False)[0], latents, timestep)


class VaeDecode(torch.nn.Module):
    """Unscaled latents (latent / scaling_factor) -> image in [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


class VaeEncodeMean(torch.nn.Module):
    """Image in [-1, 1] -> posterior mean (unscaled)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        return self.vae.encode(image).latent_dist.mean


@dataclass
class GraphJob:
    """A graph to export: its description, the module and example inputs, and what to hold during export."""

    spec: GraphSpec
    module: torch.nn.Module
    example: Tuple[torch.Tensor, ...]
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    decomposed: bool = False  # functional and decomposed with the exporter's table already: skip its pass


def _np_dtype(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.float16: "float16"}[dtype]


def graph_count(keep_source_kv: bool, vae_graphs: bool = True) -> int:
    """How many graphs `graph_jobs` gives (what an export's progress counts before it builds them)."""
    return 2 + keep_source_kv + 2 * vae_graphs


def graph_jobs(unet, vae, width: int, height: int, text_dim: int, start_layer: int,
               unet_dtype: torch.dtype, vae_dtype: torch.dtype, keep_source_kv: bool = False,
               scheduler=None, vae_graphs: bool = True) -> List[GraphJob]:
    """The graphs of an export at a fixed image size: inversion UNet (batch 1), reference
    UNet (batch 2, K/V swap from `start_layer` inside the graph), VAE decoder and encoder (left out
    without `vae_graphs`: an editor's backend runs the UNet graphs alone). With `keep_source_kv` the
    reference UNet also gives each swapped layer's source keys and values, and one more graph,
    `unet_kept` (batch 1), takes them with an edited latent: a repeated edit's step.
    The UNet graphs output noise; `scheduler` says what the model outputs (`OutputAsNoise`)."""
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    latent = (vae.config.latent_channels, height // scale, width // scale)
    ud, vd = _np_dtype(unet_dtype), _np_dtype(vae_dtype)
    generator = torch.Generator().manual_seed(0)
    unet_device, vae_device = next(unet.parameters()).device, next(vae.parameters()).device  # an editor's on CUDA
    rand = lambda *shape, dtype, device=unet_device: torch.randn(*shape, generator=generator).to(device, dtype)
    noise = OutputAsNoise(scheduler)

    def unet_job(name: str, batch: int, context) -> GraphJob:
        spec = GraphSpec(
            name,
            inputs=[TensorSpec("latents", (batch, *latent), ud), TensorSpec("timestep", (1,), "float32"),
                    TensorSpec("text_embeddings", (batch, 77, text_dim), ud)],
            outputs=[TensorSpec("eps", (batch, *latent), ud)],
        )
        example = (rand(batch, *latent, dtype=unet_dtype), torch.tensor([500.0], device=unet_device),
                   rand(batch, 77, text_dim, dtype=unet_dtype))
        return GraphJob(spec, UNetEps(unet, noise), example, context)

    jobs = [
        unet_job("unet_inversion", 1, contextlib.nullcontext),
        unet_job("unet_reference", 2, lambda: reference_control(unet, start_layer, "sdpa")),
    ]
    jobs[1].spec.extra["reference_control"] = {"start_layer": start_layer}
    if vae_graphs:
        jobs += [
            GraphJob(GraphSpec("vae_decoder", [TensorSpec("latents", (1, *latent), vd)], [TensorSpec("image", (1, 3, height, width), vd)]),
                     VaeDecode(vae), (rand(1, *latent, dtype=vae_dtype, device=vae_device),)),
            GraphJob(GraphSpec("vae_encoder", [TensorSpec("image", (1, 3, height, width), vd)], [TensorSpec("latent_mean", (1, *latent), vd)]),
                     VaeEncodeMean(vae), (rand(1, 3, height, width, dtype=vae_dtype, device=vae_device).clamp(-1, 1),)),
        ]
    if keep_source_kv:
        jobs += _source_kv_jobs(jobs[1], jobs[0], unet, start_layer, noise)
    return jobs


def _source_kv_jobs(reference: GraphJob, inversion: GraphJob, unet, start_layer: int,
                    noise: OutputAsNoise) -> List[GraphJob]:
    """Turn the reference job into one that also outputs the swapped layers' source keys and values,
    and return the kept job that takes them; their shapes come from one eager run of the example."""
    layers = self_attention_processor_names(unet, start_layer)
    recording, reading = KVExchange(recording=True), KVExchange(recording=False)
    reference.module = UNetEpsRecordingKV(unet, layers, recording, noise)
    reference.context = lambda: reference_control(unet, start_layer, "sdpa", source_kv=recording)
    with torch.no_grad(), reference.context():
        outputs = reference.module(*reference.example)
    names, dtype = source_kv_names(len(layers)), reference.spec.outputs[0].dtype
    kv_specs = [TensorSpec(name, tuple(tensor.shape), dtype) for name, tensor in zip(names, outputs[1:], strict=True)]
    reference.spec.outputs += kv_specs
    kept = GraphSpec("unet_kept", inputs=list(inversion.spec.inputs) + kv_specs, outputs=list(inversion.spec.outputs))
    kept.extra["reference_control"] = {"start_layer": start_layer}
    example = (*inversion.example, *[tensor.contiguous() for tensor in outputs[1:]])
    return [GraphJob(kept, UNetEpsKeptKV(unet, layers, reading, noise), example,
                     lambda: reference_control(unet, start_layer, "sdpa", source_kv=reading))]


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """The exporter logs every optional op set it skips (torchvision, ...); keep that out of the user's terminal."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def _single_output_rewrites() -> Iterator[None]:
    """onnxscript's graph optimiser without its rewrite rules whose pattern ends in several nodes.

    The optimiser tries every default rule at every node. A rule with several output nodes (in
    onnxscript 0.7: SlicesSplit, two Slices of one tensor into a Split) lists the whole graph each
    time, so optimising a tiny UNet's graph took 20.7 s with it and 4.7 s without, and the graph came
    out the same (the same nodes, the same outputs under ONNX Runtime). Other versions: unchanged.
    """
    try:
        from onnxscript import rewriter

        rules = rewriter._DEFAULT_REWRITE_RULES
    except (ImportError, AttributeError):
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = tuple(
        rule for rule in rules if getattr(getattr(rule, "_target_pattern", None), "has_single_output_node", True))
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


# torch >= 2.6's exporter optimises the graph itself (onnxscript's constant folding and rewrites) unless
# told not to; optimised here again it would pay that pass twice for the same graph
_NO_OPTIMIZE_IN_EXPORT = {"optimize": False} if "optimize" in inspect.signature(torch.onnx.export).parameters else {}


@contextlib.contextmanager
def _no_exporter_decomposition(skip: bool) -> Iterator[None]:
    """The ONNX exporter without its decomposition pass (a retrace of the whole program), for a graph that
    `make_fx` already made functional and decomposed with the exporter's table (`GraphJob.decomposed`)."""
    try:
        from torch.onnx._internal.exporter import _fx_passes

        decompose = _fx_passes.decompose_with_registry
    except (ImportError, AttributeError):
        skip = False
    if not skip:
        yield
        return
    _fx_passes.decompose_with_registry = lambda exported_program, registry: exported_program
    try:
        yield
    finally:
        _fx_passes.decompose_with_registry = decompose


def _export_program(job: GraphJob, skip_decomposition: bool):
    with _no_exporter_decomposition(skip_decomposition):
        return torch.onnx.export(
            job.module, job.example, dynamo=True, verbose=False,
            input_names=[t.name for t in job.spec.inputs], output_names=[t.name for t in job.spec.outputs],
            **_NO_OPTIMIZE_IN_EXPORT,
        )


# The exporter, and what export_onnx changes of it, of onnxscript and of the warning filters while it runs,
# belong to the whole process: one export at a time (editors in two threads may both export)
_EXPORTING = threading.Lock()


def export_onnx(job: GraphJob, path: Path) -> int:
    """Export one graph to `path` (cleaned: constant folding, dead nodes removed); returns the opset."""
    import onnx

    weight_bytes = sum(p.numel() * p.element_size() for p in job.module.parameters())
    with _EXPORTING, job.context(), warnings.catch_warnings(), torch.no_grad(), quiet_exporter():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter is not the user's concern
        try:
            program = _export_program(job, job.decomposed)
        except Exception as exc:  # noqa: BLE001 (another torch's exporter may need its pass: slower, not wrong)
            if not job.decomposed:
                raise
            logger.info("%s: the exporter could not translate it without its decompositions (%s); exporting it "
                        "again with them", job.spec.name, type(exc).__name__)
            program = _export_program(job, False)
        with _single_output_rewrites():
            program.optimize()  # once
        program.save(str(path), external_data=weight_bytes > EXTERNAL_DATA_BYTES)
    onnx.checker.check_model(str(path))
    model = onnx.load(str(path), load_external_data=False)
    return next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))
