"""An independent oracle for RefShapes geometry: what the words mean, re-derived from the masks.

Two layers:

- hand-built :class:`ObjFacts` with literal expectations for ``relation_holds``, ``in_region``,
  the extremes (leftmost, biggest, closest...) and the margins at their boundaries;
- generated scenes, where "left of / above / leftmost / in the top left / closest" are
  re-derived from the stored visible masks (centroids and extents computed here with numpy,
  with the rules written out again below) without calling the generator's evaluator, and the
  relation words of the text are checked against a hand-written phrase table.

Swapping left and right (or above and below) anywhere in the generator, measuring centres on
boxes instead of masks, or dropping the extent-separation rule fails this file.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from refjax.data import refshapes as rs
from refjax.data.refshapes_lang import Filter, ObjFacts, Query, evaluate, in_region, render
from refjax.data.refshapes_lang import relation_holds as holds

# The rules, written out again (module docstring of refjax.data.refshapes_lang).
POS_MARGIN = 5.0  # px: "a left of b" is False when a's centre is not this far left of b's
EXTREME_MARGIN = 6.0  # px: the leftmost beats the runner-up by this much
REGION_BAND = 6.0  # px
AREA_RATIO = 1.3
CLOSEST_RATIO = 1.3
SIZE = 128


def obj(box, centre=None, area=100.0, shape="circle", color="red", size="small") -> ObjFacts:
    """Hand-built facts; ``centre`` defaults to the box centre."""
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy = centre if centre is not None else ((x0 + x1) / 2, (y0 + y1) / 2)
    return ObjFacts(shape, color, size, float(cx), float(cy), float(area), (x0, y0, x1, y1))


# ------------------------------------------------------------------------- hand-built facts
def test_positional_relations_need_disjoint_extents():
    a = obj((10, 40, 30, 60))  # centre (20, 50)
    b = obj((30, 40, 50, 60))  # centre (40, 50): touches a's right edge, no shared column
    assert holds("left_of", a, b) is True and holds("right_of", b, a) is True
    assert holds("right_of", a, b) is False and holds("left_of", b, a) is False
    # same row: centres 0 px apart vertically -> definitely neither above nor below
    assert holds("above", a, b) is False and holds("below", a, b) is False
    # one shared column (a.x1 = 31 > b.x0 = 30): the centres are ordered, the objects overlap
    a1 = obj((10, 40, 31, 60))
    assert holds("left_of", a1, b) is None and holds("right_of", b, a1) is None
    assert holds("right_of", a1, b) is False


def test_side_by_side_is_not_above():
    # The bug this rule fixes: a is 10 px higher than b (centres y 25 vs 35) but beside it;
    # their y extents [10, 40) and [20, 50) overlap, so "a above b" is not a sure fact.
    a = obj((10, 10, 40, 40))
    b = obj((45, 20, 75, 50))
    assert holds("above", a, b) is None and holds("below", b, a) is None
    assert holds("below", a, b) is False
    assert holds("left_of", a, b) is True  # x extents [10, 40) and [45, 75) are disjoint
    # lift a until its extent ends at b's top edge (y1 = 20 <= b.y0 = 20): now above
    a_up = obj((10, -10, 40, 20))
    assert holds("above", a_up, b) is True and holds("below", b, a_up) is True


def test_position_margin_boundary():
    # overlapping x extents; a's centre 4.99 / 5.0 px left of b's
    b = obj((20, 0, 60, 20), centre=(40.0, 10.0))
    near = obj((10, 30, 50, 50), centre=(35.01, 40.0))  # 4.99 px: definitely not left of
    at = obj((10, 30, 50, 50), centre=(35.0, 40.0))  # 5.0 px: no longer "definitely not"
    assert holds("left_of", near, b) is False
    assert holds("left_of", at, b) is None
    # the other side: a's centre right of b's but overlapping -> not left of, not sure right of
    right = obj((30, 30, 70, 50), centre=(50.0, 40.0))
    assert holds("left_of", right, b) is False and holds("right_of", right, b) is None
    # above/below use y the same way
    lo = obj((20, 15, 60, 35), centre=(40.0, 25.0))  # y overlap with b = [15, 20)
    assert holds("below", lo, b) is None and holds("above", lo, b) is False
    assert holds("above", b, lo) is None


def test_attribute_and_size_relations():
    a = obj((0, 0, 10, 10), area=130.0, shape="star", color="blue", size="large")
    b = obj((50, 50, 60, 60), area=100.0, shape="star", color="red", size="large")
    assert holds("same_shape", a, b) is True and holds("same_color", a, b) is False
    assert holds("same_size", a, b) is True
    assert holds("bigger", a, b) is True  # 130 / 100 = 1.3 >= AREA_RATIO
    assert holds("smaller", b, a) is True
    assert holds("smaller", a, b) is False
    mid = dataclasses.replace(a, area=120.0)  # 1.2: neither sure
    same = dataclasses.replace(a, area=105.0)  # 1.05: definitely not bigger
    assert holds("bigger", mid, b) is None and holds("bigger", same, b) is False
    with pytest.raises(ValueError, match="unknown relation"):
        holds("inside", a, b)


@pytest.mark.parametrize(
    "region, centre, want",
    [
        ("left", (50.0, 64.0), True),  # 64 - 50 = 14 > 6
        ("left", (58.5, 64.0), None),  # 5.5 inside the 6 px band
        ("left", (75.0, 64.0), False),  # 11 px on the other side
        ("right", (75.0, 64.0), True),
        ("top", (64.0, 20.0), True),
        ("bottom", (64.0, 20.0), False),
        ("top left", (20.0, 20.0), True),
        ("top left", (20.0, 61.0), None),  # left sure, top within the band
        ("top left", (100.0, 61.0), False),  # right half: False wins over the unsure top
        ("bottom right", (100.0, 100.0), True),
        ("middle", (64.0, 64.0), True),  # central third [42.67, 85.33), 21.3 px inside
        ("middle", (44.0, 64.0), None),  # 1.33 px inside: within band / 2 = 3
        ("middle", (30.0, 64.0), False),  # 12.67 px outside
    ],
)
def test_in_region(region, centre, want):
    o = obj((0, 0, 1, 1), centre=centre)
    assert in_region(region, o, SIZE) is want


def _scene_of(*facts: ObjFacts) -> list[ObjFacts]:
    return list(facts)


def test_extremes_and_their_margins():
    circ = dict(shape="circle", color="red")
    a = obj((10, 10, 30, 30), centre=(20.0, 20.0), area=300.0, **circ)
    b = obj((40, 90, 60, 110), centre=(50.0, 100.0), area=200.0, **circ)
    c = obj((70, 50, 90, 70), centre=(80.0, 60.0), area=100.0, **circ)
    objs = _scene_of(a, b, c)
    head = Filter(shape="circle")

    def pick(extreme, facts=objs, **kw):
        ev = evaluate(Query("spatial", head, extreme=extreme, **kw), facts, SIZE)
        return (sorted(ev.matches), sorted(ev.uncertain))

    assert pick("leftmost") == ([0], [])
    assert pick("rightmost") == ([2], [])
    assert pick("topmost") == ([0], [])
    assert pick("bottommost") == ([1], [])
    assert pick("biggest") == ([0], [])  # 300 / 200 = 1.5 >= 1.3
    assert pick("smallest") == ([2], [])
    # runner-up 5 px away: inside EXTREME_MARGIN -> no sure answer
    b_close = dataclasses.replace(b, cx=25.0)
    assert pick("leftmost", _scene_of(a, b_close, c)) == ([], [0, 1])
    b_far = dataclasses.replace(b, cx=26.0)  # exactly 6 px: sure
    assert pick("leftmost", _scene_of(a, b_far, c)) == ([0], [])
    b_big = dataclasses.replace(b, area=250.0)  # 300 / 250 = 1.2 < 1.3
    assert pick("biggest", _scene_of(a, b_big, c)) == ([], [0, 1])
    # closest to an anchor (a blue star at (30, 30)): a is 14.1 px away, c is 58.3 px
    star = obj((25, 25, 35, 35), shape="star", color="blue")
    q = Query("relational", head, anchor=Filter(shape="star"), extreme="closest")
    ev = evaluate(q, _scene_of(a, b, c, star), SIZE)
    assert sorted(ev.matches) == [0] and not ev.uncertain
    # move a to (72, 52): 47.4 px from the star against c's 58.3 px, a ratio of 1.23 < 1.3
    a_far = dataclasses.replace(a, cx=72.0, cy=52.0)
    d_a, d_c = math.hypot(42.0, 22.0), math.hypot(50.0, 30.0)
    assert 1.2 < d_c / d_a < CLOSEST_RATIO
    ev = evaluate(q, _scene_of(a_far, b, c, star), SIZE)
    assert not ev.matches and ev.uncertain


def test_relations_through_evaluate_exclude_the_anchor():
    sq = obj((60, 60, 80, 80), shape="square", color="green")
    left = obj((10, 60, 30, 80), shape="circle")
    right = obj((100, 60, 120, 80), shape="circle")
    q = Query("relational", Filter(shape="circle"), relation="left_of", anchor=Filter("square"))
    ev = evaluate(q, [sq, left, right], SIZE)
    assert ev.is_exactly({1})
    q = dataclasses.replace(q, relation="right_of")
    assert evaluate(q, [sq, left, right], SIZE).is_exactly({2})


def test_centre_is_the_mask_centroid():
    # An upright triangle 36 px across: its box centre sits about a sixth of its height
    # (0.87 * 36 / 6 = 5.2 px) above the centroid of its pixels.
    m = rs.shape_mask("triangle", 64.0, 64.0, 36.0, SIZE)
    (f,) = rs.facts_from_masks(m[None], ["triangle"], ["red"], ["large"])
    ys, xs = np.nonzero(m)
    assert f.cx == pytest.approx(xs.mean() + 0.5) and f.cy == pytest.approx(ys.mean() + 0.5)
    box_cy = (ys.min() + ys.max() + 1) / 2
    assert 4.0 < f.cy - box_cy < 6.5
    assert f.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert f.area == m.sum()


# ------------------------------------------------------------------------ generated scenes
# Hand-written phrase tables (not the generator's): which words mean which relation/extreme.
REL_PHRASES = {
    "left_of": ("left of",),
    "right_of": ("right of",),
    "above": ("above", "over", "higher than"),
    "below": ("below", "under", "beneath", "lower than"),
}
EXTREME_PHRASES = {
    "leftmost": ("leftmost", "furthest to the left", "far left"),
    "rightmost": ("rightmost", "furthest to the right", "far right"),
    "topmost": ("topmost", "highest", "very top", "closest to the top"),
    "bottommost": ("bottommost", "lowest", "very bottom", "closest to the bottom"),
}
# words of region phrases -> region words
DIRECTION_WORDS = {"left": "left", "right": "right", "top": "top", "upper": "top",
                   "bottom": "bottom", "lower": "bottom", "middle": "middle",
                   "center": "middle", "centre": "middle"}
# relation -> (axis, +1 if the described object comes first along the axis)
AXIS = {"left_of": (0, 1), "right_of": (0, -1), "above": (1, 1), "below": (1, -1)}


@dataclasses.dataclass
class Geo:
    """Geometry of one object re-derived from its visible mask."""

    centre: np.ndarray  # (x, y) mean pixel centre
    lo: np.ndarray  # (x0, y0) first column/row
    hi: np.ndarray  # (x1, y1) last column/row + 1


def geometry(mask: np.ndarray) -> Geo:
    ys, xs = np.nonzero(mask)
    return Geo(
        np.array([xs.mean() + 0.5, ys.mean() + 0.5]),
        np.array([xs.min(), ys.min()], float),
        np.array([xs.max() + 1, ys.max() + 1], float),
    )


def sure_rel(rel: str, a: Geo, b: Geo) -> bool:
    """``a rel b`` for sure: a's extent ends before b's starts along the relation's axis."""
    axis, sign = AXIS[rel]
    first, second = (a, b) if sign > 0 else (b, a)
    return bool(first.hi[axis] <= second.lo[axis])


