"""RefShapes language: structured queries, their semantic evaluator, and text rendering.

Every RefShapes expression is generated from a :class:`Query` (what to pick out) and rendered
to text by :func:`render`. :func:`evaluate` computes which objects of a scene a query denotes,
with a three-valued logic (True, False, None = uncertain); an expression whose evaluation
touches an uncertain object is rejected by the generator. Objects are described by
:class:`ObjFacts`: attributes plus the geometry of the visible mask, whose *centre* is the mask
centroid and whose *extent* is its tight box.

The geometric rules (``a`` is the object described, ``b`` the anchor):

- ``a left of b`` is True when the two visible masks do not overlap along x: ``a.x1 <= b.x0``
  (a's extent ends where b's starts, or earlier); False when a's centre is not at least
  ``POS_MARGIN`` (5 px) left of b's centre; uncertain in between (the centres are ordered but
  the objects overlap along x, e.g. two shapes side by side vertically offset). Right of, above
  and below are the same rule on the other side or on y. Requiring disjoint extents (rather
  than centres a few pixels apart) is what keeps "above" from naming an object that sits
  *beside* the anchor.
- leftmost/rightmost/topmost/bottommost: the centre beats the runner-up's by ``EXTREME_MARGIN``
  (6 px) or the expression is uncertain.
- regions (halves, quadrants, the central third): the centre lies ``REGION_BAND`` (6 px) inside
  the region (3 px for 'middle'), outside by as much for False.
- bigger/smaller, biggest/smallest: a visible-area ratio of at least ``AREA_RATIO`` (1.3); below
  ``AREA_SAME`` (1.05) it is definitely not bigger.
- closest: by distance between centres, at least ``CLOSEST_RATIO`` (1.3) closer than the
  runner-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "star", "ring")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
KINDS = ("attribute", "spatial", "relational", "superlative", "group", "no-target", "hybrid")
MASK_REF = "<mask-ref>"

POS_MARGIN = 5.0  # px: "a left of b" is False when a's centre is not this far left of b's
EXTREME_MARGIN = 6.0  # px: leftmost etc. must beat the runner-up by this much
REGION_BAND = 6.0  # px: centres this close to a region border are uncertain
AREA_RATIO = 1.3  # bigger/biggest need this area ratio; below 1.05 it is definitely not bigger
AREA_SAME = 1.05
CLOSEST_RATIO = 1.3  # the closest object must be this much closer than the runner-up

RELATIONS = ("left_of", "right_of", "above", "below")
REF_RELATIONS = RELATIONS + ("same_color", "same_shape", "same_size", "bigger", "smaller")
REFLEXIVE = frozenset({"same_color", "same_shape", "same_size"})
EXTREMES = ("leftmost", "rightmost", "topmost", "bottommost", "biggest", "smallest", "closest")
REGIONS = (
    "top left",
    "top right",
    "bottom left",
    "bottom right",
    "top",
    "bottom",
    "left",
    "right",
    "middle",
)

NOUNS = {
    "circle": (("circle", "circles"), ("ball", "balls"), ("disk", "disks")),
    "square": (("square", "squares"), ("box", "boxes"), ("block", "blocks")),
    "triangle": (("triangle", "triangles"),),
    "diamond": (("diamond", "diamonds"), ("rhombus", "rhombuses")),
    "star": (("star", "stars"),),
    "ring": (("ring", "rings"), ("donut", "donuts"), ("hoop", "hoops")),
    None: (("shape", "shapes"), ("object", "objects"), ("thing", "things"), ("item", "items")),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
COLOR_WORDS = {c: (c,) for c in COLORS} | {"purple": ("purple", "violet")}
REL_WORDS = {
    "left_of": ("left of", "to the left of", "on the left of"),
    "right_of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over", "higher than"),
    "below": ("below", "under", "beneath", "lower than"),
    "closest": ("closest to", "nearest to", "next to"),
    "bigger": ("bigger than", "larger than"),
    "smaller": ("smaller than",),
}


@dataclass(frozen=True)
class ObjFacts:
    """What the language can say about one object: attributes and visible-mask geometry.

    ``cx, cy``: the centre (the centroid of the visible mask); ``area``: visible pixels;
    ``box``: the visible mask's extent, its tight ``(x0, y0, x1, y1)`` box (x1 = last column + 1).
    """

    shape: str
    color: str
    size: str
    cx: float
    cy: float
    area: float
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class Filter:
    """A conjunction of attributes (None = unconstrained)."""

    shape: str | None = None
    color: str | None = None
    size: str | None = None

    def matches(self, o: ObjFacts) -> bool:
        return (
            (self.shape is None or o.shape == self.shape)
            and (self.color is None or o.color == self.color)
            and (self.size is None or o.size == self.size)
        )

    @property
    def num_attributes(self) -> int:
        return sum(a is not None for a in (self.shape, self.color, self.size))


@dataclass(frozen=True)
class Query:
    """A structured referring query.

    ``head`` filters candidates; ``relation`` (with a textual ``anchor`` or the object index
    ``ref`` shown as ``<mask-ref>``) and ``region`` filter further; ``extreme`` then picks the
    single best candidate. ``number`` is the grammatical number: 'one', 'all', 'two', 'three'.
    ``exclude_ref`` ("other shapes ...") removes the reference even for reflexive relations.
    """

    kind: str
    head: Filter
    number: str = "one"
    relation: str | None = None
    anchor: Filter | None = None
    ref: int | None = None
    region: str | None = None
    extreme: str | None = None
    exclude_ref: bool = False


@dataclass(frozen=True)
class Evaluation:
    """Result of :func:`evaluate`: definite matches, uncertain objects, and validity."""

    matches: frozenset[int] = field(default_factory=frozenset)
    uncertain: frozenset[int] = field(default_factory=frozenset)
    valid: bool = True

    def is_exactly(self, intended: set[int] | frozenset[int]) -> bool:
        return self.valid and not self.uncertain and self.matches == frozenset(intended)


def _tri_gt(d: float, margin: float) -> bool | None:
    """Three-valued ``d > 0``: True above ``margin``, False below ``-margin``, else None."""
    if d > margin:
        return True
    if d < -margin:
        return False
    return None


def _before(first: ObjFacts, second: ObjFacts, axis: int) -> bool | None:
    """Three-valued "``first`` lies before ``second`` along ``axis``" (0: x, 1: y).

    True: the extents are disjoint (``first``'s ends where ``second``'s starts, or earlier).
    False: ``first``'s centre is not ``POS_MARGIN`` before ``second``'s. Else uncertain.
    """
    if first.box[axis + 2] <= second.box[axis]:
        return True
    c1, c2 = (first.cx, second.cx) if axis == 0 else (first.cy, second.cy)
    return False if c2 - c1 < POS_MARGIN else None


def relation_holds(rel: str, a: ObjFacts, b: ObjFacts) -> bool | None:
    """Three-valued truth of ``a rel b`` (see the module docstring for the rules)."""
    if rel == "left_of":
        return _before(a, b, 0)
    if rel == "right_of":
        return _before(b, a, 0)
    if rel == "above":
        return _before(a, b, 1)
    if rel == "below":
        return _before(b, a, 1)
    if rel == "same_color":
        return a.color == b.color
    if rel == "same_shape":
        return a.shape == b.shape
    if rel == "same_size":
        return a.size == b.size
    if rel in ("bigger", "smaller"):
        big, small = (a, b) if rel == "bigger" else (b, a)  # "a smaller b" = "b bigger a"
        r = big.area / max(small.area, 1.0)
        return True if r >= AREA_RATIO else (False if r <= AREA_SAME else None)
    raise ValueError(f"unknown relation {rel!r}")


def in_region(region: str, o: ObjFacts, size: int) -> bool | None:
    """Three-valued region membership: halves, quadrants, or the central third ('middle')."""
    h = size / 2.0
    parts = []
    if region == "middle":
        lo, hi = size / 3.0, 2 * size / 3.0
        for c in (o.cx, o.cy):
            parts.append(_tri_gt(min(c - lo, hi - c), REGION_BAND / 2))
    else:
        for word in region.split():
            c = o.cy if word in ("top", "bottom") else o.cx
            d = h - c if word in ("top", "left") else c - h
            parts.append(_tri_gt(d, REGION_BAND))
    return _and(parts)


def _and(values) -> bool | None:
    values = list(values)
    if any(v is False for v in values):
        return False
    if any(v is None for v in values):
        return None
    return True


def _extreme_score(extreme: str, o: ObjFacts, anchor: ObjFacts | None) -> float:
    return {
        "leftmost": lambda: -o.cx,
        "rightmost": lambda: o.cx,
        "topmost": lambda: -o.cy,
        "bottommost": lambda: o.cy,
        "biggest": lambda: np.log(max(o.area, 1.0)),
        "smallest": lambda: -np.log(max(o.area, 1.0)),
        "closest": lambda: -np.log(max(np.hypot(o.cx - anchor.cx, o.cy - anchor.cy), 1.0)),
    }[extreme]()


def _extreme_margin(extreme: str) -> float:
    if extreme in ("biggest", "smallest"):
        return float(np.log(AREA_RATIO))
    if extreme == "closest":
        return float(np.log(CLOSEST_RATIO))
    return EXTREME_MARGIN


def resolve_anchor(q: Query, objs: list[ObjFacts]) -> int | None:
    """Object index of the query's anchor: the mask-ref, or the unique match of ``anchor``."""
    if q.ref is not None:
        return q.ref
    if q.anchor is None:
        return None
    found = [i for i, o in enumerate(objs) if q.anchor.matches(o)]
    return found[0] if len(found) == 1 else -1


