"""The drag iteration as an exported graph, so a service with only the export can run stage 3.

A drag step needs the UNet's gradient with respect to its input latent, which an inference graph
does not give. `drag_job` traces one iteration of `fastdrag.drag.DragLoop` in fp32 (the UNet forward
with the feature block's output, point tracking, the motion supervision loss with the mask term, and
the backward to the latent) into functional aten operators with `make_fx`, rewriting the backward
operators that ONNX has no translation for into forward ones (`_BACKWARD_REWRITES`) and decomposing
what the ONNX exporter would decompose, and exports that without the exporter's own pass. The service
keeps the loop's state and takes the Adam step; `drag` in `export/standalone.py` is the protocol in
numpy, and the manifest's `drag` section states it.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Dict, Optional, Tuple

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.torch_version import TorchVersion

from ..config import DragConfig
from ..ddim import DdimSchedule, ddim_move, predicted_noise
from ..errors import ConfigError
from ..features import unet_with_features
from ..kernels import reference
from .graphs import GraphJob, GraphSpec, TensorSpec, quiet_exporter

aten = torch.ops.aten

# the oldest torch that traces the drag iteration's backward: 2.10 and 2.11 stop in it at a data-dependent
# scalar (`aten._local_scalar_dense`) under make_fx; 2.12.1 traces it (tests/test_drag_export.py passed on it,
# 2026-12-07). Inference graphs export from 2.10 on.
DRAG_GRAPH_TORCH = "2.12"


def check_drag_graph_torch(version: Optional[str] = None) -> None:
    """A ConfigError, before any work, where this torch (`version`, default the installed one) cannot
    trace the drag graph."""
    version = torch.__version__ if version is None else version
    if TorchVersion(version) < DRAG_GRAPH_TORCH:
        raise ConfigError(f"exporting the drag graph (drag_points > 0) needs torch {DRAG_GRAPH_TORCH} or later, "
                          f"whose make_fx traces its backward; this is torch {version}: upgrade torch, or "
                          "export without drag points")


def _convolution_input_grad(grad, inp, weight, bias_sizes, stride, padding, dilation, transposed, output_padding,
                            groups, output_mask):
    """A convolution's input gradient as the transposed convolution ONNX has (frozen weights: no weight
    or bias gradient is asked for)."""
    if transposed or output_mask[1] or output_mask[2]:
        raise NotImplementedError("only the input gradient of a plain convolution is exported")
    spatial = range(weight.dim() - 2)
    extra = [inp.shape[2 + i] - ((grad.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                                 + dilation[i] * (weight.shape[2 + i] - 1) + 1) for i in spatial]
    return aten.convolution(grad, weight, None, stride, padding, dilation, True, extra, groups), None, None


def _nearest_upsample_grad(grad, output_size, input_size, scales_h=None, scales_w=None):
    """Nearest upsampling's input gradient for whole scale factors (the UNet's 2x): a sum over each block."""
    n, c, h, w = input_size
    if output_size[0] % h or output_size[1] % w:
        raise NotImplementedError("nearest upsampling by a fractional factor is not exported")
    return grad.reshape(n, c, h, output_size[0] // h, w, output_size[1] // w).sum((3, 5))


def interpolation_matrix(size_out: int, size_in: int, align_corners: bool) -> torch.Tensor:
    """(size_out, size_in) float64: row i holds the weights 1-D linear interpolation gives output i."""
    out = torch.arange(size_out, dtype=torch.float64)
    if align_corners:
        source = out * ((size_in - 1) / (size_out - 1) if size_out > 1 else 0.0)
    else:
        source = ((out + 0.5) * (size_in / size_out) - 0.5).clamp(min=0)
    low = source.floor().long().clamp(max=size_in - 1)
    high = (low + 1).clamp(max=size_in - 1)
    frac = (source - low).unsqueeze(1)
    one_hot = torch.nn.functional.one_hot  # (no in-place writes: the graph it is traced into stays functional)
    return one_hot(low, size_in).double() * (1 - frac) + one_hot(high, size_in).double() * frac


def _bilinear_upsample_grad(grad, output_size, input_size, align_corners, scales_h=None, scales_w=None):
    """Bilinear resizing's input gradient: the transposed interpolation matrices on both sides."""
    rows = interpolation_matrix(output_size[0], input_size[2], align_corners).to(grad.device, grad.dtype)
    cols = interpolation_matrix(output_size[1], input_size[3], align_corners).to(grad.device, grad.dtype)
    return rows.T @ grad @ cols


