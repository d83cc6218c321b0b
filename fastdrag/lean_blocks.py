"""The UNet's and VAE's blocks without operations that change no number (`lean_blocks`, on by default).

diffusers' blocks run a few tensor operations that, for SD 1.x, leave every value as it was:
- each attention layer divides its output by `rescale_output_factor` and each `ResnetBlock2D` its
  output by `output_scale_factor`, both 1.0: at SD 1.5 that is 54 activation-sized operations in a
  UNet forward (22 resnets, 32 attention layers) and as many in a drag iteration's backward (53 in a
  LoRA step's), and 14 in a VAE decode, up to the image's own size;
- in training mode (the LoRA step) a `ResnetBlock2D` with a shortcut convolution makes its input
  contiguous before it, for DDP's sake: with channels-last activations (the CUDA default) that copies
  the input to NCHW, which the convolution then copies back (14 resnets of SD 1.5 at batch 4);
- each `Transformer2DModel` with convolution projections (SD 1.x's) makes its tokens NCHW-contiguous
  before `proj_out`; with channels-last weights (the CUDA default) the convolution computes
  channels-last and copies them back, so the tokens, already channels-last when seen as an image,
  are copied twice: 32 activation-sized copies in every SD 1.5 UNet forward, in every stage;
- peft's LoRA `Linear` multiplies its branch by the adapter's scale, `lora_alpha / r`, which is 1 at
  DragDiffusion's settings (alpha = rank): 128 activation-sized multiplications in a LoRA step's
  forward at SD 1.5 and 128 in its backward;
- each `GEGLU` leaves its GELU's output to autograd and concatenates its two gradients in the
  backward (`fastdrag.lean_geglu` keeps the projection alone, computes the GELU again and writes both
  gradients into one buffer: 352 MiB less kept by an SD 1.5 LoRA step, 88 MiB less by a drag iteration).
`install_lean_blocks(model)` gives each plain `ResnetBlock2D` (the kind `fused_blocks` also takes) a
forward without them, each such transformer an output step that hands `proj_out` its tokens as they
lie where its weight is channels-last, each attention layer that runs diffusers' `AttnProcessor2_0` the
`LeanAttnProcessor`, which makes the same calls without the division, each peft LoRA `Linear` a
forward without the multiplication by a scale of 1 (adapters added later get it from
`fastdrag.lora.install_adapter`), each GEGLU the lean product; and `fastdrag.shared_casts`' autocast
casts made once (an fp32 input read by several linear layers, an fp32 NCHW input to a channels-last
convolution, the norms' weights). Results are bit for bit the stock ones (tests/test_lean_blocks.py,
tests/test_shared_casts.py, tests/test_lean_geglu.py), so it needs no GPU measurement to be on.
`bench/op_count.py` counts what it removes: on the meta device at SD 1.5 / 512 px a drag iteration 1,393 -> 1,269 operations, a LoRA step 2,585 -> 2,206, a denoising
step 691 -> 627, a VAE decode 139 -> 125 (the meta device's convolution makes no layout copy of its
own, so each transformer counts one of its two copies); on the CPU under CUDA-like autocast, a drag
iteration's copies (casts and layout copies) 1,186 -> 691, a LoRA step's 2,093 -> 747 (with its LoRA
weights cast in one pass, `fastdrag.lora_casts`, which the lean LoRA forward takes). The VAE's
one attention layer (a residual and a group norm inside it) keeps the stock processor. Its resnets
and attention layers are also where a drag's kept conditioning (`fastdrag.fixed_conditioning`)
reaches the forward.
"""
from __future__ import annotations

import types
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.modules import module as torch_module
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from peft.tuners.lora.layer import Linear as LoraLinear

from .lean_geglu import install_lean_geglu, lean_geglu_count, remove_lean_geglu
from .lora_casts import half_weights
from .patching import own_forward
from .shared_casts import (channels_last_conv, fp32_affine_count, install_fp32_affine, install_shared_casts,
                           remove_fp32_affine, remove_shared_casts, shared_cast_count)

OUTPUT_STEP = "_get_output_for_continuous_inputs"  # the transformer's method the lean one shadows
NormAct = Callable[[ResnetBlock2D, torch.nn.GroupNorm, torch.Tensor], torch.Tensor]


