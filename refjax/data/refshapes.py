"""RefShapes: refjax's procedural referring dataset (spec/refshapes.md).

``generate_scene(config, split, index)`` renders one 128x128 scene of 3-7 coloured shapes,
writes about six verified referring expressions for it, an imperfect candidate mask pool with
IoA labels, and a caption. Everything is a pure function of ``(config, split, index)``: each
scene has its own ``numpy.random.Generator`` seeded from ``(config.seed, split seed, index)``.

The generator is split in three modules, all re-exported here:

- :mod:`refjax.data.refshapes_render`: pixels (shapes, layout, image, visible masks, object
  facts with mask-centroid centres, candidate pools, the greedy pool oracle);
- :mod:`refjax.data.refshapes_lang`: the query language, its three-valued evaluator (relation
  logic, regions, extremes and their margins) and the text templates;
- :mod:`refjax.data.refshapes_expressions`: sampling verified expressions of each kind, and
  captions.

This module holds the configs and splits and puts a :class:`Scene` together.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from refjax import boxes as box_ops
from refjax.data.refshapes_expressions import (
    Expression,
    make_caption,
    make_expressions,
    number_agrees,
)
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
from refjax.data.refshapes_render import (
    BASE_RGB,
    MAX_OCCLUSION,
    SIZE_RANGES,
    facts_from_masks,
    greedy_oracle,
    make_pool,
    mask_centroid,
    place_objects,
    render_image,
    scene_geometry,
    shape_mask,
)

__all__ = [
    "BASE_RGB",
    "COLORS",
    "CONFIGS",
    "KINDS",
    "MAX_OCCLUSION",
    "REFLEXIVE",
    "REF_RELATIONS",
    "REGIONS",
    "RELATIONS",
    "SHAPES",
    "SIZE_RANGES",
    "SPLITS",
    "SPLIT_KINDS",
    "SPLIT_SEEDS",
    "Expression",
    "Filter",
    "ObjFacts",
    "Query",
    "RefShapesConfig",
    "Scene",
    "evaluate",
    "facts_from_masks",
    "generate_scene",
    "generate_split",
    "get_config",
    "greedy_oracle",
    "image_id",
    "in_region",
    "make_caption",
    "make_pool",
    "mask_centroid",
    "number_agrees",
    "relation_holds",
    "render",
    "scene_rng",
    "shape_mask",
]

SPLITS = ("train", "val", "testA", "testB")
SPLIT_SEEDS = {"train": 11, "val": 22, "testA": 33, "testB": 44}
SPLIT_KINDS = {
    "train": KINDS,
    "val": KINDS,
    "testA": ("attribute", "spatial"),
    "testB": ("relational", "superlative"),
}


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


def image_id(config: RefShapesConfig, split: str, index: int) -> str:
    return f"refshapes-{config.name}-{split}-{index:05d}"


def generate_scene(config: RefShapesConfig, split: str, index: int) -> Scene:
    """Scene ``index`` of ``split``: a pure function of (config, split, index)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown RefShapes split {split!r}; choose from {SPLITS}")
    rng = scene_rng(config, split, index)
    size = config.image_size
    objs = place_objects(rng, size, config.min_objects, config.max_objects)
    while len(objs) < config.min_objects:  # crowded layout: resample (rare)
        objs = place_objects(rng, size, config.min_objects, config.max_objects)
    image = render_image(rng, objs, size)
    masks, boxes_xywh, facts = scene_geometry(objs)
    scene = Scene(
        image_id(config, split, index),
        image,
        masks,
        boxes_xywh,
        facts,
        np.array([o["area"] for o in objs]),
    )
    scene.expressions = make_expressions(
        rng, scene.image_id, facts, SPLIT_KINDS[split], config.expressions_per_scene, size
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