_BACKWARD_REWRITES = {
    aten.convolution_backward.default: _convolution_input_grad,
    aten.upsample_nearest2d_backward.default: _nearest_upsample_grad,
    aten.upsample_bilinear2d_backward.default: _bilinear_upsample_grad,
}


@functools.lru_cache(maxsize=1)
def onnx_exporter_decompositions() -> Optional[Dict[object, object]]:
    """The table the ONNX exporter decomposes a program with (torch's decompositions of the operators its
    translations lack), or None where this torch's exporter does not expose how it builds it. Built once
    per process (0.7-2.4 s: the exporter's whole registry); callers copy it (`decompositions`)."""
    try:
        from torch.onnx._internal.exporter import _decomp, _registration

        with quiet_exporter():  # (it logs each op set it skips: torchvision's, where that is not installed)
            registry = _registration.ONNXRegistry.from_torchlib()
        return _decomp.create_onnx_friendly_decomposition_table(set(_decomp.get_onnx_implemented_overloads(registry)))
    except (ImportError, AttributeError):
        return None


def decompositions(exporters: Optional[Dict[object, object]] = None) -> Dict[object, object]:
    """torch's core-aten decompositions of backward operators (the norms' and activations' backward into
    elementwise operators) with the rewrites above, over `exporters` (the ONNX exporter's table, so the
    forward operators come out as the exporter would make them)."""
    table = dict(exporters or {})
    table.update({op: fn for op, fn in torch._decomp.core_aten_decompositions().items() if "backward" in op.name()})
    table.update(_BACKWARD_REWRITES)
    return table


def drag_step(unet, schedule: DdimSchedule, timestep: int, config: DragConfig, sup_res: Tuple[int, int]):
    """One drag iteration as a function of tensors, as `DragLoop._iteration` computes it (fp32, the
    reference kernels): returns (the loss's gradient with respect to `latents`, the handles after
    tracking, the loss, x_prev of `latents`, the features at the input handles). A `mask` of ones
    (every latent pixel editable) makes the mask term zero, as a drag without a mask has none."""
    size = tuple(sup_res)
    alpha, alpha_prev = schedule.step_coefficients(timestep)  # numbers, read before tracing

    def step(latents, text_embeddings, handles, targets, handle_features, x_prev0, mask, tracking):
        def loss_of(latent):
            eps, feat = unet_with_features(unet, latent, timestep, text_embeddings, config.feature_block)
            here = reference.point_features(feat.detach(), handles, size)
            tracked = reference.track_points(feat.detach(), handle_features, handles, config.r_p, size=size)
            tracked = torch.where(tracking > 0.5, tracked, handles)
            loss = reference.motion_supervision_loss(feat, tracked, targets, config.r_m, size=size)
            eps = predicted_noise(eps.float(), latent, alpha, schedule.prediction_type)
            x_prev = ddim_move(latent, eps, alpha, alpha_prev)
            loss = loss + config.lam * reference.masked_l1(x_prev, x_prev0, mask)
            return loss, (tracked, loss.detach().reshape(1), x_prev.detach(), here)

        # torch.func's gradient, not autograd's: it composes with `functionalize` (`drag_job`)
        grad, (tracked, loss, x_prev, here) = torch.func.grad(loss_of, has_aux=True)(latents)
        return grad, tracked, loss, x_prev, here

    return step


