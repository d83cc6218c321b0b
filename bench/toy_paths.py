"""Where a toy edit's move is lost: the drag's features, its latent, and the UNet paths in between.

    python bench/toy_paths.py [--model toy] [--cases 24] [--world-size 128] [--lora-steps N] [--report quality.json]

Per benchmark case (published defaults unless overridden):
- *near* / *ring*: how different the up-block-2 features (at supervision resolution, what the drag
  loop sees) are 1-3 and 4-8 supervision pixels from the handle inside the dragged shape, as a
  fraction of their typical difference over the background (0 = indistinguishable from the handle);
- *moved* of the one-step x0 prediction of the optimised latent z*, with the noise estimate from
  the UNet on z* (`full`, where denoising starts), from the source latent (`latent`, the latent
  change read directly), and from the UNet on z* with its skip connections (`skips_src`) or its
  mid block's output (`mid_src`) swapped for the source's.
With `--report` (a `fastdrag toy eval` JSON of the same cases), correlations with the edits' *moved*
and *tracked*. Numbers from this script are in bench/RESULTS.md (seventh session).
"""
import argparse
import json
import sys
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F


def _pool(mask: np.ndarray) -> torch.Tensor:
    """An image-size boolean mask at half resolution (the default supervision size)."""
    return F.avg_pool2d(torch.from_numpy(mask.astype(np.float32))[None, None], 2)[0, 0]


