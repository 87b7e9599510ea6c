"""The one box / IoU / mask-geometry utility of refjax.

Every box conversion, IoU, GIoU, mask IoU, tight box and letterbox map used by the data
pipeline, the losses and the metrics lives here. Functions accept numpy or jax arrays and
return the same kind (numpy in -> numpy out), so host-side data code and jitted model code
share one implementation. Boxes are ``(..., 4)`` arrays; conventions:

- ``xyxy``: (x1, y1, x2, y2), continuous coordinates (a pixel box [x, x+w) has x2 = x + w);
- ``cxcywh``: (cx, cy, w, h);
- ``xywh``: COCO (x, y, w, h).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

Array = Any


def _xp(x: Array):
    """numpy for numpy inputs (and Python scalars/lists), jax.numpy otherwise."""
    if isinstance(x, (np.ndarray, np.generic, list, tuple, float, int)):
        return np
    import jax.numpy as jnp

    return jnp


def cxcywh_to_xyxy(b: Array) -> Array:
    xp = _xp(b)
    b = xp.asarray(b)
    cx, cy, w, h = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    return xp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def xyxy_to_cxcywh(b: Array) -> Array:
    xp = _xp(b)
    b = xp.asarray(b)
    x1, y1, x2, y2 = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    return xp.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1)


def xywh_to_xyxy(b: Array) -> Array:
    xp = _xp(b)
    b = xp.asarray(b)
    return xp.concatenate([b[..., :2], b[..., :2] + b[..., 2:4]], axis=-1)


def xyxy_to_xywh(b: Array) -> Array:
    xp = _xp(b)
    b = xp.asarray(b)
    return xp.concatenate([b[..., :2], b[..., 2:4] - b[..., :2]], axis=-1)


def box_area(b: Array) -> Array:
    """Area of xyxy boxes (negative extents count as 0)."""
    xp = _xp(b)
    b = xp.asarray(b)
    return xp.clip(b[..., 2] - b[..., 0], 0, None) * xp.clip(b[..., 3] - b[..., 1], 0, None)


def _inter_union(a: Array, b: Array):
    xp = _xp(a)
    lt = xp.maximum(a[..., :2], b[..., :2])
    rb = xp.minimum(a[..., 2:], b[..., 2:])
    wh = xp.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a) + box_area(b) - inter
    return inter, union


def box_iou(a: Array, b: Array, eps: float = 1e-16) -> Array:
    """Element-wise IoU of xyxy boxes (broadcasting), as OneRef's eval: inter / (union + eps)."""
    xp = _xp(a)
    a, b = xp.asarray(a), xp.asarray(b)
    inter, union = _inter_union(a, b)
    return inter / (union + eps)


def generalized_box_iou(a: Array, b: Array, eps: float = 1e-7) -> Array:
    """Element-wise GIoU of xyxy boxes (broadcasting)."""
    xp = _xp(a)
    a, b = xp.asarray(a), xp.asarray(b)
    inter, union = _inter_union(a, b)
    iou = inter / (union + eps)
    lt = xp.minimum(a[..., :2], b[..., :2])
    rb = xp.maximum(a[..., 2:], b[..., 2:])
    wh = xp.clip(rb - lt, 0, None)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / (hull + eps)


def mask_iou(pred: Array, gt: Array) -> tuple[Array, Array, Array]:
    """Per-sample intersection, union and IoU of binary masks shaped (..., H, W).

    IoU is 0 where the union is empty.
    """
    xp = _xp(pred)
    p = xp.asarray(pred).astype(bool)
    g = xp.asarray(gt).astype(bool)
    inter = xp.sum(p & g, axis=(-2, -1)).astype(np.float64 if xp is np else np.float32)
    union = xp.sum(p | g, axis=(-2, -1)).astype(inter.dtype)
    iou = xp.where(union > 0, inter / xp.maximum(union, 1), 0.0)
    return inter, union, iou


BOX_TOLERANCE = 1.0  # pixels a stored box may exceed the image by before it is an error


