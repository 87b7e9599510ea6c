"""RefShapes expressions: sampling verified referring expressions and captions for a scene.

For each expression kind of spec/refshapes.md (attribute, spatial, relational, superlative,
group, no-target, hybrid) a maker samples a :class:`~refjax.data.refshapes_lang.Query` and the
targets it intends; :func:`make_expressions` keeps it only if the evaluator of
:mod:`refjax.data.refshapes_lang` denotes exactly those targets with no uncertain object, and
renders it to text with that module's templates. :func:`make_caption` lists a scene's objects
in reading order. Objects are seen only through their :class:`ObjFacts`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from refjax.data.refshapes_lang import (
    REF_RELATIONS,
    REFLEXIVE,
    REGIONS,
    RELATIONS,
    Filter,
    ObjFacts,
    Query,
    evaluate,
    in_region,
    relation_holds,
    render,
)


@dataclass
class Expression:
    """One verified referring expression; ``query`` is the structure it was rendered from.

    ``text`` is the rendered expression; ``raw`` the same text as stored in the ``raw`` field of
    the record scheme (RefShapes text is already lower-case words, so the two are equal).
    """

    id: str
    text: str
    kind: str
    targets: tuple[int, ...]
    refs: tuple[int, ...]
    subject_span: tuple[int, int]
    object_span: tuple[int, int]
    query: Query

    @property
    def raw(self) -> str:
        return self.text


def all_filters(o: ObjFacts) -> list[Filter]:
    """The 8 conjunctions of ``o``'s attributes (from none to shape+color+size)."""
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


def matching(f: Filter, objs: list[ObjFacts]) -> list[int]:
    """Indices of the objects that ``f`` matches."""
    return [i for i, o in enumerate(objs) if f.matches(o)]


def _unique_filter(rng, objs, t: int, redundant_p: float = 0.0) -> Filter | None:
    """A fewest-attribute description of object ``t`` (sometimes with a redundant attribute)."""
    unique = [f for f in all_filters(objs[t]) if matching(f, objs) == [t]]
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
        for f in all_filters(objs[t])
        if len(matching(f, objs)) >= 2 and (allow_size or f.size is None)
    ]


def _choice(rng, seq):
    return seq[int(rng.integers(len(seq)))] if seq else None


def _distance(a: ObjFacts, b: ObjFacts) -> float:
    """Distance between the two objects' centres (mask centroids)."""
    return float(np.hypot(a.cx - b.cx, a.cy - b.cy))


def _q_attribute(rng, objs, size):
    t = int(rng.integers(len(objs)))
    f = _unique_filter(rng, objs, t, redundant_p=0.25)
    return None if f is None else (Query("attribute", f), {t}, ())


def _q_spatial(rng, objs, size):
    t = int(rng.integers(len(objs)))
    head = _choice(rng, _ambiguous_heads(objs, t))
    if head is None:
        return None
    group = matching(head, objs)
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
        cands = [i for i in matching(head, objs) if i != a]
        if len(cands) < 2:
            return None
        d = [_distance(objs[i], objs[a]) for i in cands]
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
    group = matching(head, objs)
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
    head = _choice(rng, all_filters(o))
    mode = rng.random()
    if mode < 0.45 and head.num_attributes > 0:
        members = set(matching(head, objs))
        q = Query("group", head)
    elif mode < 0.8:
        a, af = _anchor(rng, objs, -1)
        if af is None:
            return None
        rel = _choice(rng, RELATIONS)
        truth = {i: relation_holds(rel, objs[i], objs[a]) for i in matching(head, objs) if i != a}
        members = {i for i, v in truth.items() if v is True}
        q = Query("group", head, relation=rel, anchor=af)
    else:
        region = _choice(rng, REGIONS)
        members = {i for i in matching(head, objs) if in_region(region, objs[i], size) is True}
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
        return (Query("no-target", f), set(), ()) if not matching(f, objs) else None
    t = int(rng.integers(len(objs)))
    head = _choice(rng, [f for f in all_filters(objs[t]) if f.num_attributes > 0])
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
        cands = [i for i in matching(head, objs) if i != r]
        if not cands:
            return None
        d = [_distance(objs[i], objs[r]) for i in cands]
        q = Query("hybrid", head, ref=r, extreme="closest")
        return q, {cands[int(np.argmin(d))]}, (r,)
    exclude = rel in REFLEXIVE and rng.random() < 0.4
    keep_ref = rel in REFLEXIVE and not exclude
    truth = {
        i: relation_holds(rel, objs[i], objs[r])
        for i in matching(head, objs)
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


MAKERS = {
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


def make_expressions(
    rng: np.random.Generator,
    image_id: str,
    objs: list[ObjFacts],
    kinds: tuple[str, ...],
    count: int,
    size: int,
) -> list[Expression]:
    """Up to ``count`` distinct verified expressions spread over ``kinds`` (ids ``<image>-eN``)."""
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
            made = MAKERS[kind](rng, objs, size)
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
                    f"{image_id}-e{len(out)}",
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


def make_caption(rng, facts: list[ObjFacts]) -> str:
    """'a large red circle, a small blue square and a green triangle.' in reading order.

    Reading order: rows of objects whose centres lie within 16 px (vertically) of the row's
    first object, top to bottom; left to right within a row.
    """
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