def _stock_norm_act(block: ResnetBlock2D, norm: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return block.nonlinearity(norm(x))


def resnet_forward(block: ResnetBlock2D, input_tensor: torch.Tensor, temb: Optional[torch.Tensor],
                   norm_act: NormAct = _stock_norm_act) -> torch.Tensor:
    """diffusers' `ResnetBlock2D.forward` for a block `plain_resnet` accepts, each GroupNorm and the SiLU
    after it computed by `norm_act`, without the shortcut's input copy or a division by 1."""
    hidden_states = block.conv1(norm_act(block, block.norm1, input_tensor))
    if block.time_emb_proj is not None:
        fixed = getattr(block, "fixed_time_projection", None)  # a drag's, kept by fastdrag.fixed_conditioning
        if fixed is not None:
            temb = fixed
        else:
            if not block.skip_time_act:
                temb = block.nonlinearity(temb)
            temb = block.time_emb_proj(temb)[:, :, None, None]
    if temb is not None and block.time_embedding_norm == "default":
        hidden_states = hidden_states + temb
    hidden_states = block.conv2(block.dropout(norm_act(block, block.norm2, hidden_states)))
    if block.conv_shortcut is not None:
        input_tensor = block.conv_shortcut(input_tensor)
    output = input_tensor + hidden_states
    return output if block.output_scale_factor == 1.0 else output / block.output_scale_factor


def _lean_resnet_forward(self: ResnetBlock2D, input_tensor: torch.Tensor, temb: Optional[torch.Tensor],
                         *args, **kwargs) -> torch.Tensor:
    return resnet_forward(self, input_tensor, temb)


def plain_resnet(block: ResnetBlock2D) -> bool:
    """Whether `resnet_forward` computes what `block`'s own forward does: GroupNorms, SiLU, no resampling
    inside the block, and the time embedding added before `norm2` ("default") or none at all (the
    VAE decoder's "group" blocks, which have no time-embedding projection and ignore `temb`)."""
    return (type(block.norm1) is torch.nn.GroupNorm and type(block.norm2) is torch.nn.GroupNorm
            and type(block.nonlinearity) is torch.nn.SiLU and block.upsample is None and block.downsample is None
            and (block.time_embedding_norm == "default"
                 or (block.time_embedding_norm == "group" and block.time_emb_proj is None)))


def _lean_transformer_output(self: Transformer2DModel, hidden_states: torch.Tensor, residual: torch.Tensor,
                             batch_size: int, height: int, width: int, inner_dim: int) -> torch.Tensor:
    """diffusers' `_get_output_for_continuous_inputs` for conv projections without the NCHW copy: the
    tokens (B, H*W, C), seen as an image, are channels-last already, which is what a channels-last
    `proj_out` computes on (it would copy an NCHW input back). The same data reach the same kernel. Any
    other case runs diffusers' own."""
    if self.use_linear_projection or not hidden_states.is_contiguous() or not channels_last_conv(self.proj_out):
        return type(self)._get_output_for_continuous_inputs(self, hidden_states=hidden_states, residual=residual,
                                                            batch_size=batch_size, height=height, width=width,
                                                            inner_dim=inner_dim)
    image = hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
    return self.proj_out(image) + residual


class LeanAttnProcessor:
    """diffusers' `AttnProcessor2_0` without its division by `rescale_output_factor` when that is 1.

    It makes the stock processor's calls in the same order (projections, the same SDPA call, output
    projection) for plain attention: token inputs (B, L, C), no mask, no spatial or group norm, no
    cross-attention norm, no query/key norm, no residual inside the layer (every attention layer of an
    SD 1.x UNet). Any other call goes to the stock processor.
    """

    def __init__(self):
        self.stock = AttnProcessor2_0()

    @staticmethod
    def takes(attn: Attention) -> bool:
        """Whether this layer is plain attention (its calls may still have a mask or 4-D inputs)."""
        return (attn.spatial_norm is None and attn.group_norm is None and not attn.norm_cross
                and attn.norm_q is None and attn.norm_k is None and not attn.residual_connection)

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                 *args, **kwargs) -> torch.Tensor:
        if hidden_states.ndim != 3 or attention_mask is not None or not self.takes(attn):
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.to_q(hidden_states)
        fixed = getattr(attn, "fixed_key_value", None)  # a drag's (text, key, value), kept by fastdrag.fixed_conditioning
        if fixed is not None and encoder_hidden_states is fixed[0]:
            key, value = fixed[1], fixed[2]
        else:
            key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(query), heads(key), heads(value), attn_mask=None, dropout_p=0.0,
                                             is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out if attn.rescale_output_factor == 1.0 else out / attn.rescale_output_factor


def _plain_adapter(layer: LoraLinear, args: tuple, kwargs: dict) -> Optional[str]:
    """The one active adapter of `layer` when it is a plain LoRA of scale 1 on an ordinary call, else None."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1 or active[0] in getattr(layer, "lora_variant", {}) or layer.scaling[active[0]] != 1.0:
        return None
    return active[0]


def _lean_lora_forward(self: LoraLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's LoRA `Linear.forward` for one plain adapter of scale 1, without its multiplication by 1:
    the base layer, the input cast peft makes (off under `disable_input_dtype_casting`), the branch, the
    sum in the base output's dtype. Within `fastdrag.lora_casts.half_adapter_weights` the branch's two
    matmuls take the half weights made there for all layers at once (`_branch`). Any other call runs
    peft's own forward."""
    adapter = _plain_adapter(self, args, kwargs)
    if adapter is None:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
    x = self._cast_input_dtype(x, lora_a.weight.dtype)
    x = self.lora_dropout[adapter](x)
    halves = half_weights(self, adapter)
    if halves is None or not (_only_pre_hooks(lora_a) and _only_pre_hooks(lora_b)):
        branch = lora_b(lora_a(x))
    else:
        branch = _branch(lora_b, halves[1], _branch(lora_a, halves[0], x))
    return (result + branch).to(result.dtype)