def sure_not_rel(rel: str, a: Geo, b: Geo) -> bool:
    """``a rel b`` surely false: a's centre is not POS_MARGIN ahead of b's along the axis."""
    axis, sign = AXIS[rel]
    return bool(sign * (b.centre[axis] - a.centre[axis]) < POS_MARGIN)


def sure_in_region(region: str, c: np.ndarray) -> bool:
    if region == "middle":
        return all(min(v - SIZE / 3, 2 * SIZE / 3 - v) > REGION_BAND / 2 for v in c)
    ok = True
    for word in region.split():
        v = c[1] if word in ("top", "bottom") else c[0]
        d = SIZE / 2 - v if word in ("top", "left") else v - SIZE / 2
        ok &= d > REGION_BAND
    return ok


def _attrs_match(f: Filter, fact: ObjFacts) -> bool:
    return all(
        want is None or want == have
        for want, have in ((f.shape, fact.shape), (f.color, fact.color), (f.size, fact.size))
    )


@pytest.fixture(scope="module")
def scenes() -> list[rs.Scene]:
    out = []
    for seed in (0, 5):
        cfg = dataclasses.replace(rs.CONFIGS["tiny"], seed=seed)
        out += [rs.generate_scene(cfg, "train", i) for i in range(70)]
        out += [rs.generate_scene(cfg, "testB", i) for i in range(60)]
        out += [rs.generate_scene(cfg, "testA", i) for i in range(25)]
    return out


