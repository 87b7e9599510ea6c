"""Human-readable evaluation reports: a per-kind metric table and a grid of predictions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from refjax.evaluate import draw

COLUMNS = (("acc@0.5", "Acc@0.5"), ("miou", "mIoU"), ("oiou", "oIoU"))
OVERALL = "overall"


def split_kinds(result: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """One split's metrics -> ``{'overall': {...}, kind: {...}}``.

    Accepts a flat ``MetricAccumulator.result()`` dict (``'<kind>/<metric>'`` keys) or the
    trainer's ``{'overall': {...}, 'per_kind': {kind: {...}}}``.
    """
    if isinstance(result.get(OVERALL), Mapping):
        out = {OVERALL: {k: float(v) for k, v in result[OVERALL].items()}}
        for kind, vals in (result.get("per_kind") or {}).items():
            out[kind] = {k: float(v) for k, v in vals.items()}
        return out
    out = {OVERALL: {}}
    for key, value in result.items():
        kind, _, metric = key.rpartition("/")
        out.setdefault(kind or OVERALL, {})[metric] = float(value)
    return out


def per_kind_table(metrics: Mapping[str, Any]) -> str:
    """A fixed-width table: one row per (split, kind), columns count, Acc@0.5, mIoU, oIoU (%).

    ``metrics`` maps split -> that split's metrics (see ``split_kinds``); a single flat result
    dict (float values) is shown as split ``all``. Metrics a split lacks print as ``-``.
    """
    if metrics and all(isinstance(v, int | float) for v in metrics.values()):
        metrics = {"all": metrics}
    head = f"{'split':<8} {'kind':<12} {'count':>6}" + "".join(f" {t:>8}" for _, t in COLUMNS)
    lines = [head, "-" * len(head)]
    for split, result in metrics.items():
        rows = split_kinds(result)
        for kind in [OVERALL] + sorted(k for k in rows if k != OVERALL):
            r = rows[kind]
            cells = "".join(f" {100 * r[m]:>7.2f}%" if m in r else f" {'-':>8}" for m, _ in COLUMNS)
            lines.append(f"{split:<8} {kind:<12} {int(r.get('count', 0)):>6}{cells}")
    return "\n".join(lines)


def _scaled(box: Any, sx: float, sy: float) -> np.ndarray | None:
    return None if box is None else np.asarray(box, np.float64) * [sx, sy, sx, sy]


def _up(mask: Any, size: tuple[int, int]) -> np.ndarray | None:
    if mask is None:
        return None
    img = Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255)
    return np.asarray(img.resize(size, Image.NEAREST)) > 127


def prediction_grid(
    images: Sequence[np.ndarray],
    preds: Sequence[Mapping[str, Any]],
    gts: Sequence[Mapping[str, Any]],
    texts: Sequence[str],
    *,
    cols: int = 4,
    cell: int = 256,
) -> Image.Image:
    """A grid of predictions: each cell is the image scaled to ``cell`` px on its long side,
    the predicted mask (translucent) and box in blue, the GT box and mask contour in red, and
    the text below. ``preds``/``gts`` hold ``box_xyxy`` and optionally ``mask`` in original
    pixels (``Predictor.predict`` outputs)."""
    n = len(images)
    if not (len(preds) == len(gts) == len(texts) == n) or n == 0:
        raise ValueError(
            f"need equally many images, preds, gts, texts (got {n}, {len(preds)}, "
            f"{len(gts)}, {len(texts)}) and at least one"
        )
    tiles = []
    for img, p, g, t in zip(images, preds, gts, texts):
        h, w = np.asarray(img).shape[:2]
        s = cell / max(h, w)
        size = (max(1, round(w * s)), max(1, round(h * s)))
        big = Image.fromarray(np.asarray(img, np.uint8)).resize(size, Image.NEAREST)
        sx, sy = size[0] / w, size[1] / h
        tile = draw.overlay(
            big,
            box=_scaled(p.get("box_xyxy"), sx, sy),
            mask=_up(p.get("mask"), size),
            gt_box=_scaled(g.get("box_xyxy"), sx, sy),
            gt_mask=_up(g.get("mask"), size),
        )
        tiles.append(draw.caption(tile, t, below=True))
    return tile_grid(tiles, cols)


def tile_grid(tiles: Sequence[Image.Image], cols: int = 4, pad: int = 4) -> Image.Image:
    """``tiles`` pasted row by row, ``cols`` a row, into cells of the largest tile's size with
    ``pad`` white pixels around each."""
    if not tiles:
        raise ValueError("no tiles to arrange")
    cw = max(x.width for x in tiles)
    ch = max(x.height for x in tiles)
    cols = min(cols, len(tiles))
    rows = -(-len(tiles) // cols)
    grid = Image.new("RGB", (cols * (cw + pad) + pad, rows * (ch + pad) + pad), (255, 255, 255))
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        grid.paste(tile, (pad + c * (cw + pad), pad + r * (ch + pad)))
    return grid
