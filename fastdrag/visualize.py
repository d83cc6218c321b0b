"""Pictures for people: the input with mask and drag arrows beside the edited output."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

HANDLE = (230, 40, 40)
TARGET = (40, 90, 230)


def _scale_points(points: Sequence[Tuple[float, float]], factor: float):
    return [(x * factor, y * factor) for x, y in points]


def _arrow(draw: ImageDraw.ImageDraw, start, end, color, width: int) -> None:
    draw.line([start, end], fill=color, width=width)
    angle = math.atan2(end[1] - start[1], end[0] - start[0])
    size = 4 * width
    left = (end[0] - size * math.cos(angle - 0.5), end[1] - size * math.sin(angle - 0.5))
    right = (end[0] - size * math.cos(angle + 0.5), end[1] - size * math.sin(angle + 0.5))
    draw.polygon([end, left, right], fill=color)


def _dot(draw: ImageDraw.ImageDraw, center, color, radius: int) -> None:
    x, y = center
    draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color, outline=(255, 255, 255))


def side_by_side(
    image: Image.Image,
    edited: Image.Image,
    handles: Sequence[Tuple[float, float]],
    targets: Sequence[Tuple[float, float]],
    final_handles: Sequence[Tuple[float, float]],
    mask: Optional[np.ndarray] = None,
    min_size: int = 256,
) -> Image.Image:
    """Input (mask tinted, handle->target arrows) | output (final handles and targets), upscaled to `min_size`."""
    factor = max(1, int(math.ceil(min_size / min(image.size))))
    size = (image.width * factor, image.height * factor)
    left = image.convert("RGB").resize(size, Image.NEAREST)
    if mask is not None:
        tint = Image.new("RGB", size, (255, 255, 255))
        alpha = Image.fromarray((np.asarray(mask, dtype=np.float64) > 0.5).astype(np.uint8) * 90).resize(size, Image.NEAREST)
        left = Image.composite(tint, left, alpha)
    right = edited.convert("RGB").resize(size, Image.NEAREST)
    width = max(1, factor // 2)
    draw = ImageDraw.Draw(left)
    for start, end in zip(_scale_points(handles, factor), _scale_points(targets, factor), strict=True):
        _arrow(draw, start, end, HANDLE, width)
        _dot(draw, start, HANDLE, 2 * width)
    draw = ImageDraw.Draw(right)
    for point in _scale_points(targets, factor):
        _dot(draw, point, TARGET, 2 * width)
    for point in _scale_points(final_handles, factor):
        _dot(draw, point, HANDLE, 2 * width)
    canvas = Image.new("RGB", (2 * size[0] + 8, size[1]), (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (size[0] + 8, 0))
    return canvas
