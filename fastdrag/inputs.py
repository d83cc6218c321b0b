"""Validate an edit's image, points and mask and bring them to the working size.

Resize policy: the working size is the image size rounded to the nearest multiple of 64 (at
least 64), or the `size` the caller gives; points and mask are scaled with the image, and the
edited image is resized back to the input's size.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

logger = logging.getLogger(__name__)

ImageLike = Union[str, Path, Image.Image, np.ndarray]
Point = Tuple[float, float]
Points = Union[Sequence[Tuple[Point, Point]], np.ndarray]  # pairs, or an (N, 2, 2) array of them


@dataclass
class EditInputs:
    """An edit's inputs at working size; points in supervision `(row, col)` coordinates."""

    image: Image.Image              # RGB at the working size
    original_size: Tuple[int, int]  # (width, height) of the input
    handles: torch.Tensor           # (N, 2) float
    targets: torch.Tensor           # (N, 2) float
    mask: Optional[torch.Tensor]    # (1, 1, H, W) float at working size, 1 = editable; None = no mask term
    sup_res: Tuple[int, int]        # (h, w) of the supervision map

    @property
    def working_size(self) -> Tuple[int, int]:
        return self.image.size


def _upright(picture: Image.Image) -> Image.Image:
    """The picture as a viewer shows it: its EXIF orientation applied (a phone photo stores its pixels
    sideways and says so there), so that points picked on the displayed image land where they were
    picked. The edit is written upright, without the tag."""
    try:
        return ImageOps.exif_transpose(picture)
    except (OSError, ValueError, SyntaxError) as exc:  # a damaged EXIF block: take the pixels as stored
        logger.warning("ignoring the image's unreadable EXIF orientation: %s", exc)
        return picture


def _eight_bit(picture: Image.Image) -> Image.Image:
    """16- and 32-bit integer pictures scaled to 8 bits (PIL's own conversion saturates them), and float
    ones in [0, 1] (a float TIFF) scaled by 255 (PIL's would make them black)."""
    def scaled(array: np.ndarray, top: float) -> Image.Image:
        return Image.fromarray(np.round(np.clip(array, 0, top) * (255.0 / top)).astype(np.uint8))

    if picture.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(picture, dtype=np.float64)
        return scaled(array, 65535.0 if picture.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0)
    if picture.mode == "F":
        array = np.nan_to_num(np.asarray(picture, dtype=np.float64))
        return scaled(array, 1.0 if array.max(initial=0) <= 1.0 else 255.0)
    return picture


def _as_shown(picture: Image.Image) -> Image.Image:
    """Upright and in 8 bits: the picture a viewer shows, which points and masks refer to."""
    return _eight_bit(_upright(picture))


def _to_rgb(picture: Image.Image, what: str) -> Image.Image:
    picture = _as_shown(picture)
    if picture.mode in ("RGBA", "LA", "PA") or (picture.mode == "P" and "transparency" in picture.info):
        logger.warning("%s has transparency; it is dropped (the colours under it are edited as they are)", what)
    return picture.convert("RGB")


def _array_to_uint8(array: np.ndarray, what: str) -> np.ndarray:
    """An image array's values as 0-255 uint8: uint8 as given, other integers if in 0-255, floats if
    in [0, 1]; anything else is refused rather than wrapped or truncated."""
    if array.size == 0:
        raise InputError(f"{what} array is empty (shape {array.shape})")
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise InputError(f"{what} array of {array.dtype} has values outside 0-255 "
                             f"({array.min()} to {array.max()}); give uint8 pixels")
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InputError(f"{what} array has NaN or infinite values")
        if array.min() < 0 or array.max() > 1:
            raise InputError(f"{what} array of {array.dtype} has values outside [0, 1] "
                             f"({array.min():g} to {array.max():g}); give floats in [0, 1] or uint8 pixels")
        return np.round(array * 255.0).astype(np.uint8)
    raise InputError(f"{what} array must hold uint8 pixels (or floats in [0, 1]); got {array.dtype}")