def evaluate(q: Query, objs: list[ObjFacts], size: int = 128) -> Evaluation:
    """The set of objects that ``q`` denotes in a scene (three-valued; see module doc)."""
    anchor = resolve_anchor(q, objs)
    if anchor == -1:  # a textual anchor must denote exactly one object
        return Evaluation(valid=False)
    keep_anchor = q.relation in REFLEXIVE and not q.exclude_ref
    sure, unsure = set(), set()
    for i, o in enumerate(objs):
        if not q.head.matches(o) or (anchor is not None and i == anchor and not keep_anchor):
            continue
        truth = []
        if q.relation is not None:
            truth.append(relation_holds(q.relation, o, objs[anchor]))
        if q.region is not None:
            truth.append(in_region(q.region, o, size))
        t = _and(truth)
        if t is True:
            sure.add(i)
        elif t is None:
            unsure.add(i)
    if q.extreme is None or not sure:
        return Evaluation(frozenset(sure), frozenset(unsure))
    if unsure:  # cannot tell which candidate is the extreme one
        return Evaluation(frozenset(), frozenset(sure | unsure))
    anchor_facts = objs[anchor] if anchor is not None else None
    ranked = sorted(sure, key=lambda i: -_extreme_score(q.extreme, objs[i], anchor_facts))
    if len(ranked) > 1:
        gap = _extreme_score(q.extreme, objs[ranked[0]], anchor_facts) - _extreme_score(
            q.extreme, objs[ranked[1]], anchor_facts
        )
        if gap < _extreme_margin(q.extreme):
            return Evaluation(frozenset(), frozenset(ranked[:2]))
    return Evaluation(frozenset(ranked[:1]))


