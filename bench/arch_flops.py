"""What each built-in architecture costs, counted with torch's FLOP counter on the meta device (no memory,
no GPU): one UNet forward (batch 1), its forward and input-gradient backward (a drag iteration's
UNet), one LoRA step (batch 4, the adapter trained), the same with `lora_checkpointing` (its blocks
recomputed in the backward), the VAE's encode and decode, the text encoder.

    python bench/arch_flops.py [--model sd15-random --model sd21-random] [--json FILE]

Why: a throughput study of another architecture (SD 2.1 at 768 px) starts from how much more work it
is than SD 1.5 at 512 before anything is timed.
"""
import argparse
import json
from types import SimpleNamespace
from typing import Dict

import torch
from torch.utils.flop_counter import FlopCounterMode

from fastdrag.atomic import atomic_path
from fastdrag.config import LoraConfig
from fastdrag.lora import LoraTrainer
from fastdrag.models import SD_ARCHITECTURES, build_sd_random, build_tiny

MODELS = ("tiny", *SD_ARCHITECTURES)


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def costs(model: str) -> Dict[str, float]:
    """TFLOP of each piece of an edit for `model` at its own image size (its VAE's `sample_size`)."""
    components = build_sd_random(model, device="meta") if model in SD_ARCHITECTURES else build_tiny().to("meta", torch.float32)
    unet, vae, width = components.unet, components.vae, components.text_encoder.config.hidden_size
    for module in (unet, vae, components.text_encoder):
        module.requires_grad_(False)  # frozen, as loaded: no weight gradients in the backward
    image_side = vae.config.sample_size
    side = image_side // components.vae_scale
    latent = torch.randn(1, 4, side, side, device="meta")
    text = torch.randn(1, 77, width, device="meta")
    t = torch.full((1,), 500, device="meta")
    with torch.no_grad():
        forward = _count(lambda: unet(latent, t, encoder_hidden_states=text).sample)
        encode = _count(lambda: vae.encode(torch.randn(1, 3, image_side, image_side, device="meta")))
        decode = _count(lambda: vae.decode(latent))
        prompt = _count(lambda: components.text_encoder(torch.zeros(1, 77, dtype=torch.long, device="meta")))
    leaf = latent.clone().requires_grad_(True)
    backward = _count(lambda: unet(leaf, t, encoder_hidden_states=text).sample.sum().backward())
    posterior = SimpleNamespace(mean=torch.zeros_like(latent), std=torch.ones_like(latent))
    trainer = LoraTrainer(unet, components.scheduler, posterior, text, components.scaling_factor, LoraConfig(), seed=0)
    lora_step = _count(trainer.step)
    trainer.finish()
    trainer = LoraTrainer(unet, components.scheduler, posterior, text, components.scaling_factor, LoraConfig(), seed=0,
                          checkpointing=True)
    checkpointed_step = _count(trainer.step)
    trainer.finish()
    tera = 1e12
    return {"model": model, "image_side": image_side, "prediction_type": components.scheduler.config.prediction_type,
            "unet_forward": forward / tera, "unet_forward_input_backward": backward / tera,
            "lora_step": lora_step / tera, "lora_step_checkpointed": checkpointed_step / tera, "vae_encode": encode / tera, "vae_decode": decode / tera,
            "text_encoder": prompt / tera}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", choices=MODELS, default=None)
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()
    rows = [costs(model) for model in args.model or ["sd15-random", "sd21-random"]]
    columns = ["unet_forward", "unet_forward_input_backward", "lora_step", "lora_step_checkpointed", "vae_encode", "vae_decode", "text_encoder"]
    print(f"{'model':<12} {'px':>4} {'output':<13}" + "".join(f" {name:>14}" for name in columns) + "   (TFLOP)")
    for row in rows:
        print(f"{row['model']:<12} {row['image_side']:>4} {row['prediction_type']:<13}"
              + "".join(f" {row[name]:>14.4f}" for name in columns))
    if args.json:
        with atomic_path(args.json) as staged, open(staged, "w") as file:
            json.dump(rows, file, indent=2)


if __name__ == "__main__":
    main()