def test_stored_facts_are_mask_centroids_and_extents(scenes):
    for s in scenes:
        for f, m in zip(s.facts, s.masks):
            g = geometry(m)
            assert (f.cx, f.cy) == pytest.approx(tuple(g.centre), abs=1e-4), s.image_id
            assert f.box == (*g.lo, *g.hi), s.image_id


def _anchor_index(s: rs.Scene, e) -> int:
    if e.query.ref is not None:
        assert e.refs == (e.query.ref,)
        return e.query.ref
    found = [i for i, f in enumerate(s.facts) if _attrs_match(e.query.anchor, f)]
    assert len(found) == 1, (e.text, found)  # a textual anchor names exactly one object
    return found[0]


def test_positional_relations_from_masks(scenes):
    """'X left of / right of / above / below Y': every target lies wholly on that side of the
    anchor; every other candidate is clearly not; the text says the same relation."""
    seen = {rel: 0 for rel in AXIS}
    single = 0
    for s in scenes:
        geo = [geometry(m) for m in s.masks]
        for e in s.expressions:
            rel = e.query.relation
            if rel not in AXIS:
                continue
            seen[rel] += 1
            single += e.kind == "relational"
            words = f" {e.text} "
            assert any(f" {p} " in words for p in REL_PHRASES[rel]), (e.text, rel)
            opposite = {"left_of": "right_of", "right_of": "left_of", "above": "below",
                        "below": "above"}[rel]
            assert not any(f" {p} " in words for p in REL_PHRASES[opposite]), e.text
            a = _anchor_index(s, e)
            cands = [
                i for i, f in enumerate(s.facts)
                if _attrs_match(e.query.head, f) and i != a
            ]
            for i in cands:
                if i in e.targets:
                    assert sure_rel(rel, geo[i], geo[a]), (s.image_id, e.text, i, a)
                    axis, sign = AXIS[rel]
                    assert sign * (geo[a].centre[axis] - geo[i].centre[axis]) > 0
                else:
                    assert sure_not_rel(rel, geo[i], geo[a]), (s.image_id, e.text, i, a)
            assert set(e.targets) <= set(cands)
    assert min(seen.values()) >= 15 and single >= 40, (seen, single)