def drag_job(unet, latent_shape: Tuple[int, ...], text_dim: int, points: int, schedule: DdimSchedule,
             config: DragConfig, sup_res: Tuple[int, int]) -> GraphJob:
    """The `unet_drag` graph for `points` handle/target pairs at a fixed latent size (batch 1, fp32):
    the UNet of `unet` (frozen, fp32) traced with its backward into forward operators."""
    if points < 1:
        raise ValueError(f"a drag graph needs at least one point pair; got {points}")
    channels = unet.up_blocks[config.feature_block].resnets[-1].out_channels
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(*latent_shape, generator=generator)
    text = torch.randn(1, 77, text_dim, generator=generator)
    height, width = sup_res
    handles = torch.stack([torch.randint(0, height, (points,), generator=generator),
                           torch.randint(0, width, (points,), generator=generator)], -1).float()
    targets = (handles + 4).clamp(max=min(height, width) - 1)
    example = (latent, text, handles, targets, torch.randn(points, channels, generator=generator),
               torch.randn(*latent_shape, generator=generator), torch.ones(1, 1, *latent_shape[2:]), torch.ones(1))
    device = next(unet.parameters()).device
    example = tuple(tensor.to(device) for tensor in example)
    step = drag_step(unet, schedule, schedule.drag_timestep, config, sup_res)
    exporters = onnx_exporter_decompositions()
    # functional (no in-place writes, which the exporter's pass would otherwise remove) and decomposed as the
    # exporter would: it skips its own pass over the graph, a whole second trace (the tiny UNet's drag graph
    # took 84-101 s to trace and write with it, 55-65 s without, over three and four runs on a 2-core CPU)
    with _math_attention():
        graph = make_fx(torch.func.functionalize(step, remove="mutations"),
                        decomposition_table=decompositions(exporters))(*example)
    f32 = "float32"
    spec = GraphSpec(
        "unet_drag",
        inputs=[TensorSpec("latents", tuple(latent_shape), f32), TensorSpec("text_embeddings", (1, 77, text_dim), f32),
                TensorSpec("handles", (points, 2), f32), TensorSpec("targets", (points, 2), f32),
                TensorSpec("handle_features", (points, channels), f32), TensorSpec("x_prev0", tuple(latent_shape), f32),
                TensorSpec("mask", (1, 1, *latent_shape[2:]), f32), TensorSpec("tracking", (1,), f32)],
        outputs=[TensorSpec("grad", tuple(latent_shape), f32), TensorSpec("tracked_handles", (points, 2), f32),
                 TensorSpec("loss", (1,), f32), TensorSpec("x_prev", tuple(latent_shape), f32),
                 TensorSpec("handle_features_now", (points, channels), f32)],
    )
    spec.extra["timestep"] = schedule.drag_timestep
    return GraphJob(spec, graph, example, decomposed=exporters is not None)  # a GraphModule: exported as a module


@contextlib.contextmanager
def _math_attention():
    """Trace attention as matmuls and a softmax: its backward then decomposes into operators ONNX has
    (a fused attention kernel's backward does not, and its CPU decomposition is not exact)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def drag_protocol(config: DragConfig, points: int, sup_res: Tuple[int, int], timestep: int) -> Dict[str, object]:
    """The manifest's `drag` section: the settings and the loop a service runs around `unet_drag`."""
    return {
        "graph": "unet_drag",
        "points": points,
        "timestep": timestep,
        "supervision_size": list(sup_res),
        "steps": config.drag_steps,
        "lr": config.drag_lr,
        "reach_distance": config.reach_distance,
        "r_m": config.r_m, "r_p": config.r_p, "lam": config.lam,
        "adam": {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
        "how": ("Points are (row, col) at supervision_size: image (x, y) -> (round(y * sh / H), round(x * sw / W)). "
                "mask is the editable mask at latent size (1 = may change; all ones without a mask). "
                "Anchors: run unet_drag once on z_t with tracking 0 (handle_features and x_prev0 any values); "
                "keep its x_prev as x_prev0 and its handle_features_now as handle_features. "
                "Then for k in 0..steps-1: run it on the current latent with tracking = (k > 0); the handles "
                "become tracked_handles; if every |target - handle| < reach_distance, stop (the latent stays); "
                "else take one Adam step on the latent (fp32) with grad. The result is the edited z_t. "
                "Fewer pairs than points: pad with pairs whose handle is its target, feeding their handles "
                "unchanged at every run (a pair within reach adds nothing to the loss and does not hold up the stop)."),
    }
