"""RefShapes: refjax's procedural referring dataset (spec/refshapes.md).

``generate_scene(config, split, index)`` renders one 128x128 scene of 3-7 coloured shapes,
writes about six verified referring expressions for it (see :mod:`refjax.data.refshapes_lang`
for the query language and its evaluator), an imperfect candidate mask pool with IoA labels, and
a caption. Everything is a pure function of ``(config, split, index)``: each scene has its own
``numpy.random.Generator`` seeded from ``(config.seed, split seed, index)``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from refjax import boxes as box_ops
from refjax.data.refshapes_lang import (
    COLORS,
    KINDS,
    REF_RELATIONS,
    REFLEXIVE,
    REGIONS,
    RELATIONS,
    SHAPES,
    Filter,
    ObjFacts,
    Query,
    evaluate,
    in_region,
    relation_holds,
    render,
)

SPLITS = ("train", "val", "testA", "testB")
SPLIT_SEEDS = {"train": 11, "val": 22, "testA": 33, "testB": 44}
SPLIT_KINDS = {
    "train": KINDS,
    "val": KINDS,
    "testA": ("attribute", "spatial"),
    "testB": ("relational", "superlative"),
}
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


@dataclass(frozen=True)
class RefShapesConfig:
    """Generator settings; ``split_sizes`` maps split name to number of scenes."""

    name: str
    split_sizes: dict[str, int]
    seed: int = 0
    image_size: int = 128
    min_objects: int = 3
    max_objects: int = 7
    expressions_per_scene: int = 6
    pool_cap: int = 24


CONFIGS = {
    "tiny": RefShapesConfig("tiny", {"train": 40, "val": 12, "testA": 12, "testB": 12}),
    "default": RefShapesConfig("default", {"train": 4000, "val": 400, "testA": 400, "testB": 400}),
}


def get_config(name: str | None) -> RefShapesConfig:
    """The named builder config ('tiny' or 'default'; None means 'default')."""
    name = name or "default"
    if name not in CONFIGS:
        raise ValueError(f"unknown RefShapes config {name!r}; choose from {sorted(CONFIGS)}")
    return CONFIGS[name]


@dataclass
class Expression:
    """One verified referring expression; ``query`` is the structure it was rendered from."""

    id: str
    text: str
    kind: str
    targets: tuple[int, ...]
    refs: tuple[int, ...]
    subject_span: tuple[int, int]
    object_span: tuple[int, int]
    query: Query


@dataclass
class Scene:
    """A generated scene: image, modal masks, COCO xywh boxes, expressions, pool, caption."""

    image_id: str
    image: np.ndarray  # uint8 (H, W, 3)
    masks: np.ndarray  # bool (K, H, W), visible pixels
    boxes_xywh: np.ndarray  # float32 (K, 4)
    facts: list[ObjFacts]
    full_areas: np.ndarray  # int (K,): pixel areas before occlusion
    expressions: list[Expression] = field(default_factory=list)
    pool_masks: np.ndarray | None = None  # bool (P, H, W)
    pool_sources: list[str] = field(default_factory=list)
    pool_ioa: np.ndarray | None = None  # float32 (E, P)
    caption: str = ""

    @property
    def categories(self) -> list[str]:
        return [f.shape for f in self.facts]

    def target_union(self, e: int) -> np.ndarray:
        """Union of expression ``e``'s target masks (H, W) bool."""
        t = list(self.expressions[e].targets)
        return self.masks[t].any(axis=0) if t else np.zeros(self.masks.shape[1:], bool)


def scene_rng(config: RefShapesConfig, split: str, index: int) -> np.random.Generator:
    """The scene's own generator, seeded by (config seed, split seed, scene index)."""
    return np.random.default_rng([config.seed, SPLIT_SEEDS[split], index])


# ----------------------------------------------------------------------------- drawing


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return yy, xx


def shape_mask(shape: str, cx: float, cy: float, s: float, size: int) -> np.ndarray:
    """Binary (size, size) mask of a shape ``s`` pixels across centred at (cx, cy)."""
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


def _dilate(m: np.ndarray) -> np.ndarray:
    out = m.copy()
    out[1:] |= m[:-1]
    out[:-1] |= m[1:]
    out[:, 1:] |= m[:, :-1]
    out[:, :-1] |= m[:, 1:]
    return out


def _erode(m: np.ndarray) -> np.ndarray:
    return ~_dilate(~m)