def load_image(image: ImageLike, what: str = "image") -> Image.Image:
    """An upright RGB PIL image from a path, a PIL image, or an array (uint8, or floats in [0, 1]):
    HxWx3, or as a PIL image of that mode would be, HxW or HxWx1 (grey) and HxWx4 (transparency dropped)."""
    if isinstance(image, Image.Image):
        return _to_rgb(image, what)
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[..., 0]
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
            raise InputError(f"{what} array must be HxWx3 (or HxW grey, HxWx4 with transparency); "
                             f"got shape {image.shape}")
        pixels = _array_to_uint8(image, what)
        if pixels.ndim == 2:
            return Image.fromarray(pixels).convert("RGB")  # mode L
        if pixels.shape[2] == 4:
            return _to_rgb(Image.fromarray(pixels), what)  # mode RGBA
        return Image.fromarray(pixels)
    if not isinstance(image, (str, os.PathLike)):
        raise InputError(f"{what} must be a file path, a PIL image or an HxWx3 array; got {type(image).__name__}")
    path = Path(image)
    if not path.is_file():
        raise InputError(f"{what} file {path} does not exist")
    try:
        with Image.open(path) as opened:
            return _to_rgb(opened, f"{what} file {path}")
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{what} file {path} is not a readable image: {exc}") from exc


