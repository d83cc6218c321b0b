"""Procedural scenes: smooth two-colour gradient backgrounds with one to three flat shapes.

Every scene comes with each shape's mask, colour and centre, so an edit can be scored against
the truth; a drag case puts the handle at a shape's centre and the target 8-16 px away.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
from PIL import Image, ImageDraw

SIZE = 128
KINDS = ("circle", "square", "triangle")
PALETTE = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
    "purple": (140, 50, 180), "orange": (240, 130, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
BACKGROUNDS = {
    "sky": ((150, 190, 235), (235, 240, 250)), "sand": ((225, 200, 150), (180, 150, 110)),
    "grass": ((120, 180, 110), (190, 220, 150)), "dusk": ((90, 80, 140), (230, 150, 120)),
    "grey": ((110, 110, 110), (190, 190, 190)), "teal": ((60, 140, 140), (170, 215, 210)),
}


@dataclass
class Shape:
    kind: str
    colour_name: str
    colour: Tuple[int, int, int]
    centre: Tuple[float, float]   # (x, y) pixels
    size: float                   # across, pixels
    mask: np.ndarray              # HxW bool


@dataclass
class Scene:
    image: Image.Image
    background: np.ndarray        # HxWx3 uint8, the scene without shapes
    shapes: List[Shape]
    prompt: str


@dataclass
class DragCase:
    scene: Scene
    shape_index: int
    handle: Tuple[float, float]
    target: Tuple[float, float]
    mask: np.ndarray              # HxW float 0/1: editable region

    @property
    def points(self):
        return [(self.handle, self.target)]


def _gradient(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, str]:
    name = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    first, second = (np.array(c, dtype=np.float64) for c in BACKGROUNDS[name])
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    ramp = np.clip((xs * math.cos(angle) + ys * math.sin(angle)) / 1.42 + 0.5, 0, 1)[..., None]
    return (first * (1 - ramp) + second * ramp).round().astype(np.uint8), name


def _draw(kind: str, centre, size: float, canvas: Image.Image, colour) -> None:
    x, y = centre
    half = size / 2
    draw = ImageDraw.Draw(canvas)
    if kind == "circle":
        draw.ellipse([x - half, y - half, x + half, y + half], fill=colour)
    elif kind == "square":
        draw.rectangle([x - half, y - half, x + half, y + half], fill=colour)
    else:  # an upward triangle whose centroid is the centre
        height = size * math.sqrt(3) / 2
        draw.polygon([(x, y - 2 * height / 3), (x - half, y + height / 3), (x + half, y + height / 3)], fill=colour)


def shape_mask(kind: str, centre, size: float, image_size: int = SIZE) -> np.ndarray:
    canvas = Image.new("L", (image_size, image_size), 0)
    _draw(kind, centre, size, canvas, 255)
    return np.asarray(canvas) > 127


def make_scene(rng: np.random.Generator, size: int = SIZE, max_shapes: int = 3) -> Scene:
    """A gradient background with 1-`max_shapes` non-overlapping flat shapes of 20-50 px (at 128 px)."""
    background, bg_name = _gradient(rng, size)
    image = Image.fromarray(background)
    scale = size / 128
    shapes: List[Shape] = []
    occupied = np.zeros((size, size), dtype=bool)
    wanted = int(rng.integers(1, max_shapes + 1))
    for _ in range(60):
        if len(shapes) == wanted:
            break
        kind = KINDS[rng.integers(len(KINDS))]
        across = rng.uniform(20, 50) * scale
        margin = across / 2 + 2 * scale
        centre = (float(rng.uniform(margin, size - margin)), float(rng.uniform(margin, size - margin)))
        mask = shape_mask(kind, centre, across, size)
        if (mask & occupied).any():
            continue
        names = [n for n in PALETTE if n not in {s.colour_name for s in shapes}]
        colour_name = names[rng.integers(len(names))]
        _draw(kind, centre, across, image, PALETTE[colour_name])
        occupied |= _dilate(mask, int(4 * scale))
        shapes.append(Shape(kind, colour_name, PALETTE[colour_name], centre, across, mask))
    described = " and ".join(f"a {s.colour_name} {s.kind}" for s in shapes)
    return Scene(image, background, shapes, f"{described} on {bg_name}")


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    out = mask.copy()
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            out |= np.roll(np.roll(mask, dy, axis=0), dx, axis=1)
    return out


def interior(mask: np.ndarray, margin: int = 3) -> np.ndarray:
    """`mask` eroded by `margin` pixels: a shape's flat interior, away from its blurred edge."""
    inner = mask.copy()
    for _ in range(margin):
        inner = inner & np.roll(inner, 1, 0) & np.roll(inner, -1, 0) & np.roll(inner, 1, 1) & np.roll(inner, -1, 1)
    return inner


def make_drag_case(rng: np.random.Generator, size: int = SIZE) -> DragCase:
    """A scene and a drag of one of its shapes by 8-16 px (at 128 px) in any direction; the mask
    covers the shape at its start and end positions with a margin."""
    for _ in range(100):
        scene = make_scene(rng, size)
        index = int(rng.integers(len(scene.shapes)))
        shape = scene.shapes[index]
        distance = rng.uniform(8, 16) * size / 128
        angle = rng.uniform(0, 2 * math.pi)
        target = (shape.centre[0] + distance * math.cos(angle), shape.centre[1] + distance * math.sin(angle))
        half = shape.size / 2 + 2 * size / 128
        if not (half <= target[0] <= size - 1 - half and half <= target[1] <= size - 1 - half):
            continue
        moved = shape_mask(shape.kind, target, shape.size, size)
        mask = _dilate(shape.mask | moved, int(6 * size / 128)).astype(np.float64)
        return DragCase(scene, index, shape.centre, target, mask)
    raise RuntimeError("could not place a drag case")