# ----------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Rendered:
    """Expression text plus the [start, end) word spans of subject and relation object."""

    text: str
    subject_span: tuple[int, int]
    object_span: tuple[int, int]


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def noun_phrase(
    f: Filter, rng: np.random.Generator, plural: bool = False, extra: tuple[str, ...] = ()
) -> list[str]:
    """Adjectives (size, colour) and a head noun (a shape synonym or 'shape/object/...')."""
    words = list(extra)
    if f.size is not None:
        words.append(_pick(rng, SIZE_WORDS[f.size]))
    if f.color is not None:
        words.append(_pick(rng, COLOR_WORDS[f.color]))
    words.append(_pick(rng, NOUNS[f.shape])[1 if plural else 0])
    return words


class _Builder:
    """Accumulates words and records the spans of tagged segments."""

    def __init__(self):
        self.words: list[str] = []
        self.spans: dict[str, tuple[int, int]] = {}

    def add(self, words, tag: str | None = None) -> _Builder:
        if isinstance(words, str):
            words = words.split()
        start = len(self.words)
        self.words.extend(words)
        if tag is not None:
            self.spans[tag] = (start, len(self.words))
        return self

    def done(self) -> Rendered:
        no = (-1, -1)
        return Rendered(" ".join(self.words), self.spans.get("subj", no), self.spans.get("obj", no))