def test_spatial_extremes_from_masks(scenes):
    """'the leftmost / topmost ... X': the target's centroid beats every other X's by the
    margin in the direction the text names."""
    n = 0
    key = {"leftmost": (0, 1), "rightmost": (0, -1), "topmost": (1, 1), "bottommost": (1, -1)}
    for s in scenes:
        geo = [geometry(m) for m in s.masks]
        for e in s.expressions:
            ext = e.query.extreme
            if ext not in key:
                continue
            assert any(p in e.text for p in EXTREME_PHRASES[ext]), (e.text, ext)
            axis, sign = key[ext]
            (t,) = e.targets
            others = [
                i for i, f in enumerate(s.facts)
                if _attrs_match(e.query.head, f) and i != t
            ]
            assert others, e.text  # the head alone is ambiguous
            for i in others:
                gap = sign * (geo[i].centre[axis] - geo[t].centre[axis])
                assert gap >= EXTREME_MARGIN, (s.image_id, e.text, t, i, gap)
            n += 1
    assert n >= 30


def test_regions_and_closest_from_masks(scenes):
    n_region = n_closest = 0
    for s in scenes:
        geo = [geometry(m) for m in s.masks]
        for e in s.expressions:
            q = e.query
            if q.region is not None and e.kind in ("spatial", "group"):
                said = {DIRECTION_WORDS[w] for w in e.text.split() if w in DIRECTION_WORDS}
                assert said == set(q.region.split()), (e.text, q.region)
                for t in e.targets:
                    assert sure_in_region(q.region, geo[t].centre), (s.image_id, e.text, t)
                n_region += 1
            if q.extreme == "closest":
                a = _anchor_index(s, e)
                (t,) = e.targets
                dist = {
                    i: float(np.hypot(*(geo[i].centre - geo[a].centre)))
                    for i, f in enumerate(s.facts)
                    if _attrs_match(q.head, f) and i != a
                }
                runner_up = min((d for i, d in dist.items() if i != t), default=math.inf)
                assert runner_up >= CLOSEST_RATIO * dist[t], (s.image_id, e.text)
                n_closest += 1
    assert n_region >= 20 and n_closest >= 15, (n_region, n_closest)


