"""RefShapes rendering: shapes, scene layout, image, visible masks, object facts, mask pools.

Everything here is pixels; the words live in :mod:`refjax.data.refshapes_lang` (query language,
evaluator, templates) and :mod:`refjax.data.refshapes_expressions` (sampling verified
expressions and captions). :mod:`refjax.data.refshapes` puts a scene together.

Geometry conventions: pixel ``(row y, column x)`` covers ``[x, x + 1) x [y, y + 1)`` and its
centre is ``(x + 0.5, y + 0.5)``. An object's *centre* is the centroid of its visible mask (the
mean of its pixel centres), not the centre of its box: for a triangle the two differ by about a
sixth of its height. Its *extent* is the tight box of the visible mask ``(x0, y0, x1, y1)``
(``x1`` = last column + 1).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from refjax import boxes as box_ops
from refjax.data.refshapes_lang import COLORS, SHAPES, ObjFacts

BASE_RGB = {
    "red": (215, 35, 35),
    "green": (40, 170, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 210, 40),
    "purple": (140, 55, 185),
    "orange": (245, 135, 25),
}
SIZE_RANGES = {"small": (14.0, 20.0), "large": (28.0, 40.0)}
MAX_OCCLUSION = 0.3


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return yy, xx


def shape_mask(shape: str, cx: float, cy: float, s: float, size: int) -> np.ndarray:
    """Binary (size, size) mask of a shape ``s`` pixels across, its box centred at (cx, cy)."""
    yy, xx = _grid(size)
    dx, dy, r = xx - cx, yy - cy, s / 2.0
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if shape == "square":
        return (np.abs(dx) <= r * 0.9) & (np.abs(dy) <= r * 0.9)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "triangle":
        h = 0.87 * s
        t = (dy + h / 2) / h
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= r * t)
    if shape == "star":
        ang = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        pts = list(zip((cx + rad * np.cos(ang)).tolist(), (cy + rad * np.sin(ang)).tolist()))
        im = Image.new("L", (size, size), 0)
        ImageDraw.Draw(im).polygon(pts, fill=1)
        return np.asarray(im, dtype=bool)
    raise ValueError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth two-colour gradient plus low-amplitude, low-frequency texture (float HxWx3)."""
    yy, xx = _grid(size)
    base = rng.uniform(80, 190, size=2)
    c0 = np.clip(base[0] + rng.uniform(-30, 30, size=3), 0, 255)
    c1 = np.clip(base[1] + rng.uniform(-30, 30, size=3), 0, 255)
    theta = rng.uniform(0, 2 * np.pi)
    t = xx * np.cos(theta) + yy * np.sin(theta)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    coarse = rng.normal(0, 1, size=(8, 8)).astype(np.float32)
    tex = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BILINEAR))
    return img + 4.0 * tex[..., None]


def dilate(m: np.ndarray) -> np.ndarray:
    """4-neighbour binary dilation by one pixel."""
    out = m.copy()
    out[1:] |= m[:-1]
    out[:-1] |= m[1:]
    out[:, 1:] |= m[:, :-1]
    out[:, :-1] |= m[:, 1:]
    return out


def erode(m: np.ndarray) -> np.ndarray:
    """4-neighbour binary erosion by one pixel."""
    return ~dilate(~m)