def _shift(m: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(m)
    h, w = m.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = m[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


# ----------------------------------------------------------------------------- layout


def _place_objects(rng: np.random.Generator, cfg: RefShapesConfig):
    """Sample and place objects; later ones may occlude earlier ones by at most 30%.

    Objects of the same colour never touch (they would look like one object).
    """
    size = cfg.image_size
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
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
        grown = _dilate(_dilate(hull))
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


def _render_image(rng: np.random.Generator, objs: list[dict], size: int) -> np.ndarray:
    img = _background(rng, size)
    for o in objs:
        img[o["full"]] = o["rgb"]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _facts(objs: list[dict]) -> tuple[np.ndarray, np.ndarray, list[ObjFacts]]:
    masks = np.stack([o["visible"] for o in objs])
    xyxy = np.stack([box_ops.mask_to_box(m) for m in masks]).astype(np.float32)
    facts = [
        ObjFacts(
            o["shape"],
            o["color"],
            o["size"],
            float((b[0] + b[2]) / 2),
            float((b[1] + b[3]) / 2),
            float(m.sum()),
        )
        for o, b, m in zip(objs, xyxy, masks)
    ]
    return masks, box_ops.xyxy_to_xywh(xyxy).astype(np.float32), facts


def facts_from_masks(masks: np.ndarray, shapes, colors, sizes) -> list[ObjFacts]:
    """Recompute :class:`ObjFacts` from stored visible masks and attributes (used by tests)."""
    out = []
    for m, sh, co, si in zip(masks, shapes, colors, sizes):
        b = box_ops.mask_to_box(np.asarray(m, bool))
        out.append(
            ObjFacts(
                sh,
                co,
                si,
                float((b[0] + b[2]) / 2),
                float((b[1] + b[3]) / 2),
                float(np.asarray(m, bool).sum()),
            )
        )
    return out


# ----------------------------------------------------------------------------- expressions


def _all_filters(o: ObjFacts) -> list[Filter]:
    out = []
    for use in range(8):
        out.append(
            Filter(
                o.shape if use & 1 else None,
                o.color if use & 2 else None,
                o.size if use & 4 else None,
            )
        )
    return out


def _matching(f: Filter, objs: list[ObjFacts]) -> list[int]:
    return [i for i, o in enumerate(objs) if f.matches(o)]


def _unique_filter(rng, objs, t: int, redundant_p: float = 0.0) -> Filter | None:
    """A fewest-attribute description of object ``t`` (sometimes with a redundant attribute)."""
    unique = [f for f in _all_filters(objs[t]) if _matching(f, objs) == [t]]
    if not unique:
        return None
    k = min(f.num_attributes for f in unique)
    if rng.random() < redundant_p:
        more = [f for f in unique if f.num_attributes == k + 1]
        if more:
            return more[int(rng.integers(len(more)))]
    best = [f for f in unique if f.num_attributes == k]
    return best[int(rng.integers(len(best)))]


def _ambiguous_heads(objs, t: int, allow_size: bool = True) -> list[Filter]:
    """Descriptions that match ``t`` and at least one other object."""
    return [
        f
        for f in _all_filters(objs[t])
        if len(_matching(f, objs)) >= 2 and (allow_size or f.size is None)
    ]


def _choice(rng, seq):
    return seq[int(rng.integers(len(seq)))] if seq else None


def _q_attribute(rng, objs, size):
    t = int(rng.integers(len(objs)))
    f = _unique_filter(rng, objs, t, redundant_p=0.25)
    return None if f is None else (Query("attribute", f), {t}, ())


def _q_spatial(rng, objs, size):
    t = int(rng.integers(len(objs)))
    head = _choice(rng, _ambiguous_heads(objs, t))
    if head is None:
        return None
    group = _matching(head, objs)
    if rng.random() < 0.5:
        keys = {
            "leftmost": lambda i: objs[i].cx,
            "rightmost": lambda i: -objs[i].cx,
            "topmost": lambda i: objs[i].cy,
            "bottommost": lambda i: -objs[i].cy,
        }
        options = [k for k, fn in keys.items() if min(group, key=fn) == t]
        ext = _choice(rng, options)
        return None if ext is None else (Query("spatial", head, extreme=ext), {t}, ())
    regions = [r for r in REGIONS if in_region(r, objs[t], size) is True]
    region = _choice(rng, regions)
    return None if region is None else (Query("spatial", head, region=region), {t}, ())


def _anchor(rng, objs, exclude: int):
    a = _choice(rng, [i for i in range(len(objs)) if i != exclude])
    f = _unique_filter(rng, objs, a) if a is not None else None
    return (a, f) if f is not None else (None, None)


def _q_relational(rng, objs, size):
    t = int(rng.integers(len(objs)))
    head = _choice(rng, _ambiguous_heads(objs, t))
    a, af = _anchor(rng, objs, t)
    if head is None or af is None:
        return None
    if rng.random() < 0.2:
        cands = [i for i in _matching(head, objs) if i != a]
        if len(cands) < 2:
            return None
        d = [np.hypot(objs[i].cx - objs[a].cx, objs[i].cy - objs[a].cy) for i in cands]
        q = Query("relational", head, anchor=af, extreme="closest")
        return q, {cands[int(np.argmin(d))]}, ()
    rels = [r for r in RELATIONS if relation_holds(r, objs[t], objs[a]) is True]
    rel = _choice(rng, rels)
    return None if rel is None else (Query("relational", head, relation=rel, anchor=af), {t}, ())


def _q_superlative(rng, objs, size):
    t = int(rng.integers(len(objs)))
    head = _choice(rng, _ambiguous_heads(objs, t, allow_size=False))
    if head is None:
        return None
    group = _matching(head, objs)
    area = [objs[i].area for i in group]
    ext = (
        "biggest"
        if objs[t].area == max(area)
        else ("smallest" if objs[t].area == min(area) else None)
    )
    return None if ext is None else (Query("superlative", head, extreme=ext), {t}, ())


def _number(n: int, rng) -> str:
    if n in (2, 3) and rng.random() < 0.4:
        return "two" if n == 2 else "three"
    return "all"


def _q_group(rng, objs, size):
    o = objs[int(rng.integers(len(objs)))]
    head = _choice(rng, _all_filters(o))
    mode = rng.random()
    if mode < 0.45 and head.num_attributes > 0:
        members = set(_matching(head, objs))
        q = Query("group", head)
    elif mode < 0.8:
        a, af = _anchor(rng, objs, -1)
        if af is None:
            return None
        rel = _choice(rng, RELATIONS)
        truth = {i: relation_holds(rel, objs[i], objs[a]) for i in _matching(head, objs) if i != a}
        members = {i for i, v in truth.items() if v is True}
        q = Query("group", head, relation=rel, anchor=af)
    else:
        region = _choice(rng, REGIONS)
        members = {i for i in _matching(head, objs) if in_region(region, objs[i], size) is True}
        q = Query("group", head, region=region)
    if len(members) < 2:
        return None
    return dataclasses.replace(q, number=_number(len(members), rng)), members, ()


def _q_no_target(rng, objs, size):
    shapes = sorted({o.shape for o in objs})
    colors = sorted({o.color for o in objs})
    mode = rng.random()
    if mode < 0.5:
        size_attr = _choice(rng, ["small", "large"]) if rng.random() < 0.4 else None
        f = Filter(
            _choice(rng, shapes), _choice(rng, colors) if rng.random() < 0.8 else None, size_attr
        )
        return (Query("no-target", f), set(), ()) if not _matching(f, objs) else None
    t = int(rng.integers(len(objs)))
    head = _choice(rng, [f for f in _all_filters(objs[t]) if f.num_attributes > 0])
    if mode < 0.75:
        a, af = _anchor(rng, objs, t)
        if af is None:
            return None
        return Query("no-target", head, relation=_choice(rng, RELATIONS), anchor=af), set(), ()
    return Query("no-target", head, region=_choice(rng, REGIONS)), set(), ()


def _q_hybrid(rng, objs, size):
    r = int(rng.integers(len(objs)))
    rel = _choice(rng, REF_RELATIONS + ("closest",))
    attr = _choice(rng, [None, None, "shape", "color", "size"])
    banned = {"same_color": "color", "same_shape": "shape", "same_size": "size"}.get(rel)
    if attr == banned:
        attr = None
    head = Filter(**({attr: getattr(objs[r], attr)} if attr else {}))
    if rel == "closest":
        if head.num_attributes and rng.random() < 0.5:  # use another object's attribute
            head = Filter(**{attr: getattr(objs[int(rng.integers(len(objs)))], attr)})
        cands = [i for i in _matching(head, objs) if i != r]
        if not cands:
            return None
        d = [np.hypot(objs[i].cx - objs[r].cx, objs[i].cy - objs[r].cy) for i in cands]
        q = Query("hybrid", head, ref=r, extreme="closest")
        return q, {cands[int(np.argmin(d))]}, (r,)
    exclude = rel in REFLEXIVE and rng.random() < 0.4
    keep_ref = rel in REFLEXIVE and not exclude
    truth = {
        i: relation_holds(rel, objs[i], objs[r])
        for i in _matching(head, objs)
        if i != r or keep_ref
    }
    members = {i for i, v in truth.items() if v is True}
    if not members and rng.random() < 0.7:
        return None
    return (
        Query("hybrid", head, number="all", relation=rel, ref=r, exclude_ref=exclude),
        members,
        (r,),
    )


_MAKERS = {
    "attribute": _q_attribute,
    "spatial": _q_spatial,
    "relational": _q_relational,
    "superlative": _q_superlative,
    "group": _q_group,
    "no-target": _q_no_target,
    "hybrid": _q_hybrid,
}


def number_agrees(q: Query, n: int) -> bool:
    """Whether a result of ``n`` objects fits the query's kind and grammatical number."""
    if q.kind == "no-target":
        return n == 0
    if q.kind == "hybrid":
        return n == 1 if q.number == "one" else True
    if q.kind == "group":
        return {"two": n == 2, "three": n == 3}.get(q.number, n >= 2)
    return n == 1


def _expressions(rng, scene: Scene, kinds: tuple[str, ...], count: int, size: int):
    objs = scene.facts
    order = list(rng.permutation(kinds))
    while len(order) < count:
        order += list(rng.permutation(kinds))
    queue = order[:count] + list(rng.permutation(kinds)) * 2
    texts: set[str] = set()
    out: list[Expression] = []
    for kind in queue:
        if len(out) == count:
            break
        for _ in range(8):
            made = _MAKERS[kind](rng, objs, size)
            if made is None:
                continue
            q, intended, refs = made
            ev = evaluate(q, objs, size)
            if not ev.is_exactly(intended) or not number_agrees(q, len(intended)):
                continue
            r = render(q, rng)
            if r.text in texts:
                continue
            texts.add(r.text)
            out.append(
                Expression(
                    f"{scene.image_id}-e{len(out)}",
                    r.text,
                    q.kind,
                    tuple(sorted(intended)),
                    tuple(refs),
                    r.subject_span,
                    r.object_span,
                    q,
                )
            )
            break
    return out


# ----------------------------------------------------------------------------- pool, caption


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
            core.append((_dilate(m), "dilated"))
        elif u < 0.77 and _erode(m).sum() >= 12:
            core.append((_erode(m), "eroded"))
        elif u < 0.9:
            core += [(p, "part") for p in _split_in_two(rng, m)]
        else:
            core.append((_shift(m, *rng.choice([-2, -1, 1, 2], size=2)), "shifted"))
        if rng.random() < 0.3:
            extra.append((_split_in_two(rng, m)[int(rng.integers(2))], "part"))
        if rng.random() < 0.2:
            extra.append((_dilate(_dilate(m)), "dilated"))
    for i in range(len(masks)):
        grown = _dilate(_dilate(masks[i]))
        for j in range(i + 1, len(masks)):
            if (grown & masks[j]).any():
                extra.append((masks[i] | masks[j], "union"))
    occupied = _dilate(_dilate(masks.any(axis=0)))
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


def make_caption(rng, facts: list[ObjFacts]) -> str:
    """'a large red circle, a small blue square and a green triangle.' in reading order."""
    order = sorted(range(len(facts)), key=lambda i: facts[i].cy)
    rows: list[list[int]] = []
    for i in order:
        if rows and facts[i].cy - facts[rows[-1][0]].cy < 16:
            rows[-1].append(i)
        else:
            rows.append([i])
    order = [i for row in rows for i in sorted(row, key=lambda i: facts[i].cx)]
    parts = []
    for i in order:
        f = facts[i]
        words = ([f.size] if rng.random() < 0.75 else []) + [f.color, f.shape]
        parts.append(("an " if words[0][0] in "aeiou" else "a ") + " ".join(words))
    return ", ".join(parts[:-1]) + " and " + parts[-1] + "."


# ----------------------------------------------------------------------------- scenes


def image_id(config: RefShapesConfig, split: str, index: int) -> str:
    return f"refshapes-{config.name}-{split}-{index:05d}"


def generate_scene(config: RefShapesConfig, split: str, index: int) -> Scene:
    """Scene ``index`` of ``split``: a pure function of (config, split, index)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown RefShapes split {split!r}; choose from {SPLITS}")
    rng = scene_rng(config, split, index)
    size = config.image_size
    objs = _place_objects(rng, config)
    while len(objs) < config.min_objects:  # crowded layout: resample (rare)
        objs = _place_objects(rng, config)
    image = _render_image(rng, objs, size)
    masks, boxes_xywh, facts = _facts(objs)
    scene = Scene(
        image_id(config, split, index),
        image,
        masks,
        boxes_xywh,
        facts,
        np.array([o["area"] for o in objs]),
    )
    scene.expressions = _expressions(
        rng, scene, SPLIT_KINDS[split], config.expressions_per_scene, size
    )
    scene.pool_masks, scene.pool_sources = make_pool(rng, masks, config.pool_cap)
    ioa = [
        box_ops.mask_ioa(scene.pool_masks, scene.target_union(e))
        for e in range(len(scene.expressions))
    ]
    scene.pool_ioa = (
        np.stack(ioa) if ioa else np.zeros((0, len(scene.pool_masks)), np.float32)
    ).astype(np.float32)
    scene.caption = make_caption(rng, facts)
    return scene


def generate_split(
    config: RefShapesConfig, split: str, start: int = 0, stop: int | None = None
) -> Iterator[Scene]:
    """Scenes ``start..stop`` (default: the whole split) in index order."""
    stop = config.split_sizes[split] if stop is None else stop
    for i in range(start, stop):
        yield generate_scene(config, split, i)