def _grow(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Dilate (pixels > 0) or erode (pixels < 0) a boolean mask by |pixels| (square structuring element)."""
    k = 2 * abs(pixels) + 1
    if pixels > 0:
        return F.max_pool2d(mask.float()[None, None], k, 1, abs(pixels))[0, 0] > 0.5
    return F.max_pool2d((~mask).float()[None, None], k, 1, abs(pixels))[0, 0] < 0.5


def feature_distinctness(features: torch.Tensor, handle: Tuple[int, int], shape: torch.Tensor,
                         background: torch.Tensor) -> Tuple[float, float]:
    """(near, ring): median feature distance to the handle 1-3 and 4-8 px from it inside `shape`, over the
    median distance over `background`; features (C, H, W) at supervision resolution."""
    row, col = handle
    distance = (features - features[:, row:row + 1, col:col + 1]).abs().mean(0)
    rows, cols = torch.meshgrid(torch.arange(distance.shape[0]), torch.arange(distance.shape[1]), indexing="ij")
    radius = torch.hypot((rows - row).float(), (cols - col).float())
    scale = distance[background].median()
    near = shape & (radius >= 1) & (radius <= 3)
    ring = shape & (radius >= 4) & (radius <= 8)
    if near.sum() < 3 or ring.sum() < 3:
        return float("nan"), float("nan")
    return float(distance[near].median() / scale), float(distance[ring].median() / scale)


def unet_paths(unet, latent: torch.Tensor, timestep, text: torch.Tensor):
    """(eps, skip connections, mid block output) of one UNet forward."""
    skips: List[torch.Tensor] = []
    mid: List[torch.Tensor] = []
    hooks = [unet.conv_in.register_forward_hook(lambda module, args, out: skips.append(out))]
    hooks += [block.register_forward_hook(lambda module, args, out: skips.extend(out[1])) for block in unet.down_blocks]
    hooks.append(unet.mid_block.register_forward_hook(lambda module, args, out: mid.append(out)))
    try:
        eps = unet(latent, timestep, encoder_hidden_states=text).sample
    finally:
        for hook in hooks:
            hook.remove()
    return eps, skips, mid[0]


def swapped_eps(unet, latent, timestep, text, paths, source_paths, skips: bool, mid: bool) -> torch.Tensor:
    """The UNet's eps on `latent` with its skip connections and/or mid output replaced by the source's."""
    _, own_skips, own_mid = paths
    _, src_skips, src_mid = source_paths
    skip_delta = tuple((s - o) if skips else torch.zeros_like(o) for s, o in zip(src_skips, own_skips, strict=True))
    mid_delta = (src_mid - own_mid) if mid else torch.zeros_like(own_mid)
    return unet(latent, timestep, encoder_hidden_states=text, down_block_additional_residuals=skip_delta,
                mid_block_additional_residual=mid_delta).sample


def analyse_case(editor, case, **overrides) -> Dict[str, float]:
    """Both measures for one drag case (see the module docstring)."""
    from fastdrag.ddim import ddim_move
    from fastdrag.drag import drag
    from fastdrag.features import capture_up_block
    from fastdrag.toy.quality import score
    from fastdrag.vae import decode

    config = editor.config.replace(**overrides)
    parts = editor.components
    prepared = editor.prepare(case.scene.image, case.scene.prompt, case.points, case.mask, config)
    schedule = editor._schedule(config)
    latents = (prepared.posterior.mean * parts.scaling_factor).float()
    z_t = editor._invert(editor.denoiser, latents, prepared, schedule, config)
    inputs, t, text = prepared.inputs, schedule.drag_timestep, prepared.text_embeddings
    dragged = drag(parts.unet, z_t, t, text, inputs.handles, inputs.targets, inputs.mask, schedule, config.drag,
                   inputs.sup_res, progress=False).latent
    with torch.no_grad():
        with capture_up_block(parts.unet, config.drag.feature_block) as captured:  # the source's features, same forward
            source = unet_paths(parts.unet, z_t, t, text)
        edited = unet_paths(parts.unet, dragged, t, text)
        features = F.interpolate(captured[-1].float(), size=inputs.sup_res, mode="bilinear", align_corners=False)[0]
        shape = _grow(_pool(case.scene.shapes[case.shape_index].mask) > 0.5, -1)
        every_shape = _pool(np.any([s.mask for s in case.scene.shapes], axis=0)) > 0
        near, ring = feature_distinctness(features, tuple(int(v) for v in inputs.handles[0]), shape,
                                          ~_grow(every_shape, 2))

        def moved(eps: torch.Tensor) -> float:
            x0 = ddim_move(dragged, eps, schedule.alpha(t), 1.0)  # the one-step x0 prediction
            return score(case, np.asarray(decode(parts.vae, x0, parts.scaling_factor))).moved

        return {"near": near, "ring": ring, "full": moved(edited[0]), "latent": moved(source[0]),
                "skips_src": moved(swapped_eps(parts.unet, dragged, t, text, edited, source, skips=True, mid=False)),
                "mid_src": moved(swapped_eps(parts.unet, dragged, t, text, edited, source, skips=False, mid=True))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--case-seed", type=int, default=0)
    parser.add_argument("--world-size", type=int, default=128, help="render the cases at this size (as `toy eval`)")
    parser.add_argument("--lora-steps", type=int, default=None)
    parser.add_argument("--report", default=None, help="a `fastdrag toy eval` quality.json of the same cases")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    from fastdrag import DragEditor
    from fastdrag.toy.world import make_drag_case

    editor = DragEditor.from_pretrained(args.model, device=args.device, progress=False)
    overrides = {} if args.lora_steps is None else {"lora_steps": args.lora_steps}
    rng = np.random.default_rng(args.case_seed)
    rows = []
    for index in range(args.cases):
        rows.append(analyse_case(editor, make_drag_case(rng, args.world_size), **overrides))
        print(index, " ".join(f"{k} {v:.3f}" for k, v in rows[-1].items()), flush=True)
    table = {key: np.array([row[key] for row in rows]) for key in rows[0]}
    print("means:", " ".join(f"{k} {np.nanmean(v) if np.isfinite(v).any() else float('nan'):.3f}" for k, v in table.items()))
    difference = table["full"] - table["latent"]
    if len(difference) > 1:
        print(f"paired full - latent: {difference.mean():+.3f} ± {difference.std(ddof=1) / np.sqrt(len(difference)):.3f}")
    if args.report:
        cases = json.loads(open(args.report).read())["cases"][:args.cases]
        ok = ~np.isnan(table["ring"])
        for name, values in (("moved", [c["edit"]["moved"] for c in cases]), ("tracked", [c["tracked"] for c in cases])):
            r = np.corrcoef(table["ring"][ok], np.array(values)[ok])[0, 1]
            print(f"Pearson r(ring, edit {name}) = {r:.2f} over {ok.sum()} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