def box_problem(xyxy: Any, width: float, height: float, tol: float = BOX_TOLERANCE) -> str | None:
    """What is wrong with an xyxy pixel box for a ``width x height`` image, or None.

    The one box check of refjax (data transforms and dataset builders raise it with the
    record and field): finite, positive width and height, inside the image up to ``tol``
    pixels, and still of positive area once clipped to the image.
    """
    b = np.asarray(xyxy, np.float64)
    if b.shape != (4,) or not np.all(np.isfinite(b)):
        return f"not a finite xyxy box: {b.tolist()}"
    if b[2] - b[0] <= 0 or b[3] - b[1] <= 0:
        return f"zero-area box {b.tolist()}"
    if b[0] < -tol or b[1] < -tol or b[2] > width + tol or b[3] > height + tol:
        return f"box {b.tolist()} outside the {width}x{height} (WxH) image"
    c = np.clip(b, 0, [width, height, width, height])
    if c[2] <= c[0] or c[3] <= c[1]:
        return f"zero-area box inside the image {b.tolist()}"
    return None


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """Tight xyxy box (pixel-edge convention) of a binary (H, W) numpy mask; zeros if empty."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return np.zeros(4, np.float32)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def clip_boxes(b: Array, width: float, height: float) -> Array:
    xp = _xp(b)
    b = xp.asarray(b)
    lo = xp.zeros_like(b)
    hi = xp.asarray([width, height, width, height], dtype=b.dtype)
    return xp.minimum(xp.maximum(b, lo), hi)


@dataclass(frozen=True)
class Letterbox:
    """OneRef letterbox: resize the long side to ``size`` then pad to ``size x size``.

    ``scale`` maps original pixels to resized pixels; ``left``/``top`` is the padding offset.
    New size follows PIL/OneRef: ``round(w * r), round(h * r)``.
    """

    orig_w: int
    orig_h: int
    size: int
    scale: float
    new_w: int
    new_h: int
    left: int
    top: int

    @classmethod
    def centered(cls, orig_w: int, orig_h: int, size: int) -> Letterbox:
        """The eval letterbox: pad offsets round(d/2 - 0.1) with Python's round, as OneRef."""
        r = size / max(orig_w, orig_h)
        new_w, new_h = round(orig_w * r), round(orig_h * r)
        left = round((size - new_w) / 2 - 0.1)
        top = round((size - new_h) / 2 - 0.1)
        return cls(orig_w, orig_h, size, r, new_w, new_h, left, top)

    def forward_boxes(self, b_xyxy: Array) -> Array:
        """Original-pixel xyxy -> letterboxed-pixel xyxy."""
        xp = _xp(b_xyxy)
        b = xp.asarray(b_xyxy)
        sx, sy = self.new_w / self.orig_w, self.new_h / self.orig_h
        mul = xp.asarray([sx, sy, sx, sy], dtype=b.dtype)
        off = xp.asarray([self.left, self.top, self.left, self.top], dtype=b.dtype)
        return b * mul + off

    def inverse_boxes(self, b_xyxy: Array) -> Array:
        """Letterboxed-pixel xyxy -> original-pixel xyxy."""
        xp = _xp(b_xyxy)
        b = xp.asarray(b_xyxy)
        sx, sy = self.new_w / self.orig_w, self.new_h / self.orig_h
        mul = xp.asarray([sx, sy, sx, sy], dtype=b.dtype)
        off = xp.asarray([self.left, self.top, self.left, self.top], dtype=b.dtype)
        return (b - off) / mul

    def inverse_mask(self, mask: np.ndarray) -> np.ndarray:
        """Letterboxed ``(..., size, size)`` numpy mask -> original ``(..., orig_h, orig_w)``.

        Crops the content region and resizes it with nearest sampling at pixel centres
        (source index ``floor((i + 0.5) * new / orig)``), keeping the dtype.
        """
        m = np.asarray(mask)
        m = m[..., self.top : self.top + self.new_h, self.left : self.left + self.new_w]
        ys = ((np.arange(self.orig_h) + 0.5) * self.new_h / self.orig_h).astype(int)
        xs = ((np.arange(self.orig_w) + 0.5) * self.new_w / self.orig_w).astype(int)
        ys, xs = np.minimum(ys, self.new_h - 1), np.minimum(xs, self.new_w - 1)
        return m[..., ys[:, None], xs[None, :]]


