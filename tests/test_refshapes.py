"""RefShapes generator invariants: verified expressions, pool, captions, determinism, splits."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from refjax import boxes as box_ops
from refjax.data import refshapes as rs
from refjax.data.builders.refshapes import scene_to_record
from refjax.data.refshapes_lang import (
    COLOR_WORDS,
    MASK_REF,
    NOUNS,
    REFLEXIVE,
    evaluate,
)

SEEDS = (0, 1, 2)


def _cfg(seed: int) -> rs.RefShapesConfig:
    return dataclasses.replace(rs.CONFIGS["tiny"], seed=seed)


@pytest.fixture(scope="module")
def scenes() -> dict[str, list[rs.Scene]]:
    out: dict[str, list[rs.Scene]] = {s: [] for s in rs.SPLITS}
    for seed in SEEDS:
        for split, n in (("train", 30), ("val", 5), ("testA", 12), ("testB", 12)):
            out[split] += [rs.generate_scene(_cfg(seed), split, i) for i in range(n)]
    return out


def _all(scenes):
    return [s for split in scenes.values() for s in split]


def _color_of(word: str) -> str | None:
    return next((c for c, ws in COLOR_WORDS.items() if word in ws), None)


def _shape_of(word: str) -> str | None:
    return next((s for s, forms in NOUNS.items() if s and any(word in f for f in forms)), None)


def test_scene_geometry(scenes):
    for s in _all(scenes):
        k = len(s.facts)
        assert 3 <= k <= 7
        assert s.image.shape == (128, 128, 3) and s.image.dtype == np.uint8
        assert s.masks.shape == (k, 128, 128)
        vis = s.masks.sum(axis=(1, 2))
        # Occlusion: at most 30% of an object's own area is hidden.
        assert np.all(vis >= 0.7 * s.full_areas - 1), (s.image_id, vis, s.full_areas)
        for m, b in zip(s.masks, s.boxes_xywh):
            np.testing.assert_array_equal(box_ops.xywh_to_xyxy(b), box_ops.mask_to_box(m))
            assert b[2] > 0 and b[3] > 0
        assert not (s.masks.sum(axis=0) > 1).any(), "modal masks must not overlap"


def test_every_expression_denotes_exactly_its_targets(scenes):
    n_checked = 0
    for s in _all(scenes):
        facts = rs.facts_from_masks(s.masks, [f.shape for f in s.facts],
                                    [f.color for f in s.facts], [f.size for f in s.facts])
        for e in s.expressions:
            ev = evaluate(e.query, facts)
            assert ev.is_exactly(set(e.targets)), (e.text, e.targets, ev)
            n = len(e.targets)
            if e.kind in ("attribute", "spatial", "relational", "superlative"):
                assert n == 1, e
            elif e.kind == "group":
                assert n >= 2, e
            elif e.kind == "no-target":
                assert n == 0, e
            n_checked += 1
    assert n_checked > 500


def test_hybrid_references(scenes):
    seen_reflexive_with_ref = False
    for s in _all(scenes):
        for e in s.expressions:
            words = e.text.split()
            assert (MASK_REF in words) == (e.kind == "hybrid"), e.text
            if e.kind != "hybrid":
                assert e.refs == ()
                continue
            assert len(e.refs) == 1 and words.count(MASK_REF) == 1
            assert words[slice(*e.object_span)] == [MASK_REF]
            if e.refs[0] in e.targets:
                assert e.query.relation in REFLEXIVE and not e.query.exclude_ref, e
                seen_reflexive_with_ref = True
            elif e.query.relation in REFLEXIVE and not e.query.exclude_ref:
                assert e.query.head.matches(s.facts[e.refs[0]]) is False, e
    assert seen_reflexive_with_ref


def test_text_mentions_query_attributes(scenes):
    for s in _all(scenes):
        for e in s.expressions:
            words = e.text.split()
            q = e.query
            colors = {_color_of(w) for w in words} - {None}
            wanted = {f.color for f in (q.head, q.anchor) if f is not None} - {None}
            assert colors == wanted, (e.text, q)
            shapes = {_shape_of(w) for w in words} - {None}
            wanted = {f.shape for f in (q.head, q.anchor) if f is not None} - {None}
            assert shapes == wanted, (e.text, q)
            a, b = e.subject_span
            assert 0 <= a < b <= len(words), e
            if q.anchor is not None:
                a, b = e.object_span
                assert 0 <= a < b <= len(words) and _shape_of(words[b - 1]) == q.anchor.shape \
                    or q.anchor.shape is None, e
            elif q.ref is None:
                assert e.object_span == (-1, -1)


def test_kinds_per_split(scenes):
    kinds = {split: {e.kind for s in ss for e in s.expressions} for split, ss in scenes.items()}
    assert kinds["train"] == set(rs.SPLIT_KINDS["train"])
    assert kinds["testA"] == {"attribute", "spatial"}
    assert kinds["testB"] == {"relational", "superlative"}
    for split, ss in scenes.items():
        mean = np.mean([len(s.expressions) for s in ss])
        assert 5.0 <= mean <= 6.0, (split, mean)
        for s in ss:
            assert len({e.text for e in s.expressions}) == len(s.expressions)


def test_pool_labels_and_oracle(scenes):
    inter = union = 0.0
    sources = set()
    for s in _all(scenes):
        p = len(s.pool_masks)
        assert len(s.facts) <= p <= 24
        assert s.pool_masks.sum(axis=(1, 2)).min() > 0
        assert s.pool_ioa.shape == (len(s.expressions), p)
        sources |= set(s.pool_sources)
        for e in range(len(s.expressions)):
            u = s.target_union(e)
            np.testing.assert_allclose(s.pool_ioa[e], box_ops.mask_ioa(s.pool_masks, u))
            if u.any():
                _, i, un = rs.greedy_oracle(s.pool_masks, u)
                inter, union = inter + i, union + un
    ciou = inter / union
    assert 0.8 < ciou < 1.0, ciou
    assert {"instance", "part", "union", "blob"} <= sources


def test_caption_lists_objects_in_reading_order(scenes):
    for s in _all(scenes):
        c = s.caption
        assert c.endswith(".") and " and " in c
        items = c[:-1].replace(" and ", ", ").split(", ")
        assert len(items) == len(s.facts)
        assert all(it.split()[0] in ("a", "an") for it in items)
        first = min(s.facts, key=lambda f: f.cy)  # the topmost object is in the first row
        assert any(f.shape == items[0].split()[-1] for f in s.facts if f.cy - first.cy < 16)


def test_deterministic_bytes():
    cfg = _cfg(0)
    for split in ("train", "testB"):
        a = scene_to_record(rs.generate_scene(cfg, split, 3))
        b = scene_to_record(rs.generate_scene(cfg, split, 3))
        assert a["image"] == b["image"]
        assert a["objects"]["mask"] == b["objects"]["mask"]
        assert a["pool"]["mask"] == b["pool"]["mask"]
        assert a["expressions"]["text"] == b["expressions"]["text"]
        np.testing.assert_array_equal(a["pool_ioa"], b["pool_ioa"])
        assert a["caption"] == b["caption"]
    x = rs.generate_scene(cfg, "train", 3).image
    assert not np.array_equal(x, rs.generate_scene(cfg, "train", 4).image)
    assert not np.array_equal(x, rs.generate_scene(cfg, "val", 3).image)
    assert not np.array_equal(x, rs.generate_scene(_cfg(1), "train", 3).image)


def test_unknown_config_and_split():
    with pytest.raises(ValueError, match="config"):
        rs.get_config("huge")
    with pytest.raises(ValueError, match="split"):
        rs.generate_scene(rs.CONFIGS["tiny"], "test", 0)


def test_public_names_and_split_modules():
    """refjax.data.refshapes re-exports the rendering, language and expression modules."""
    from refjax.data import refshapes_expressions, refshapes_render

    for name in rs.__all__:
        assert getattr(rs, name) is not None, name
    assert rs.shape_mask is refshapes_render.shape_mask
    assert rs.facts_from_masks is refshapes_render.facts_from_masks
    assert rs.Expression is refshapes_expressions.Expression
    e = rs.generate_scene(rs.CONFIGS["tiny"], "val", 0).expressions[0]
    assert e.raw == e.text