def working_size(size: Tuple[int, int], requested: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
    """(width, height) the model works at: `requested`, or each side rounded to a multiple of 64."""
    if requested is not None:
        return int(requested[0]), int(requested[1])
    return tuple(max(64, 64 * int(round(side / 64))) for side in size)  # type: ignore[return-value]


def size_advice(size: Tuple[int, int], native: int) -> Optional[str]:
    """What to tell a user whose working size is far above the model's native size (more than four
    times its pixels: an SD 1.x model above 1024x1024): it is slow, takes memory with the area and is
    off the model's training distribution; the size at the model's own scale is suggested. None otherwise."""
    width, height = size
    if width * height <= 4 * native * native:
        return None
    scale = native / max(width, height)
    suggested = working_size((width * scale, height * scale))
    ratio = width * height / native ** 2
    return (f"working at {width}x{height}, {ratio:.{0 if ratio >= 10 else 1}f}x the pixels of the {native}x{native} "
            f"this model was trained at: slow, memory-hungry and off its training distribution; "
            f"size=({suggested[0]}, {suggested[1]}) (--size {suggested[0]}x{suggested[1]}) edits at its scale")


def points_from_json(data: Any, where: str) -> List[Any]:
    """Point pairs from parsed JSON, `[[[hx, hy], [tx, ty]], ...]` or `{"handles": [...], "targets": [...]}`
    (a points file's or a served request's); `where` names the source in errors. The numbers are checked
    against the image by `parse_points`."""
    if isinstance(data, dict):
        handles, targets = data.get("handles"), data.get("targets")
        if not isinstance(handles, list) or not isinstance(targets, list):
            raise InputError(f"{where} needs lists 'handles' and 'targets'")
        if len(handles) != len(targets):
            raise InputError(f"{where} has {len(handles)} handles but {len(targets)} targets: points must be paired")
        return list(zip(handles, targets, strict=True))
    if isinstance(data, list):
        for index, pair in enumerate(data):
            if not isinstance(pair, list) or len(pair) != 2:
                raise InputError(f"{where}: entry {index} is not a [handle, target] pair")
        return data
    raise InputError(f"{where} must hold a list of pairs or handles/targets lists")


def parse_points(points: Points, size: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """Handles and targets as (N, 2) arrays of image `(x, y)`, validated against the image size."""
    width, height = size
    if points is None or len(points) == 0:
        raise InputError("no drag points given: pass at least one (handle, target) pair")
    handles, targets = [], []
    for index, pair in enumerate(points):
        try:
            handle, target = pair
            if len(handle) != 2 or len(target) != 2:
                raise ValueError("a point is (x, y)")
            handle = (float(handle[0]), float(handle[1]))
            target = (float(target[0]), float(target[1]))
        except (TypeError, ValueError, IndexError) as exc:
            raise InputError(f"drag pair {index} is not a (handle, target) pair of (x, y) points: {pair!r}") from exc
        for name, (x, y) in (("handle", handle), ("target", target)):
            if not (math.isfinite(x) and math.isfinite(y)):
                raise InputError(f"{name} of drag pair {index} is not finite: ({x}, {y})")
            if not (0 <= x <= width - 1 and 0 <= y <= height - 1):
                raise InputError(f"{name} ({x:g}, {y:g}) of drag pair {index} is outside the {width}x{height} image")
        if handle == target:
            raise InputError(f"drag pair {index} has its handle equal to its target ({handle[0]:g}, {handle[1]:g})")
        handles.append(handle)
        targets.append(target)
    return np.array(handles, dtype=np.float64), np.array(targets, dtype=np.float64)


def load_mask(mask: Optional[ImageLike], size: Tuple[int, int]) -> Optional[np.ndarray]:
    """The editable-region mask as an HxW float array of 0/1, or None when there is none or it is empty."""
    if mask is None:
        return None
    if isinstance(mask, (str, Path)):
        path = Path(mask)
        if not path.is_file():
            raise InputError(f"mask file {path} does not exist")
        try:
            with Image.open(path) as opened:
                array = np.asarray(_as_shown(opened).convert("L"), dtype=np.float64) / 255.0
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"mask file {path} is not a readable image: {exc}") from exc
    elif isinstance(mask, Image.Image):
        array = np.asarray(_as_shown(mask).convert("L"), dtype=np.float64) / 255.0
    else:
        try:
            array = np.asarray(mask, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InputError(f"mask must be a file path, a PIL image or an HxW array of numbers; "
                             f"got {type(mask).__name__}") from exc
        if not np.isfinite(array).all():
            raise InputError("mask array has NaN or infinite values")
        if array.ndim == 3 and array.shape[2] in (1, 3, 4):
            array = array[..., 0]
        if array.max(initial=0) > 1:
            array = array / 255.0
    if array.ndim != 2 or (array.shape[1], array.shape[0]) != tuple(size):
        shape = f"{array.shape[1]}x{array.shape[0]}" if array.ndim == 2 else str(array.shape)
        raise InputError(f"mask size {shape} differs from the image size {size[0]}x{size[1]}")
    binary = (array > 0.5).astype(np.float64)
    if not binary.any():
        logger.info("the mask is empty: no mask term (the whole image may change)")
        return None
    return binary


def _warn_points_outside(mask: np.ndarray, handles_xy: np.ndarray, targets_xy: np.ndarray) -> None:
    """Warn about points outside the editable region: the mask term holds that region as it was, so
    content can neither leave a handle there nor arrive at a target there."""
    for index, (handle, target) in enumerate(zip(handles_xy, targets_xy, strict=True)):
        for name, (x, y) in (("handle", handle), ("target", target)):
            if mask[int(round(y)), int(round(x))] == 0:
                logger.warning("%s (%g, %g) of drag pair %d is outside the editable mask, which the edit keeps "
                               "as it was: widen the mask to cover it", name, x, y, index)


def prepare_inputs(
    image: ImageLike,
    points: Optional[Points],
    mask: Optional[ImageLike] = None,
    size: Optional[Tuple[int, int]] = None,
    sup_res: Optional[Tuple[int, int]] = None,
) -> EditInputs:
    """Validate everything an edit takes and convert it to the working size and supervision coordinates.

    `points` None: no points yet (an image prepared ahead of its edit, `DragEditor.preload`): no handles
    or targets, shape (0, 2)."""
    picture = load_image(image)
    original = picture.size
    if points is None:
        handles_xy = targets_xy = np.zeros((0, 2))
    else:
        handles_xy, targets_xy = parse_points(points, original)
    mask_array = load_mask(mask, original)
    if mask_array is not None:
        _warn_points_outside(mask_array, handles_xy, targets_xy)
    work_w, work_h = working_size(original, size)
    if work_w % 8 or work_h % 8:
        raise InputError(f"working size {work_w}x{work_h} is not a multiple of 8")
    if (work_w, work_h) != original:
        logger.info("working at %dx%d (input %dx%d); points and mask are scaled", work_w, work_h, *original)
        picture = picture.resize((work_w, work_h), Image.BICUBIC)
    sup_h, sup_w = sup_res if sup_res is not None else (work_h // 2, work_w // 2)

    def to_sup(points_xy: np.ndarray) -> torch.Tensor:
        rows = np.clip(np.round(points_xy[:, 1] * sup_h / original[1]), 0, sup_h - 1)
        cols = np.clip(np.round(points_xy[:, 0] * sup_w / original[0]), 0, sup_w - 1)
        return torch.tensor(np.stack([rows, cols], axis=1), dtype=torch.float32)

    mask_tensor = None
    if mask_array is not None:
        resized = Image.fromarray((mask_array * 255).astype(np.uint8)).resize((work_w, work_h), Image.NEAREST)
        mask_tensor = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0)[None, None]
    return EditInputs(picture, original, to_sup(handles_xy), to_sup(targets_xy), mask_tensor, (sup_h, sup_w))


def sup_to_image(points: torch.Tensor, sup_res: Tuple[int, int], size: Tuple[int, int]) -> List[Tuple[float, float]]:
    """Supervision `(row, col)` points back to image `(x, y)` pixels of an image of `size`."""
    scale_y, scale_x = size[1] / sup_res[0], size[0] / sup_res[1]
    return [(float(col) * scale_x, float(row) * scale_y) for row, col in points.tolist()]