@dataclass(frozen=True)
class Expand2Square:
    """LLaVA ``expand2square`` followed by a resize of the square to ``size x size``.

    The image is pasted at ``(left, top) = ((side - w) // 2, (side - h) // 2)`` on a square of
    side ``max(w, h)`` (LLaVA's integer offsets), the square is resized to ``size``. Masks are
    zero-padded the same way and resized with PIL-exact nearest sampling
    (``refjax.data.transforms.resize_masks``).
    """

    orig_w: int
    orig_h: int
    size: int

    @property
    def side(self) -> int:
        return max(self.orig_w, self.orig_h)

    @property
    def left(self) -> int:
        return (self.side - self.orig_w) // 2

    @property
    def top(self) -> int:
        return (self.side - self.orig_h) // 2

    def pad(self, x: np.ndarray, fill: Any = 0) -> np.ndarray:
        """Original ``(..., orig_h, orig_w)`` masks zero-padded (``fill``) to the centred
        ``(..., side, side)`` square (an ``(orig_h, orig_w, C)`` image: pass it with its
        channels first, or use :meth:`pad_image`)."""
        x = np.asarray(x)
        out = np.full((*x.shape[:-2], self.side, self.side), fill, x.dtype)
        out[..., self.top : self.top + self.orig_h, self.left : self.left + self.orig_w] = x
        return out

    def pad_image(self, image: np.ndarray, fill: Any) -> np.ndarray:
        """An ``(orig_h, orig_w, C)`` image pasted on the centred ``(side, side, C)`` square
        filled with ``fill`` (LLaVA: the CLIP mean colour, ``int(255 * mean)`` per channel)."""
        img = np.asarray(image)
        if img.shape[:2] != (self.orig_h, self.orig_w):
            raise ValueError(f"image of size {img.shape[:2]}, expected "
                             f"{(self.orig_h, self.orig_w)}")
        out = np.empty((self.side, self.side, *img.shape[2:]), img.dtype)
        out[...] = np.asarray(fill, img.dtype)
        out[self.top : self.top + self.orig_h, self.left : self.left + self.orig_w] = img
        return out

    def forward_mask(self, mask: np.ndarray) -> np.ndarray:
        """Original ``(..., orig_h, orig_w)`` mask -> canvas ``(..., size, size)``."""
        from refjax.data.transforms import resize_masks

        m = np.asarray(mask)
        if m.shape[-2:] != (self.orig_h, self.orig_w):
            raise ValueError(f"mask of size {m.shape[-2:]}, expected {(self.orig_h, self.orig_w)}")
        return resize_masks(self.pad(m), self.size, self.size)

    def inverse_mask(self, mask: np.ndarray) -> np.ndarray:
        """Canvas ``(..., size, size)`` mask -> original ``(..., orig_h, orig_w)``: nearest
        sampling at original pixel centres, canvas index ``floor((i + off + 0.5) * size / side)``
        (as ``Letterbox.inverse_mask``), keeping the dtype."""
        m = np.asarray(mask)
        if m.shape[-2:] != (self.size, self.size):
            raise ValueError(f"mask of size {m.shape[-2:]}, expected {(self.size, self.size)}")
        r = self.size / self.side
        ys = np.floor((np.arange(self.orig_h) + self.top + 0.5) * r).astype(np.int64)
        xs = np.floor((np.arange(self.orig_w) + self.left + 0.5) * r).astype(np.int64)
        ys, xs = np.minimum(ys, self.size - 1), np.minimum(xs, self.size - 1)
        return m[..., ys[:, None], xs[None, :]]


def mask_ioa(cands: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Intersection over candidate area: |c ∩ region| / |c| for masks (N, H, W) vs (H, W).

    Used for RAS pool labels (spec/ras.md 8.4); 0 for empty candidates.
    """
    c = np.asarray(cands).astype(bool)
    r = np.asarray(region).astype(bool)
    inter = (c & r[None]).sum(axis=(-2, -1)).astype(np.float64)
    area = c.sum(axis=(-2, -1)).astype(np.float64)
    return np.where(area > 0, inter / np.maximum(area, 1), 0.0).astype(np.float32)


def upsample_seg_logits(seg_logits: Array, size: tuple[int, int]) -> Array:
    """Bilinear resize of ``(B, h, w)`` logits to ``size`` in float32 with half-pixel centres,
    equal to torch ``F.interpolate(mode='bilinear', align_corners=False)`` for upsampling."""
    import jax
    import jax.numpy as jnp

    b = seg_logits.shape[0]
    x = jnp.asarray(seg_logits, jnp.float32)
    return jax.image.resize(x, (b, *size), method="bilinear", antialias=False)
