"""The OneRef rec/res tasks: the box-mask constraint's target (REC: the rasterised GT box, as the
official loader builds it without --enable_seg_mask; RES: the object mask) and the metric
reduction over processes (sums, not means)."""

from __future__ import annotations

import numpy as np
import pytest

from refjax import boxes as bx
from refjax.data import stages
from refjax.data import transforms as tf
from refjax.tasks.oneref import OneRefAccumulator, OneRefData, rasterize_box
from tests.test_transforms import make_scene


def _row(task: OneRefData, scene: dict) -> dict:
    ex = stages.Expand([scene], False, task).map(np.array([0, 0, 0]))
    ex = tf.eval_letterbox(ex, task.size)
    ex.update(text_ids=np.zeros(task.max_len, np.int32),
              text_padding=np.zeros(task.max_len, np.int32))
    return task.row(ex)


def test_rec_target_is_the_rasterised_box_res_the_disc():
    scene = make_scene()  # expression 0 refers to a disc (object 1)
    disc = scene["masks"][1].astype(bool)
    rec = _row(OneRefData(140, 8, 7, box_mask=True), scene)["mask"].astype(bool)
    res = _row(OneRefData(140, 8, 7, box_mask=False), scene)["mask"].astype(bool)
    lb = bx.Letterbox.centered(140, 96, 140)  # identity scale: canvas = padded original
    x0, y0, x1, y1 = np.trunc(bx.mask_to_box(scene["masks"][1])).astype(int)
    want_box = np.zeros((96, 140), bool)
    want_box[y0:y1, x0:x1] = True
    np.testing.assert_array_equal(lb.inverse_mask(rec), want_box)
    np.testing.assert_array_equal(lb.inverse_mask(res), disc)
    corners = want_box & ~disc
    assert corners.sum() > 0.15 * want_box.sum()  # the disc and its box really differ
    assert rec.sum() > res.sum()


def test_rasterize_box_pixel_centres():
    m = rasterize_box(np.array([1.0, 2.0, 4.0, 3.0]), 5, 6)
    assert m.dtype == np.uint8 and m.shape == (5, 6)
    np.testing.assert_array_equal(np.argwhere(m), [[2, 1], [2, 2], [2, 3]])
    # a fractional box covers the pixels whose centres (k + 0.5) it contains: 0.6 <= 1.5 < 2.4
    m = rasterize_box(np.array([0.6, 0.6, 2.4, 2.6]), 4, 4)
    np.testing.assert_array_equal(np.argwhere(m[1]), [[1]])
    np.testing.assert_array_equal(np.argwhere(m[:, 1]), [[1], [2]])


def _rows(correct, iou, inter, union, kinds):
    n = len(correct)
    return {"correct": np.array(correct, bool), "box_iou": np.zeros(n),
            "mask_iou": np.array(iou, float), "mask_inter": np.array(inter, float),
            "mask_union": np.array(union, float), "valid": np.ones(n, np.int32),
            "kind": np.array(kinds, np.int32)}


def test_accumulator_reduces_sums_over_processes(monkeypatch):
    """Two processes with different rows: the reduction adds sums (Acc = hits / count, mIoU =
    sum IoU / count, oIoU = sum I / sum U); a mean of per-process results would differ."""
    from jax.experimental import multihost_utils

    a = OneRefAccumulator()
    a.update(_rows([1, 0, 1], [0.5, 0.0, 1.0], [5, 0, 10], [10, 4, 10], [1, 1, 2]))
    b = OneRefAccumulator()
    b.update(_rows([1], [0.25], [1], [4], [2]))

    # Record what each process would send (the kind-set hash check, then the packed sums)...
    seq = {}
    for acc in (a, b):
        seen = []

        def grab(x, tiled=False, seen=seen):
            seen.append(np.asarray(x))
            return np.asarray(x)[None]

        monkeypatch.setattr(multihost_utils, "process_allgather", grab)
        acc.allreduce()
        seq[id(acc)] = seen
    calls = iter(range(len(seq[id(a)])))

    # ...and replay both rows through a two-process all-gather.
    def two_process(x, tiled=False):
        i = next(calls)
        return np.stack([seq[id(a)][i], seq[id(b)][i]])

    monkeypatch.setattr(multihost_utils, "process_allgather", two_process)
    res = a.allreduce().result()
    assert res["count"] == 4
    assert res["acc@0.5"] == pytest.approx(3 / 4)
    assert res["miou"] == pytest.approx((0.5 + 0.0 + 1.0 + 0.25) / 4)
    assert res["oiou"] == pytest.approx((5 + 0 + 10 + 1) / (10 + 4 + 10 + 4))
    assert res["spatial/count"] == 2 and res["spatial/oiou"] == pytest.approx(11 / 14)
    mean_of_processes = (a.result()["oiou"] + b.result()["oiou"]) / 2
    assert abs(res["oiou"] - mean_of_processes) > 0.05