def test_superlatives_from_masks(scenes):
    n = 0
    for s in scenes:
        areas = s.masks.sum(axis=(1, 2)).astype(float)
        for e in s.expressions:
            ext = e.query.extreme
            if ext not in ("biggest", "smallest"):
                continue
            (t,) = e.targets
            for i, f in enumerate(s.facts):
                if i != t and _attrs_match(e.query.head, f):
                    ratio = areas[t] / areas[i] if ext == "biggest" else areas[i] / areas[t]
                    assert ratio >= AREA_RATIO, (s.image_id, e.text)
            n += 1
    assert n >= 30


# ------------------------------------------------------------------------------- grammar
PLURAL_NOUNS = {"circles", "balls", "disks", "squares", "boxes", "blocks", "triangles",
                "diamonds", "rhombuses", "stars", "rings", "donuts", "hoops", "shapes",
                "objects", "things", "items"}


def _check_agreement(text: str, subject_span: tuple[int, int]) -> None:
    words = text.split()
    assert "every other" not in text, text  # reads as "every second"
    if "that is" not in text and "that are" not in text:
        return
    head = words[subject_span[1] - 1]
    plural = head in PLURAL_NOUNS
    if head == "everything" or words[0] == "every":
        plural = False
    verb = "that are" if plural else "that is"
    assert verb in text, (text, head)


def test_plural_agreement_in_rendered_queries():
    queries = [
        Query("hybrid", Filter(), number="all", relation=rel, ref=0)
        for rel in ("left_of", "above", "bigger", "smaller")
    ] + [
        Query("hybrid", Filter(color="red"), number="all", relation="same_shape", ref=0,
              exclude_ref=True),
        Query("group", Filter(shape="square"), number="two", relation="below",
              anchor=Filter(color="blue")),
        Query("group", Filter(shape="ring"), number="all", relation="right_of",
              anchor=Filter(color="blue")),
        Query("relational", Filter(color="red"), relation="above", anchor=Filter("star")),
    ]
    seen = set()
    for q in queries:
        for seed in range(120):
            r = render(q, np.random.default_rng(seed))
            _check_agreement(r.text, r.subject_span)
            seen |= {w for w in ("everything that is", "that are", "that is")
                     if w in r.text}
    assert seen == {"everything that is", "that are", "that is"}


def test_plural_agreement_in_generated_scenes(scenes):
    for s in scenes:
        for e in s.expressions:
            _check_agreement(e.text, e.subject_span)