_REGION_PHRASES = {
    "top left": ("in the top left", "in the top left corner", "at the top left"),
    "top right": ("in the top right", "in the top right corner", "at the top right"),
    "bottom left": ("in the bottom left", "in the bottom left corner", "at the bottom left"),
    "bottom right": ("in the bottom right", "in the bottom right corner", "at the bottom right"),
    "top": ("at the top", "in the upper half", "near the top"),
    "bottom": ("at the bottom", "in the lower half", "near the bottom"),
    "left": ("on the left", "on the left side", "in the left half"),
    "right": ("on the right", "on the right side", "in the right half"),
    "middle": ("in the middle", "in the center", "in the centre"),
}
_EXTREME_PREFIX = {
    "leftmost": ("leftmost",),
    "rightmost": ("rightmost",),
    "topmost": ("topmost", "highest"),
    "bottommost": ("bottommost", "lowest"),
    "biggest": ("biggest", "largest"),
    "smallest": ("smallest", "tiniest"),
}
_EXTREME_SUFFIX = {
    "leftmost": ("furthest to the left", "on the far left"),
    "rightmost": ("furthest to the right", "on the far right"),
    "topmost": ("at the very top", "closest to the top"),
    "bottommost": ("at the very bottom", "closest to the bottom"),
    "biggest": ("that is biggest",),
    "smallest": ("that is smallest",),
}
_REF_PHRASES = {
    "same_color": ("with the same color as", "of the same color as", "colored like"),
    "same_shape": ("with the same shape as", "of the same type as", "shaped like"),
    "same_size": ("with the same size as", "of the same size as"),
}


def _relation_words(rel: str, rng: np.random.Generator) -> str:
    return _pick(rng, REL_WORDS.get(rel) or _REF_PHRASES[rel])


def render(q: Query, rng: np.random.Generator) -> Rendered:
    """Text for a query, choosing among templates and synonyms with ``rng``."""
    b = _Builder()
    plural = q.number != "one"
    # Determiner / quantifier.
    if q.number == "one":
        det = _pick(rng, ("the", "the", ""))
    elif q.number in ("two", "three"):
        det = _pick(rng, ("the " + q.number, "both") if q.number == "two" else ("the three",))
    elif q.exclude_ref:  # not "every other shape ...", which reads as "every second shape"
        det = _pick(rng, ("all", ""))
    else:
        det = _pick(
            rng, ("all", "all the", "every", "") if q.kind != "hybrid" else ("all", "", "every")
        )
        if det == "every":
            plural = False  # "every square that is ..."
    generic_everything = (
        q.kind == "hybrid"
        and q.head == Filter()
        and q.number == "all"
        and not q.exclude_ref
        and rng.random() < 0.3
    )
    if generic_everything:
        plural = False  # "everything that is ...", singular agreement
        b.add("everything", "subj")
    else:
        b.add(det)
        extra: tuple[str, ...] = ()
        suffix = None
        if q.exclude_ref:
            extra = ("other",)
        if q.extreme in _EXTREME_PREFIX:
            if rng.random() < 0.7 or plural:
                extra = extra + (_pick(rng, _EXTREME_PREFIX[q.extreme]),)
            else:
                suffix = _pick(rng, _EXTREME_SUFFIX[q.extreme])
        b.add(noun_phrase(q.head, rng, plural, extra), "subj")
        if suffix:
            b.add(suffix)
    if q.region is not None:
        b.add(_pick(rng, _REGION_PHRASES[q.region]))
    if q.extreme == "closest":
        b.add(_relation_words("closest", rng))
    elif q.relation is not None:
        if rng.random() < 0.25 and q.relation in REL_WORDS:
            b.add("that is" if not plural else "that are")
        b.add(_relation_words(q.relation, rng))
    if q.ref is not None:
        b.add(MASK_REF, "obj")
    elif q.anchor is not None:
        b.add("the")
        b.add(noun_phrase(q.anchor, rng), "obj")
    return b.done()
