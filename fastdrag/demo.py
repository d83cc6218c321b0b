"""The demo: a synthetic picture, a drag on the built-in model, and a side-by-side picture of it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

from .atomic import check_image_output, save_image
from .visualize import side_by_side

if TYPE_CHECKING:
    from .editor import DragEditor, EditResult
    from .progress import StepCallback

DEMO_PROMPT = "a red ball on a blue and yellow background"


@dataclass
class DemoCase:
    image: Image.Image
    prompt: str
    points: List[Tuple[Tuple[float, float], Tuple[float, float]]]
    mask: np.ndarray


def demo_case(size: int = 64) -> DemoCase:
    """A gradient background with a red disc; drag the disc right and down, mask around its path."""
    ys, xs = np.mgrid[0:size, 0:size] / (size - 1)
    top, bottom = np.array([250, 220, 90]), np.array([60, 110, 200])
    background = (top * (1 - ys[..., None]) + bottom * ys[..., None]) * (0.85 + 0.15 * xs[..., None])
    image = Image.fromarray(background.astype(np.uint8))
    radius = size * 0.16
    cx, cy = size * 0.35, size * 0.4
    ImageDraw.Draw(image).ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=(210, 40, 40))
    target = (cx + size * 0.22, cy + size * 0.1)
    mask = np.zeros((size, size))
    margin = radius * 1.6
    mask[int(max(0, cy - margin)):int(min(size, target[1] + margin)), int(max(0, cx - margin)):int(min(size, target[0] + margin))] = 1
    return DemoCase(image, DEMO_PROMPT, [((cx, cy), target)], mask)


def toy_demo_case() -> DemoCase:
    """A toy-world scene with one shape and its drag (the cases the toy model was trained on)."""
    import numpy as np

    from .toy.world import make_drag_case

    case = make_drag_case(np.random.default_rng(7))
    return DemoCase(case.scene.image, case.scene.prompt, case.points, case.mask)


def demo_paths(output_dir: Path, overwrite: bool = False) -> Dict[str, Path]:
    """The demo's three pictures in `output_dir`, refused (`check_image_output`) before any work."""
    paths = {name: Path(output_dir) / f"{name}.png" for name in ("input", "edited", "side_by_side")}
    for path in paths.values():
        check_image_output(path, overwrite)
    return paths


def run_demo(output_dir: Path, model: str = "toy", overwrite: bool = False, progress: bool = True,
             on_step: Optional[StepCallback] = None, editor: Optional[DragEditor] = None,
             **overrides: Any) -> Tuple[Dict[str, Path], EditResult]:
    """Edit the demo case and write input, output and side-by-side pictures into `output_dir`;
    `on_step` as in `DragEditor.edit`. `editor` is the `DragEditor` of `model` to edit with (loaded
    with its device, dtype, cache and fast paths), else one loaded with the defaults; `model` picks the case."""
    from .editor import DragEditor

    paths = demo_paths(output_dir, overwrite)
    case = toy_demo_case() if model == "toy" else demo_case()
    if editor is None:
        editor = DragEditor.from_pretrained(model, progress=progress)
    result = editor.edit(case.image, case.prompt, case.points, mask=case.mask, on_step=on_step, **overrides)
    picture = side_by_side(case.image, result.image, [p[0] for p in case.points], [p[1] for p in case.points],
                           result.handles, case.mask)
    save_image(case.image, paths["input"], overwrite)
    save_image(result.image, paths["edited"], overwrite)
    save_image(picture, paths["side_by_side"], overwrite)
    return paths, result
