"""Stage 3: the drag loop — motion supervision and point tracking on the inverted latent.

Everything in the loop stays on the device: handle positions, the reached-target test and the
early stop. Once every handle is within `reach_distance` of its target a device flag freezes
the latent (so later iterations change nothing); the host learns of the flag through a
non-blocking copy and an event it polls, so the loop never waits for the GPU. On the CPU the
flag is simply read each step.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, replace
from typing import Iterator, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from . import kernels
from .autocast import unet_autocast
from .config import DragConfig
from .cuda_graph import OptimizerStep
from .ddim import DdimSchedule, ddim_step
from .features import unet_features, unet_with_features
from .fixed_conditioning import FixedConditioning
from .half_norms import enabled as half_norms_enabled
from .progress import Progress, as_progress
from .weights import first_weight


@dataclass
class DragResult:
    latent: torch.Tensor    # the optimised z_t*, fp32
    handles: torch.Tensor   # (N, 2) final handle positions, supervision coordinates
    steps: int              # iterations run until every handle arrived (or the step limit)
    losses: torch.Tensor    # (steps,) loss of each iteration


def latent_mask(mask: Optional[torch.Tensor], latent_shape: Tuple[int, ...]) -> Optional[torch.Tensor]:
    """The editable mask at latent resolution (nearest), or None when there is no mask term."""
    if mask is None:
        return None
    return F.interpolate(mask.float(), size=tuple(latent_shape[-2:]), mode="nearest")


class ArrivalWatch:
    """Tells the host, without blocking, that the device flag 'every handle arrived' became true."""

    def __init__(self, device: torch.device, every: int):
        self.cuda = device.type == "cuda"
        self.every = max(1, every)
        self.event = None
        self.host = torch.zeros((), dtype=torch.bool, pin_memory=self.cuda)

    def arrived(self, step: int, done: torch.Tensor) -> bool:
        if not self.cuda:
            return bool(done)
        ready = self.event is None or self.event.query()
        seen = self.event is not None and ready and bool(self.host)  # a host read: no GPU sync
        if ready and step % self.every == 0:
            self.host.copy_(done, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        return seen

    def reset(self) -> None:
        """Forget the last drag's flag (its copies are done: the drag's result synchronised)."""
        self.event = None
        self.host.zero_()


@contextlib.contextmanager
def sync_debug(device: torch.device) -> Iterator[None]:
    """`FASTDRAG_SYNC_DEBUG=warn|error` makes any host sync inside the drag loop warn or raise (CUDA)."""
    mode = os.environ.get("FASTDRAG_SYNC_DEBUG", "")
    if device.type != "cuda" or not mode:
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


class DragLoop:
    """The drag loop's state on the device and one iteration at a time (DESIGN.md stage 3).

    Construction does the work before the loop: `F_0`, `x_prev_0` and the original handles'
    features from one forward. `step(k)` runs iteration k and says whether the host has seen
    every handle arrive. Only the latent is a leaf: the UNet's weights must be frozen. Without a
    mask term nothing needs the predicted noise, so the UNet's forwards stop after the feature block.

    The loop's state (latent, handles, flags, loss, optimiser state) lives in tensors allocated once
    and updated in place, so with `cuda_graph=True` (CUDA only) iterations from `GRAPH_WARMUP` on
    replay one captured CUDA graph: forward, tracking, loss, backward and the Adam step without a
    kernel launch from Python (the graph's temporaries come from its private memory pool, or from
    `graph_pool`, a `GraphPool` handle that other graphs share). `restart`
    refills those tensors for another drag of the same shapes and settings, and the graph replays
    it from its first iteration.
    """

    GRAPH_WARMUP = 3  # eager iterations before capture (lazy inits settle)

    def __init__(self, unet, z_t: torch.Tensor, timestep: int, text_embeddings: torch.Tensor, handles: torch.Tensor,
                 targets: torch.Tensor, mask: Optional[torch.Tensor], schedule: DdimSchedule, config: DragConfig,
                 sup_res: Tuple[int, int], check_every: int = 4, cuda_graph: bool = False, graph_pool=None):
        _require_frozen(unet)
        device = z_t.device
        self.unet, self.schedule, self.config, self.sup_res = unet, schedule, config, sup_res
        self.timestep = timestep
        self.dtype = unet.dtype
        self.autocast = config.mixed_precision and device.type == "cuda" and self.dtype != torch.float32
        self.half_norms = self.autocast and half_norms_enabled()  # experimental (fastdrag.half_norms)
        self.text = text_embeddings.to(self.dtype).clone()
        self.t = torch.full((), timestep, device=device, dtype=torch.long)
        self.handles = handles.to(device=device, dtype=torch.float32).clone()
        self.targets = targets.to(device=device, dtype=torch.float32).clone()
        self.mask = latent_mask(mask.to(device) if mask is not None else None, z_t.shape)
        self.latent = z_t.detach().float().clone().requires_grad_(True)
        self.x_prev0, self.feat0 = self._anchors()
        # the time embedding, its projections and the text's cross-attention K/V: the same every iteration
        # (its context holds no reference to the loop: a dropped loop, and its graph, must go without a collection)
        self.fixed = FixedConditioning(unet, self.latent.detach().to(self.dtype), self.t, self.text,
                                       functools.partial(unet_autocast, unet, self.autocast, norms_in_half=self.half_norms))
        self.handle_feats = kernels.point_features(self.feat0, self.handles, self.sup_res)
        self._start = self._start_of(z_t, text_embeddings)
        self.before = torch.empty_like(self.latent, requires_grad=False)  # the latent before each step, reused
        self.cuda_graph = cuda_graph and device.type == "cuda"
        self.optimizer = torch.optim.Adam([self.latent], lr=config.drag_lr, fused=True if device.type == "cuda" else None,
                                          capturable=self.cuda_graph)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast and self.dtype == torch.float16)
        self.scaler_start = self.scaler.state_dict()
        self.tracking = torch.zeros((), dtype=torch.bool, device=device)  # iteration 0 does not track
        self.done = torch.zeros((), dtype=torch.bool, device=device)
        self.steps_run = torch.zeros((), dtype=torch.long, device=device)
        self.loss = torch.zeros((), device=device)  # the last iteration's loss (0 once arrived)
        self.losses = torch.zeros(max(config.drag_steps, 1), device=device)
        self.watch = ArrivalWatch(device, check_every)
        self.optimizer_step = OptimizerStep(self._iteration, self.optimizer, self.cuda_graph, self.GRAPH_WARMUP, device,
                                            pool=graph_pool)

    def _forward(self) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """(eps, features) of the current latent; without a mask term nothing needs eps, so the
        forward stops after the feature block."""
        latent, block = self.latent.to(self.dtype), self.config.feature_block
        if self.mask is None:
            return None, unet_features(self.unet, latent, self.t, self.text, block)
        return unet_with_features(self.unet, latent, self.t, self.text, block)

    def _anchors(self) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """`x_prev_0` (with a mask term) and the feature map `F_0`, from the start latent."""
        with torch.no_grad():
            eps0, feat0 = self._forward()
            x_prev0 = None if eps0 is None else self._x_prev(self.latent.detach(), eps0)
            return x_prev0, feat0

    def _x_prev(self, latent: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """The DDIM step of `latent` from the drag timestep, given the UNet's output on it."""
        t = self.timestep
        return ddim_step(self.schedule, latent, self.schedule.noise(prediction.float(), latent, t), t)

    @staticmethod
    def _start_of(z_t: torch.Tensor, text_embeddings: torch.Tensor) -> tuple:
        """What the anchors were computed from: the tensors themselves and their in-place versions."""
        return z_t, z_t._version, text_embeddings, text_embeddings._version

    def _same_start(self, z_t: torch.Tensor, text_embeddings: torch.Tensor) -> bool:
        """Whether `z_t` and `text_embeddings` are the last start's tensors, not written since."""
        last_z, z_version, last_text, text_version = self._start
        return (z_t is last_z and z_t._version == z_version
                and text_embeddings is last_text and text_embeddings._version == text_version)

    def fits(self, unet, z_t: torch.Tensor, timestep: int, text_embeddings: torch.Tensor, handles: torch.Tensor,
             mask: Optional[torch.Tensor], schedule: DdimSchedule, config: DragConfig, sup_res: Tuple[int, int],
             cuda_graph: bool = False) -> bool:
        """Whether `restart` can take this drag: the same UNet, shapes and settings (the number of steps
        aside: the host counts them), so the same graph."""
        return (unet is self.unet and first_weight(unet).dtype == self.dtype and z_t.shape == self.latent.shape
                and z_t.device == self.latent.device and text_embeddings.shape == self.text.shape
                and handles.shape == self.handles.shape and (mask is None) == (self.mask is None)
                and timestep == self.timestep
                and schedule.step_coefficients(timestep) == self.schedule.step_coefficients(self.timestep)
                and schedule.prediction_type == self.schedule.prediction_type
                and replace(config, drag_steps=0) == replace(self.config, drag_steps=0)
                and tuple(sup_res) == tuple(self.sup_res)
                and (cuda_graph and z_t.device.type == "cuda") == self.cuda_graph
                and (self.autocast and half_norms_enabled()) == self.half_norms)

    def restart(self, z_t: torch.Tensor, text_embeddings: torch.Tensor, handles: torch.Tensor, targets: torch.Tensor,
                mask: Optional[torch.Tensor], drag_steps: Optional[int] = None, same_weights: bool = False) -> None:
        """Start a new drag (one that `fits`) in this loop's tensors, in place, as a fresh loop would;
        `drag_steps` replaces the number of steps (e.g. after `DragEditor.warm_up`'s short drag).

        Every tensor the graph reads keeps its storage, so a captured CUDA graph replays the new drag
        from its first iteration: a repeated edit pays neither the eager warm-up iterations nor a capture.
        With `same_weights` (the UNet computes what it computed at the last start, as for an editor's
        repeated edit of an image) and the same `z_t` and `text_embeddings` tensors, unchanged, as the
        last start's, `F_0` and `x_prev_0` are the last start's: no UNet forward (an eager one: host-bound
        at batch 1 on a GPU); only the new handles' features are read from `F_0`.
        """
        _require_frozen(self.unet)
        device = self.latent.device
        if drag_steps is not None and drag_steps != self.config.drag_steps:
            self.config = replace(self.config, drag_steps=drag_steps)
            self.losses = torch.zeros(max(drag_steps, 1), device=device)  # written by the host's loop, not the graph
        same_start = same_weights and self._same_start(z_t, text_embeddings)
        with torch.no_grad():
            self.latent.copy_(z_t)
            self.text.copy_(text_embeddings)
            self.handles.copy_(handles)
            self.targets.copy_(targets)
            if mask is not None:
                self.mask.copy_(latent_mask(mask.to(device), z_t.shape))
            self.fixed.refresh()  # the text, and the weights of another image's adapter
            if not same_start:
                x_prev0, feat0 = self._anchors()
                self.feat0.copy_(feat0)
                if x_prev0 is not None:
                    self.x_prev0.copy_(x_prev0)
            self.handle_feats.copy_(kernels.point_features(self.feat0, self.handles, self.sup_res))
            for flag in (self.tracking, self.done, self.steps_run, self.loss, self.losses):
                flag.zero_()
        self._start = self._start_of(z_t, text_embeddings)
        self.optimizer_step.reset_optimizer()  # Adam as before its first step
        self.scaler.load_state_dict(self.scaler_start)  # in place, like the optimiser's state
        self.watch.reset()

    def step(self, index: int) -> bool:
        """Iteration `index` (forward, tracking, arrival test, loss, one Adam step, frozen once arrived).

        Returns True, without running it, once the host has seen every handle arrive.
        """
        if self.watch.arrived(index, self.done):
            return True
        if index < 2:
            self.tracking.fill_(index > 0)  # a device flag, so that one captured graph runs every iteration
        self.optimizer_step()
        self.losses[min(index, self.losses.numel() - 1)] = self.loss
        return False

    def _iteration(self) -> None:
        """One iteration on the loop's own tensors, in place: what a CUDA graph captures."""
        config = self.config
        with unet_autocast(self.unet, self.autocast, norms_in_half=self.half_norms), self.fixed.active():
            eps, feat = self._forward()
        tracked = kernels.track_points(feat.detach(), self.handle_feats, self.handles, config.r_p, size=self.sup_res)
        self.handles.copy_(torch.where(self.tracking & ~self.done, tracked, self.handles))
        self.steps_run.add_((~self.done).long())
        self.done.logical_or_(((self.targets - self.handles).norm(dim=-1) < config.reach_distance).all())
        loss = kernels.motion_supervision_loss(feat, self.handles, self.targets, config.r_m, size=self.sup_res)
        if self.mask is not None:
            x_prev = self._x_prev(self.latent, eps)
            loss = loss + config.lam * kernels.masked_l1(x_prev, self.x_prev0, self.mask)
        self.before.copy_(self.latent.detach())
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():
            self.latent.copy_(torch.where(self.done, self.before, self.latent))
            self.loss.copy_(torch.where(self.done, torch.zeros_like(loss), loss.detach()))

    def run(self, progress: Union[bool, Progress] = True) -> DragResult:
        """Iterate until every handle arrived or the step limit; the loop's tensors stay for a `restart`."""
        with sync_debug(self.latent.device):
            for index in as_progress(progress).steps("drag", self.config.drag_steps):
                if self.step(index):
                    break
        return self.result()

    def result(self) -> DragResult:
        steps = int(self.steps_run)  # the one host sync, after the loop
        return DragResult(self.latent.detach().clone(), self.handles.clone(), steps, self.losses[:steps].clone())


def _require_frozen(unet) -> None:
    if any(p.requires_grad for p in unet.parameters()):
        raise RuntimeError("the UNet has trainable weights; freeze them before the drag loop")


def drag(
    unet,
    z_t: torch.Tensor,
    timestep: int,
    text_embeddings: torch.Tensor,
    handles: torch.Tensor,
    targets: torch.Tensor,
    mask: Optional[torch.Tensor],
    schedule: DdimSchedule,
    config: DragConfig,
    sup_res: Tuple[int, int],
    check_every: int = 4,
    progress: Union[bool, Progress] = True,
    cuda_graph: bool = False,
) -> DragResult:
    """Optimise the latent so the content under each handle moves to its target.

    `cuda_graph=True` replays the iterations as one captured CUDA graph (CUDA only; ignored elsewhere).
    """
    loop = DragLoop(unet, z_t, timestep, text_embeddings, handles, targets, mask, schedule, config, sup_res, check_every,
                    cuda_graph)
    return loop.run(progress)
