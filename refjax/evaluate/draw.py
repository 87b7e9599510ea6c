"""Drawing predictions on images (PIL): box outlines, translucent masks, GT contours, captions."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PRED_COLOR = (0, 200, 255)
GT_COLOR = (255, 60, 60)
Color = tuple[int, int, int]


def _rgb(image: np.ndarray | Image.Image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")


def contour(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a binary (H, W) mask (4-neighbourhood)."""
    m = np.asarray(mask, bool)
    p = np.pad(m, 1)
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~inner


def overlay(
    image: np.ndarray | Image.Image,
    *,
    box: Sequence[float] | None = None,
    mask: np.ndarray | None = None,
    gt_box: Sequence[float] | None = None,
    gt_mask: np.ndarray | None = None,
    color: Color = PRED_COLOR,
    gt_color: Color = GT_COLOR,
    alpha: float = 0.45,
) -> Image.Image:
    """A copy of ``image`` with the predicted mask blended in (``alpha``), the GT mask's contour,
    and the GT / predicted xyxy boxes outlined (pixel coordinates of ``image``)."""
    img = _rgb(image)
    arr = np.asarray(img, np.float32)
    h, w = arr.shape[:2]
    for m, name in ((mask, "mask"), (gt_mask, "gt_mask")):
        if m is not None and np.shape(m) != (h, w):
            raise ValueError(f"{name} of shape {np.shape(m)} does not match the image {(h, w)}")
    if mask is not None:
        sel = np.asarray(mask, bool)
        arr[sel] = (1 - alpha) * arr[sel] + alpha * np.asarray(color, np.float32)
    if gt_mask is not None:
        arr[contour(gt_mask)] = gt_color
    img = Image.fromarray(arr.round().clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    width = max(1, round(min(h, w) / 128))
    for b, c in ((gt_box, gt_color), (box, color)):
        if b is not None:
            x1, y1, x2, y2 = (float(v) for v in b)
            d.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=c, width=width)
    return img


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    chars = max(4, int(width / max(draw.textlength("x", font=font), 1)))
    return textwrap.wrap(text, chars) or [""]


def caption(image: Image.Image, text: str, *, below: bool = False) -> Image.Image:
    """``text`` on a dark strip: over the top of ``image`` (same size), or in a strip added
    ``below`` it."""
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(image)
    lines = _wrap(probe, text, font, image.width - 4)
    line_h = sum(font.getmetrics()) + 1
    strip = line_h * len(lines) + 4
    if below:
        out = Image.new("RGB", (image.width, image.height + strip), (20, 20, 20))
        out.paste(image, (0, 0))
        top = image.height
    else:
        out = image.copy()
        band = Image.new("RGB", (image.width, min(strip, image.height)), (0, 0, 0))
        region = out.crop((0, 0, band.width, band.height))
        out.paste(Image.blend(region, band, 0.6), (0, 0))
        top = 0
    d = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        d.text((2, top + 2 + i * line_h), line, fill=(255, 255, 255), font=font)
    return out
