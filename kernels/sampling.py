"""Triton helpers: read the bilinearly resized feature map without materialising it.

`resized_at` returns the value `F.interpolate(feat, size=(H, W), mode="bilinear",
align_corners=False)` has at integer positions, computed from the native `(C, h, w)` map with
PyTorch's arithmetic; `sample_at` bilinearly samples that resized map at fractional positions
(border padding), and the `scatter_*` twins push a gradient back into the native map.
All position arguments broadcast against the channel offsets, so the same helpers serve one
position and a channel vector, or a tile of positions by channels.
"""
from typing import Optional, Tuple

import triton
import triton.language as tl


def geometry(feat, size: Optional[Tuple[int, int]]):
    """(h, w, H, W, scale_h, scale_w): native size, read size, and F.interpolate's source scales."""
    _, _, h, w = feat.shape
    H, W = (h, w) if size is None else (int(size[0]), int(size[1]))
    return h, w, H, W, h / H, w / W


@triton.jit
def source_index(dst, scale, size):
    """(i0, i1, lambda) of F.interpolate's bilinear source for destination index `dst`."""
    src = (dst.to(tl.float32) + 0.5) * scale - 0.5
    src = tl.maximum(src, 0.0)
    i0 = src.to(tl.int32)
    lam = src - i0.to(tl.float32)
    i1 = tl.minimum(i0 + 1, size - 1)
    return i0, i1, lam


@triton.jit
def resized_at(feat_ptr, c_off, mask, y, x, h, w, scale_h, scale_w, stride_c):
    """Resized-map value at integer (y, x), in fp32."""
    y0, y1, ly = source_index(y, scale_h, h)
    x0, x1, lx = source_index(x, scale_w, w)
    base = feat_ptr + c_off * stride_c
    v00 = tl.load(base + y0 * w + x0, mask=mask, other=0.0).to(tl.float32)
    v01 = tl.load(base + y0 * w + x1, mask=mask, other=0.0).to(tl.float32)
    v10 = tl.load(base + y1 * w + x0, mask=mask, other=0.0).to(tl.float32)
    v11 = tl.load(base + y1 * w + x1, mask=mask, other=0.0).to(tl.float32)
    return (1.0 - ly) * ((1.0 - lx) * v00 + lx * v01) + ly * ((1.0 - lx) * v10 + lx * v11)


@triton.jit
def scatter_resized(grad_ptr, c_off, mask, y, x, g, h, w, scale_h, scale_w, stride_c):
    """Add gradient `g` of the resized value at integer (y, x) into the native map's gradient."""
    y0, y1, ly = source_index(y, scale_h, h)
    x0, x1, lx = source_index(x, scale_w, w)
    base = grad_ptr + c_off * stride_c
    tl.atomic_add(base + y0 * w + x0, g * (1.0 - ly) * (1.0 - lx), mask=mask)
    tl.atomic_add(base + y0 * w + x1, g * (1.0 - ly) * lx, mask=mask)
    tl.atomic_add(base + y1 * w + x0, g * ly * (1.0 - lx), mask=mask)
    tl.atomic_add(base + y1 * w + x1, g * ly * lx, mask=mask)


@triton.jit
def _corners(r, c, H, W):
    r = tl.minimum(tl.maximum(r, 0.0), H - 1.0)
    c = tl.minimum(tl.maximum(c, 0.0), W - 1.0)
    r0f = tl.floor(r)
    c0f = tl.floor(c)
    r0 = r0f.to(tl.int32)
    c0 = c0f.to(tl.int32)
    return r0, tl.minimum(r0 + 1, H - 1), r - r0f, c0, tl.minimum(c0 + 1, W - 1), c - c0f


@triton.jit
def sample_at(feat_ptr, c_off, mask, r, c, H, W, h, w, scale_h, scale_w, stride_c):
    """Bilinear sample of the resized (H, W) map at fractional (r, c), border padding, in fp32."""
    r0, r1, wr, c0, c1, wc = _corners(r, c, H, W)
    top = resized_at(feat_ptr, c_off, mask, r0, c0, h, w, scale_h, scale_w, stride_c) * (1.0 - wc) \
        + resized_at(feat_ptr, c_off, mask, r0, c1, h, w, scale_h, scale_w, stride_c) * wc
    bottom = resized_at(feat_ptr, c_off, mask, r1, c0, h, w, scale_h, scale_w, stride_c) * (1.0 - wc) \
        + resized_at(feat_ptr, c_off, mask, r1, c1, h, w, scale_h, scale_w, stride_c) * wc
    return top * (1.0 - wr) + bottom * wr


@triton.jit
def scatter_sample(grad_ptr, c_off, mask, r, c, g, H, W, h, w, scale_h, scale_w, stride_c):
    """Add gradient `g` of `sample_at(r, c)` into the native map's gradient."""
    r0, r1, wr, c0, c1, wc = _corners(r, c, H, W)
    scatter_resized(grad_ptr, c_off, mask, r0, c0, g * (1.0 - wr) * (1.0 - wc), h, w, scale_h, scale_w, stride_c)
    scatter_resized(grad_ptr, c_off, mask, r0, c1, g * (1.0 - wr) * wc, h, w, scale_h, scale_w, stride_c)
    scatter_resized(grad_ptr, c_off, mask, r1, c0, g * wr * (1.0 - wc), h, w, scale_h, scale_w, stride_c)
    scatter_resized(grad_ptr, c_off, mask, r1, c1, g * wr * wc, h, w, scale_h, scale_w, stride_c)
