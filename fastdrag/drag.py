"""Stage 3: the drag loop — motion supervision and point tracking on the inverted latent.

Everything in the loop stays on the device: handle positions, the reached-target test and the
early stop. Once every handle is within `reach_distance` of its target a device flag freezes
the latent; the host reads the flag only every `check_every` steps to end the loop early.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

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
    steps: int              # iterations run (including the one that found every handle arrived)
    losses: torch.Tensor    # (steps,) loss of each iteration (0 once frozen)


def latent_mask(mask: Optional[torch.Tensor], latent_shape: Tuple[int, ...]) -> Optional[torch.Tensor]:
    """The editable mask at latent resolution (nearest), or None when there is no mask term."""
    if mask is None:
        return None
    return F.interpolate(mask.float(), size=tuple(latent_shape[-2:]), mode="nearest")


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
    check_every: Optional[int] = None,
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
    handles = handles.to(device=device, dtype=torch.float32)
    targets = targets.to(device=device, dtype=torch.float32)
    mask = latent_mask(mask, z_t.shape)
    if mask is not None:
        mask = mask.to(device)
    if check_every is None:
        check_every = 1 if device.type == "cpu" else 4

    with torch.no_grad():
        eps0, feat0 = unet_with_features(unet, z_t.to(dtype), timestep, text, config.feature_block)
        x_prev0 = ddim_step(schedule, z_t.float(), eps0.float(), timestep)
        handle_feats = kernels.point_features(feat0, handles, sup_res)

    latent = z_t.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([latent], lr=config.drag_lr, fused=True if device.type == "cuda" else None)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast and dtype == torch.float16)
    done = torch.zeros((), dtype=torch.bool, device=device)
    losses = torch.zeros(config.drag_steps, device=device)
    steps = 0
    for step in tqdm(range(config.drag_steps), desc="drag", disable=not progress, leave=False):
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            eps, feat = unet_with_features(unet, latent.to(dtype), timestep, text, config.feature_block)
        if step > 0:
            tracked = kernels.track_points(feat.detach(), handle_feats, handles, config.r_p, size=sup_res)
            handles = torch.where(done, handles, tracked)
        done = done | ((targets - handles).norm(dim=-1) < config.reach_distance).all()
        steps = step + 1
        if step % check_every == 0 and bool(done):
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
    return DragResult(latent.detach(), handles, steps, losses[:steps])
