"""RAS / GRES metrics (spec/ras.md 9, 8.4, 14): hand-worked GRES cases, a direct numpy
computation, the pool oracle, the two-process reduction, the RES headline and the geometry."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from refjax.boxes import Letterbox
from refjax.data.transforms import KINDS
from refjax.evaluate import gres
from refjax.evaluate.gres import (
    Expand2Square,
    GresAccumulator,
    gres_per_sample,
    oracle_per_sample,
    original_resolution_stats,
    res_headline,
    selected_union,
)

H, W = 4, 10


def _mask(*cells: tuple[int, int]) -> np.ndarray:
    m = np.zeros((H, W), bool)
    for y, x in cells:
        m[y, x] = True
    return m


def _row(y: int, x0: int, x1: int) -> np.ndarray:
    """Row ``y``, columns [x0, x1)."""
    m = np.zeros((H, W), bool)
    m[y, x0:x1] = True
    return m


def _hand_cases():
    """Seven samples; per sample (pool (N,H,W), selected (N,), gt (H,W), kind)."""
    empty = np.zeros((H, W), bool)
    cases = [
        # a: targeted, predicted exactly: I=4, U=4, IoU 1
        (np.stack([_row(0, 0, 4)]), [1], _row(0, 0, 4), "group"),
        # b: targeted, nothing selected ("no target"): I=0, U=|M|=3
        (np.stack([_row(1, 0, 3)]), [0], _row(1, 0, 3), "group"),
        # c: no-target, predicted empty: I=U=0, term 1
        (np.stack([_row(2, 0, 5)]), [0], empty, "no-target"),
        # d: no-target, predicted 2 pixels: I=0, U=|P|=2, term 0
        (np.stack([_row(3, 0, 2), _row(3, 5, 9)]), [1, 0], empty, "no-target"),
        # e: targeted, the only selected candidate has no pixels -> empty: I=0, U=|M|=5
        (np.stack([empty, _row(0, 0, 5)]), [1, 0], _row(0, 0, 5), "group"),
        # f: targeted, 3 of 4 target pixels plus 1 outside: I=3, U=5, IoU 0.6
        (np.stack([_row(1, 0, 3), _mask((2, 9))]), [1, 1], _row(1, 0, 4), "spatial"),
        # g: targeted, IoU exactly 0.7 (>= counts for Pr@0.7): I=7, U=10
        (np.stack([_row(2, 0, 7)]), [1], _row(2, 0, 10), "spatial"),
    ]
    return cases


# Hand-worked totals of _hand_cases.
HAND_I = 4 + 0 + 0 + 0 + 0 + 3 + 7
HAND_U = 4 + 3 + 0 + 2 + 5 + 5 + 10
HAND_GIOU = (1 + 0 + 1 + 0 + 0 + 0.6 + 0.7) / 7


def _hand_rows(xp=np):
    cases = _hand_cases()
    n_max = 2
    pools = np.zeros((len(cases), n_max, H, W), bool)
    sel = np.zeros((len(cases), n_max), bool)
    valid_pool = np.zeros((len(cases), n_max), np.int32)
    for i, (p, s, _, _) in enumerate(cases):
        pools[i, : len(p)] = p
        sel[i, : len(s)] = s
        valid_pool[i, : len(p)] = 1
    gt = np.stack([c[2] for c in cases])
    kinds = np.array([KINDS.index(c[3]) for c in cases], np.int32)
    num_targets = np.array([int(c[2].any()) for c in cases], np.int32)
    return pools, sel, valid_pool, gt, kinds, num_targets


@pytest.mark.parametrize("xp", [np, jnp], ids=["numpy", "jax"])
def test_hand_worked_gres_examples(xp):
    pools, sel, valid_pool, gt, kinds, num_targets = _hand_rows()

    def per_sample(pools, sel, valid_pool, gt, num_targets):
        pred = selected_union(pools, sel, valid_pool)
        return gres_per_sample(pred, gt, num_targets > 0)

    if xp is jnp:
        terms = jax.jit(per_sample)(*map(jnp.asarray, (pools, sel, valid_pool, gt, num_targets)))
        terms = {k: np.asarray(v) for k, v in terms.items()}
    else:
        terms = per_sample(pools, sel, valid_pool, gt, num_targets)
    np.testing.assert_array_equal(terms["inter"], [4, 0, 0, 0, 0, 3, 7])
    np.testing.assert_array_equal(terms["union"], [4, 3, 0, 2, 5, 5, 10])
    np.testing.assert_array_equal(terms["pred_area"], [4, 0, 0, 2, 0, 4, 7])
    np.testing.assert_allclose(terms["iou"], [1, 0, 1, 0, 0, 0.6, 0.7], rtol=1e-6)

    acc = GresAccumulator()
    # Padding rows (valid=0) must not count: append two junk rows.
    rows = {k: np.concatenate([v, v[:2]]) for k, v in terms.items() if k != "iou"}
    rows["valid"] = np.array([1] * 7 + [0, 0])
    rows["kind"] = np.concatenate([kinds, kinds[:2]])
    acc.update(rows)
    r = acc.result()
    assert r["count"] == 7
    assert r["ciou"] == pytest.approx(HAND_I / HAND_U, rel=1e-12)  # 14 / 29
    assert r["giou"] == pytest.approx(HAND_GIOU, rel=1e-12)
    assert r["n_acc"] == pytest.approx(1 / 2)  # c right, d wrong
    assert r["t_acc"] == pytest.approx(3 / 5)  # a, f, g non-empty; b, e empty
    assert r["pr@0.7"] == pytest.approx(2 / 5)  # a (1.0) and g (exactly 0.7)
    assert r["pr@0.8"] == pytest.approx(1 / 5) and r["pr@0.9"] == pytest.approx(1 / 5)
    assert r["no_target_count"] == 2
    assert "miou" not in r and "oracle_ciou" not in r
    # Per kind: the no-target group has N-acc and cIoU (I = 0, U = 2) but no T-acc / Pr.
    assert r["no-target/count"] == 2 and r["no-target/n_acc"] == pytest.approx(0.5)
    assert r["no-target/giou"] == pytest.approx(0.5) and r["no-target/ciou"] == 0.0
    assert "no-target/t_acc" not in r and "no-target/pr@0.7" not in r
    # Targeted-only groups: N-acc undefined (absent); RES names equal gIoU / cIoU.
    assert "group/n_acc" not in r and "spatial/n_acc" not in r
    assert r["spatial/ciou"] == pytest.approx(10 / 15) and r["spatial/oiou"] == r["spatial/ciou"]
    assert r["spatial/giou"] == pytest.approx(0.65) and r["spatial/miou"] == r["spatial/giou"]
    assert r["group/giou"] == pytest.approx(1 / 3) and r["group/t_acc"] == pytest.approx(1 / 3)
    assert not any(k.startswith(("attribute/", "with_ref/")) for k in r)


def test_mask_rows_equal_term_rows_and_no_target_only_split():
    pools, sel, valid_pool, gt, kinds, num_targets = _hand_rows()
    a = GresAccumulator()
    a.update(
        {
            "selected": sel,
            "pool_masks": pools,
            "pool_valid": valid_pool,
            "gt_mask": gt,
            "num_targets": num_targets,
            "kind": kinds,
            "valid": np.ones(len(gt), np.int32),
        }
    )
    r = a.result()
    assert r["ciou"] == pytest.approx(HAND_I / HAND_U) and r["giou"] == pytest.approx(HAND_GIOU)
    assert "oracle_ciou" in r  # pools given: the oracle comes along

    # A split of only no-target samples, all predicted empty: cIoU and T-acc are undefined.
    b = GresAccumulator()
    b.update(
        {
            "pred_mask": np.zeros((3, H, W), bool),
            "gt_mask": np.zeros((3, H, W), bool),
            "valid": np.ones(3),
        }
    )
    r = b.result()
    assert r == {"count": 3.0, "giou": 1.0, "n_acc": 1.0, "no_target_count": 3.0}


def _direct(pred, gt, targeted):
    """The spec 9 definitions written out sample by sample (the reference)."""
    inter = np.array([np.logical_and(p, g).sum() for p, g in zip(pred, gt)], np.float64)
    union = np.array([np.logical_or(p, g).sum() for p, g in zip(pred, gt)], np.float64)
    empty = np.array([not p.any() for p in pred])
    ious = []
    for i, u, t, e in zip(inter, union, targeted, empty):
        ious.append((i / u if u else 0.0) if t else float(e))
    ious = np.array(ious)
    out = {"count": len(pred), "giou": ious.mean()}
    if union.sum():
        out["ciou"] = inter.sum() / union.sum()
    if (~targeted).any():
        out["n_acc"] = empty[~targeted].mean()
    if targeted.any():
        out["t_acc"] = (~empty[targeted]).mean()
        for thr in (0.7, 0.8, 0.9):
            out[f"pr@{thr}"] = (ious[targeted] >= thr).mean()
    return out


def test_random_cases_against_direct_numpy():
    rng = np.random.default_rng(0)
    b, n, s = 48, 6, 12
    pools = rng.random((b, n, s, s)) < rng.uniform(0.0, 0.3, (b, n, 1, 1))
    pools[:, 0] = False  # an empty candidate in every pool
    sel = rng.random((b, n)) < 0.3
    valid_pool = (rng.random((b, n)) < 0.9).astype(np.int32)
    targeted = rng.random(b) < 0.7
    gt = (rng.random((b, s, s)) < 0.3) & targeted[:, None, None]
    kinds = rng.integers(0, 4, b)
    has_ref = rng.random(b) < 0.5
    valid = rng.random(b) < 0.9
    pred = selected_union(pools, sel, valid_pool)

    acc = GresAccumulator()
    for lo in range(0, b, 16):  # three batches
        sl = slice(lo, lo + 16)
        t = gres_per_sample(pred[sl], gt[sl], targeted[sl])
        rows = {k: v for k, v in t.items() if k != "iou"}
        rows.update(kind=kinds[sl], has_ref=has_ref[sl], valid=valid[sl])
        acc.update(rows)
    r = acc.result()
    groups = {"": np.ones(b, bool), "with_ref/": has_ref, "without_ref/": ~has_ref,
              "targeted/": targeted}
    groups.update({f"{KINDS[k]}/": kinds == k for k in range(4)})
    for prefix, g in groups.items():
        sel_g = g & valid
        want = _direct(pred[sel_g], gt[sel_g], targeted[sel_g])
        for key, value in want.items():
            assert r[prefix + key] == pytest.approx(value, rel=1e-12, abs=0), prefix + key
    assert r["no_target_count"] == (~targeted & valid).sum() > 0
    # the targeted group has no no-target samples, so it carries the RES names
    assert r["targeted/miou"] == r["targeted/giou"] and "n_acc" not in {
        k.split("/", 1)[1] for k in r if k.startswith("targeted/")}


def _scene(seed: int, s: int = 16):
    """Three disjoint-ish objects on an s x s image and a few unrelated masks."""
    rng = np.random.default_rng(seed)
    objs = []
    for _ in range(3):
        m = np.zeros((s, s), bool)
        y, x = rng.integers(0, s - 5, 2)
        m[y : y + rng.integers(3, 6), x : x + rng.integers(3, 6)] = True
        objs.append(m)
    return np.stack(objs)


def test_oracle_gt_pool_is_one_and_imperfect_pool_below():
    rng = np.random.default_rng(1)
    acc_gt, acc_bad = GresAccumulator(), GresAccumulator()
    for seed in range(6):
        objs = _scene(seed)
        target_ids = [0, 2] if seed % 2 else [1]
        target = objs[target_ids].any(0)
        # GT pool: every object, shuffled, plus the whole image and a non-target object.
        perm = rng.permutation(len(objs))
        pool = np.concatenate([objs[perm], np.ones((1, *target.shape), bool)])
        o = oracle_per_sample(pool, target)
        assert o["oracle_inter"] == o["oracle_union"] == target.sum()
        chosen = set(np.flatnonzero(o["oracle_selected"]).tolist())
        assert chosen <= {int(np.flatnonzero(perm == t)[0]) for t in target_ids}
        # Imperfect pool: each target eroded on one side and grown on another.
        bad = np.stack([np.roll(objs[t], 1, axis=1) for t in range(len(objs))])
        ob = oracle_per_sample(bad, target)
        sel = ob["oracle_selected"]
        pred = bad[sel].any(0) if sel.any() else np.zeros_like(target)
        # The oracle's I/U are those of its selection, and no subset of the pool does better.
        assert ob["oracle_inter"] == (pred & target).sum()
        assert ob["oracle_union"] == (pred | target).sum()
        best = max(
            ((bad[list(c)].any(0) & target).sum() / (bad[list(c)].any(0) | target).sum())
            for k in range(1, len(bad) + 1)
            for c in itertools.combinations(range(len(bad)), k)
        )
        assert ob["oracle_inter"] / ob["oracle_union"] <= best + 1e-12
        for acc, o_ in ((acc_gt, o), (acc_bad, ob)):
            acc.update(
                {
                    "inter": np.zeros(1),
                    "union": np.array([float(target.sum())]),
                    "pred_area": np.zeros(1),
                    "has_target": np.ones(1, bool),
                    "oracle_inter": np.array([o_["oracle_inter"]]),
                    "oracle_union": np.array([o_["oracle_union"]]),
                    "valid": np.ones(1),
                }
            )
    assert acc_gt.result()["oracle_ciou"] == 1.0
    assert 0.3 < acc_bad.result()["oracle_ciou"] < 1.0
    # A no-target sample: nothing selected, I = U = 0.
    o = oracle_per_sample(_scene(0), np.zeros((16, 16), bool))
    assert o["oracle_inter"] == o["oracle_union"] == 0 and not o["oracle_selected"].any()
    # pool_valid: padded candidates are never selected.
    objs = _scene(3)
    o = oracle_per_sample(objs, objs[1], pool_valid=np.array([1, 0, 1]))
    assert not o["oracle_selected"][1]


def _process_rows(seed: int, n: int, kind: str, scale: int):
    rng = np.random.default_rng(seed)
    inter = rng.integers(0, 50, n).astype(np.float64) * scale
    union = inter + rng.integers(1, 50, n) * scale
    return {
        "inter": inter,
        "union": union,
        "pred_area": inter + 1,
        "has_target": np.ones(n, bool),
        "kind": np.full(n, KINDS.index(kind)),
        "valid": np.ones(n),
    }


def test_two_process_reduction_sums_not_means(monkeypatch):
    from jax.experimental import multihost_utils

    rows_a = _process_rows(0, 5, "spatial", scale=1)
    rows_b = _process_rows(1, 9, "attribute", scale=1000)  # big unions: cIoU_b dominates
    a, b = GresAccumulator(), GresAccumulator()
    a.update(rows_a)
    b.update(rows_b)

    sent_by_b = []

    def record(x):
        sent_by_b.append(np.asarray(x))
        return np.asarray(x)[None]

    monkeypatch.setattr(multihost_utils, "process_allgather", record)
    b.allreduce()  # what process 1 contributes, call by call

    def gather(x):
        return np.stack([np.asarray(x), sent_by_b.pop(0)])

    monkeypatch.setattr(multihost_utils, "process_allgather", gather)
    r = a.allreduce().result()
    assert not sent_by_b

    both = GresAccumulator()
    both.update(rows_a)
    both.update(rows_b)
    want = both.result()
    assert r.keys() == want.keys()
    for k in want:
        assert r[k] == pytest.approx(want[k], rel=1e-12), k
    assert r["count"] == 14 and r["spatial/count"] == 5 and r["attribute/count"] == 9
    ciou = (rows_a["inter"].sum() + rows_b["inter"].sum()) / (
        rows_a["union"].sum() + rows_b["union"].sum()
    )
    assert r["ciou"] == pytest.approx(ciou, rel=1e-12)
    mean_of_processes = (a.result()["ciou"] + b.result()["ciou"]) / 2
    assert abs(r["ciou"] - mean_of_processes) > 1e-3  # a mean over processes would fail here
    # Different groups on the two processes are refused.
    c = GresAccumulator(kinds=("other", "x"))
    sent_by_b.clear()
    monkeypatch.setattr(multihost_utils, "process_allgather", record)
    c.allreduce()
    monkeypatch.setattr(multihost_utils, "process_allgather", gather)
    with pytest.raises(ValueError, match="different metric groups"):
        a.allreduce()


def test_single_process_allreduce_keeps_pixel_sums():
    a = GresAccumulator()
    big = 123_456_789.0  # not representable in float32
    a.update(
        {
            "inter": np.array([big]),
            "union": np.array([big + 3]),
            "pred_area": np.array([big]),
            "has_target": np.ones(1, bool),
            "valid": np.ones(1),
        }
    )
    r = a.allreduce()
    counts = [i for i, f in enumerate(gres.FIELDS) if f != "iou_sum"]
    np.testing.assert_array_equal(r.sums[:, counts], a.sums[:, counts])  # integers: exact
    assert r.sums[0, gres.FIELDS.index("union")] == big + 3
    np.testing.assert_allclose(r.sums, a.sums, rtol=1e-14, atol=0)  # iou_sum: hi/lo float32


def test_res_headline_psalm_eight_splits():
    psalm = {
        "refcoco/val": 83.6,
        "refcoco/testA": 84.7,
        "refcoco/testB": 81.6,
        "refcoco+/val": 72.9,
        "refcoco+/testA": 75.5,
        "refcoco+/testB": 70.1,
        "refcocog/val": 73.8,
        "refcocog/test": 74.4,
    }
    assert res_headline(psalm) == pytest.approx(77.075, abs=1e-9)
    assert round(res_headline(psalm), 1) == 77.1  # the project page's PSALM figure
    val_only = np.mean([psalm[s] for s in gres.RES_SPLITS if s.endswith("/val")])
    assert round(val_only, 1) == 76.8  # the alternative reading the spec rules out
    with pytest.raises(KeyError, match="refcocog/test"):
        res_headline({k: v for k, v in psalm.items() if k != "refcocog/test"})


# ----------------------------------------------------------------------------- geometry
def _llava_expand2square_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """LLaVA's expand2square on a mask image, then a PIL NEAREST resize (the reference)."""
    im = Image.fromarray(mask.astype(np.uint8) * 255)
    w, h = im.size
    side = max(w, h)
    sq = Image.new("L", (side, side), 0)
    sq.paste(im, ((side - w) // 2, (side - h) // 2))
    return np.asarray(sq.resize((size, size), Image.NEAREST)) > 0


@pytest.mark.parametrize("w,h,size", [(641, 480, 336), (37, 53, 64), (50, 31, 24), (20, 20, 32)])
def test_expand2square_matches_llava_and_inverts(w, h, size):
    rng = np.random.default_rng(w * h)
    m = np.zeros((h, w), bool)
    for _ in range(4):
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
        m[y : y + rng.integers(3, h // 2), x : x + rng.integers(3, w // 2)] = True
    geo = Expand2Square(w, h, size)
    canvas = geo.forward_mask(m)
    np.testing.assert_array_equal(canvas, _llava_expand2square_mask(m, size))
    back = geo.inverse_mask(canvas)
    assert back.shape == (h, w)
    # Reference inverse: PIL NEAREST resize of the canvas back to the square, then the crop.
    side = max(w, h)
    sq = Image.fromarray(canvas.astype(np.uint8) * 255).resize((side, side), Image.NEAREST)
    top, left = (side - h) // 2, (side - w) // 2
    np.testing.assert_array_equal(back, np.asarray(sq)[top : top + h, left : left + w] > 0)
    if size >= side:  # upsampled: nearest there and back is exact
        np.testing.assert_array_equal(back, m)
    # The padded area is empty after the inverse: a mask on the pad maps to nothing.
    pad_only = np.ones((size, size), bool) & ~geo.forward_mask(np.ones((h, w), bool))
    assert not geo.inverse_mask(pad_only).any()


@pytest.mark.parametrize("w,h", [(641, 480), (640, 427), (333, 500)])
def test_letterbox_does_not_express_expand2square(w, h):
    """Along the padded axis the two maps read different canvas pixels for many original rows
    (or columns): Letterbox pads by whole canvas pixels, expand2square by whole original ones."""
    size = 336
    lb, sq = Letterbox.centered(w, h, size), Expand2Square(w, h, size)
    rows = np.repeat(np.arange(size)[:, None], size, axis=1)  # canvas row index per pixel
    src = rows if w > h else rows.T
    a = lb.inverse_mask(src)[:, 0] if w > h else lb.inverse_mask(src)[0]
    b = sq.inverse_mask(src)[:, 0] if w > h else sq.inverse_mask(src)[0]
    assert (a != b).sum() > 0.1 * min(w, h)
    assert np.abs(a - b).max() == 1


def test_original_resolution_stats_and_geometry_rows():
    w, h, size = 30, 18, 24  # downsampled canvas
    gt = np.zeros((h, w), bool)
    gt[4:12, 6:20] = True
    geo = Expand2Square(w, h, size)
    pred_canvas = geo.forward_mask(gt)
    s = original_resolution_stats(pred_canvas, geo, gt, pool_canvas=pred_canvas[None])
    back = geo.inverse_mask(pred_canvas)
    assert s["inter"] == (back & gt).sum() and s["union"] == (back | gt).sum()
    assert s["oracle_inter"] == s["inter"] and s["has_target"]
    # The accumulator's mask path with geometry maps both masks back through the row vector.
    acc = GresAccumulator(geometry="expand2square", size=size)
    acc.update(
        {
            "pred_mask": pred_canvas[None],
            "gt_mask": geo.forward_mask(gt)[None],
            "letterbox": np.array([[w, h, 0, 0, 0, 0]], np.float32),
            "valid": np.ones(1),
        }
    )
    assert acc.result()["ciou"] == 1.0
    assert acc.sums[0, gres.FIELDS.index("union")] == back.sum()  # original pixels, not canvas
    with pytest.raises(ValueError, match="canvas size"):
        GresAccumulator(geometry="expand2square")
