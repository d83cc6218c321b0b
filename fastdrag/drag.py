"""Stage 3: the drag loop — motion supervision and point tracking on the inverted latent.

Everything in the loop stays on the device: handle positions, the reached-target test and the
early stop. Once every handle is within `reach_distance` of its target a device flag freezes
the latent (so later iterations change nothing); the host learns of the flag through a
non-blocking copy and an event it polls, so the loop never waits for the GPU. On the CPU the
flag is simply read each step.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import kernels
from .config import DragConfig
from .ddim import DdimSchedule, ddim_step
from .features import unet_with_features


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
    progress: bool = True,
) -> DragResult:
    """Optimise the latent so the content under each handle moves to its target.

    Only the latent is a leaf: the UNet's weights must be frozen (`requires_grad_(False)`).
    """
    if any(p.requires_grad for p in unet.parameters()):
        raise RuntimeError("the UNet has trainable weights; freeze them before the drag loop")
    device = z_t.device
    dtype = unet.dtype
    autocast = config.mixed_precision and device.type == "cuda" and dtype != torch.float32
    text = text_embeddings.to(dtype)
    t = torch.full((), timestep, device=device, dtype=torch.long)
    handles = handles.to(device=device, dtype=torch.float32)
    targets = targets.to(device=device, dtype=torch.float32)
    mask = latent_mask(mask.to(device) if mask is not None else None, z_t.shape)

    with torch.no_grad():
        eps0, feat0 = unet_with_features(unet, z_t.to(dtype), t, text, config.feature_block)
        x_prev0 = ddim_step(schedule, z_t.float(), eps0.float(), timestep)
        handle_feats = kernels.point_features(feat0, handles, sup_res)

    latent = z_t.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([latent], lr=config.drag_lr, fused=True if device.type == "cuda" else None)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast and dtype == torch.float16)
    done = torch.zeros((), dtype=torch.bool, device=device)
    steps_run = torch.zeros((), dtype=torch.long, device=device)
    losses = torch.zeros(config.drag_steps, device=device)
    watch = ArrivalWatch(device, check_every)
    with sync_debug(device):
        for step in tqdm(range(config.drag_steps), desc="drag", disable=not progress, leave=False):
            with torch.autocast(device.type, dtype=dtype, enabled=autocast):
                eps, feat = unet_with_features(unet, latent.to(dtype), t, text, config.feature_block)
            if step > 0:
                tracked = kernels.track_points(feat.detach(), handle_feats, handles, config.r_p, size=sup_res)
                handles = torch.where(done, handles, tracked)
            steps_run += (~done).long()
            done = done | ((targets - handles).norm(dim=-1) < config.reach_distance).all()
            if watch.arrived(step, done):
                break
            loss = kernels.motion_supervision_loss(feat, handles, targets, config.r_m, size=sup_res)
            if mask is not None:
                x_prev = ddim_step(schedule, latent, eps.float(), timestep)
                loss = loss + config.lam * kernels.masked_l1(x_prev, x_prev0, mask)
            before = latent.detach().clone()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                latent.copy_(torch.where(done, before, latent))
                losses[step] = torch.where(done, torch.zeros_like(loss), loss.detach())
    steps = int(steps_run)
    return DragResult(latent.detach(), handles, steps, losses[:steps])