def _shift(m: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(m)
    h, w = m.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = m[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


# ----------------------------------------------------------------------------- layout


def place_objects(
    rng: np.random.Generator, size: int, min_objects: int, max_objects: int
) -> list[dict]:
    """Sample and place 3-7 objects; later ones may occlude earlier ones by at most 30%.

    Objects of the same colour never touch (they would look like one object). Each object is a
    dict with its attributes, its full mask and its ``visible`` (modal) mask.
    """
    n = int(rng.integers(min_objects, max_objects + 1))
    shapes = list(rng.choice(SHAPES, size=int(rng.integers(2, 5)), replace=False))
    colors = list(rng.choice(COLORS, size=int(rng.integers(2, 5)), replace=False))
    objs: list[dict] = []
    for _ in range(60 * n):
        if len(objs) == n:
            break
        shape = str(rng.choice(shapes if rng.random() < 0.85 else SHAPES))
        color = str(rng.choice(colors if rng.random() < 0.85 else COLORS))
        sclass = "small" if rng.random() < 0.5 else "large"
        s = float(rng.uniform(*SIZE_RANGES[sclass]))
        cx, cy = rng.uniform(s / 2 + 1, size - s / 2 - 1, size=2)
        full = shape_mask(shape, cx, cy, s, size)
        hull = shape_mask("circle", cx, cy, s, size) if shape == "ring" else full
        area, hull_area = int(full.sum()), int(hull.sum())
        ok = True
        grown = dilate(dilate(hull))
        for o in objs:
            if o["color"] == color and (grown & o["hull"]).any():  # would read as one blob
                ok = False
                break
            if (hull & o["hull"]).sum() > MAX_OCCLUSION * min(hull_area, o["hull_area"]):
                ok = False
                break
            if (o["visible"] & ~full).sum() < (1 - MAX_OCCLUSION) * o["area"]:
                ok = False
                break
        if not ok:
            continue
        for o in objs:
            o["visible"] = o["visible"] & ~full
        rgb = np.clip(np.array(BASE_RGB[color]) + rng.integers(-20, 21, size=3), 0, 255)
        objs.append(
            dict(
                shape=shape,
                color=color,
                size=sclass,
                s=s,
                full=full,
                hull=hull,
                area=area,
                hull_area=hull_area,
                visible=full.copy(),
                rgb=rgb,
            )
        )
    return objs


def render_image(rng: np.random.Generator, objs: list[dict], size: int) -> np.ndarray:
    """The uint8 (size, size, 3) image: background, then objects in placement order."""
    img = _background(rng, size)
    for o in objs:
        img[o["full"]] = o["rgb"]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def mask_centroid(mask: np.ndarray) -> tuple[float, float]:
    """(cx, cy): the mean pixel centre of a non-empty binary (H, W) mask."""
    ys, xs = np.nonzero(np.asarray(mask, bool))
    if ys.size == 0:
        raise ValueError("the centroid of an empty mask is undefined")
    return float(xs.mean() + 0.5), float(ys.mean() + 0.5)


def facts_from_masks(
    masks: np.ndarray, shapes: Sequence[str], colors: Sequence[str], sizes: Sequence[str]
) -> list[ObjFacts]:
    """:class:`ObjFacts` of objects from their visible masks and attributes.

    ``cx, cy`` = the mask centroid, ``box`` = the mask's tight xyxy box, ``area`` = its pixels.
    """
    out = []
    for m, sh, co, si in zip(masks, shapes, colors, sizes):
        m = np.asarray(m, bool)
        b = box_ops.mask_to_box(m)
        cx, cy = mask_centroid(m)
        box = (float(b[0]), float(b[1]), float(b[2]), float(b[3]))
        out.append(ObjFacts(sh, co, si, cx, cy, float(m.sum()), box))
    return out


def scene_geometry(objs: list[dict]) -> tuple[np.ndarray, np.ndarray, list[ObjFacts]]:
    """(visible masks bool (K, H, W), COCO xywh boxes float32 (K, 4), facts) of placed objects."""
    masks = np.stack([o["visible"] for o in objs])
    xyxy = np.stack([box_ops.mask_to_box(m) for m in masks]).astype(np.float32)
    facts = facts_from_masks(
        masks, [o["shape"] for o in objs], [o["color"] for o in objs], [o["size"] for o in objs]
    )
    return masks, box_ops.xyxy_to_xywh(xyxy).astype(np.float32), facts


# ----------------------------------------------------------------------------- candidate pool


def _split_in_two(rng, m: np.ndarray) -> list[np.ndarray]:
    yy, xx = _grid(m.shape[0])
    ys, xs = np.nonzero(m)
    ang = rng.uniform(0, np.pi)
    d = (xx - xs.mean() - 0.5) * np.cos(ang) + (yy - ys.mean() - 0.5) * np.sin(ang)
    return [m & (d > 0.7), m & (d < -0.7)]


def _blob(rng, size: int, occupied: np.ndarray) -> np.ndarray:
    yy, xx = _grid(size)
    cx, cy = rng.uniform(8, size - 8, size=2)
    rx, ry = rng.uniform(5, 14, size=2)
    return (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0) & ~occupied


def make_pool(rng, masks: np.ndarray, cap: int) -> tuple[np.ndarray, list[str]]:
    """An imperfect class-agnostic candidate pool: instances (some perturbed) + distractors."""
    core: list[tuple[np.ndarray, str]] = []
    extra: list[tuple[np.ndarray, str]] = []
    for m in masks:
        u = rng.random()
        if u < 0.55:
            core.append((m, "instance"))
        elif u < 0.67:
            core.append((dilate(m), "dilated"))
        elif u < 0.77 and erode(m).sum() >= 12:
            core.append((erode(m), "eroded"))
        elif u < 0.9:
            core += [(p, "part") for p in _split_in_two(rng, m)]
        else:
            core.append((_shift(m, *rng.choice([-2, -1, 1, 2], size=2)), "shifted"))
        if rng.random() < 0.3:
            extra.append((_split_in_two(rng, m)[int(rng.integers(2))], "part"))
        if rng.random() < 0.2:
            extra.append((dilate(dilate(m)), "dilated"))
    for i in range(len(masks)):
        grown = dilate(dilate(masks[i]))
        for j in range(i + 1, len(masks)):
            if (grown & masks[j]).any():
                extra.append((masks[i] | masks[j], "union"))
    occupied = dilate(dilate(masks.any(axis=0)))
    for _ in range(int(rng.integers(1, 4))):
        extra.append((_blob(rng, masks.shape[1], occupied), "blob"))
    extra = [extra[i] for i in rng.permutation(len(extra))]
    seen: set[bytes] = set()
    pool: list[tuple[np.ndarray, str]] = []
    for m, src in core + extra:
        key = np.packbits(m).tobytes()
        if m.sum() >= 8 and key not in seen and len(pool) < cap:
            seen.add(key)
            pool.append((m, src))
    pool = [pool[i] for i in rng.permutation(len(pool))]
    return np.stack([m for m, _ in pool]), [s for _, s in pool]


def greedy_oracle(pool: np.ndarray, target: np.ndarray) -> tuple[list[int], float, float]:
    """Greedy oracle of ras.md 8.4: candidates by decreasing IoA, kept when union IoU rises.

    A candidate that does not raise the IoU is skipped (not a stop), so duplicates do not end
    the search early. Returns (selected indices, intersection, union) in pixels.
    """
    target = np.asarray(target, bool)
    ioa = box_ops.mask_ioa(pool, target)
    cur = np.zeros_like(target)
    best, chosen = 0.0, []
    for i in np.argsort(-ioa, kind="stable"):
        if ioa[i] <= 0:
            break
        new = cur | pool[i]
        inter, union = float((new & target).sum()), float((new | target).sum())
        if inter / union > best:
            best, cur = inter / union, new
            chosen.append(int(i))
    return chosen, float((cur & target).sum()), float((cur | target).sum())
