"""Fold the image's LoRA adapter into the UNet weights, giving a stock UNet for export."""
from __future__ import annotations

import copy

import torch
from peft.tuners.lora import LoraLayer

from ..frozen_conv import remove_frozen_conv
from ..fused_blocks import remove_fused_blocks
from ..lean_blocks import remove_lean_blocks
from ..regional_compile import without_compiled_blocks


def merged_unet(unet: torch.nn.Module) -> torch.nn.Module:
    """A copy of `unet` with every LoRA adapter merged into its base layer and the wrappers removed.

    The original keeps its adapter (the editor goes on using it). The copy has the module names
    of the stock model (`...attn1.to_q.weight`), so exported weights are found by those names.
    """
    merged = without_compiled_blocks(copy.deepcopy(unet))  # traced for export: plain modules,
    remove_fused_blocks(merged)  # with the stock operators (an exporter need not trace through Triton)
    remove_frozen_conv(merged)  # nor through an autograd function
    remove_lean_blocks(merged)  # nor through the lean blocks' (the drag graph traces their backward)
    wrapped = [(name, module) for name, module in merged.named_modules() if isinstance(module, LoraLayer)]
    for name, module in wrapped:
        if module.active_adapters:
            module.merge(adapter_names=list(module.active_adapters))
        parent_name, _, child = name.rpartition(".")
        parent = merged.get_submodule(parent_name) if parent_name else merged
        setattr(parent, child, module.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded", "_fastdrag_lora_config"):
        if hasattr(merged, attr):
            try:
                delattr(merged, attr)
            except AttributeError:
                pass
    merged.requires_grad_(False)
    return merged.eval()