def _only_pre_hooks(layer: torch.nn.Module) -> bool:
    """Whether a call of `layer` runs nothing but its forward and its plain forward pre-hooks (no forward
    or backward hooks, no keyword pre-hooks, no global hooks), so that `_branch` can stand in for it."""
    return not (layer._forward_hooks or layer._backward_hooks or layer._backward_pre_hooks
                or layer._forward_pre_hooks_with_kwargs or torch_module._global_forward_pre_hooks
                or torch_module._global_forward_hooks or torch_module._global_backward_hooks
                or torch_module._global_backward_pre_hooks)


def _branch(layer: torch.nn.Linear, half_weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` (a bias-free LoRA matrix, its forward pre-hooks run as a call would run them) with
    `half_weight`, the cast autocast would make of its weight, in its place."""
    for hook in layer._forward_pre_hooks.values():
        changed = hook(layer, (x,))
        if changed is not None:
            x = changed[0] if isinstance(changed, tuple) else changed
    return F.linear(x, half_weight)


def lean_lora_layers(model: torch.nn.Module) -> list:
    """`(layer, adapter)` for each LoRA layer of `model` that runs the lean forward on one plain adapter:
    what `fastdrag.lora_casts.half_adapter_weights` takes."""
    layers = []
    for module in model.modules():
        if own_forward(module) is _lean_lora_forward:
            adapter = _plain_adapter(module, (), {})
            if adapter is not None and module.lora_A[adapter].bias is None and module.lora_B[adapter].bias is None:
                layers.append((module, adapter))
    return layers


def install_lean_lora(model: torch.nn.Module) -> int:
    """Give each peft LoRA `Linear` of `model` without a forward of its own the lean one, and its linear
    layers the shared casts; returns how many LoRA layers run lean."""
    for module in model.modules():
        if type(module) is LoraLinear and "forward" not in vars(module):
            module.forward = types.MethodType(_lean_lora_forward, module)
    install_shared_casts(model)
    return lean_counts(model)["lora"]


def runs_lean(model: torch.nn.Module) -> bool:
    """Whether `install_lean_blocks` gave `model` any lean block (so that adapters added later get theirs)."""
    counts = lean_counts(model)
    return counts["resnet"] + counts["attention"] > 0


def install_lean_blocks(model: torch.nn.Module) -> dict:
    """Give `model`'s plain resnets (those without a forward of their own, e.g. `fused_blocks`') the
    lean forward, its transformers the lean output step, its stock-processor attention layers the lean
    processor, its LoRA layers the lean forward, and the shared casts (`fastdrag.shared_casts`);
    returns `lean_counts`.
    Installing twice changes nothing more. CUDA graphs captured before keep replaying the stock kernels."""
    for module in model.modules():
        if isinstance(module, ResnetBlock2D) and plain_resnet(module) and "forward" not in vars(module):
            module.forward = types.MethodType(_lean_resnet_forward, module)
        elif isinstance(module, Attention) and type(module.processor) is AttnProcessor2_0 and LeanAttnProcessor.takes(module):
            module.set_processor(LeanAttnProcessor())
        elif isinstance(module, Transformer2DModel) and getattr(module, "is_input_continuous", False) \
                and OUTPUT_STEP not in vars(module):
            setattr(module, OUTPUT_STEP, types.MethodType(_lean_transformer_output, module))
    install_fp32_affine(model)
    install_lean_geglu(model)
    install_lean_lora(model)
    return lean_counts(model)


def remove_lean_blocks(model: torch.nn.Module) -> int:
    """Give the modules `install_lean_blocks` changed their stock forward or processor back, and take the
    shared casts off; returns how many modules it changed."""
    count = remove_shared_casts(model) + remove_fp32_affine(model) + remove_lean_geglu(model)
    for module in model.modules():
        if own_forward(module) in (_lean_resnet_forward, _lean_lora_forward):
            del module.forward
            count += 1
        elif _lean_output(module):
            delattr(module, OUTPUT_STEP)
            count += 1
        elif isinstance(module, Attention) and isinstance(module.processor, LeanAttnProcessor):
            module.set_processor(AttnProcessor2_0())
            count += 1
    return count


def _lean_output(module: torch.nn.Module) -> bool:
    return own_forward(module, OUTPUT_STEP) is _lean_transformer_output


def lean_counts(model: torch.nn.Module) -> dict:
    """How many of `model`'s resnets, transformers' output steps, attention layers, LoRA layers and GEGLUs
    run lean, how many linear and convolution layers have `fastdrag.shared_casts`' pre-hooks and how many
    norms keep fp32 weights: {"resnet", "transformer", "attention", "lora", "geglu", "cast", "norm"}."""
    modules = list(model.modules())
    forwards = [own_forward(m) for m in modules]
    return {"resnet": forwards.count(_lean_resnet_forward),
            "transformer": sum(_lean_output(m) for m in modules),
            "attention": sum(isinstance(m, Attention) and isinstance(m.processor, LeanAttnProcessor) for m in modules),
            "lora": forwards.count(_lean_lora_forward),
            "geglu": lean_geglu_count(model),
            "cast": shared_cast_count(model),
            "norm": fp32_affine_count(model)}
