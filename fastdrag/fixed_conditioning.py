"""The parts of a UNet forward that a drag's iterations share, computed once per drag (`FixedConditioning`).

Every iteration of the drag loop runs the UNet at the same timestep on the same text, with frozen
weights. So the time embedding (the sinusoid and its MLP), each resnet's projection of it, and each
cross-attention layer's keys and values of the text come out the same every time: at SD 1.5, 91 of
a drag iteration's 1,269 tensor operations with the lean blocks (1,178 left; counted on the meta
device by `bench/op_count.py`), each a small kernel on a GPU. `FixedConditioning`
computes them once, with the same modules under the same autocast, into tensors that it keeps and
refreshes in place (`refresh`), so a CUDA graph captured with them reads the new values of a
restarted drag; inside `active()` the UNet's forward takes them instead of computing them:
- the UNet's `time_proj` and `time_embedding` return the kept values;
- a resnet with the lean forward (`fastdrag.lean_blocks`, also the fused one) takes its kept
  projection (`fixed_time_projection`);
- an attention layer with the lean processor takes its kept keys and values (`fixed_key_value`)
  when it is given the kept text itself.
The forward then computes what it computed before, bit for bit (tests/test_fixed_conditioning.py).
A UNet with a class, augmented or activated time embedding or an encoder projection is left as it
is (`applies`): nothing is kept for it. Without the lean blocks only the time embedding is kept.
"""
from __future__ import annotations

import contextlib
import types
from typing import Callable, ContextManager, Iterator, List, Tuple

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D


def applies(unet: torch.nn.Module) -> bool:
    """Whether the UNet's time embedding is the plain one (SD 1.x) and its text reaches attention as is."""
    return (getattr(unet, "class_embedding", None) is None and getattr(unet, "add_embedding", None) is None
            and getattr(unet, "time_embed_act", None) is None and getattr(unet, "encoder_hid_proj", None) is None
            and hasattr(unet, "get_time_embed") and hasattr(unet, "time_embedding"))


def _kept(self: torch.nn.Module, *args, **kwargs) -> torch.Tensor:
    return self.fixed_output


class FixedConditioning:
    """What a UNet forward computes from the timestep and text alone, for a run of forwards that share them."""

    def __init__(self, unet: torch.nn.Module, latent: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                 context: Callable[[], ContextManager] = contextlib.nullcontext):
        """`latent`, `timestep` and `text` are what the forwards will take (the latent for its batch, dtype
        and device only); `context` is the one they run in (autocast), entered to compute the kept values."""
        self.unet, self.latent, self.timestep, self.text, self.context = unet, latent, timestep, text, context
        self.enabled = applies(unet)
        modules = list(unet.modules())
        self.resnets: List[ResnetBlock2D] = [m for m in modules if isinstance(m, ResnetBlock2D)
                                             and m.time_emb_proj is not None]
        self.cross_attention: List[Attention] = [m for m in modules if isinstance(m, Attention) and m.is_cross_attention]
        self.values: List[torch.Tensor] = []
        self.refresh()
        self.assignments = self._assignments() if self.enabled else []  # the values' tensors stay: refreshed in place

    def _compute(self) -> List[torch.Tensor]:
        """[t_emb, emb, each resnet's projection, each cross-attention layer's key and value], as the forward has them."""
        unet = self.unet
        with torch.no_grad(), self.context():
            t_emb = unet.get_time_embed(sample=self.latent, timestep=self.timestep)
            emb = unet.time_embedding(t_emb, None)
            values = [t_emb, emb]
            for block in self.resnets:
                values.append(block.time_emb_proj(emb if block.skip_time_act else block.nonlinearity(emb))[:, :, None, None])
            for attn in self.cross_attention:
                values += [attn.to_k(self.text), attn.to_v(self.text)]
        return values

    def refresh(self) -> None:
        """Compute the kept values again (the text, the weights or the adapter changed), into the same tensors."""
        if not self.enabled:
            return
        values = self._compute()
        if not self.values:
            self.values = values
            return
        with torch.no_grad():
            for kept, value in zip(self.values, values, strict=True):
                kept.copy_(value)

    def _assignments(self) -> List[Tuple[torch.nn.Module, str, object]]:
        t_emb, emb, *rest = self.values
        projections, key_values = rest[:len(self.resnets)], rest[len(self.resnets):]
        unet = self.unet
        kept = [(unet.time_proj, "fixed_output", t_emb), (unet.time_embedding, "fixed_output", emb),
                (unet.time_proj, "forward", types.MethodType(_kept, unet.time_proj)),
                (unet.time_embedding, "forward", types.MethodType(_kept, unet.time_embedding))]
        kept += [(block, "fixed_time_projection", value) for block, value in zip(self.resnets, projections, strict=True)]
        kept += [(attn, "fixed_key_value", (self.text, key_values[2 * i], key_values[2 * i + 1]))
                 for i, attn in enumerate(self.cross_attention)]
        return kept

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Inside, the UNet's forwards take the kept values (for `timestep` and `text` only)."""
        assignments = self.assignments
        for module, name, _ in assignments:
            if name in vars(module):
                raise RuntimeError(f"{type(module).__name__} already has its own {name}")
        for module, name, value in assignments:
            setattr(module, name, value)
        try:
            yield
        finally:
            for module, name, _ in assignments:
                vars(module).pop(name, None)
